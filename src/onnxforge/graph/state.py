"""The state a token mixer carries from one run of the model to the next, as a declaration.

onnxruntime-genai feeds each `present` output back as the next run's `past` input. A mixer part declares
each tensor it carries once (`State`); the graph's inputs and outputs (graph/kinds.py) and genai_config.json's
names (export/genai_config.py) are generated from the declarations, never written per family.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

SEQ = "{seq}"  # in State.dims: the axis that grows by each run's tokens


@dataclass(frozen=True)
class State:
    """One carried tensor of a layer. `past` / `present` name the graph input / output, %d the layer index;
    `genai` is the stem of genai_config.json's keys (inputs.past_<genai>_names, outputs.present_<genai>_names).
    A state with a SEQ axis starts empty (length 0 along it: past_sequence_length in, total_sequence_length
    out); one without starts as zeros of its shape."""

    past: str
    present: str
    genai: str
    dims: tuple[int | str, ...]
    dtype: ir.DataType | None = None  # None: the model's activation dtype

    @property
    def starts(self) -> str:
        return "empty" if SEQ in self.dims else "zeros"

    def shape(self, present: bool) -> list[int | str]:
        seq = "total_sequence_length" if present else "past_sequence_length"
        return [seq if d == SEQ else d for d in self.dims]
