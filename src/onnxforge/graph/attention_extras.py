"""Attention variants the spec declares beside GroupQueryAttention's own attributes (graph/parts.py `attention`):

  * chunked attention (LayerSpec.chunk, Llama 4): a token attends to the keys of its own chunk of `chunk`
    positions only. GQA's local_window_size is a sliding window (the last W keys of every query), which a
    chunk is not: the first token of a chunk sees 1 key, its last `chunk`. The chunk is GQA's
    `attention_bias`, (1, 1, S, T): 0 where floor(key / chunk) == floor(query / chunk), the dtype's lowest
    elsewhere (GQA's causal mask does the rest); one bias per chunk size, shared by the layers;
  * weightless per-head RMS norms of q and k ("l2", Llama 4's L2 norm on the layers with rotary): a rotation
    keeps each pair's length, so the norm commutes with RoPE and runs before GQA's own rotary;
  * the attention temperature of layers without rotary (AttentionSpec.nope_temperature, Llama 4):
    q x (1 + attn_scale x log1p(floor((position + 1) / floor_scale))), from the position ids.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

if TYPE_CHECKING:
    from ..spec import ModelSpec
    from .emitter import Emitter

AttnInputs = Any  # graph/parts.py's AttnInputs (parts imports this module: no import back)


def needs_positions(spec: "ModelSpec", i: int) -> bool:
    """Whether layer i reads the position ids (the temperature of a layer without rotary)."""
    layer = spec.layers[i]
    return layer.kind == "attention" and layer.rope is None and bool(spec.attention.nope_temperature)


def l2_head_norm(e: "Emitter", x: ir.Value, i: int, which: str, heads: int) -> ir.Value:
    """x / rms(x) over each head, no weight, at the model's norm epsilon."""
    a, b = e.spec.attention_of(i), e.b
    node = f"/model/layers.{i}/attn/{which}_norm"
    view = b.op("Reshape", [x, b.const([0, 0, heads, a.head_dim], np.int64)], f"{node}/Reshape")
    y = b.op("SimplifiedLayerNormalization", [view, e.ones(a.head_dim)], f"{node}/LayerNorm", axis=-1,
             epsilon=e.spec.norm.eps, stash_type=1)
    return b.op("Reshape", [y, b.const([0, 0, heads * a.head_dim], np.int64)], f"{node}/Reshape_1")


def nope_temperature(e: "Emitter", i: int, q: ir.Value, ctx: "AttnInputs") -> ir.Value:
    """q scaled per position, computed in float32 and cast to the activations' dtype (as transformers)."""
    floor_scale, attn_scale = e.spec.attention.nope_temperature
    b, node = e.b, f"/model/layers.{i}/attn/temperature"
    f32 = lambda v: b.const(np.float32(v))  # noqa: E731
    pos = b.op("Cast", [ctx.positions], f"{node}/Cast", to=ir.DataType.FLOAT)
    steps = b.op("Floor", [b.op("Div", [b.op("Add", [pos, f32(1.0)], f"{node}/Add"), f32(floor_scale)], f"{node}/Div")],
                 f"{node}/Floor")
    log1p = b.op("Log", [b.op("Add", [steps, f32(1.0)], f"{node}/Add_1")], f"{node}/Log")
    scale = b.op("Add", [b.op("Mul", [log1p, f32(attn_scale)], f"{node}/Mul"), f32(1.0)], f"{node}/Add_2")
    scale = b.op("Unsqueeze", [scale, b.const([-1], np.int64)], f"{node}/Unsqueeze")
    if e.io.ir_dtype != ir.DataType.FLOAT:
        scale = b.op("Cast", [scale], f"{node}/Cast_1", to=e.io.ir_dtype)
    return b.op("Mul", [q, scale], f"{node}/Mul_1")


def chunk_bias(e: "Emitter", chunk: int, q: ir.Value, ctx: "AttnInputs") -> ir.Value:
    """GQA's attention_bias for chunks of `chunk` positions, built once per chunk size (ctx.biases)."""
    if chunk in ctx.biases:
        return ctx.biases[chunk]
    b, node = e.b, f"/model/attn_mask_reformat/chunk_{chunk}"
    one, c = b.const(np.int64(1)), b.const(np.int64(chunk))
    total = b.op("Cast", [ctx.total_len], f"{node}/Cast", to=ir.DataType.INT64)
    seq = b.op("Gather", [b.op("Shape", [q], f"{node}/Shape"), b.const(np.int64(1))], f"{node}/Gather", axis=0)
    queries = b.op("Range", [b.op("Sub", [total, seq], f"{node}/Sub"), total, one], f"{node}/Range")
    keys = b.op("Range", [b.const(np.int64(0)), total, one], f"{node}/Range_1")
    q_chunk = b.op("Unsqueeze", [b.op("Div", [queries, c], f"{node}/Div"), b.const([1], np.int64)], f"{node}/Unsqueeze")
    same = b.op("Equal", [q_chunk, b.op("Div", [keys, c], f"{node}/Div_1")], f"{node}/Equal")  # (S, T)
    lowest = e.finfo().min
    bias = b.op("Where", [same, b.const(np.zeros((), e.io.np_dtype)), b.const(np.asarray(lowest, e.io.np_dtype))],
                f"{node}/Where")
    ctx.biases[chunk] = b.op("Unsqueeze", [bias, b.const([0, 1], np.int64)], f"{node}/Unsqueeze_1")
    return ctx.biases[chunk]
