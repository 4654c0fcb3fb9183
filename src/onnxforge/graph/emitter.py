"""The emitter: what every part of a layer builds on (the graph builder, the spec, tensor names, the
recipe's plan) and the weight helpers they share (MatMul / MatMulNBits over stacked projections, biases,
vectors). It sits at the bottom of graph/: parts, layer kinds, MoE and experts build on it, and decoder.py
(the whole model) on them. Nothing here asks which family it builds.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np
import onnx_ir as ir

from ..archs.names import Names, Part
from ..errors import CheckpointError
from ..quant.storage import Storage
from ..sources.base import Source
from ..spec import ModelSpec
from . import weights as W
from .builder import MS, GraphBuilder


class Plan(Protocol):
    """What the recipe decides; see quant/recipe.py."""

    io: Storage  # activation dtype (bits == 0)
    unpack_matmul: bool
    prune_lm_head: bool
    exclude_embeds: bool  # output shaping (quant/recipe.py): an inputs_embeds input, a hidden_states output
    exclude_lm_head: bool
    include_hidden_states: bool

    def storage(self, names: Sequence[str], op: str) -> Storage: ...

    def share_embeddings(self, spec: ModelSpec, embed: Storage, lm_head: Storage) -> bool: ...


@dataclass
class Emitter:
    b: GraphBuilder
    spec: ModelSpec
    names: Names
    source: Source
    plan: Plan
    past: list[tuple[ir.Value, ...]] = field(default_factory=list)  # per layer: its mixer's state inputs
    notes: list[str] = field(default_factory=list)  # choices the build made that the report should say
    lora: object | None = None  # graph/lora.py's LoraSet: branches beside the projections run-time adapters target

    # -- weight helpers ----------------------------------------------------------------------
    @property
    def io(self) -> Storage:
        return self.plan.io

    def scalar(self, value: float) -> ir.Value:
        return self.b.const(np.asarray(value, dtype=np.float32).astype(self.io.np_dtype))

    def finfo(self):
        """The activation dtype's limits (ml_dtypes.finfo: numpy's own refuses bfloat16 in some versions)."""
        import ml_dtypes

        return ml_dtypes.finfo(self.io.np_dtype)

    def float32_op(self, op: str, inputs: Sequence[ir.Value], name: str, float_in: int = 1, n_out: int = 1,
                   float_out: int = 1, **attrs):
        """`op` computed in float32 where the activations are bfloat16 (ONNX has no bfloat16 TopK before opset 24;
        onnxruntime's CUDA provider has no bfloat16 Clip kernel): its first `float_in` inputs cast to float32, its
        first `float_out` outputs cast back (the rest, e.g. TopK's indices, as they are); elsewhere the op itself.
        Exact for ops that select or compare (TopK; Clip, whose bounds are given as activation-dtype values)."""
        b = self.b
        if self.io.ir_dtype != ir.DataType.BFLOAT16:
            return b.op(op, list(inputs), name, n_out=n_out, **attrs)
        cast = [b.op("Cast", [x], f"{name}/Cast_{j}", to=ir.DataType.FLOAT) if j < float_in else x
                for j, x in enumerate(inputs)]
        outs = b.op(op, cast, name, n_out=n_out, **attrs)
        outs = [outs] if n_out == 1 else list(outs)
        back = [b.op("Cast", [o], f"{name}/Cast_out_{j}", to=ir.DataType.BFLOAT16) if j < float_out else o
                for j, o in enumerate(outs)]
        return back[0] if n_out == 1 else tuple(back)

    def ones(self, size: int) -> ir.Value:
        return self.b.const(np.ones(size, dtype=self.io.np_dtype))

    def expect(self, name: str, shape: tuple[int, ...], rows: tuple[int, int] | None = None) -> None:
        got = tuple(self.source.shape(name))
        if rows is not None and got and got[0] >= rows[1]:
            got = (rows[1] - rows[0], *got[1:])
        if got != shape:
            raise CheckpointError(f"tensor {name!r} has shape {got}, but config.json implies {shape}")

    def vector(self, label: str, name: str, size: int, offset: float = 0.0) -> ir.Value:
        self.expect(name, (size,))
        return self.b.weights(W.float_table_job(self.source, label, name, name, (size,), self.io, offset))[0]

    def matmul(self, x: ir.Value, node: str, parts: Sequence[Part], sizes: Sequence[int], K: int, st: Storage) -> ir.Value:
        for p, size in zip(parts, sizes):
            self.expect(p.name, (size, K), p.rows)
        N = sum(sizes)
        prefix = node.strip("/").replace("/", ".")
        if not st.quantized:
            w = self.b.weights(W.float_matmul_job(self.source, node, f"{prefix}.weight", parts, N, K, st))[0]
            return self.b.op("MatMul", [x, w], f"{node}/MatMul")
        job = (W.qdq_matmul_job if self.qdq else W.quant_matmul_job)(self.source, node, prefix, parts, N, K, st,
                                                                     self.io.ir_dtype, self.io.np_dtype)
        return self.matmul_nbits(x, self.b.weights(job), node, K, N, st)

    @property
    def qdq(self) -> bool:
        """use_qdq: quantized weights as DequantizeLinear + MatMul (QNN, OpenVINO, NPUs), not MatMulNBits."""
        return bool(getattr(self.plan, "use_qdq", False))

    def dequantize(self, ws: Sequence[ir.Value], node: str, st: Storage, axis: int = 0) -> ir.Value:
        """DequantizeLinear of a QDQ weight (codes, scales[, zero points]), blocked along `axis`."""
        return self.b.op("DequantizeLinear", list(ws), f"{node}/DequantizeLinear", axis=axis, block_size=st.block_size)

    def matmul_nbits(self, x: ir.Value, ws: Sequence[ir.Value], node: str, K: int, N: int, st: Storage) -> ir.Value:
        """MatMulNBits, or with use_qdq DequantizeLinear + MatMul (the weight `ws` is then `qdq_matmul_job`'s, or an
        already dequantized value); with per-block offsets (weights stored as scale x code + offset, e.g. GGUF
        Q4_K), y += ReduceSum(x per block) @ offsets^T: a MatMul of width K / block_size."""
        ws = list(ws)
        offsets = ws.pop() if st.offsets else None
        if self.qdq:
            w = ws[0] if len(ws) == 1 else self.dequantize(ws, node, st)
            y = self.b.op("MatMul", [x, w], f"{node}/MatMul")
        else:
            y = self.b.op("MatMulNBits", [x, *ws], f"{node}/MatMul", domain=MS, K=K, N=N, bits=st.bits,
                          block_size=st.block_size, accuracy_level=st.accuracy_level)
        if offsets is None:
            return y
        b, kb = self.b, W.k_blocks(K, st.block_size)
        blocks = b.op("Reshape", [x, b.const([0, 0, kb, st.block_size], np.int64)], f"{node}/offsets/Reshape")
        sums = b.op("ReduceSum", [blocks, b.const([-1], np.int64)], f"{node}/offsets/ReduceSum", keepdims=0)
        fix = b.op("FusedMatMul", [sums, offsets], f"{node}/offsets/MatMul", domain=MS, transB=1, alpha=1.0)
        return b.op("Add", [y, fix], f"{node}/offsets/Add")

    def linear_group(self, x: ir.Value, packed: str, i: int | None, roles: Sequence[tuple[str, str, int]], K: int,
                     bias: bool = False) -> list[ir.Value]:
        """One MatMul over stacked roles when the recipe stores them alike, else one per role.

        roles: (role, node name, N). Returns one value per role, or a single packed value.
        """
        parts = self.names.linear([r for r, _, _ in roles], [n for *_, n in roles], i)
        stores = [self.plan.storage([f"{packed}/MatMul", f"{node}/MatMul", p.module], "MatMul")
                  for (_, node, _), p in zip(roles, parts)]
        lora = self.lora is not None and self.lora.targets(parts)  # a LoRA branch needs its projection alone
        if len(roles) > 1 and (len(set(stores)) > 1 or self.plan.unpack_matmul or lora):
            groups = [(node, [p], [n], st) for (_, node, n), p, st in zip(roles, parts, stores)]
        else:
            groups = [(packed, parts, [n for *_, n in roles], stores[0])]
        outs = []
        for node, ps, sizes, st in groups:
            y = self.matmul(x, node, ps, sizes, K, st)
            if lora:
                y = self.lora.branch(self, x, y, node, ps[0], K, sizes[0])
            outs.append(self.add_bias(y, node, [p.with_suffix("bias") for p in ps], sum(sizes)) if bias else y)
        return outs

    def add_bias(self, y: ir.Value, node: str, parts: Sequence[Part], N: int) -> ir.Value:
        for p in parts:
            if not self.source.has(p.name):
                raise CheckpointError(f"tensor {p.name!r} is missing from the checkpoint (the config asks for biases)")
        init = node.strip("/").replace("/", ".") + ".bias"
        bias = self.b.weights(W.concat_vector_job(self.source, node, init, parts, N, self.io))[0]
        return self.b.op("Add", [y, bias], f"{node}/Add")

    def split(self, values: list[ir.Value], sizes: list[int], node: str) -> list[ir.Value]:
        if len(values) == len(sizes):
            return values
        return list(self.b.op("Split", [values[0], self.b.const(sizes, np.int64)], f"{node}/Split", n_out=len(sizes),
                              axis=-1))
