"""Bit packing, dequantization and the GatherBlockQuantized view of a QuantizedWeight."""
from __future__ import annotations

import numpy as np

from onnxforge.errors import RecipeError
from onnxforge.quant.types import QuantizedWeight


def _per_byte(bits: int) -> int:
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"bits must divide 8, got {bits}")
    return 8 // bits


def pack_bits(values: np.ndarray, bits: int, fill: int = 0) -> np.ndarray:
    """Pack unsigned ``bits``-wide values along the last axis, low bits first.

    The last axis is padded with ``fill`` to a multiple of ``8 // bits``; the result has
    ``ceil(M * bits / 8)`` bytes on that axis. Values must fit in ``bits``.
    """
    per = _per_byte(bits)
    v = np.asarray(values, dtype=np.uint8)
    if per == 1:
        return np.ascontiguousarray(v)
    m = v.shape[-1]
    pad = -m % per
    if pad:
        v = np.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, pad)], constant_values=fill)
    v = v.reshape(*v.shape[:-1], -1, per)
    out = v[..., 0].copy()
    for i in range(1, per):
        out |= v[..., i] << np.uint8(i * bits)
    return out


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: the first ``count`` values of the last axis, uint8."""
    per = _per_byte(bits)
    p = np.asarray(packed, dtype=np.uint8)
    if per == 1:
        return p[..., :count]
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    v = (p[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return v.reshape(*p.shape[:-1], -1)[..., :count]


def from_levels(levels: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None,
                bits: int, block_size: int, K: int) -> QuantizedWeight:  # noqa: N803
    """Build a QuantizedWeight from unpacked levels.

    Args:
        levels: ``(N, k_blocks, block_size)`` integers (any dtype) in ``[0, 2**bits-1]``.
        scales: ``(N, k_blocks)``.
        zero_points: ``(N, k_blocks)`` integer zero points, or None for symmetric.
    """
    data = pack_bits(levels.astype(np.uint8), bits)
    # unused trailing zero-point slots hold the op default, as onnxruntime writes them
    zp = None if zero_points is None else pack_bits(zero_points.astype(np.uint8), bits, 1 << (bits - 1))
    return QuantizedWeight(data=data, scales=np.ascontiguousarray(scales, dtype=np.float32),
                           zero_points=zp, bits=bits, block_size=block_size, K=K)


def zero_point_levels(q: QuantizedWeight) -> np.ndarray:
    """Unpacked zero points ``(N, k_blocks)`` uint8 (the op default when symmetric)."""
    if q.zero_points is None:
        return np.full(q.scales.shape, 1 << (q.bits - 1), dtype=np.uint8)
    return unpack_bits(q.zero_points, q.bits, q.k_blocks)


def dequantize(q: QuantizedWeight) -> np.ndarray:
    """float32 ``(N, K)``: ``(q - zp) * scale`` per block, exactly as MatMulNBits does."""
    levels = unpack_bits(q.data, q.bits, q.block_size).astype(np.float32)
    levels -= zero_point_levels(q)[..., None].astype(np.float32)
    levels *= q.scales[..., None]
    return levels.reshape(q.N, -1)[:, : q.K]


def to_gather_block_quantized(q: QuantizedWeight, *, shared: bool = True
                              ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Inputs for ``com.microsoft.GatherBlockQuantized`` that reproduce ``dequantize(q)[ids]``.

    Use with attributes ``bits=q.bits, block_size=q.block_size, gather_axis=0,
    quantize_axis=1`` and uint8 data. scales and zero_points are the MatMulNBits ones
    unchanged (GatherBlockQuantized takes the same packed zero points).

    GatherBlockQuantized derives the embedding width from the data's last dimension
    (``cols * 8 // bits``), so it cannot skip MatMulNBits' per-row padding:

    * ``K % block_size == 0``: ``data`` is a zero-copy reshape ``(N, k_blocks * blob)``
      of ``q.data`` -- the same bytes, so a tied embedding / lm_head can share them
      (MatMulNBits itself needs the 3-D shape, so share through external data or a
      Reshape; the op rejects a 2-D B initializer).
    * otherwise, with ``shared=True`` (default) this raises RecipeError so the caller
      can fall back to separate tensors; with ``shared=False`` it returns a trimmed
      copy ``(N, K * bits // 8)`` that is correct but not byte-identical to B.
    * ``K * bits`` not a multiple of 8 (odd K at 4 bits, ...): no layout works, the op
      would output a padded last dimension; always RecipeError.
    """
    blob = q.block_size * q.bits // 8
    if q.K % q.block_size == 0:
        return q.data.reshape(q.N, q.k_blocks * blob), q.scales, q.zero_points
    if shared:
        raise RecipeError(
            f"GatherBlockQuantized cannot share MatMulNBits bytes when K={q.K} is not a multiple of "
            f"block_size={q.block_size} (the op would output {q.k_blocks * q.block_size} columns); "
            "use a block size dividing K, or untie the embedding (shared=False gives a trimmed copy)")
    if (q.K * q.bits) % 8:
        raise RecipeError(f"GatherBlockQuantized cannot represent K={q.K} at {q.bits} bits "
                          "(K * bits must be a multiple of 8); keep this embedding unquantized")
    data = q.data.reshape(q.N, q.k_blocks * blob)[:, : q.K * q.bits // 8]
    return np.ascontiguousarray(data), q.scales, q.zero_points


def quantize_blockwise(w: np.ndarray, bits: int, block_size: int, symmetric: bool, fit) -> QuantizedWeight:
    """Shared driver of the searching methods: `fit(blocks)` returns per-block (scale, zero point or None),
    each `(..., 1)`; blocks are processed a slice of rows at a time to bound temporaries."""
    from onnxforge.quant.types import round_levels, row_chunks, to_blocks

    blocks, k = to_blocks(w, block_size)
    n, kb, _ = blocks.shape
    scales = np.empty((n, kb), np.float32)
    zps = None if symmetric else np.empty((n, kb), np.float32)
    levels = np.empty(blocks.shape, np.uint8)
    for rows in row_chunks(n, kb * block_size):
        x = blocks[rows]
        s, zp = fit(x)
        levels[rows] = round_levels(x, s, np.float32(1 << (bits - 1)) if zp is None else zp, bits)
        scales[rows] = s[..., 0]
        if zps is not None:
            zps[rows] = zp[..., 0]
    return from_levels(levels, scales, zps, bits, block_size, k)
