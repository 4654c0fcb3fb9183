"""A thin typed layer over onnx_ir for emitting nodes with the anchor's naming scheme.

Node `/model/layers.0/attn/qkv_proj/MatMul` has outputs `/model/layers.0/attn/qkv_proj/MatMul/output_0`, ...
Weights are not arrays here but `WeightJob`s: a thunk that produces the arrays of one or more
initializers when the writer asks for them, so the graph is complete before any weight is read.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import ml_dtypes
import numpy as np
import onnx_ir as ir

MS = "com.microsoft"

NP_TO_IR = {
    np.dtype(np.float32): ir.DataType.FLOAT,
    np.dtype(np.float16): ir.DataType.FLOAT16,
    np.dtype(ml_dtypes.bfloat16): ir.DataType.BFLOAT16,
    np.dtype(np.uint8): ir.DataType.UINT8,
    np.dtype(np.int64): ir.DataType.INT64,
    np.dtype(np.int32): ir.DataType.INT32,
}


@dataclass(frozen=True)
class TensorSlot:
    """One initializer a job produces: its name, dtype and shape."""

    name: str
    dtype: ir.DataType
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:  # 4-bit types (QDQ's int4/uint4) are packed two to a byte, the last byte padded
        return (int(np.prod(self.shape, dtype=np.int64)) * self.dtype.bitwidth + 7) // 8

    @property
    def packed(self) -> bool:
        """A sub-byte type: its job produces the packed bytes (uint8, one axis), not an array of `shape`."""
        return self.dtype.bitwidth < 8


@dataclass
class Pieces:
    """A slot's array produced in pieces along its first axis (say one expert at a time) and written as
    they come, so the whole array never has to exist in memory; a job may return one instead of an array."""

    shape: tuple[int, ...]
    dtype: np.dtype
    pieces: Callable[[], Iterable[np.ndarray]]


@dataclass
class WeightJob:
    """Produces the arrays of `slots` (in order) when called; reads and quantizes lazily."""

    label: str  # the group in the build report, e.g. "/model/layers.0/attn/qkv_proj"
    slots: tuple[TensorSlot, ...]
    produce: Callable[[], Sequence[np.ndarray]]
    storage: str = "float"  # human-readable: "fp32", "int4 rtn sym b32", "int4 (transcoded Q4_0)", ...
    sources: tuple[str, ...] = ()  # the checkpoint tensors it reads, `name[start:stop]` for a row range
    # pre-quantized values carried over: max |written - checkpoint| once produced (0 exact; None: not carried over)
    max_difference: float | None = None

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.slots)


@dataclass
class GraphBuilder:
    """Accumulates nodes, inputs, outputs and deferred initializers for one graph."""

    opset: int = 21
    nodes: list[ir.Node] = field(default_factory=list)
    inputs: list[ir.Value] = field(default_factory=list)
    outputs: list[ir.Value] = field(default_factory=list)
    initializers: dict[str, ir.Value] = field(default_factory=dict)
    jobs: list[WeightJob] = field(default_factory=list)
    _consts: dict[tuple, ir.Value] = field(default_factory=dict)

    def input(self, name: str, dtype: ir.DataType, shape: Sequence[int | str]) -> ir.Value:
        v = ir.val(name, dtype, list(shape))
        self.inputs.append(v)
        return v

    def optional_input(self, name: str, dtype: ir.DataType, shape: Sequence[int | str], default: np.ndarray) -> ir.Value:
        """An input that onnxruntime may be fed or not: an initializer of the same name holds its default (a LoRA
        weight's empty tensor, graph/lora.py)."""
        v = self.input(name, dtype, shape)
        v.const_value = ir.tensor(default, name=name)
        self.initializers[name] = v
        return v

    def output(self, value: ir.Value, name: str, dtype: ir.DataType, shape: Sequence[int | str]) -> None:
        value.name = name
        value.dtype = dtype
        value.shape = ir.Shape(list(shape))
        self.outputs.append(value)

    def op(
        self,
        op_type: str,
        inputs: Sequence[ir.Value | None],
        name: str,
        *,
        domain: str = "",
        n_out: int = 1,
        **attrs,
    ) -> ir.Value | tuple[ir.Value, ...]:
        node_name = name
        outs = [ir.Value(name=f"{node_name}/output_{i}") for i in range(n_out)]
        node = ir.node(op_type, list(inputs), attributes=attrs, domain=domain, name=node_name, outputs=outs)
        self.nodes.append(node)
        return outs[0] if n_out == 1 else tuple(outs)

    def if_op(self, cond: ir.Value, then: Sequence[ir.Value], other: Sequence[ir.Value], name: str) -> tuple[ir.Value, ...]:
        """`If(cond)` choosing between two tuples of outer-scope values (no copy of either is made here)."""

        def branch(values: Sequence[ir.Value], which: str) -> ir.Graph:
            outs = [ir.Value(name=f"{name}/{which}/output_{k}", type=v.type, shape=v.shape) for k, v in enumerate(values)]
            nodes = [ir.node("Identity", [v], name=f"{name}/{which}/Identity_{k}", outputs=[o])
                     for k, (v, o) in enumerate(zip(values, outs))]
            return ir.Graph([], outs, nodes=nodes, name=f"{name.strip('/').replace('/', '_')}_{which}")

        outs = [ir.Value(name=f"{name}/output_{k}", type=v.type, shape=v.shape) for k, v in enumerate(then)]
        node = ir.node("If", [cond], attributes={"then_branch": branch(then, "then"), "else_branch": branch(other, "else")},
                       name=name, outputs=outs)
        self.nodes.append(node)
        return tuple(outs)

    def weights(self, job: WeightJob) -> tuple[ir.Value, ...]:
        """Register a job and return one initializer value per slot."""
        values = []
        for slot in job.slots:
            if slot.name in self.initializers:
                raise ValueError(f"initializer {slot.name} defined twice")
            v = ir.Value(name=slot.name, type=ir.TensorType(slot.dtype), shape=ir.Shape(slot.shape))
            self.initializers[slot.name] = v
            values.append(v)
        self.jobs.append(job)
        return tuple(values)

    def const(self, array: np.ndarray | int | float | Sequence[int], dtype: np.dtype | None = None) -> ir.Value:
        """A small constant stored inside model.onnx, shared by value."""
        arr = np.asarray(array, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            label = np.array2string(arr.reshape(-1)[:8], separator=",").replace(" ", "")
            name = f"/model/constants/{arr.dtype.name.upper()}/{list(arr.shape)}/{label}"
            if name in self.initializers:
                name = f"{name}#{len(self._consts)}"
            v = ir.Value(name=name, type=ir.TensorType(NP_TO_IR[arr.dtype]), shape=ir.Shape(arr.shape))
            v.const_value = ir.tensor(arr, name=name)
            self.initializers[name] = v
            self._consts[key] = v
        return self._consts[key]

    def to_model(self, producer: str, version: str) -> ir.Model:
        graph = ir.Graph(
            self.inputs,
            self.outputs,
            nodes=self.nodes,
            initializers=list(self.initializers.values()),
            opset_imports={"": self.opset, MS: 1},
            name="main_graph",
        )
        return ir.Model(graph, ir_version=10, producer_name=producer, producer_version=version)
