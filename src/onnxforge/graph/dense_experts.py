"""Experts computed densely with standard ops, for experts onnxruntime's MoE / QMoE CPU kernels cannot run
(Gemma 4's GeGLU experts: the CPU kernels have SwiGLU only, "Unsupported MoE activation type: geglu").

Every expert runs on every token and is weighted by its routing weight, 0 for the experts not selected, so the
result is the sparse mixture exactly (a finite expert output times 0 adds 0). The stacked checkpoint tensors
become two plain MatMuls (quantized like any other MatMul by the recipe):
  fc1: gate_up_proj (E, 2I, H), gate rows then up rows per expert, as (E x 2I, H) rows: x @ fc1^T -> (T, E, 2, I)
  fc2: down_proj (E, H, I) as (H, E x I) rows: (act(gate) x up x weight) (T, E x I) @ fc2^T -> (T, H)
The cost is a dense model's of all the experts' size (every expert read per token), not the active experts'.

The router ("norm_scaled", MoESpec.mixer): a weightless RMS norm of the layer input, times the router's scale
vector and hidden_size^-0.5, the projection, softmax, top k renormalised, times each selected expert's
per_expert_scale (transformers' Gemma4TextRouter).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from ..archs.names import Part
from ..errors import CheckpointError
from ..quant.storage import Storage
from . import weights as W
from .parts import activation

if TYPE_CHECKING:
    from .emitter import Emitter


class FlatExperts:
    """A source view in which the stacked expert tensors `layouts` names read as 2D (N, K) MatMul rows."""

    read_rows = None  # whole reads: the view reshapes the tensor it reads

    def __init__(self, source, layouts: dict[str, str]):
        self.source, self.layouts = source, layouts  # name -> "rows" (E, N, K) -> (E*N, K); "down" (E, H, I) -> (H, E*I)

    def __getattr__(self, name):
        return getattr(self.source, name)

    def shape(self, name: str) -> tuple[int, ...]:
        shape = tuple(self.source.shape(name))
        if name not in self.layouts:
            return shape
        E, N, K = shape
        return (E * N, K) if self.layouts[name] == "rows" else (N, E * K)

    def read(self, name: str) -> np.ndarray:
        arr = self.source.read(name)
        if name not in self.layouts:
            return arr
        E, N, K = arr.shape
        return arr.reshape(E * N, K) if self.layouts[name] == "rows" else arr.transpose(1, 0, 2).reshape(N, E * K)

    def native_blocks(self, name: str, bits: int, block_size: int):
        return None if name in self.layouts else self.source.native_blocks(name, bits, block_size)

    def native_format(self, name: str):
        if name in self.layouts:
            return None
        fmt = getattr(self.source, "native_format", None)
        return fmt(name) if fmt else None


def _tensor(e: "Emitter", role: str, i: int, shape: tuple[int, ...]) -> str:
    name = e.names.tensor(role, i)
    if name is None:
        raise CheckpointError(f"layer {i}: the experts' {role} tensor is missing from the checkpoint")
    e.expect(name, shape)
    return name


def _matmul(e: "Emitter", x: ir.Value, node: str, name: str, view: FlatExperts, N: int, K: int) -> ir.Value:
    module = name.rsplit(".weight", 1)[0]
    st = e.plan.storage([f"{node}/MatMul", module], "MatMul")
    parts = [Part(name)]
    if not st.quantized:
        w = e.b.weights(W.float_matmul_job(view, node, f"{module}.weight", parts, N, K, st))[0]
        return e.b.op("MatMul", [x, w], f"{node}/MatMul")
    prefix = node.strip("/").replace("/", ".")
    job = W.quant_matmul_job(view, node, prefix, parts, N, K, st, e.io.ir_dtype, e.io.np_dtype)
    return e.matmul_nbits(x, e.b.weights(job), node, K, N, st)


def routing_weights(e: "Emitter", i: int, x: ir.Value) -> ir.Value:
    """(T, E): each expert's weight for each token, 0 for the experts not selected ("norm_scaled" router), computed
    in float32 whatever the activations' dtype (fp16's rounding would flip the selection at near ties more often)."""
    m, H, b = e.spec.moe, e.spec.hidden_size, e.b
    E, node, f32 = m.num_experts, f"/model/layers.{i}/moe/router", Storage()
    if e.io.ir_dtype != ir.DataType.FLOAT:
        x = b.op("Cast", [x], f"{node}/Cast", to=ir.DataType.FLOAT)
    normed = b.op("SimplifiedLayerNormalization", [x, b.const(np.ones(H, np.float32))], f"{node}/norm/LayerNorm",
                  axis=-1, epsilon=e.spec.norm.eps, stash_type=1)
    scale = _vector(e, node, _tensor(e, "router_scale", i, (H,)), H, f32)
    scaled = b.op("Mul", [b.op("Mul", [normed, scale], f"{node}/scale/Mul"), b.const(np.float32(H ** -0.5))],
                  f"{node}/scale/Mul_1")
    (part,) = e.names.linear(["router"], [E], i)
    st = e.plan.storage([f"{node}/MatMul", part.module], "Router")  # float unless a user rule says otherwise
    logits = e.matmul(scaled, node, [part], [E], H, st if st.quantized else f32)
    flat = b.op("Reshape", [logits, b.const([-1, E], np.int64)], f"{node}/Reshape")
    probs = b.op("Softmax", [flat], f"{node}/Softmax", axis=-1)
    top, idx = b.op("TopK", [probs, b.const([m.top_k], np.int64)], f"{node}/TopK", n_out=2, axis=-1)
    top = b.op("Div", [top, b.op("ReduceSum", [top, b.const([-1], np.int64)], f"{node}/ReduceSum", keepdims=1)],
               f"{node}/Div")
    per_expert = _vector(e, node, _tensor(e, "expert_scale", i, (E,)), E, f32)
    top = b.op("Mul", [top, b.op("Gather", [per_expert, idx], f"{node}/Gather", axis=0)], f"{node}/Mul")
    zeros = b.op("Mul", [probs, b.const(np.float32(0.0))], f"{node}/zeros/Mul")
    weights = b.op("ScatterElements", [zeros, idx, top], f"{node}/ScatterElements", axis=-1)
    if e.io.ir_dtype != ir.DataType.FLOAT:
        weights = b.op("Cast", [weights], f"{node}/Cast_1", to=e.io.ir_dtype)
    return weights


def _vector(e: "Emitter", label: str, name: str, size: int, st: Storage) -> ir.Value:
    return e.b.weights(W.float_table_job(e.source, label, name, name, (size,), st))[0]


def dense_experts(e: "Emitter", i: int, x: ir.Value, router_input: ir.Value) -> ir.Value:
    """sum over the experts of weight(token, expert) x down(act(gate(x)) x up(x)), on (B, S, H) -> (B, S, H)."""
    m, H, b = e.spec.moe, e.spec.hidden_size, e.b
    E, I, base = m.num_experts, m.intermediate_size, f"/model/layers.{i}/moe/experts"
    weights = routing_weights(e, i, router_input)  # (T, E)
    gate_up = _tensor(e, "experts_gate_up", i, (E, 2 * I, H))
    down = _tensor(e, "experts_down", i, (E, H, I))
    view = FlatExperts(e.source, {gate_up: "rows", down: "down"})
    flat = b.op("Reshape", [x, b.const([-1, H], np.int64)], f"{base}/Reshape")
    h = _matmul(e, flat, f"{base}/gate_up_proj", gate_up, view, E * 2 * I, H)
    h = b.op("Reshape", [h, b.const([-1, E, 2, I], np.int64)], f"{base}/Reshape_1")
    gate, up = b.op("Split", [h, b.const([1, 1], np.int64)], f"{base}/Split", n_out=2, axis=2)
    h = b.op("Mul", [activation(e, gate, f"{base}/act_fn"), up], f"{base}/Mul")  # (T, E, 1, I)
    w = b.op("Reshape", [weights, b.const([-1, E, 1, 1], np.int64)], f"{base}/Reshape_2")
    h = b.op("Reshape", [b.op("Mul", [h, w], f"{base}/Mul_1"), b.const([-1, E * I], np.int64)], f"{base}/Reshape_3")
    y = _matmul(e, h, f"{base}/down_proj", down, view, H, E * I)
    return b.op("Reshape", [y, b.op("Shape", [x], f"{base}/Shape")], f"{base}/Reshape_4")
