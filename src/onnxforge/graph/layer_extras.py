"""What a layer adds after its block (graph/blocks.py), as the spec declares it:

  * the layer scalar (ModelSpec.layer_scalar, Gemma 4): the layer's whole output, residual included, times
    a scalar the checkpoint stores per layer (`model.layers.{i}.layer_scalar`, shape (1,)).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import CheckpointError
from . import weights as W
from .parts import Stream

if TYPE_CHECKING:
    from .emitter import Emitter


def after_block(e: "Emitter", i: int, h: Stream) -> Stream:
    """The layer's output after what the spec adds to its block."""
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
