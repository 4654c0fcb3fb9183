"""The Mamba2 token mixer (Granite 4 hybrid's "mamba" layers), a layer kind of graph/kinds.py.

  (z, xBC, dt) = in_proj(h);  xBC = silu(causal_depthwise_conv(xBC));  (x, B, C) = xBC
  dt = softplus(dt + dt_bias) (clipped to time_step_limit);  per head, with S its (state, head_dim) state:
  S = exp(dt * A) * S + B (x) (dt * x);  y = C^T S + D * x;  out_proj(group_rms_norm(y * silu(z)) * w)

Both steps run in onnxruntime 1.31.1 CPU kernels: the convolution in com.microsoft CausalConvWithState
(fused SiLU; its state is the last kernel - 1 inputs), the scan in com.microsoft LinearAttention with
update_rule "gated" (S = exp(g) S + k (x) v, o = q^T S) with q = C, k = B (each group's B and C repeated
over its heads), v = dt * x, g = dt * A and scale 1. Both take their state from the previous run and
return the new one, so a prompt fed in pieces continues where it stopped and one token is one step.

The states follow onnxruntime-genai's names for layers with a convolution and a recurrent state
(`past.%d.conv` (batch, conv channels, kernel - 1), `past.%d.recurrent` (batch, heads, d_k, d_v) as
LinearAttention keeps it: here (batch, heads, state, head_dim), transformers' ssm state transposed).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from ..errors import CheckpointError, ConfigError
from . import weights as W
from .builder import MS
from .parts import AttnInputs, chunk_padding, conv_state_after
from .state import State

if TYPE_CHECKING:
    from ..spec import ModelSpec
    from .emitter import Emitter


def mamba_states(spec: "ModelSpec", i: int) -> tuple[State, ...]:
    m = spec.mamba
    if m is None:
        raise ConfigError(f"layer {i} is a Mamba2 layer, but the family gives no Mamba2 settings")
    return (State("past.%d.conv", "present.%d.conv", "conv", ("batch_size", m.conv_dim, m.kernel - 1)),
            State("past.%d.recurrent", "present.%d.recurrent", "recurrent", ("batch_size", m.heads, m.state, m.head_dim)))


def _param(e: "Emitter", i: int, role: str, label: str, size: int) -> ir.Value:
    name = e.names.tensor(role, i)
    if name is None:
        raise CheckpointError(f"layer {i}: the Mamba2 parameter {role[len('mamba_'):]} is missing from the checkpoint")
    return e.vector(label, name, size)


def _per_head(e: "Emitter", t: ir.Value, shape: list[int], node: str) -> ir.Value:
    return e.b.op("Reshape", [t, e.b.const(shape, np.int64)], node)


def _repeat_groups(e: "Emitter", t: ir.Value, node: str) -> ir.Value:
    """(B, S, groups * state) -> (B, S, heads * state): each group's vector repeated over its heads."""
    m, b = e.spec.mamba, e.b
    g = _per_head(e, t, [0, 0, m.groups, 1, m.state], f"{node}/Reshape")
    shape = b.op("Concat", [b.op("Slice", [b.op("Shape", [t], f"{node}/Shape"), b.const([0], np.int64),
                                           b.const([2], np.int64)], f"{node}/Slice"),
                            b.const([m.groups, m.heads // m.groups, m.state], np.int64)], f"{node}/Concat", axis=0)
    return _per_head(e, b.op("Expand", [g, shape], f"{node}/Expand"), [0, 0, m.heads * m.state], f"{node}/Reshape_1")


def _conv(e: "Emitter", i: int, xbc: ir.Value, past: ir.Value, base: str, ctx: AttnInputs
          ) -> tuple[ir.Value, ir.Value]:
    m, b = e.spec.mamba, e.b
    module = e.names.module("mamba_conv", i)
    e.expect(f"{module}.weight", (m.conv_dim, 1, m.kernel))
    weight = b.weights(W.float_table_job(e.source, f"{base}/conv1d", f"model.layers.{i}.mamba.conv1d.weight",
                                         f"{module}.weight", (m.conv_dim, 1, m.kernel), e.io))[0]
    bias = e.vector(f"{base}/conv1d", f"{module}.bias", m.conv_dim) if m.conv_bias else None
    t = b.op("Transpose", [xbc], f"{base}/conv1d/Transpose", perm=[0, 2, 1])  # (B, conv_dim, S)
    y, _ = b.op("CausalConvWithState", [t, weight, bias, past], f"{base}/conv1d/CausalConvWithState", domain=MS,
                n_out=2, ndim=1, activation="silu")
    present = conv_state_after(e, ctx, xbc, past, t, m.kernel, f"{base}/conv1d")  # right padding: unchanged
    return b.op("Transpose", [y], f"{base}/conv1d/Transpose_1", perm=[0, 2, 1]), present


def _gated_norm(e: "Emitter", i: int, y: ir.Value, z: ir.Value, base: str) -> ir.Value:
    """weight * rms_norm over each group of (y * silu(z)), as transformers' MambaRMSNormGated. The mean of squares
    is taken in float32 (SimplifiedLayerNormalization, stash_type 1): the gated values reach thousands in trained
    and random models alike (3.9e3 in the tiny test model), whose squares overflow fp16 (what made fp16 Granite 4
    hybrid builds 4.1 off on CUDA, where the elementwise ops run in fp16)."""
    m, b, node = e.spec.mamba, e.b, f"{base}/norm"
    y = b.op("Mul", [y, b.op("Mul", [z, b.op("Sigmoid", [z], f"{node}/Sigmoid")], f"{node}/Mul")], f"{node}/Mul_1")
    width = m.inner // m.groups
    g = _per_head(e, y, [0, 0, m.groups, width], f"{node}/Reshape")
    g = b.op("SimplifiedLayerNormalization", [g, e.ones(width)], f"{node}/LayerNorm", axis=-1,
             epsilon=e.spec.norm.eps, stash_type=1)
    g = _per_head(e, g, [0, 0, m.inner], f"{node}/Reshape_1")
    return b.op("Mul", [g, _param(e, i, "mamba_norm", node, m.inner)], f"{node}/Mul_3")


def mamba2(e: "Emitter", i: int, x: ir.Value, ctx: AttnInputs, past: tuple[ir.Value, ...]
           ) -> tuple[ir.Value, tuple[ir.Value, ...]]:
    m, b, H = e.spec.mamba, e.b, e.spec.hidden_size
    base = f"/model/layers.{i}/mamba"
    if e.spec.mlp.activation not in ("silu", "swish"):  # BambaMixer's act is hidden_act's, the kernel's SiLU
        raise ConfigError(f"hidden_act {e.spec.mlp.activation!r}: the Mamba2 convolution runs SiLU only")
    (proj,) = e.linear_group(x, f"{base}/in_proj", i, [("mamba_in", f"{base}/in_proj", m.inner + m.conv_dim + m.heads)],
                             H, bias=m.proj_bias)
    z, xbc, dt = b.op("Split", [proj, b.const([m.inner, m.conv_dim, m.heads], np.int64)], f"{base}/Split", n_out=3,
                      axis=-1)
    xbc, conv_state = _conv(e, i, xbc, past[0], base, ctx)
    xs, bs, cs = b.op("Split", [xbc, b.const([m.inner, m.groups * m.state, m.groups * m.state], np.int64)],
                      f"{base}/Split_1", n_out=3, axis=-1)
    dt = e.float32_op("Softplus", [b.op("Add", [dt, _param(e, i, "mamba_dt_bias", f"{base}/dt", m.heads)],
                                        f"{base}/dt/Add")], f"{base}/dt/Softplus")
    if (m.dt_min, m.dt_max) != (0.0, float("inf")):
        dt = e.float32_op("Clip", [dt, e.scalar(m.dt_min), e.scalar(min(m.dt_max, float(e.finfo().max)))],
                          f"{base}/dt/Clip", float_in=3)
    dt = b.op("Mul", [dt, chunk_padding(e, ctx, x)[0]], f"{base}/dt/pad/Mul")  # padding: no decay, no update
    a = b.op("Neg", [b.op("Exp", [_param(e, i, "mamba_A_log", f"{base}/A", m.heads)], f"{base}/A/Exp")], f"{base}/A/Neg")
    decay = b.op("Mul", [dt, a], f"{base}/decay/Mul")  # (B, S, heads): log of the state's decay per step
    heads = _per_head(e, xs, [0, 0, m.heads, m.head_dim], f"{base}/x/Reshape")
    dt4 = b.op("Unsqueeze", [dt, b.const([-1], np.int64)], f"{base}/dt/Unsqueeze")
    v = _per_head(e, b.op("Mul", [heads, dt4], f"{base}/v/Mul"), [0, 0, m.inner], f"{base}/v/Reshape")
    q, k = _repeat_groups(e, cs, f"{base}/C"), _repeat_groups(e, bs, f"{base}/B")
    y, ssm_state = b.op("LinearAttention", [q, k, v, past[1], decay], f"{base}/LinearAttention", domain=MS, n_out=2,
                        update_rule="gated", q_num_heads=m.heads, kv_num_heads=m.heads, scale=1.0)
    d = b.op("Unsqueeze", [_param(e, i, "mamba_D", f"{base}/D", m.heads), b.const([-1], np.int64)], f"{base}/D/Unsqueeze")
    skip = _per_head(e, b.op("Mul", [heads, d], f"{base}/D/Mul"), [0, 0, m.inner], f"{base}/D/Reshape")
    y = _gated_norm(e, i, b.op("Add", [y, skip], f"{base}/D/Add"), z, base)
    (out,) = e.linear_group(y, f"{base}/out_proj", i, [("mamba_out", f"{base}/out_proj", H)], m.inner, bias=m.proj_bias)
    return out, (conv_state, ssm_state)
