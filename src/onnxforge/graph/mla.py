"""Multi-head latent attention (DeepSeek-V2 / V3, Kimi-K2): the token mixer of layers of kind "mla".

As transformers' DeepseekV3Attention computes it:
  q       = q_b_proj(rms(q_a_proj(x)))  (or q_proj(x) where q_lora_rank is null), per head [q_nope, q_rope];
  latent, k_rope = split(kv_a_proj_with_mqa(x), [kv_lora_rank, qk_rope_head_dim]);
  k_nope, v = per head split(kv_b_proj(rms(latent)), [qk_nope_head_dim, v_head_dim]);
  k       = per head [k_nope, k_rope] with the one rotary key shared by every head;
  the rotary on the rope dims only; softmax scale 1/sqrt(qk_head_dim) x mscale(factor, mscale_all_dim)^2
  (AttentionSpec.scale, archs/deepseek.py).

It runs on GroupQueryAttention with num_heads = kv_num_heads and one head size P = max(qk_head_dim,
v_head_dim) for q, k and v (the op takes one head size; the KV cache is (batch, heads, seq, P) each):
  * q and k are laid out per head as [rope dims, nope dims]: a permutation of the dims applied to both leaves
    q.k unchanged, and GQA's own rotary (do_rotary, its rotary_dim from the cos cache) rotates the first
    rope_dim dims of each head. With rope_interleave (the default) transformers rotates adjacent pairs
    (x0, x1), (x2, x3), ... and writes them de-interleaved, again the same permutation on q and k: GQA's
    rotary_interleaved=1 gives the same scores;
  * v (v_head_dim) is zero-padded to P (q and k where v_head_dim is the larger), the output sliced back
    per head to v_head_dim before o_proj: the padded dims add exactly 0.
So the KV cache holds the up-projected k and v of every head (2 x heads x P values per token and layer),
not the compressed latent (kv_lora_rank + qk_rope_head_dim): docs/design.md gives the sizes.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from ..errors import ConfigError
from ..runs_on import rotary_in_gqa
from .builder import MS, TensorSlot, WeightJob
from .state import SEQ, State

if TYPE_CHECKING:
    from ..spec import ModelSpec
    from .emitter import Emitter
    from .parts import AttnInputs


def head_size(spec: "ModelSpec") -> int:
    """The one head size q, k and v take in GroupQueryAttention (and the KV cache)."""
    m = spec.mla
    return max(m.qk_dim, m.v_dim)


def mla_states(spec: "ModelSpec", i: int) -> tuple[State, ...]:
    """The KV cache: k and v of every head after the up-projection, (batch, heads, sequence, P); with the latent
    cache one shared head of kv_lora_rank + rope_dim, (batch, 1, sequence, D), k = [k_rope, latent] and
    v = [latent, zeros]."""
    m = spec.mla
    if m.latent_cache:
        dims = ("batch_size", 1, SEQ, m.kv_lora_rank + m.rope_dim)
        return tuple(State(f"past_key_values.%d.{kv}", f"present.%d.{kv}", kv, dims) for kv in ("key", "value"))
    dims = ("batch_size", spec.attention.num_heads, SEQ, head_size(spec))
    return tuple(State(f"past_key_values.%d.{kv}", f"present.%d.{kv}", kv, dims) for kv in ("key", "value"))


def _latent_norm(e: "Emitter", x: ir.Value, role: str, i: int, node: str, size: int) -> ir.Value:
    name = f"{e.names.module(role, i)}.weight"
    gamma = e.vector(node, name, size)
    return e.b.op("SimplifiedLayerNormalization", [x, gamma], f"{node}/LayerNorm", axis=-1,
                  epsilon=e.spec.mla.latent_eps, stash_type=1)


def _heads(e: "Emitter", x: ir.Value, heads: int, size: int, node: str) -> ir.Value:
    return e.b.op("Reshape", [x, e.b.const([0, 0, heads, size], np.int64)], node)


def _pad(e: "Emitter", x: ir.Value, by: int, node: str) -> ir.Value:
    """Zeros appended to the last axis of a (B, S, heads, d) tensor: Concat with zeros Expanded to (B, S, heads,
    by), not Pad, which has no bfloat16 kernel in onnxruntime's CUDA or CPU provider (a bf16 build's session then
    failed to initialise: "Provider type for ... node is not set")."""
    if by == 0:
        return x
    b = e.b
    lead = b.op("Slice", [b.op("Shape", [x], f"{node}/Shape"), b.const([0], np.int64), b.const([3], np.int64)],
                f"{node}/Slice")
    shape = b.op("Concat", [lead, b.const([by], np.int64)], f"{node}/Concat_shape", axis=0)
    zeros = b.op("Expand", [b.const(np.zeros((1, 1, 1, by), e.io.np_dtype)), shape], f"{node}/Expand")
    return b.op("Concat", [x, zeros], f"{node}/Concat", axis=-1)


def _absorbed(e: "Emitter", i: int, base: str) -> tuple[ir.Value, ir.Value]:
    """kv_b_proj split per head for the latent form, in the activations' dtype: W_UK (heads, nope, R) that takes a
    head's q_nope into the latent space, and W_UV^T (heads, R, v) that takes its attention over the latent to v."""
    m, nh = e.spec.mla, e.spec.attention.num_heads
    name = e.names.weight("kv_b", i)
    R, per = m.kv_lora_rank, m.nope_dim + m.v_dim
    e.expect(name, (nh * per, R))

    def produce():
        w = e.source.read(name).astype(np.float32).reshape(nh, per, R)
        return [np.ascontiguousarray(w[:, :m.nope_dim, :]).astype(e.io.np_dtype),
                np.ascontiguousarray(w[:, m.nope_dim:, :].transpose(0, 2, 1)).astype(e.io.np_dtype)]

    slots = (TensorSlot(f"model.layers.{i}.attn.kv_b_proj.w_uk", e.io.ir_dtype, (nh, m.nope_dim, R)),
             TensorSlot(f"model.layers.{i}.attn.kv_b_proj.w_uv_t", e.io.ir_dtype, (nh, R, m.v_dim)))
    uk, uv = e.b.weights(WeightJob(f"{base}/kv_b_proj", slots, produce, e.io.describe(), (name,)))
    return uk, uv


def _per_head_matmul(e: "Emitter", x: ir.Value, w: ir.Value, node: str) -> ir.Value:
    """(B, S, heads, a) x (heads, a, c) -> (B, S, heads, c): each head by its own matrix."""
    b = e.b
    t = b.op("Transpose", [x], f"{node}/Transpose", perm=[0, 2, 1, 3])  # (B, heads, S, a)
    y = b.op("MatMul", [t, w], f"{node}/MatMul")  # broadcast over B: (B, heads, S, c)
    return b.op("Transpose", [y], f"{node}/Transpose_1", perm=[0, 2, 1, 3])


def _latent_attention(e: "Emitter", i: int, q: ir.Value, latent: ir.Value, k_rope: ir.Value, ctx: "AttnInputs",
                      past: tuple[ir.Value, ...], base: str) -> tuple[ir.Value, tuple[ir.Value, ...]]:
    """The absorbed form over the compressed cache: q_h = [q_rope_h, q_nope_h W_UK_h] against one shared key
    [k_rope, latent] (q.k unchanged: q_nope.k_nope = q_nope W_UK latent), values [latent, zeros] (GQA takes one
    head size), each head's output over the latent times W_UV_h^T, so the cache holds kv_lora_rank + rope_dim
    values twice per token and layer instead of 2 x heads x P."""
    spec, b = e.spec, e.b
    m, a, H, layer = spec.mla, spec.attention, spec.hidden_size, spec.layers[i]
    nh, R = a.num_heads, m.kv_lora_rank
    D = R + m.rope_dim
    rope = spec.rope_for(layer.rope)
    if not rotary_in_gqa(D, m.rope_dim):
        raise ConfigError(f"layer {i}: mla_cache=latent rotates qk_rope_head_dim {m.rope_dim} of a head of {D} "
                          "(kv_lora_rank + qk_rope_head_dim) inside GroupQueryAttention, which needs both to be "
                          "multiples of 16; use mla_cache=full")
    uk, uv = _absorbed(e, i, base)
    q_nope, q_rope = b.op("Split", [_heads(e, q, nh, m.qk_dim, f"{base}/q/Reshape"),
                                    b.const([m.nope_dim, m.rope_dim], np.int64)], f"{base}/q/Split", n_out=2, axis=-1)
    q_lat = _per_head_matmul(e, q_nope, uk, f"{base}/q_absorb")  # (B, S, heads, R)
    q = b.op("Reshape", [b.op("Concat", [q_rope, q_lat], f"{base}/q/Concat", axis=-1), b.const([0, 0, nh * D], np.int64)],
             f"{base}/q/Reshape_1")
    k = b.op("Concat", [k_rope, latent], f"{base}/k/Concat", axis=-1)  # (B, S, D): one kv head
    v = _pad(e, b.op("Unsqueeze", [latent, b.const([2], np.int64)], f"{base}/v/Unsqueeze"), m.rope_dim, f"{base}/v/Pad")
    v = b.op("Reshape", [v, b.const([0, 0, D], np.int64)], f"{base}/v/Reshape")
    cos, sin = ctx.rotary[layer.rope]
    out, present_k, present_v = b.op(
        "GroupQueryAttention", [q, k, v, *past, ctx.seqlens_k, ctx.total_len, cos, sin], f"{base}/GroupQueryAttention",
        domain=MS, n_out=3, num_heads=nh, kv_num_heads=1, scale=a.scale, do_rotary=1,
        rotary_interleaved=int(rope.interleaved), local_window_size=-1)
    out = b.op("Slice", [_heads(e, out, nh, D, f"{base}/out/Reshape"), b.const([0], np.int64), b.const([R], np.int64),
                         b.const([-1], np.int64)], f"{base}/out/Slice")  # each head's attention over the latent
    out = _per_head_matmul(e, out, uv, f"{base}/out_absorb")  # (B, S, heads, v)
    out = b.op("Reshape", [out, b.const([0, 0, nh * m.v_dim], np.int64)], f"{base}/out/Reshape_1")
    (o,) = e.linear_group(out, f"{base}/o_proj", i, [("o", f"{base}/o_proj", H)], nh * m.v_dim, bias=a.o_bias)
    return o, (present_k, present_v)


def mla(e: "Emitter", i: int, x: ir.Value, ctx: "AttnInputs", past: tuple[ir.Value, ...]
        ) -> tuple[ir.Value, tuple[ir.Value, ...]]:
    """Latent attention over the layer's KV cache (`past`: key, value); returns (output, (key, value))."""
    spec, b = e.spec, e.b
    m, a, H, layer = spec.mla, spec.attention, spec.hidden_size, spec.layers[i]
    nh, P = a.num_heads, head_size(spec)
    base = f"/model/layers.{i}/attn"
    rope = spec.rope_for(layer.rope) if layer.rope is not None else None
    if rope is None or rope.rotary_dim != m.rope_dim or not rotary_in_gqa(P, m.rope_dim):
        raise ConfigError(f"layer {i}: latent attention rotates qk_rope_head_dim {m.rope_dim} of a head of {P} inside "
                          "GroupQueryAttention, which needs both to be multiples of 16 (every DeepSeek-V3 / Kimi-K2 "
                          "checkpoint has 64 of 192)")
    kv_rows = m.kv_lora_rank + m.rope_dim
    # the two projections of x: q_a_proj (or q_proj) and kv_a_proj_with_mqa, one MatMul where stored alike
    if m.q_lora_rank:
        qa, kva = e.split(e.linear_group(x, f"{base}/qa_kva_proj", i, [("q_a", f"{base}/q_a_proj", m.q_lora_rank),
                                                                         ("kv_a", f"{base}/kv_a_proj", kv_rows)],
                                         H, bias=a.qkv_bias), [m.q_lora_rank, kv_rows], f"{base}/qa_kva_proj")
        qa = _latent_norm(e, qa, "q_a_norm", i, f"{base}/q_a_norm", m.q_lora_rank)
        (q,) = e.linear_group(qa, f"{base}/q_b_proj", i, [("q_b", f"{base}/q_b_proj", nh * m.qk_dim)], m.q_lora_rank)
    else:  # q_proj has no bias; kv_a_proj_with_mqa has attention_bias
        (q,) = e.linear_group(x, f"{base}/q_proj", i, [("q", f"{base}/q_proj", nh * m.qk_dim)], H)
        (kva,) = e.linear_group(x, f"{base}/kv_a_proj", i, [("kv_a", f"{base}/kv_a_proj", kv_rows)], H,
                                bias=a.qkv_bias)
    latent, k_rope = b.op("Split", [kva, b.const([m.kv_lora_rank, m.rope_dim], np.int64)], f"{base}/kv_a_proj/Split",
                          n_out=2, axis=-1)
    latent = _latent_norm(e, latent, "kv_a_norm", i, f"{base}/kv_a_norm", m.kv_lora_rank)
    if m.latent_cache:
        return _latent_attention(e, i, q, latent, k_rope, ctx, past, base)
    (kv,) = e.linear_group(latent, f"{base}/kv_b_proj", i, [("kv_b", f"{base}/kv_b_proj", nh * (m.nope_dim + m.v_dim))],
                           m.kv_lora_rank)
    k_nope, v = b.op("Split", [_heads(e, kv, nh, m.nope_dim + m.v_dim, f"{base}/kv_b_proj/Reshape"),
                               b.const([m.nope_dim, m.v_dim], np.int64)], f"{base}/kv_b_proj/Split", n_out=2, axis=-1)
    # per head [rope, nope]: GQA's rotary rotates the first rope_dim dims of each head
    q_nope, q_rope = b.op("Split", [_heads(e, q, nh, m.qk_dim, f"{base}/q/Reshape"),
                                    b.const([m.nope_dim, m.rope_dim], np.int64)], f"{base}/q/Split", n_out=2, axis=-1)
    q = _pad(e, b.op("Concat", [q_rope, q_nope], f"{base}/q/Concat", axis=-1), P - m.qk_dim, f"{base}/q/Pad")
    shared = b.op("Unsqueeze", [k_rope, b.const([2], np.int64)], f"{base}/k_rope/Unsqueeze")  # (B, S, 1, rope)
    shared = b.op("Expand", [shared, b.const([1, 1, nh, 1], np.int64)], f"{base}/k_rope/Expand")
    k = _pad(e, b.op("Concat", [shared, k_nope], f"{base}/k/Concat", axis=-1), P - m.qk_dim, f"{base}/k/Pad")
    v = _pad(e, v, P - m.v_dim, f"{base}/v/Pad")
    flat = b.const([0, 0, nh * P], np.int64)
    q, k, v = (b.op("Reshape", [t, flat], f"{base}/{n}/Reshape_1") for t, n in ((q, "q"), (k, "k"), (v, "v")))
    cos, sin = ctx.rotary[layer.rope]
    out, present_k, present_v = b.op(
        "GroupQueryAttention", [q, k, v, *past, ctx.seqlens_k, ctx.total_len, cos, sin], f"{base}/GroupQueryAttention",
        domain=MS, n_out=3, num_heads=nh, kv_num_heads=nh, scale=a.scale, do_rotary=1,
        rotary_interleaved=int(rope.interleaved), local_window_size=-1)
    if P != m.v_dim:  # each head's first v_head_dim dims
        out = b.op("Slice", [_heads(e, out, nh, P, f"{base}/out/Reshape"), b.const([0], np.int64),
                             b.const([m.v_dim], np.int64), b.const([-1], np.int64)], f"{base}/out/Slice")
        out = b.op("Reshape", [out, b.const([0, 0, nh * m.v_dim], np.int64)], f"{base}/out/Reshape_1")
    (o,) = e.linear_group(out, f"{base}/o_proj", i, [("o", f"{base}/o_proj", H)], nh * m.v_dim, bias=a.o_bias)
    return o, (present_k, present_v)
