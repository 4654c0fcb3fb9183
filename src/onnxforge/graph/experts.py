"""Expert weights of a mixture-of-experts layer: found in any checkpoint form, read one expert's
projection at a time, written as the MoE / QMoE op's stacked tensors.

Checkpoint forms (archs/names.py roles):
  * one module per expert: Mixtral `block_sparse_moe.experts.{e}.w1/w2/w3`, Qwen `mlp.experts.{e}.gate_proj/...`;
  * stacked (E, N, K) tensors: transformers 5 `mlp.experts.gate_up_proj` (gate rows, then up rows) and
    `down_proj`, Granite's `input_linear` / `output_linear`, llama.cpp's `ffn_{gate,up,down}_exps`;
  * GPT-OSS's stacked (E, K, N) tensors with gate and up interleaved (spec.moe.layout "interleaved_t"),
    and their MXFP4 form `<name>_blocks` / `<name>_scales` (quant/mxfp4.py).
The op's fc1 is SwiGLU fused and interleaved (`swiglu_fusion=1`): row 2j is gate j, row 2j+1 is up j.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import onnx_ir as ir

from ..errors import CheckpointError
from ..quant.storage import Storage
from .builder import Pieces, TensorSlot, WeightJob

if TYPE_CHECKING:
    from .emitter import Emitter


def read_expert(source, name: str, e: int) -> np.ndarray:
    """Expert `e` of a stacked tensor, reading only its bytes where the source can."""
    read_slice = getattr(source, "read_slice", None)
    if read_slice is not None:
        return read_slice(name, e)
    return source.read(name)[e]


def interleave(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    out = np.empty((gate.shape[0] * 2, *gate.shape[1:]), dtype=gate.dtype)
    out[0::2] = gate
    out[1::2] = up
    return out


@dataclass
class ExpertTensors:
    """How to read one layer's experts: fc1 (2I, H) interleaved and fc2 (H, I) of expert e, float32."""

    fc1: Callable[[int], np.ndarray]
    fc2: Callable[[int], np.ndarray]
    fc1_sources: tuple[str, ...]
    fc2_sources: tuple[str, ...]
    fc1_bias: Callable[[int], np.ndarray] | None = None
    fc2_bias: Callable[[int], np.ndarray] | None = None
    bias_sources: tuple[str, ...] = ()  # fc1 bias tensors, then the fc2 bias tensor
    # GPT-OSS's original MXFP4 blocks, if the source has them: per projection, expert -> (codes (N, K/32, 16) in the
    # Hugging Face nibble order, E8M0 scales (N, K/32)), fc1's rows interleaved like `fc1`
    mxfp4: tuple[Callable[[int], tuple[np.ndarray, np.ndarray]], Callable[[int], tuple[np.ndarray, np.ndarray]]] \
        | None = None
    # the source's own blocks of each projection, expert -> NativeBlocks (fc1's rows interleaved), where every
    # tensor of the projection has an exact block form (GGUF's stacked experts)
    blocks: tuple[Callable[[int], object], Callable[[int], object]] | None = None
    # the names whose native formats `blocks` reads, where they are not fc1_sources / fc2_sources: one expert's
    # slice of stacked tensors (expert_slice), blocks onnxforge.calibrate made
    block_names: tuple[tuple[str, ...], tuple[str, ...]] | None = None


def expert_slice(tensor: str, e: int, half: str = "") -> str:
    """The name of expert e's slice of a stacked (E, N, K) tensor, or of the gate / up half of its rows ("gate",
    "up": a fused gate_up tensor); onnxforge.calibrate keys its blocks of stacked experts by these."""
    return f"{tensor}#{e}" + (f".{half}" if half else "")


def read_expert_slice(source, name: str) -> np.ndarray:
    """float32 of an expert_slice name."""
    tensor, _, rest = name.rpartition("#")
    e, _, half = rest.partition(".")
    w = np.asarray(read_expert(source, tensor, int(e)), dtype=np.float32)
    n = w.shape[0] // 2
    return w[:n] if half == "gate" else w[n:] if half == "up" else w


def _calibrated_slices(src, gates: list[str], ups: list[str], downs: list[str]) -> dict:
    """ExpertTensors fields for stacked experts whose per-expert slices onnxforge.calibrate made blocks for."""
    has = getattr(src, "has_blocks", None)
    if has is None or not all(has(n) for n in gates + ups + downs):
        return {}
    blocks = _module_blocks(src, gates, ups, downs)
    return {"blocks": blocks, "block_names": (tuple(gates + ups), tuple(downs))} if blocks else {}


def find_experts(e: "Emitter", i: int) -> ExpertTensors:
    """The checkpoint form of layer i's experts, with shapes checked against the config."""
    from ..quant.mxfp4 import mxfp4_expert, mxfp4_shape

    m, H, src, names = e.spec.moe, e.spec.hidden_size, e.source, e.names
    E, I = m.num_experts, m.intermediate_size
    f = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731

    def check(name: str, shape: tuple[int, ...], got: tuple[int, ...] | None = None) -> None:
        got = tuple(src.shape(name)) if got is None else got
        if got != shape:
            raise CheckpointError(f"tensor {name!r} has shape {got}, but config.json implies {shape}")

    bias = None
    if m.expert_bias:
        b1, b2 = names.tensor("experts_gate_up", i, "_bias"), names.tensor("experts_down", i, "_bias")
        apart = [names.module(r, i, required=False) for r in ("experts_gate", "experts_up", "experts_down")]
        if b1 is None and all(apart) and all(src.has(f"{mod}.bias") for mod in apart):
            # llama.cpp: the gate and up biases stacked apart like their weights, (E, I) each
            bg, bu, b2 = (f"{mod}.bias" for mod in apart)
            for n in (bg, bu):
                check(n, (E, I))
            check(b2, (E, H))
            bias = (lambda x: interleave(f(read_expert(src, bg, x)), f(read_expert(src, bu, x))),
                    lambda x: f(read_expert(src, b2, x)), (bg, bu, b2))
        elif b1 is None or b2 is None:
            raise CheckpointError(f"layer {i}: the experts' biases (gate_up_proj_bias, down_proj_bias) are missing")
        else:
            check(b1, (E, 2 * I))
            check(b2, (E, H))
            bias = (lambda x: f(read_expert(src, b1, x)), lambda x: f(read_expert(src, b2, x)), (b1, b2))

    gate_up, down = names.tensor("experts_gate_up", i), names.tensor("experts_down", i)
    if gate_up is not None and down is not None:
        if m.layout in ("interleaved_t", "halves_t"):  # (E, H, 2I), down (E, I, H): GPT-OSS with gate/up
            check(gate_up, (E, H, 2 * I))               # alternating columns, Llama 4 with gate columns then up
            check(down, (E, I, H))

            def fc1_t(x: int) -> np.ndarray:
                w = f(read_expert(src, gate_up, x)).T
                return interleave(w[:I], w[I:]) if m.layout == "halves_t" else w.copy()

            return ExpertTensors(fc1_t, lambda x: f(read_expert(src, down, x)).T.copy(), (gate_up,), (down,),
                                 *(bias or (None, None, ())))
        check(gate_up, (E, 2 * I, H))
        check(down, (E, H, I))

        def fc1_stacked(x: int) -> np.ndarray:
            w = f(read_expert(src, gate_up, x))
            return interleave(w[:I], w[I:])

        return ExpertTensors(fc1_stacked, lambda x: f(read_expert(src, down, x)), (gate_up,), (down,),
                             *(bias or (None, None, ())),
                             **_calibrated_slices(src, [expert_slice(gate_up, x, "gate") for x in range(E)],
                                                  [expert_slice(gate_up, x, "up") for x in range(E)],
                                                  [expert_slice(down, x) for x in range(E)]))

    blocks = [names.tensor(r, i, "_blocks") for r in ("experts_gate_up", "experts_down")]
    if all(blocks):  # GPT-OSS MXFP4: (E, N, K/32, 16) codes + (E, N, K/32) E8M0 scales, N rows interleaved
        k1, k2 = blocks
        s1, s2 = k1[: -len("_blocks")] + "_scales", k2[: -len("_blocks")] + "_scales"
        check(k1, (E, 2 * I, H), mxfp4_shape(src.shape(k1)))
        check(k2, (E, H, I), mxfp4_shape(src.shape(k2)))
        raw = lambda k, s: lambda x: (np.asarray(src.read_slice(k, x, raw=True), dtype=np.uint8),  # noqa: E731
                                      np.asarray(src.read_slice(s, x, raw=True), dtype=np.uint8))
        return ExpertTensors(lambda x: mxfp4_expert(src, k1, s1, x), lambda x: mxfp4_expert(src, k2, s2, x),
                             (k1, s1), (k2, s2), *(bias or (None, None, ())), mxfp4=(raw(k1, s1), raw(k2, s2)))

    gate, up = names.tensor("experts_gate", i), names.tensor("experts_up", i)
    if gate is not None and up is not None and down is not None:  # llama.cpp: gate and up stacked apart
        for n in (gate, up):
            check(n, (E, I, H))
        check(down, (E, H, I))
        fp4 = None
        blocks_of = getattr(src, "mxfp4_blocks", None)  # a GGUF's MXFP4 experts: the same codes and scales
        if blocks_of is not None and all(getattr(src.native_format(n), "origin", None) == "MXFP4"
                                         for n in (gate, up, down)):
            def fc1_blocks(x: int) -> tuple[np.ndarray, np.ndarray]:
                (gb, gs), (ub, us) = blocks_of(gate, x), blocks_of(up, x)
                return interleave(gb, ub), interleave(gs, us)

            fp4 = (fc1_blocks, lambda x: blocks_of(down, x))
        calibrated = _calibrated_slices(src, *([expert_slice(n, x) for x in range(E)] for n in (gate, up, down)))
        return ExpertTensors(lambda x: interleave(f(read_expert(src, gate, x)), f(read_expert(src, up, x))),
                             lambda x: f(read_expert(src, down, x)), (gate, up), (down,), *(bias or (None, None, ())),
                             mxfp4=fp4, **(calibrated or {"blocks": _stored_blocks(src, gate, up, down)}))

    per = [[names.module(r, i, e=x) for x in range(E)] for r in ("expert_gate", "expert_up", "expert_down")]
    gates, ups, downs = ([f"{mod}.weight" for mod in mods] for mods in per)
    for g, u, d in zip(gates, ups, downs):
        check(g, (I, H))
        check(u, (I, H))
        check(d, (H, I))
    return ExpertTensors(lambda x: interleave(f(src.read(gates[x])), f(src.read(ups[x]))),
                         lambda x: f(src.read(downs[x])), tuple(gates + ups), tuple(downs),
                         *(bias or (None, None, ())), blocks=_module_blocks(src, gates, ups, downs))


def _interleaved(g, u):
    """The NativeBlocks of gate and up with their rows alternating, as fc1's."""
    pair = lambda a, b: None if a is None else interleave(a, b)  # noqa: E731
    return dataclasses.replace(g, data=interleave(g.data, u.data), scales=interleave(g.scales, u.scales),
                               zero_points=pair(g.zero_points, u.zero_points), offsets=pair(g.offsets, u.offsets))


def _stored_blocks(src, gate: str, up: str, down: str):
    """(fc1, fc2) readers of the stacked experts' own blocks where gate and up share one form and every tensor
    has one (GGUF)."""
    fmt, blocks_of = getattr(src, "native_format", None), getattr(src, "read_expert_blocks", None)
    if fmt is None or blocks_of is None:
        return None
    forms = [fmt(n) for n in (gate, up, down)]
    if any(f is None or not f.bits for f in forms) or forms[0] != forms[1]:
        return None
    return lambda x: _interleaved(blocks_of(gate, x), blocks_of(up, x)), lambda x: blocks_of(down, x)


def _module_blocks(src, gates: list[str], ups: list[str], downs: list[str]):
    """(fc1, fc2) readers of per-expert modules' own blocks (GPTQ / AWQ / compressed-tensors / Quark: codes,
    scales, zero points) where every expert's gate and up share one form, every down another, each at a block
    QMoE takes (16 to 256) and 4 or 8 bits."""
    from ..quant.qmoe import QMOE_BITS, QMOE_BLOCK_SIZES

    fmt = getattr(src, "native_format", None)
    if fmt is None:
        return None
    fc1_forms = {fmt(n) for n in gates + ups}
    fc2_forms = {fmt(n) for n in downs}
    for forms in (fc1_forms, fc2_forms):
        if len(forms) != 1:
            return None
        (f,) = forms
        if f is None or f.bits not in QMOE_BITS or f.offsets or f.block_size not in QMOE_BLOCK_SIZES[1:]:
            return None
    (f1,), (f2,) = fc1_forms, fc2_forms
    return (lambda x: _interleaved(src.native_blocks(gates[x], f1.bits, f1.block_size),
                                   src.native_blocks(ups[x], f1.bits, f1.block_size)),
            lambda x: src.native_blocks(downs[x], f2.bits, f2.block_size))


def padded(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """`a` in the top-left corner of zeros of `shape` (itself when it has that shape already)."""
    if a.shape == tuple(shape):
        return a
    out = np.zeros(shape, dtype=a.dtype)
    out[tuple(slice(0, n) for n in a.shape)] = a
    return out


def pad_intermediate(t: ExpertTensors, I: int, Ip: int, H: int) -> ExpertTensors:
    """The experts with their intermediate dimension zero-padded from I to Ip (the CUDA QMoE kernels' K tile):
    fc1 (2Ip, H) gains zero rows (gate j and up j for j >= I: fc1 is interleaved, so they come last), its bias
    zeros, fc2 (H, Ip) zero columns. Exact: a padded unit's gate and up are 0, so SwiGLU gives 0 (also GPT-OSS's
    clamped form: 0 x sigmoid(0) x (0 + beta)), which the zero columns of fc2 then multiply."""
    if Ip == I:
        return t
    fc1_bias = None if t.fc1_bias is None else (lambda x: padded(t.fc1_bias(x), (2 * Ip,)))
    return dataclasses.replace(t, fc1=lambda x: padded(t.fc1(x), (2 * Ip, H)), fc2=lambda x: padded(t.fc2(x), (H, Ip)),
                               fc1_bias=fc1_bias)


def each_expert(E: int, work: Callable[[int], object], ahead: int = 2):
    """work(0), work(1), ... in order, with up to `ahead` experts computed in advance on threads (numpy and
    the quantizers release the GIL): memory stays at a few experts, time is not one expert after the other."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(ahead) as pool:
        pending = [pool.submit(work, x) for x in range(min(ahead, E))]
        for x in range(E):
            result = pending.pop(0).result()
            if x + ahead < E:
                pending.append(pool.submit(work, x + ahead))
            yield result


def float_experts_job(source_of: Callable[[int], np.ndarray], label: str, init: str, E: int, N: int, K: int,
                      st: Storage, sources: tuple[str, ...], note: str = "") -> WeightJob:
    """(E, N, K) float weights (or (E, N) biases with K = 0) for the MoE op, read and written one expert at
    a time (the stacked array never exists whole)."""
    shape = (E, N, K) if K else (E, N)

    def produce():
        return [Pieces(shape, np.dtype(st.np_dtype), lambda: each_expert(E, lambda x: source_of(x).astype(st.np_dtype)))]

    return WeightJob(label, (TensorSlot(init, st.ir_dtype, shape),), produce, st.describe() + note, sources)


def describe(st: Storage) -> str:
    if not st.quantized:
        return st.describe()
    where = "per-channel" if not st.block_size else f"block {st.block_size}"
    return f"int{st.bits} {st.method} {'sym' if st.symmetric else 'asym'} {where} (QMoE)"


def quant_experts_slots(prefix: str, E: int, N: int, K: int, st: Storage, scale_dtype: ir.DataType
                        ) -> tuple[TensorSlot, ...]:
    bits, block = st.bits, st.block_size
    slots = [TensorSlot(f"{prefix}.qweight", ir.DataType.UINT8, (E, N, K * bits // 8)),
             TensorSlot(f"{prefix}.scales", scale_dtype, (E, N, K // block) if block else (E, N))]
    if not st.symmetric:
        zp = (E, N, -(-(K // block) * bits // 8)) if block else (E, -(-N * bits // 8))
        slots.append(TensorSlot(f"{prefix}.zero_points", ir.DataType.UINT8, zp))
    return tuple(slots)


def quant_experts_job(source_of: Callable[[int], np.ndarray], label: str, prefix: str, E: int, N: int, K: int,
                      st: Storage, scale_dtype: ir.DataType, scale_np: np.dtype, sources: tuple[str, ...],
                      note: str = "") -> WeightJob:
    """QMoE codes / scales (/ zero points) of one projection, quantized one expert at a time: the codes are
    written expert by expert as they are made; the scales (1/4 to 1/16 of the codes) wait for them."""
    from ..quant.qmoe import qmoe_arrays, quantize_expert

    slots = quant_experts_slots(prefix, E, N, K, st, scale_dtype)
    method = st.method if st.method in ("rtn", "k_quant", "hqq", "default") else "rtn"

    def produce():
        rest = [np.empty(s.shape, dtype=np.uint8 if s.dtype == ir.DataType.UINT8 else scale_np) for s in slots[1:]]

        def quantized(x: int) -> np.ndarray:
            q = quantize_expert(source_of(x), bits=st.bits, block_size=st.block_size, symmetric=st.symmetric,
                                method=method)
            codes, *others = qmoe_arrays(q, per_channel=not st.block_size)
            for out, arr in zip(rest, others):
                out[x] = arr
            return codes

        return [Pieces(slots[0].shape, np.dtype(np.uint8), lambda: each_expert(E, quantized)), *rest]

    return WeightJob(label, slots, produce, describe(st) + note, sources)


def stored_storage(st: Storage, code_bits: int) -> Storage:
    """The QMoE storage of a projection carried over from its own blocks (`st`: the recipe's "source" storage):
    as stored without a minimum; a type with one in its closest form, 8-bit codes with zero points."""
    if not st.offsets:
        return st
    return dataclasses.replace(st, bits=8, symmetric=False, offsets=False, origin=f"{st.origin}:{code_bits}")


def describe_stored(st: Storage, scale_np: np.dtype) -> str:
    if st.method != "source":  # onnxforge.calibrate's blocks (graph/moe.py as_stored): the codes it chose
        return f"int{st.bits} {st.method} {'sym' if st.symmetric else 'asym'} block {st.block_size} (calibrated, QMoE)"
    origin, _, code_bits = st.origin.partition(":")
    zp = "" if st.symmetric else " zero points"
    if code_bits:  # quant/qmoe.py closest_min_form
        return f"int8 block {st.block_size} zero points (closest {origin} form, QMoE)"
    if np.dtype(scale_np) != np.float32:  # fp16 scales (a GPU build) need not hold d x sub-scale exactly
        return f"int{st.bits} block {st.block_size}{zp} (closest {origin} form: {np.dtype(scale_np)} scales, QMoE)"
    return f"int{st.bits} block {st.block_size}{zp} (exact {origin}, QMoE)"


def stored_experts_job(blocks_of: Callable[[int], object], source_of: Callable[[int], np.ndarray], label: str,
                       prefix: str, E: int, N: int, K: int, st: Storage, code_bits: int, scale_dtype: ir.DataType,
                       scale_np: np.dtype, sources: tuple[str, ...], pad_to: tuple[int, int] | None = None
                       ) -> WeightJob:
    """QMoE arrays of one projection from the checkpoint's own blocks, one expert at a time (quant/qmoe.py
    qmoe_from_blocks). A closest form (a type with a minimum), and any form under fp16 scales (a GPU build: d x
    sub-scale need not be an fp16 value), is compared with the file's values expert by expert, and the job's
    `max_difference` says by how much they differ (0 for the exact forms at fp32 scales, not measured); fp16
    scales that held every value are labelled exact after all. `pad_to` (N', K'): the arrays of each expert
    zero-padded to (N', K') (see pad_intermediate; `source_of` stays the unpadded (N, K) weight): the padded
    codes, scales and zero points are 0, so the padded weights are 0."""
    from ..quant.qmoe import dequantize_qmoe, qmoe_from_blocks

    Np, Kp = pad_to or (N, K)
    slots = quant_experts_slots(prefix, E, Np, Kp, st, scale_dtype)
    # the difference is measured (not for calibrated blocks: `source_of` is the float weight they quantize)
    closest = ":" in st.origin or (np.dtype(scale_np) != np.float32 and st.method == "source")
    job = WeightJob(label, slots, lambda: [], describe_stored(st, scale_np), sources)
    job.max_difference = None if closest else 0.0

    def produce():
        rest = [np.empty(s.shape, dtype=np.uint8 if s.dtype == ir.DataType.UINT8 else scale_np) for s in slots[1:]]
        worst = np.zeros(E)  # one slot per expert: the experts are made on two threads

        def one(x: int) -> np.ndarray:
            codes, scales, zp = qmoe_from_blocks(blocks_of(x), st.block_size, code_bits, st.bits)
            scales = scales.astype(scale_np)
            if closest:
                w = dequantize_qmoe(codes, scales, zp, st.bits, st.block_size)
                worst[x] = float(np.abs(w - source_of(x)).max())
            rest[0][x] = padded(scales, rest[0].shape[1:])
            if zp is not None:
                rest[1][x] = padded(zp, rest[1].shape[1:])
            return padded(codes, slots[0].shape[1:])

        def codes():
            yield from each_expert(E, one)
            if closest:
                job.max_difference = float(worst.max())
                if job.max_difference == 0 and ":" not in st.origin:  # fp16 scales that held every value
                    job.storage = describe_stored(st, np.dtype(np.float32))

        return [Pieces(slots[0].shape, np.dtype(np.uint8), codes), *rest]

    job.produce = produce
    return job


def fp4_pack(blocks: np.ndarray) -> np.ndarray:
    """One expert's MXFP4 blocks (N, K/32, 16) as CUDA QMoE's fp4 weight (K, N/2): two rows per byte, as
    onnxruntime-genai's GPT-OSS loader repacks them (the codes themselves are unchanged)."""
    even, odd = blocks[0::2], blocks[1::2]
    lo = ((odd & 0x0F) << 4) | (even & 0x0F)  # even k
    hi = ((odd >> 4) << 4) | (even >> 4)  # odd k
    packed = np.stack((lo, hi), axis=-1)  # (N/2, K/32, 16, 2)
    return np.ascontiguousarray(packed.transpose(1, 2, 3, 0).reshape(blocks.shape[1] * 32, blocks.shape[0] // 2))


def fp4_experts_job(read: Callable[[int], tuple[np.ndarray, np.ndarray]], label: str, prefix: str, E: int, N: int,
                    K: int, sources: tuple[str, ...]) -> WeightJob:
    """CUDA QMoE quant_type "fp4" inputs from GPT-OSS's MXFP4 blocks (`read(e)`: codes, scales), carried over
    expert by expert: weight (E, K, N/2), E8M0 scales (E, N, K/32) as stored, global scales 1."""
    slots = (TensorSlot(f"{prefix}.qweight", ir.DataType.UINT8, (E, K, N // 2)),
             TensorSlot(f"{prefix}.scales", ir.DataType.FLOAT8E8M0, (E, N, K // 32)),
             TensorSlot(f"{prefix}.global_scales", ir.DataType.FLOAT, (E,)))

    def produce():
        scales = np.empty(slots[1].shape, np.uint8)  # 1/16 of the codes: filled as the codes are written

        def weight(x: int) -> np.ndarray:
            codes, scales[x] = read(x)
            return fp4_pack(codes)

        return [Pieces(slots[0].shape, np.dtype(np.uint8), lambda: each_expert(E, weight)), scales,
                np.ones(E, np.float32)]

    return WeightJob(label, slots, produce, "mxfp4 (carried over)", sources)
