"""LoRA adapters switched at run time, the inputs onnxruntime-genai's multi-LoRA runtime feeds.

Each linear projection an adapter targets gets a float branch beside its MatMul (or MatMulNBits), named and
wired as the onnxruntime-genai builder names it (Olive's ExtractAdapters then makes its weights inputs):

    x -> /model/layers.{i}/attn/q_proj/MatMul ----------------------------+-> .../q_proj/lora/Add
    x -> .../q_proj/lora_A/MatMul (model.layers.{i}.attn.q_proj.lora_A.weight  (in, lora_r))
      -> .../q_proj/lora_B/MatMul (model.layers.{i}.attn.q_proj.lora_B.weight  (lora_r, out)) -+

The two weights are graph inputs whose default is an empty tensor (lora_r = 0): with no adapter active the
branch adds zeros; `generator.set_active_adapter` feeds the adapter file's tensors of the same names
(scale folded into B, as the anchor folds it). A projection an adapter targets is never packed with others.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np
import onnx_ir as ir

from ..archs.names import Part
from ..errors import ConfigError
from ..sources.peft import Adapter

if TYPE_CHECKING:
    from .emitter import Emitter

RANK = "lora_r"


@dataclass(frozen=True)
class Placed:
    """One graph projection with a LoRA branch: its checkpoint module, the rows of it it computes, its inputs'
    name prefix (`model.layers.0.attn.q_proj`), and its sizes."""

    module: str
    rows: tuple[int, int] | None
    prefix: str
    K: int
    N: int


@dataclass
class LoraSet:
    """The adapters of one build: the union of their target modules gets branches (graph/emitter.py asks)."""

    adapters: Sequence[Adapter]
    placed: list[Placed] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.modules = {m for a in self.adapters for m in a.modules}

    def targets(self, parts: Sequence[Part]) -> bool:
        return any(p.module in self.modules for p in parts)

    def branch(self, e: "Emitter", x: ir.Value, y: ir.Value, node: str, part: Part, K: int, N: int) -> ir.Value:
        """y + B(A x) for the projection `node` (one checkpoint part, K -> N), A and B optional graph inputs."""
        if part.module not in self.modules:
            return y
        self._check_shapes(e, part, K, N)
        prefix = node.strip("/").replace("/", ".")
        self.placed.append(Placed(part.module, part.rows, prefix, K, N))
        io, b = e.io, e.b
        a_in = b.optional_input(f"{prefix}.lora_A.weight", io.ir_dtype, [K, RANK], np.zeros((K, 0), io.np_dtype))
        b_in = b.optional_input(f"{prefix}.lora_B.weight", io.ir_dtype, [RANK, N], np.zeros((0, N), io.np_dtype))
        low = b.op("MatMul", [x, a_in], f"{node}/lora_A/MatMul")
        return b.op("Add", [y, b.op("MatMul", [low, b_in], f"{node}/lora_B/MatMul")], f"{node}/lora/Add")

    def _check_shapes(self, e: "Emitter", part: Part, K: int, N: int) -> None:
        rows = e.source.shape(part.name)[0] if part.rows is not None else N
        for a in self.adapters:
            if part.module not in a.modules:
                continue
            (_, k), (n, _) = a.shapes(part.module)
            if (k, n) != (K, rows):
                raise ConfigError(f"adapter {a.path}: {part.module} maps {k} -> {n} features, but the base model's "
                                  f"maps {K} -> {rows}; the adapter was trained on another base model")

    def check_all_placed(self) -> None:
        """Every targeted module became a branch; anything else (an lm_head, a router, a convolution, a module
        this build does not have) is refused before a weight is read."""
        missing = sorted(self.modules - {p.module for p in self.placed})
        if missing:
            owners = sorted({a.name for a in self.adapters if set(a.modules) & set(missing)})
            raise ConfigError(f"adapter {', '.join(owners)} targets {len(missing)} module(s) that are not linear "
                              f"projections of this model's layers as onnxforge builds them ({', '.join(missing[:4])}"
                              f"{' ...' if len(missing) > 4 else ''}); only attention and MLP projections can take a "
                              "LoRA branch (--merge-adapter folds one adapter into the weights instead)")

    def describe(self) -> list[str]:
        return [a.describe() for a in self.adapters]
