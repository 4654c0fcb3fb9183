"""What a layer adds after its block (graph/blocks.py), as the spec declares it:

  * per-layer inputs (ModelSpec.per_layer_input, Gemma 4 E2B/E4B): computed once from the tokens and the scaled
    embeddings, (table[ids] x sqrt(P) + norm(embeddings @ projection x H^-0.5)) x 2^-0.5, (B, S, layers, P);
    layer i adds norm(per_layer_projection(act(per_layer_input_gate(h)) x inputs[:, :, i])) to its output;
  * the layer scalar (ModelSpec.layer_scalar, Gemma 4): the layer's whole output, residual included, times
    a scalar the checkpoint stores per layer (`model.layers.{i}.layer_scalar`, shape (1,)).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from ..archs.names import Part
from ..errors import CheckpointError, ConfigError
from . import weights as W
from .parts import Stream, activation, plain_norm

if TYPE_CHECKING:
    from .emitter import Emitter


def after_block(e: "Emitter", i: int, h: Stream) -> Stream:
    """The layer's output after what the spec adds to its block."""
    if e.spec.per_layer_input:
        h = per_layer_input(e, i, h)
    if e.spec.layer_scalar:
        h = layer_scalar(e, i, h)
    return h


def layer_scalar(e: "Emitter", i: int, h: Stream) -> Stream:
    node = f"/model/layers.{i}/layer_scalar"
    name = e.names.tensor("layer_scalar", i)
    if name is None:
        raise CheckpointError(f"layer {i}: tensor 'model.layers.{i}.layer_scalar' is missing from the checkpoint")
    e.expect(name, (1,))
    scalar = e.b.weights(W.float_table_job(e.source, node, name, name, (1,), e.io))[0]
    return Stream(e.b.op("Mul", [h.total(e, node), scalar], f"{node}/Mul"))


def per_layer_inputs(e: "Emitter", ids: ir.Value, x: ir.Value) -> ir.Value | None:
    """(B, S, layers, P): every layer's own input, from the token ids and the (scaled) embeddings `x`."""
    spec, b = e.spec, e.b
    P, L, H, node = spec.per_layer_input, spec.num_layers, spec.hidden_size, "/model/per_layer_inputs"
    if not P:
        return None
    if e.plan.exclude_embeds:
        raise ConfigError("exclude_embeds: this model's per-layer inputs are looked up by token id, which an "
                          "inputs_embeds model does not have; build it without exclude_embeds")
    table_name = e.names.weight("ple_embed")
    e.expect(table_name, (spec.per_layer_vocab, L * P))
    table = b.weights(W.float_table_job(e.source, node, "model.embed_tokens_per_layer.weight", table_name,
                                        (spec.per_layer_vocab, L * P), e.io))[0]
    rows = b.op("Mul", [b.op("Gather", [table, ids], f"{node}/Gather"), e.scalar(P ** 0.5)], f"{node}/Mul")
    proj = e.matmul(x, f"{node}/model_projection", [Part(e.names.weight("ple_model_proj"))], [L * P], H,
                    e.plan.storage([f"{node}/model_projection/MatMul", e.names.module("ple_model_proj")], "MatMul"))
    proj = b.op("Mul", [proj, e.scalar(H ** -0.5)], f"{node}/model_projection/Mul")
    shape = b.const([0, 0, L, P], np.int64)
    proj = plain_norm(e, b.op("Reshape", [proj, shape], f"{node}/Reshape"), "ple_model_norm", None,
                      f"{node}/projection_norm", P)
    both = b.op("Add", [proj, b.op("Reshape", [rows, shape], f"{node}/Reshape_1")], f"{node}/Add")
    return b.op("Mul", [both, e.scalar(2.0 ** -0.5)], f"{node}/Mul_1")


def per_layer_input(e: "Emitter", i: int, h: Stream) -> Stream:
    b, P, H = e.b, e.spec.per_layer_input, e.spec.hidden_size
    node = f"/model/layers.{i}/per_layer_input"
    total = h.total(e, f"{node}/residual")
    mine = b.op("Gather", [e.per_layer, b.const(np.int64(i))], f"{node}/Gather", axis=2)  # (B, S, P)
    (gate,) = e.linear_group(total, f"{node}/gate", i, [("ple_gate", f"{node}/gate", P)], H)
    y = b.op("Mul", [activation(e, gate, f"{node}/act_fn"), mine], f"{node}/Mul")
    (y,) = e.linear_group(y, f"{node}/projection", i, [("ple_proj", f"{node}/projection", H)], P)
    return Stream(plain_norm(e, y, "ple_norm", i, f"{node}/norm"), total)
