"""The short gated convolution token mixer (LFM2's "conv" layers), a layer kind of graph/kinds.py.

  (B, C, x) = in_proj(h) per channel;  y = out_proj(C * causal_depthwise_conv(B * x))

The convolution runs in com.microsoft CausalConvWithState (a CPU kernel in onnxruntime 1.31.1), which
takes the last kernel - 1 inputs of the previous run as its state and returns the new ones: a prompt fed
in pieces continues where it stopped. Names follow the onnxruntime-genai builder (`past.%d.conv`,
`/model/layers.{i}/conv/...`), so genai_config.json is what onnxruntime-genai 0.18 expects.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from ..errors import ConfigError
from . import weights as W
from .builder import MS
from .parts import AttnInputs, conv_state_after
from .state import State

if TYPE_CHECKING:
    from ..spec import ModelSpec
    from .emitter import Emitter


def conv_states(spec: "ModelSpec", i: int) -> tuple[State, ...]:
    """The last kernel - 1 inputs of the convolution, (batch, hidden, kernel - 1), zeros at the start."""
    if spec.conv is None:
        raise ConfigError(f"layer {i} is a convolution layer, but the family gives no convolution settings")
    return (State("past.%d.conv", "present.%d.conv", "conv", ("batch_size", spec.hidden_size, spec.conv.kernel - 1)),)


def short_conv(e: "Emitter", i: int, x: ir.Value, ctx: AttnInputs, past: tuple[ir.Value, ...]
               ) -> tuple[ir.Value, tuple[ir.Value, ...]]:
    b, H, conv = e.b, e.spec.hidden_size, e.spec.conv
    base = f"/model/layers.{i}/conv"
    (bcx,) = e.linear_group(x, f"{base}/in_proj", i, [("conv_in", f"{base}/in_proj", 3 * H)], H, bias=conv.bias)
    t = b.op("Transpose", [bcx], f"{base}/Transpose_1", perm=[0, 2, 1])  # (B, 3H, S)
    gate_b, gate_c, xs = b.op("Split", [t, b.const([H, H, H], np.int64)], f"{base}/Split", n_out=3, axis=1)
    bx = b.op("Mul", [gate_b, xs], f"{base}/Mul_1")
    module = e.names.module("conv_kernel", i)
    e.expect(f"{module}.weight", (H, 1, conv.kernel))
    init = f"model.layers.{i}.conv.conv"
    weight = b.weights(W.float_table_job(e.source, f"{base}/conv", f"{init}.weight", f"{module}.weight",
                                         (H, 1, conv.kernel), e.io))[0]
    bias = e.vector(f"{base}/conv", f"{module}.bias", H) if conv.bias else None
    y, _ = b.op("CausalConvWithState", [bx, weight, bias, past[0]], f"{base}/CausalConvWithState", domain=MS,
                n_out=2, ndim=1, activation="none")
    present = conv_state_after(e, ctx, x, past[0], bx, conv.kernel, base)  # right padding leaves it unchanged
    y = b.op("Mul", [gate_c, y], f"{base}/Mul_2")
    y = b.op("Transpose", [y], f"{base}/Transpose_2", perm=[0, 2, 1])  # (B, S, H)
    (out,) = e.linear_group(y, f"{base}/out_proj", i, [("conv_out", f"{base}/out_proj", H)], H, bias=conv.bias)
    return out, (present,)
