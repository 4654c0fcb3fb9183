"""The parts a decoder layer is made of: norms, attention, the dense MLP. Small functions over `ir.Value`s.

Each takes the emitter `e` (graph builder, spec, tensor names, weight helpers) and the layer index;
what a part does is decided by the spec alone, never by which family is being built. A token mixer
(attention here) also takes the layer's past state and returns its present state; it is chosen for a
layer by kind from graph/kinds.py's table, with the states it declares (`attention_states`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from ..errors import CheckpointError, ConfigError
from ..runs_on import rotary_in_gqa
from . import attention_extras as X
from .builder import MS
from .state import SEQ, State

if TYPE_CHECKING:
    from ..spec import ModelSpec
    from .emitter import Emitter


@dataclass(frozen=True)
class Stream:
    """The hidden state as `x + residual` (residual None: just x), so the add can fuse into the next norm."""

    x: ir.Value
    residual: ir.Value | None = None

    def scaled(self, e: "Emitter", node: str) -> "Stream":
        """Granite's residual multiplier on the branch output."""
        if e.spec.residual_scale == 1.0:
            return self
        return Stream(e.b.op("Mul", [self.x, e.scalar(e.spec.residual_scale)], f"{node}/Mul"), self.residual)

    def total(self, e: "Emitter", node: str) -> ir.Value:
        return self.x if self.residual is None else e.b.op("Add", [self.residual, self.x], f"{node}/Add")


# -- norms ---------------------------------------------------------------------------------------
def _norm_inputs(e: "Emitter", module: str | None, node: str, size: int) -> list[ir.Value | None]:
    """gamma (and beta) of a norm; a non-parametric norm gets constant ones."""
    n = e.spec.norm
    if not n.weight:
        return [e.ones(size)]
    gamma = e.vector(node, f"{module}.weight", size, n.weight_offset)
    if n.kind == "layer" and n.bias:
        return [gamma, e.vector(node, f"{module}.bias", size)]
    return [gamma]


def norm(e: "Emitter", h: Stream, role: str, i: int | None, node: str, size: int | None = None) -> tuple[ir.Value, ir.Value]:
    """Normalize the stream; returns (normed, the stream's total). A pending residual fuses into a Skip norm."""
    n, size = e.spec.norm, size or e.spec.hidden_size
    module = e.names.module(role, i) if n.weight else None
    params = _norm_inputs(e, module, node, size)
    if h.residual is None:
        return plain_norm_op(e, h.x, params, node), h.x
    if n.kind == "rms":
        y, _m, _v, total = e.b.op("SkipSimplifiedLayerNormalization", [h.x, h.residual, *params],
                                  f"{node}/SkipLayerNorm", domain=MS, n_out=4, epsilon=n.eps)
    else:
        y, _m, _v, total = e.b.op("SkipLayerNormalization", [h.x, h.residual, *params], f"{node}/SkipLayerNorm",
                                  domain=MS, n_out=4, epsilon=n.eps)
    _m.name = _v.name = ""
    return y, total


def plain_norm_op(e: "Emitter", x: ir.Value, params: list, node: str) -> ir.Value:
    n = e.spec.norm
    if n.kind == "rms":
        return e.b.op("SimplifiedLayerNormalization", [x, *params], f"{node}/LayerNorm", axis=-1, epsilon=n.eps,
                      stash_type=1)
    return e.b.op("LayerNormalization", [x, *params], f"{node}/LayerNorm", axis=-1, epsilon=n.eps, stash_type=1)


def plain_norm(e: "Emitter", x: ir.Value, role: str, i: int | None, node: str, size: int | None = None) -> ir.Value:
    """A norm on a branch output (post-norms of sandwich and post blocks), no residual involved."""
    size = size or e.spec.hidden_size
    module = e.names.module(role, i) if e.spec.norm.weight else None
    return plain_norm_op(e, x, _norm_inputs(e, module, node, size), node)


def head_norm(e: "Emitter", x: ir.Value, i: int, which: str, heads: int) -> ir.Value:
    """q/k norm over each head (Qwen3, Gemma 3): Reshape -> norm -> Reshape."""
    a, b = e.spec.attention_of(i), e.b
    node = f"/model/layers.{i}/attn/{which}_norm"
    view = b.op("Reshape", [x, b.const([0, 0, heads, a.head_dim], np.int64)], f"{node}/Reshape")
    y = plain_norm(e, view, f"{which}_norm", i, node, a.head_dim)
    return b.op("Reshape", [y, b.const([0, 0, heads * a.head_dim], np.int64)], f"{node}/Reshape_1")


# -- attention -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttnInputs:
    """What every layer's GroupQueryAttention shares: lengths and the rotary tables by layer type."""

    seqlens_k: ir.Value
    total_len: ir.Value
    rotary: dict[str, tuple[ir.Value, ir.Value]]
    positions: ir.Value | None = None  # (batch, seq) int64, for rotary applied outside GQA (Emitter.positions)
    biases: dict = field(default_factory=dict)  # GQA attention_bias by chunk size (graph/attention_extras.py)
    kv: dict = field(default_factory=dict)  # layer -> what its GQA took (k, v, past, attributes, cos/sin): KV sharing
    mask: ir.Value | None = None  # the attention_mask input (batch, total) int64: padding for the recurrent mixers
    chunk: dict = field(default_factory=dict)  # "padding": (keep, lengths) of this run's tokens, made once


def chunk_padding(e: "Emitter", ctx: AttnInputs, x: ir.Value) -> tuple[ir.Value, ir.Value]:
    """(keep (B, S, 1) in the activations' dtype, lengths (B, 1) int64) for the tokens of this run: 1 / their count
    where attention_mask's last S columns mark real tokens. onnxruntime-genai right-pads a batch's prompts
    (position_inputs.cpp: trailing pad tokens get mask 0) and feeds a finished sequence pad tokens with mask 0, so
    a recurrent mixer (conv, gated delta, Mamba2) must carry its state past padding unchanged: the real tokens of a
    run are its first `lengths`. With no padding (batch 1) keep is all ones and lengths is S."""
    if "padding" not in ctx.chunk:
        if ctx.mask is None:
            raise ValueError("the recurrent mixers need the attention mask (AttnInputs.mask)")
        b, base = e.b, "/model/pad_mask"
        seq = b.op("Slice", [b.op("Shape", [x], f"{base}/Shape"), b.const([1], np.int64), b.const([2], np.int64)],
                   f"{base}/Slice")
        cols = b.op("Slice", [ctx.mask, b.op("Neg", [seq], f"{base}/Neg"),
                              b.const([np.iinfo(np.int64).max], np.int64), b.const([1], np.int64)], f"{base}/Slice_1")
        lengths = b.op("ReduceSum", [cols, b.const([1], np.int64)], f"{base}/ReduceSum", keepdims=1)
        keep = b.op("Cast", [b.op("Unsqueeze", [cols, b.const([2], np.int64)], f"{base}/Unsqueeze")], f"{base}/Cast",
                    to=e.io.ir_dtype)
        ctx.chunk["padding"] = (keep, lengths)
    return ctx.chunk["padding"]


def conv_state_after(e: "Emitter", ctx: AttnInputs, x: ir.Value, past: ir.Value, t: ir.Value, kernel: int,
                     node: str) -> ir.Value:
    """A causal conv's state after this run, (B, C, kernel - 1): the last kernel - 1 inputs up to each row's last
    real token (past then the run's inputs `t` (B, C, S)), so right padding leaves the state as the real tokens
    left it (CausalConvWithState's own present would end on the padding)."""
    b = e.b
    _, lengths = chunk_padding(e, ctx, x)
    full = b.op("Concat", [past, t], f"{node}/state/Concat", axis=2)  # (B, C, kernel - 1 + S)
    idx = b.op("Add", [lengths, b.const(np.arange(kernel - 1, dtype=np.int64)[None, :])], f"{node}/state/Add")
    idx = b.op("Expand", [b.op("Unsqueeze", [idx, b.const([1], np.int64)], f"{node}/state/Unsqueeze"),
                          b.op("Shape", [past], f"{node}/state/Shape")], f"{node}/state/Expand")
    return b.op("GatherElements", [full, idx], f"{node}/state/GatherElements", axis=2)


def rotary_outside(e: "Emitter", x: ir.Value, heads: int, rope, caches, positions, node: str) -> ir.Value:
    """RoPE on (B, S, heads x head_dim) with com.microsoft RotaryEmbedding, from the caches GQA would take."""
    return e.b.op("RotaryEmbedding", [x, positions, *caches], f"{node}/RotaryEmbedding", domain=MS, num_heads=heads,
                  rotary_embedding_dim=rope.rotary_dim, interleaved=int(rope.interleaved))


def rotary_before_attention(spec: "ModelSpec", i: int) -> bool:
    """Whether layer i's rotary is applied to q and k before GroupQueryAttention (RotaryEmbedding) instead of
    inside it: a rotary GQA cannot take (runs_on.rotary_in_gqa), or q/k norms that follow the rotary."""
    a, layer = spec.attention_of(i), spec.layers[i]
    if layer.rope is None or layer.kind != "attention":
        return False
    return (a.qk_norm_after_rope and bool(a.qk_norm)) or not rotary_in_gqa(a.head_dim, spec.rope_for(layer.rope).rotary_dim)


def attention_states(spec: "ModelSpec", i: int) -> tuple[State, ...]:
    """The KV cache of an attention layer: key and value, (batch, kv heads, sequence, head_dim), the layer's own
    sizes (onnxruntime-genai reads a cache shape per layer from these inputs)."""
    a = spec.attention_of(i)
    dims = ("batch_size", a.num_kv_heads, SEQ, a.head_dim)
    return tuple(State(f"past_key_values.%d.{kv}", f"present.%d.{kv}", kv, dims) for kv in ("key", "value"))


def attention(e: "Emitter", i: int, x: ir.Value, ctx: AttnInputs, past: tuple[ir.Value, ...]
              ) -> tuple[ir.Value, tuple[ir.Value, ...]]:
    """GroupQueryAttention over the layer's KV cache (`past`: key, value); returns (output, (key, value))."""
    a, H, layer = e.spec.attention_of(i), e.spec.hidden_size, e.spec.layers[i]
    base = f"/model/layers.{i}/attn"
    if layer.kv_source >= 0:
        return reused_kv_attention(e, i, x, ctx)
    q_rows = 2 * a.q_size if a.output_gate else a.q_size  # [q, gate] per head (Qwen3-Next, Qwen3.5)
    roles = [("q", f"{base}/q_proj", q_rows), ("k", f"{base}/k_proj", a.kv_size), ("v", f"{base}/v_proj", a.kv_size)]
    qkv = e.linear_group(x, f"{base}/qkv_proj", i, roles[:2] if layer.k_eq_v else roles, H, bias=a.qkv_bias)
    if layer.k_eq_v:  # no v_proj: v is the key projection, before the k norm and rotary (Gemma 4)
        qkv = [*e.split(qkv, [q_rows, a.kv_size], f"{base}/qkv_proj")]
        qkv.append(qkv[1])
    if a.v_norm:  # a weightless RMS norm of v per head
        q, k, v = e.split(qkv, [q_rows, a.kv_size, a.kv_size], f"{base}/qkv_proj")
        qkv = [q, k, X.l2_head_norm(e, v, i, "v", a.num_kv_heads)]
    gate = None
    if a.output_gate:
        q, k, v = e.split(qkv, [q_rows, a.kv_size, a.kv_size], f"{base}/qkv_proj")
        q, gate = query_and_gate(e, q, i)
        qkv = [q, k, v]
    if a.qk_norm:
        q, k, v = e.split(qkv, [a.q_size, a.kv_size, a.kv_size], f"{base}/qkv_proj")
        if a.qk_norm_after_rope and layer.rope is not None:  # HunYuan: rotary, then the norms
            rope, caches = e.spec.rope_for(layer.rope), ctx.rotary[layer.rope]
            q = rotary_outside(e, q, a.num_heads, rope, caches, ctx.positions, f"{base}/q_rotary")
            k = rotary_outside(e, k, a.num_kv_heads, rope, caches, ctx.positions, f"{base}/k_rotary")
        if a.qk_norm == "head":
            q, k = head_norm(e, q, i, "q", a.num_heads), head_norm(e, k, i, "k", a.num_kv_heads)
        elif a.qk_norm == "l2":  # no weight, the layers with rotary only (Llama 4)
            if layer.rope is not None:
                q, k = X.l2_head_norm(e, q, i, "q", a.num_heads), X.l2_head_norm(e, k, i, "k", a.num_kv_heads)
        else:  # "full": one norm over the whole projection (OLMo 2)
            q = plain_norm(e, q, "q_norm", i, f"{base}/q_norm", a.q_size)
            k = plain_norm(e, k, "k_norm", i, f"{base}/k_norm", a.kv_size)
        qkv = [q, k, v]
    if a.clip_qkv:  # after the q/k norms where a model has both (OLMoE)
        lo, hi = e.scalar(-a.clip_qkv), e.scalar(a.clip_qkv)
        qkv = [e.float32_op("Clip", [t, lo, hi], f"{base}/qkv_proj/Clip_{n}", float_in=3) for n, t in enumerate(qkv)]
    if X.needs_positions(e.spec, i):  # the temperature of a layer without rotary (Llama 4)
        q, k, v = e.split(qkv, [a.q_size, a.kv_size, a.kv_size], f"{base}/qkv_proj")
        qkv = [X.nope_temperature(e, i, q, ctx), k, v]
    q, k, v = (qkv + [None, None])[:3]
    attrs = dict(num_heads=a.num_heads, kv_num_heads=a.num_kv_heads, local_window_size=layer.window or -1,
                 softcap=a.softcap)
    if a.scale is not None:
        attrs["scale"] = a.scale
    cos = sin = None
    rope = e.spec.rope_for(layer.rope) if layer.rope is not None else None
    if rope is not None and not rotary_before_attention(e.spec, i):
        cos, sin = ctx.rotary[layer.rope]
        attrs.update(do_rotary=1, rotary_interleaved=int(rope.interleaved))
    elif rope is not None and not a.qk_norm_after_rope:  # a rotary GQA cannot take: applied to q and k before it
        q, k, v = e.split(qkv, [a.q_size, a.kv_size, a.kv_size], f"{base}/qkv_proj")
        q = rotary_outside(e, q, a.num_heads, rope, ctx.rotary[layer.rope], ctx.positions, f"{base}/q_rotary")
        k = rotary_outside(e, k, a.num_kv_heads, rope, ctx.rotary[layer.rope], ctx.positions, f"{base}/k_rotary")
    tail = [None, X.chunk_bias(e, layer.chunk, q, ctx) if layer.chunk else None, None]  # position_ids, bias, sink
    if a.sinks:  # GQA's head_sink, after position_ids and attention_bias
        name = e.names.tensor("sinks", i)
        if name is None:
            raise CheckpointError(f"layer {i}: the attention sinks (self_attn.sinks) are missing from the checkpoint")
        tail[2] = e.vector(f"{base}/GroupQueryAttention", name, a.num_heads)
    while tail and tail[-1] is None:
        tail.pop()
    ctx.kv[i] = (k, v, tuple(past), attrs, (cos, sin))
    out, present_k, present_v = e.b.op(
        "GroupQueryAttention", [q, k, v, *past, ctx.seqlens_k, ctx.total_len, cos, sin, *tail],
        f"{base}/GroupQueryAttention", domain=MS, n_out=3, **attrs)
    if gate is not None:
        out = e.b.op("Mul", [out, e.b.op("Sigmoid", [gate], f"{base}/gate/Sigmoid")], f"{base}/gate/Mul")
    (o,) = e.linear_group(out, f"{base}/o_proj", i, [("o", f"{base}/o_proj", H)], a.q_size, bias=a.o_bias)
    return o, (present_k, present_v)


def reused_kv_attention(e: "Emitter", i: int, x: ir.Value, ctx: AttnInputs) -> tuple[ir.Value, tuple[ir.Value, ...]]:
    """A layer with no keys and values of its own (LayerSpec.kv_source): its query attends to the source layer's,
    by a GroupQueryAttention fed the source's new keys / values and past cache, so its present cache equals the
    source's (carried as the layer's own state, which it never reads)."""
    a, H, layer = e.spec.attention_of(i), e.spec.hidden_size, e.spec.layers[i]
    base, src = f"/model/layers.{i}/attn", layer.kv_source
    if src not in ctx.kv:
        raise ConfigError(f"layer {i} reuses the keys and values of layer {src}, which has none of its own")
    k, v, past, attrs, (cos, sin) = ctx.kv[src]
    (q,) = e.linear_group(x, f"{base}/q_proj", i, [("q", f"{base}/q_proj", a.q_size)], H, bias=a.qkv_bias)
    if a.qk_norm == "head":
        q = head_norm(e, q, i, "q", a.num_heads)
    elif a.qk_norm:
        raise ConfigError(f"layer {i}: a q/k norm of kind {a.qk_norm!r} with reused keys and values is not built")
    if layer.rope is not None and cos is None:  # the source's rotary was applied before its GQA: so is this one's
        q = rotary_outside(e, q, a.num_heads, e.spec.rope_for(layer.rope), ctx.rotary[layer.rope], ctx.positions,
                           f"{base}/q_rotary")
    out, present_k, present_v = e.b.op(
        "GroupQueryAttention", [q, k, v, *past, ctx.seqlens_k, ctx.total_len, cos, sin],
        f"{base}/GroupQueryAttention", domain=MS, n_out=3, **attrs)
    (o,) = e.linear_group(out, f"{base}/o_proj", i, [("o", f"{base}/o_proj", H)], a.q_size, bias=a.o_bias)
    return o, (present_k, present_v)


def query_and_gate(e: "Emitter", q: ir.Value, i: int) -> tuple[ir.Value, ir.Value]:
    """q_proj's output holds [q, gate] per head: (B, S, heads x 2 head_dim) -> q and gate, each (B, S, q_size)."""
    a, b, node = e.spec.attention_of(i), e.b, f"/model/layers.{i}/attn/q_gate"
    view = b.op("Reshape", [q, b.const([0, 0, a.num_heads, 2 * a.head_dim], np.int64)], f"{node}/Reshape")
    q, gate = b.op("Split", [view, b.const([a.head_dim, a.head_dim], np.int64)], f"{node}/Split", n_out=2, axis=-1)
    flat = b.const([0, 0, a.q_size], np.int64)
    return (b.op("Reshape", [q, flat], f"/model/layers.{i}/attn/q_proj/Reshape"),
            b.op("Reshape", [gate, flat], f"/model/layers.{i}/attn/gate/Reshape"))


# -- MLP -----------------------------------------------------------------------------------------
def dense_mlp(e: "Emitter", i: int, x: ir.Value, roles: tuple[str, str, str] = ("gate", "up", "down"),
              base: str | None = None, size: int | None = None) -> ir.Value:
    """act(gate) * up -> down (or act(up) -> down); `roles`, `base` and `size` serve other dense MLPs of
    the layer too (a mixture of experts' shared expert)."""
    m, H = e.spec.mlp, e.spec.hidden_size
    I = size or e.spec.layers[i].mlp_size or m.intermediate_size
    base = base or f"/model/layers.{i}/mlp"
    gate_role, up_role, down_role = roles
    if m.gated:
        gate, up = e.split(e.linear_group(x, f"{base}/gate_up_proj", i, [(gate_role, f"{base}/gate_proj", I),
                                                                        (up_role, f"{base}/up_proj", I)], H, bias=m.bias),
                           [I, I], f"{base}/gate_up_proj")
        h = e.b.op("Mul", [activation(e, gate, f"{base}/act_fn"), up], f"{base}/Mul")
    else:
        (up,) = e.linear_group(x, f"{base}/up_proj", i, [(up_role, f"{base}/up_proj", I)], H, bias=m.bias)
        h = activation(e, up, f"{base}/act_fn")
    (y,) = e.linear_group(h, f"{base}/down_proj", i, [(down_role, f"{base}/down_proj", H)], I, bias=m.bias)
    return y


ACTIVATIONS = ("silu", "swish", "gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu", "relu", "relu2")


def activation(e: "Emitter", x: ir.Value, node: str) -> ir.Value:
    act, b = e.spec.mlp.activation, e.b
    if act in ("silu", "swish"):
        return b.op("Mul", [x, b.op("Sigmoid", [x], f"{node}/Sigmoid")], f"{node}/Mul")
    if act in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        return b.op("FastGelu", [x], f"{node}/FastGelu", domain=MS)
    if act == "gelu":
        return b.op("Gelu", [x], f"{node}/Gelu", domain=MS)
    if act == "relu":
        return b.op("Relu", [x], f"{node}/Relu")
    if act == "relu2":  # squared ReLU (Nemotron)
        r = b.op("Relu", [x], f"{node}/Relu")
        return b.op("Mul", [r, r], f"{node}/Mul")
    raise ConfigError(f"activation {act!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
