"""Gated delta-net linear attention (Qwen3.5 and Qwen3-Next "linear_attention" layers), a layer kind of
graph/kinds.py.

  [q, k, v] = act(causal_depthwise_conv(in_proj_qkv(h)))           conv state: the last kernel - 1 inputs
  q, k      = l2norm per head;  g = -exp(A_log) * softplus(a + dt_bias);  beta = sigmoid(b)
  S_t       = exp(g_t) S_{t-1} + k_t (beta_t (v_t - exp(g_t) S_{t-1}^T k_t))^T      recurrent state S
  y_t       = S_t^T q_t / sqrt(key_dim);   out = out_proj(rmsnorm(y) * silu(z))   per value head

Every step is a com.microsoft op with a CPU kernel in onnxruntime 1.31.1: CausalConvWithState (the conv and
its state), LinearAttentionGate (g and beta), LinearAttention with update_rule gated_delta (prefill over a
whole prompt and single-token decode alike, from the carried state), GatedRMSNorm. GatedDeltaNet, which
fuses more, has no CPU kernel there (docs/design.md). The state names and shapes are onnxruntime-genai
0.18's for Qwen3.5 (`past.%d.conv` (batch, conv channels, kernel - 1) and `past.%d.recurrent`
(batch, value heads, key_dim, value_dim)), so genai_config.json is what its runtime reads.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from ..archs.names import Part
from ..errors import CheckpointError, ConfigError
from . import weights as W
from .builder import MS, TensorSlot, WeightJob
from .parts import AttnInputs, activation, chunk_padding, conv_state_after
from .state import State

if TYPE_CHECKING:
    from ..spec import LinearAttnSpec, ModelSpec
    from .emitter import Emitter

L2_EPS = 1e-6  # transformers' l2norm: x / sqrt(sum(x^2) + 1e-6)


def _settings(spec: "ModelSpec", i: int) -> "LinearAttnSpec":
    if spec.linear is None:
        raise ConfigError(f"layer {i} is a linear-attention layer, but the family gives no linear-attention settings")
    return spec.linear


def gated_delta_states(spec: "ModelSpec", i: int) -> tuple[State, ...]:
    """The conv inputs and the recurrent state of the delta rule, zeros at the start."""
    la = _settings(spec, i)
    return (State("past.%d.conv", "present.%d.conv", "conv", ("batch_size", la.conv_channels, la.kernel - 1)),
            State("past.%d.recurrent", "present.%d.recurrent", "recurrent",
                  ("batch_size", la.value_heads, la.key_dim, la.value_dim)))


def _rows(e: "Emitter", i: int) -> dict[str, list[Part]]:
    """The checkpoint rows of the qkv, z, b and a projections: tensors of their own (Qwen3.5), or Qwen3-Next's
    in_proj_qkvz / in_proj_ba, which interleave them per key head ([q, k, v, z] and [b, a] for each)."""
    la, n = e.spec.linear, e.names
    if n.has("la_qkv", i):
        return {r: [Part(n.weight(f"la_{r}", i))] for r in ("qkv", "z", "b", "a")}
    if not n.has("la_qkvz", i):
        raise CheckpointError(f"layer {i}: neither linear_attn.in_proj_qkv nor linear_attn.in_proj_qkvz is in the "
                              "checkpoint; the download may be incomplete, or config.json does not match the weights")
    r, kd = la.value_heads // la.key_heads, la.key_dim
    vd = r * la.value_dim
    qkvz, ba = n.weight("la_qkvz", i), n.weight("la_ba", i)

    def group(name: str, width: int, start: int, size: int) -> list[Part]:
        return [Part(name, (g * width + start, g * width + start + size)) for g in range(la.key_heads)]

    w = 2 * kd + 2 * vd
    return {"qkv": group(qkvz, w, 0, kd) + group(qkvz, w, kd, kd) + group(qkvz, w, 2 * kd, vd),
            "z": group(qkvz, w, 2 * kd + vd, vd), "b": group(ba, 2 * r, 0, r), "a": group(ba, 2 * r, r, r)}


def _project(e: "Emitter", i: int, x: ir.Value, node: str, parts: list[Part]) -> ir.Value:
    sizes = [p.rows[1] - p.rows[0] if p.rows else e.source.shape(p.name)[0] for p in parts]
    st = e.plan.storage([f"{node}/MatMul", parts[0].module], "MatMul")
    return e.matmul(x, node, parts, sizes, e.spec.hidden_size, st)


def _float_param(e: "Emitter", i: int, role: str, init: str, size: int, negexp: bool = False) -> ir.Value:
    """A per-head parameter kept in float32 (the gate's arithmetic): dt_bias, or -exp(A_log)."""
    name = e.names.tensor(role, i)
    if name is None:
        raise CheckpointError(f"layer {i}: {e.names.spellings(role)[0].format(i=i)} is missing from the checkpoint")
    e.expect(name, (size,))

    def produce():
        arr = e.source.read(name).astype(np.float32)
        return [-np.exp(arr) if negexp else arr]

    job = WeightJob(f"/model/layers.{i}/linear_attn", (TensorSlot(init, ir.DataType.FLOAT, (size,)),), produce,
                    "fp32", (name,))
    return e.b.weights(job)[0]


def _l2norm(e: "Emitter", x: ir.Value, heads: int, dim: int, node: str) -> ir.Value:
    """x / sqrt(sum(x^2) + eps) per head, as RMS normalization: RMSNorm(x, eps / dim) / sqrt(dim)."""
    b = e.b
    view = b.op("Reshape", [x, b.const([0, 0, heads, dim], np.int64)], f"{node}/Reshape")
    scale = b.const(np.full(dim, dim ** -0.5, np.float32).astype(e.io.np_dtype))
    y = b.op("SimplifiedLayerNormalization", [view, scale], f"{node}/LayerNorm", axis=-1, epsilon=L2_EPS / dim,
             stash_type=1)
    return b.op("Reshape", [y, b.const([0, 0, heads * dim], np.int64)], f"{node}/Reshape_1")


def _conv(e: "Emitter", i: int, qkv: ir.Value, past: ir.Value, base: str, ctx: AttnInputs) -> tuple[ir.Value, ir.Value]:
    """The causal depthwise conv over (B, S, C) and its activation; returns (B, S, C) and the present state."""
    b, la = e.b, e.spec.linear
    C = la.conv_channels
    module = e.names.module("la_conv", i)
    e.expect(f"{module}.weight", (C, 1, la.kernel))
    weight = b.weights(W.float_table_job(e.source, f"{base}/conv1d", f"model.layers.{i}.linear_attn.conv1d.weight",
                                         f"{module}.weight", (C, 1, la.kernel), e.io))[0]
    bias = e.vector(f"{base}/conv1d", f"{module}.bias", C) if e.source.has(f"{module}.bias") else None
    fused = e.spec.mlp.activation in ("silu", "swish")  # the conv's activation is the model's hidden_act
    t = b.op("Transpose", [qkv], f"{base}/qkv_proj/Transpose", perm=[0, 2, 1])  # (B, C, S)
    y, _ = b.op("CausalConvWithState", [t, weight, bias, past], f"{base}/CausalConvWithState", domain=MS,
                n_out=2, ndim=1, activation="silu" if fused else "none")
    present = conv_state_after(e, ctx, qkv, past, t, la.kernel, base)  # right padding leaves it unchanged
    y = b.op("Transpose", [y], f"{base}/conv_out/Transpose", perm=[0, 2, 1])  # (B, S, C)
    return (y if fused else activation(e, y, f"{base}/conv_act")), present


def gated_delta(e: "Emitter", i: int, x: ir.Value, ctx: AttnInputs, past: tuple[ir.Value, ...]
                ) -> tuple[ir.Value, tuple[ir.Value, ...]]:
    b, la = e.b, _settings(e.spec, i)
    base = f"/model/layers.{i}/linear_attn"
    rows = _rows(e, i)
    qkv, z, beta_in, a = (_project(e, i, x, f"{base}/{r}_proj", rows[r]) for r in ("qkv", "z", "b", "a"))
    conv, present_conv = _conv(e, i, qkv, past[0], base, ctx)
    kd, vd = la.key_heads * la.key_dim, la.value_heads * la.value_dim
    q, k, v = b.op("Split", [conv, b.const([kd, kd, vd], np.int64)], f"{base}/split_qkv/Split", n_out=3, axis=-1)
    q = _l2norm(e, q, la.key_heads, la.key_dim, f"{base}/q_l2norm")
    k = _l2norm(e, k, la.key_heads, la.key_dim, f"{base}/k_l2norm")
    dt_bias = _float_param(e, i, "la_dt_bias", f"model.layers.{i}.linear_attn.dt_bias", la.value_heads)
    neg_a = _float_param(e, i, "la_A_log", f"model.layers.{i}.linear_attn.neg_exp_A", la.value_heads, negexp=True)
    decay, beta = b.op("LinearAttentionGate", [a, dt_bias, neg_a, beta_in], f"{base}/LinearAttentionGate",
                       domain=MS, n_out=2)
    keep, _ = chunk_padding(e, ctx, x)  # padding: no decay (log 0) and no update (beta 0), the state carried over
    decay = b.op("Mul", [decay, keep], f"{base}/pad/Mul")
    beta = b.op("Mul", [beta, keep], f"{base}/pad/Mul_1")
    y, present = b.op("LinearAttention", [q, k, v, past[1], decay, beta], f"{base}/LinearAttention", domain=MS,
                      n_out=2, q_num_heads=la.key_heads, kv_num_heads=la.value_heads, update_rule="gated_delta",
                      scale=la.key_dim ** -0.5)
    heads = b.const([0, 0, la.value_heads, la.value_dim], np.int64)
    y4 = b.op("Reshape", [y, heads], f"{base}/y_heads/Reshape")
    z4 = b.op("Reshape", [z, heads], f"{base}/z_heads/Reshape")
    weight = e.vector(f"{base}/GatedRMSNorm", f"{e.names.module('la_norm', i)}.weight", la.value_dim)
    n = b.op("GatedRMSNorm", [y4, weight, z4], f"{base}/GatedRMSNorm", domain=MS, epsilon=e.spec.norm.eps,
             activation="silu")
    n = b.op("Reshape", [n, b.const([0, 0, vd], np.int64)], f"{base}/GatedRMSNorm/Reshape")
    (out,) = e.linear_group(n, f"{base}/out_proj", i, [("la_out", f"{base}/out_proj", e.spec.hidden_size)], vd)
    return out, (present_conv, present)
