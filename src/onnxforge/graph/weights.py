"""Weight jobs: thunks that read tensors from a source, reshape/concatenate/quantize them, and
return the arrays of one or more initializers. They capture names, never arrays."""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import numpy as np
import onnx_ir as ir

from ..archs.names import Part
from ..quant.methods import CALIBRATED_FALLBACK
from ..quant.storage import Storage
from ..sources.base import Source
from .builder import Pieces, TensorSlot, WeightJob


def k_blocks(K: int, block_size: int) -> int:
    return -(-K // block_size)


TRANSPOSE_ROWS = 256
PIECES_BYTES = 64 << 20  # float tables larger than this are written in slices of rows as they are read


def read_parts(source: Source, parts: Sequence[Part]):
    """Yield the arrays of `parts` in order; consecutive row ranges of one tensor are read once."""
    i = 0
    while i < len(parts):
        j = i + 1
        if parts[i].rows is not None:
            while (j < len(parts) and parts[j].name == parts[i].name and parts[j].rows is not None
                   and parts[j].rows[0] == parts[j - 1].rows[1]):
                j += 1
        whole = source.read(parts[i].name)
        for p in parts[i:j]:
            yield whole if p.rows is None else whole[p.rows[0]:p.rows[1]]
        del whole
        i = j


def float_matmul_job(source: Source, label: str, init: str, parts: Sequence[Part], N: int, K: int, st: Storage) -> WeightJob:
    """(K, N) weight for a plain MatMul: the Hugging Face (N, K) rows, transposed."""
    parts = tuple(parts)

    def produce():
        out = np.empty((K, N), dtype=st.np_dtype)  # one allocation: transpose and cast on assignment
        row = 0
        for n, chunks in row_chunks(source, parts, K):  # read a slice of rows at a time where the source can
            for start, part in chunks:
                for i in range(0, part.shape[0], TRANSPOSE_ROWS):  # blocks of rows: cache-friendly, 3x faster
                    rows = part[i:i + TRANSPOSE_ROWS].astype(st.np_dtype)
                    out[:, row + start + i:row + start + i + rows.shape[0]] = rows.T
            row += n
        return [out]

    return WeightJob(label, (TensorSlot(init, st.ir_dtype, (K, N)),), produce,
                     st.describe() + stored_note(source, parts, st), tuple(map(str, parts)))


def float_table_job(source: Source, label: str, init: str, name: str, shape: tuple[int, ...], st: Storage,
                    offset: float = 0.0) -> WeightJob:
    """A tensor stored as it is in the checkpoint (embedding table, norm weight, bias), cast."""

    def cast(arr):
        if offset:
            arr = arr.astype(np.float32) + np.float32(offset)
        return arr.astype(st.np_dtype, copy=False)

    def produce():
        read_rows = getattr(source, "read_rows", None)
        if read_rows is not None and len(shape) == 2 and np.prod(shape) * st.np_dtype.itemsize > PIECES_BYTES:
            step = max(1, CHUNK_ELEMENTS // shape[1])  # a large table (an untied 70B embedding: 4 GB) in slices
            return [Pieces(shape, st.np_dtype, lambda: (cast(read_rows(name, i, min(i + step, shape[0])))
                                                        for i in range(0, shape[0], step)))]
        return [cast(source.read(name))]

    return WeightJob(label, (TensorSlot(init, st.ir_dtype, shape),), produce,
                     st.describe() + stored_note(source, [Part(name)], st), (name,))


def concat_vector_job(source: Source, label: str, init: str, parts: Sequence[Part], size: int, st: Storage) -> WeightJob:
    parts = tuple(parts)

    def produce():
        arrays = [np.asarray(a, dtype=np.float32).reshape(-1) for a in read_parts(source, parts)]
        return [np.concatenate(arrays).astype(st.np_dtype)]

    return WeightJob(label, (TensorSlot(init, st.ir_dtype, (size,)),), produce, st.describe(), tuple(map(str, parts)))


def quant_slots(prefix: str, N: int, K: int, st: Storage, scale_dtype: ir.DataType) -> tuple[TensorSlot, ...]:
    kb = k_blocks(K, st.block_size)
    slots = [
        TensorSlot(f"{prefix}.weight_Q{st.bits}", ir.DataType.UINT8, (N, kb, st.block_size * st.bits // 8)),
        TensorSlot(f"{prefix}.weight_scales", scale_dtype, (N, kb)),
    ]
    if not st.symmetric:
        slots.append(TensorSlot(f"{prefix}.weight_zp", ir.DataType.UINT8, (N, -(-kb * st.bits // 8))))
    if st.offsets:  # w = scale x (code - zero point) + offset per block; Emitter.matmul adds them back
        slots.append(TensorSlot(f"{prefix}.weight_offsets", scale_dtype, (N, kb)))
    return tuple(slots)


def quant_matmul_job(source: Source, label: str, prefix: str, parts: Sequence[Part], N: int, K: int, st: Storage,
                     scale_dtype: ir.DataType, scale_np: np.dtype) -> WeightJob:
    """MatMulNBits B / scales / zero_points (/ offsets), carried over from native blocks when the source has
    them in this form (always for storage method "source"), else quantized from the float weights."""
    parts = tuple(parts)
    slots = quant_slots(prefix, N, K, st, scale_dtype)
    native = _all_native(source, parts, st)
    if st.method == "source" and not native:
        raise ValueError(f"{label}: the recipe keeps {', '.join(map(str, parts))} as stored, but the source has "
                         f"no exact {st.describe()} form for it")
    note = getattr(source, "calibration_note", None)
    reasons = [r for r in (note(p.name) for p in parts) if r] if note else []
    if native:
        storage = st.describe() if st.method == "source" else st.describe() + (
            " (calibrated)" if native == "calibrated" else f" (transcoded {native})")
        storage += "".join(f" ({r})" for r in dict.fromkeys(reasons))
    else:
        uncalibrated = ""
        if st.method in CALIBRATED_FALLBACK:  # no calibration data reached it (onnxforge.calibrate): said so
            uncalibrated = " (" + ("; ".join(dict.fromkeys(reasons)) if reasons
                                   else f"{st.method}: no calibration data reaches it") + ")"
            st = replace(st, method=CALIBRATED_FALLBACK[st.method])
        storage = st.describe() + uncalibrated + stored_note(source, parts, st)

    def produce():
        if native:
            return _native_arrays(source, parts, st, scale_np)
        return quantize_rows(source, parts, slots, st, scale_np, K)

    return WeightJob(label, slots, produce, storage, tuple(map(str, parts)))


def stored_formats(source: Source, parts: Sequence[Part]) -> str:
    """"Q4_K/Q6_K": the quantized formats the parts are stored in ("" for float tensors)."""
    fmt = getattr(source, "native_format", None)
    found = {f.origin for f in (fmt(p.name) for p in parts) if f is not None} if fmt else set()
    return "/".join(sorted(found))


def stored_note(source: Source, parts: Sequence[Part], st: Storage, op: str = "MatMulNBits") -> str:
    """What happened to pre-quantized parts that are not carried over: " (dequantized Q4_1)",
    " (re-quantized Q6_K: 8-bit codes > int4)", " (re-quantized IQ2_XS: no exact form)"."""
    origins = stored_formats(source, parts)
    if not origins:
        return ""
    if not st.quantized:
        return f" (dequantized {origins})"
    fmts = [source.native_format(p.name) for p in parts]
    if any(f is not None and f.bits == 0 for f in fmts):
        return f" (re-quantized {origins}: no exact {op} form)"
    wider = max((f.bits for f in fmts if f is not None), default=0)
    why = f"{wider}-bit storage > int{st.bits}" if wider > st.bits else "as the recipe asks"
    return f" (re-quantized {origins}: {why})"


def _all_native(source: Source, parts: Sequence[Part], st: Storage) -> str | None:
    """The native block format(s) if every part is stored exactly in the form `st` describes, else None."""
    fmt = getattr(source, "native_format", None)
    if fmt is None:
        return None
    origins = set()
    for p in parts:
        f = fmt(p.name)
        if (f is None or (f.bits, f.block_size) != (st.bits, st.block_size) or f.zero_points == st.symmetric
                or f.offsets != st.offsets):
            return None
        origins.add(f.origin)
    return "/".join(sorted(origins))


def _native_arrays(source: Source, parts: Sequence[Part], st: Storage, scale_np: np.dtype) -> list[np.ndarray]:
    blocks = []
    for p in parts:
        nb = source.native_blocks(p.name, st.bits, st.block_size)
        rows = slice(*p.rows) if p.rows else slice(None)
        blocks.append([None if a is None else a[rows] for a in (nb.data, nb.scales, nb.zero_points, nb.offsets)])
        del nb
    arrays = [np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks]).astype(scale_np)]
    if not st.symmetric:
        arrays.append(np.concatenate([b[2] for b in blocks]))
    if st.offsets:
        arrays.append(np.concatenate([b[3] for b in blocks]).astype(scale_np))
    return arrays


CHUNK_ELEMENTS = 1 << 22  # rows are quantized in slices of ~4M values (16 MB in float32)


def quantize_rows(source: Source, parts: Sequence[Part], slots: Sequence[TensorSlot], st: Storage,
                  scale_np: np.dtype, K: int) -> list[np.ndarray]:
    """Quantize stacked (N_i, K) parts into preallocated MatMulNBits arrays, a slice of rows at a time.

    Blocks never span rows, so slicing rows gives exactly the result of quantizing the whole
    matrix, while temporaries stay at one slice instead of several copies of the weight.
    """
    from ..quant.methods import quantize

    outs = [np.empty(s.shape, dtype=np.uint8 if s.dtype == ir.DataType.UINT8 else scale_np) for s in slots]

    def store(rows: slice, data, scales, zero_points) -> None:
        outs[0][rows] = data
        outs[1][rows] = scales
        if not st.symmetric:
            outs[2][rows] = zero_points

    from .. import cancel
    from ..quant import pool

    workers = pool.active() if st.method in pool.PROCESS_METHODS else None
    row = 0
    for n, chunks in row_chunks(source, parts, K):
        if workers is not None:  # the slices of one weight on every worker process
            done = workers.quantize_many(chunks, bits=st.bits, block_size=st.block_size, symmetric=st.symmetric,
                                         method=st.method)
        else:
            done = ((start, quantize(chunk, bits=st.bits, block_size=st.block_size, symmetric=st.symmetric,
                                     method=st.method, accuracy_level=st.accuracy_level)) for start, chunk in chunks)
        for start, q in done:
            store(slice(row + start, row + start + q.data.shape[0]), q.data, q.scales, q.zero_points)
            cancel.check()  # a stopped build's threads end at the next slice
        row += n
    return outs


def row_chunks(source: Source, parts: Sequence[Part], K: int, elements: int | None = None):
    """For each part: (its rows, an iterator of (first row, rows) slices of about `elements` values).

    Slices are read on demand with the source's `read_rows` where it has one (a safetensors weight of
    any size never exists whole in memory; a 70B lm_head is 1 billion values), else cut from one read
    of the tensor. The slicing depends only on K, never on the worker count."""
    step = max(1, (elements or CHUNK_ELEMENTS) // max(1, K))
    read_rows = getattr(source, "read_rows", None)
    if read_rows is None:
        for part in read_parts(source, parts):
            yield part.shape[0], ((i, part[i:i + step]) for i in range(0, part.shape[0], step))
            del part
        return
    for p in parts:
        first, last = p.rows if p.rows is not None else (0, source.shape(p.name)[0])
        yield last - first, ((i - first, read_rows(p.name, i, min(i + step, last))) for i in range(first, last, step))


# ---- QDQ (use_qdq): DequantizeLinear's blocked int4/int8 in place of MatMulNBits' packed blocks ------------------
def qdq_type(st: Storage) -> ir.DataType:
    """The DequantizeLinear type of `st`'s codes: int4/int8 when symmetric (the code minus MatMulNBits' implicit
    zero point), uint4/uint8 with zero points. 2-bit codes fit int4/uint4 exactly (opset 21 has no 2-bit type)."""
    wide = st.bits > 4
    if st.symmetric:
        return ir.DataType.INT8 if wide else ir.DataType.INT4
    return ir.DataType.UINT8 if wide else ir.DataType.UINT4


def qdq_slots(prefix: str, N: int, K: int, st: Storage, scale_dtype: ir.DataType, axis: int) -> tuple[TensorSlot, ...]:
    """DequantizeLinear's codes, scales (and zero points), blocks along `axis`: axis 0 on a MatMul's [K, N] weight
    (scales [K/block, N], as onnxruntime's quantizer writes QDQ), axis 1 on an embedding's [N, K] table. The names
    are the quantizer's (`<weight>_DQ_Q4`, `_DQ_scales`, `_DQ_zero_points`); offsets keep MatMulNBits' [N, K/block]."""
    kb = k_blocks(K, st.block_size)
    qt = qdq_type(st)
    shape, blocks = ((K, N), (kb, N)) if axis == 0 else ((N, K), (N, kb))
    slots = [TensorSlot(f"{prefix}.weight_DQ_Q{qt.bitwidth}", qt, shape),
             TensorSlot(f"{prefix}.weight_DQ_scales", scale_dtype, blocks)]
    if not st.symmetric:
        slots.append(TensorSlot(f"{prefix}.weight_DQ_zero_points", qt, blocks))
    if st.offsets:
        slots.append(TensorSlot(f"{prefix}.weight_offsets", scale_dtype, (N, kb)))
    return tuple(slots)


def qdq_arrays(arrays: Sequence[np.ndarray], st: Storage, N: int, K: int, axis: int) -> list[np.ndarray]:
    """MatMulNBits' arrays (B (N, K/block, block*bits/8), scales (N, K/block), packed zero points, offsets) re-laid
    as DequantizeLinear's, every value unchanged: code - zero point and the scale of each weight are the same."""
    from ..quant.pack import pack_bits, unpack_bits

    kb = k_blocks(K, st.block_size)
    data, scales = arrays[0], arrays[1]
    codes = unpack_bits(data, st.bits, st.block_size).reshape(N, kb * st.block_size)[:, :K]
    zp = None if st.symmetric else unpack_bits(arrays[2], st.bits, kb)
    if st.symmetric:  # (code - 2^(bits-1)) as a signed integer: uint8 arithmetic wraps to its two's complement
        codes = np.subtract(codes, np.uint8(1 << (st.bits - 1)), dtype=np.uint8).view(np.int8)
    if axis == 0:
        codes, scales = codes.T, scales.T
        zp = None if zp is None else zp.T
    qt = qdq_type(st)

    def stored(values: np.ndarray) -> np.ndarray:
        if qt.bitwidth == 4:  # ONNX packs 4-bit tensors flat, two to a byte, the first in the low nibble
            return pack_bits(np.ascontiguousarray(values).reshape(-1).view(np.uint8) & np.uint8(0xF), 4)
        return np.ascontiguousarray(values)

    out = [stored(codes), np.ascontiguousarray(scales)]
    if zp is not None:
        out.append(stored(zp))
    if st.offsets:
        out.append(arrays[-1])
    return out


def qdq_matmul_job(source: Source, label: str, prefix: str, parts: Sequence[Part], N: int, K: int, st: Storage,
                   scale_dtype: ir.DataType, scale_np: np.dtype, axis: int = 0) -> WeightJob:
    """`quant_matmul_job`'s weight (the same quantizer, the same codes and scales) for DequantizeLinear."""
    inner = quant_matmul_job(source, label, prefix, parts, N, K, st, scale_dtype, scale_np)
    slots = qdq_slots(prefix, N, K, st, scale_dtype, axis)

    def produce():
        return qdq_arrays(inner.produce(), st, N, K, axis)

    return WeightJob(label, slots, produce, inner.storage + " QDQ", inner.sources)
