"""k-quant style block quantization: per-block search of scale (and zero point).

In the spirit of llama.cpp's ``make_qx_quants`` (symmetric) and ``make_qkx2_quants``
(asymmetric): every block tries a grid of candidate inverse scales around the RTN one,
rounds, solves the weighted least-squares scale for the resulting levels, and keeps the
candidate with the lowest weighted squared error; a few Lloyd rounds (re-round with the
best scale, re-solve) finish. Importance weights are ``|x| + rms(block)`` (llama.cpp's
Q4_K choice without an imatrix): they favour large weights without ignoring small ones.

Differences from llama.cpp forced by MatMulNBits: the asymmetric offset must be an
integer zero point in ``[0, 2**bits - 1]``, so the least-squares ``(scale, min)`` fit is
snapped to the nearest integer zero point and the scale re-solved for it. The RTN levels
are among the candidates, so the weighted error is never above RTN's.

Two implementations of one method: this numpy reference, and the C kernel in ``_native/kquant.c``
that builds use when it is compiled. Every float32 operation below is written in the order the
kernel makes it (block sums are the halving tree of :func:`tsum`), so both give the same bytes.
"""
from __future__ import annotations

import numpy as np

from onnxforge.quant.pack import quantize_blockwise
from onnxforge.quant.rtn import asymmetric_scale_zp, signed_absmax
from onnxforge.quant.types import (
    QuantizedWeight,
    check_params,
    keep_better,
    reciprocal,
    round_levels,
    to_blocks,
)

KQUANT_BITS = (2, 4, 8)
# Candidate inverse scales are (levels + d) / range for these d, as in llama.cpp.
GRID = np.arange(-0.9, 0.91, 0.1, dtype=np.float32)
LLOYD_ROUNDS = 2


def tsum(a: np.ndarray) -> np.ndarray:
    """Sum over the last axis as a halving tree, keeping it: ``(..., 1)``.

    The order of the additions is fixed (``a[i] + a[i + n/2]``, then again on the first half), so
    the C kernel (``_native/kquant.c``, power-of-two blocks of 16 to 256) reproduces every sum, and so
    every choice, bit for bit. Any other length (a per-channel row of K values) is padded with zeros to
    the next power of two: ``x + 0`` is exact, so the padding changes no sum, and power-of-two lengths
    are summed exactly as before.
    """
    n = a.shape[-1]
    if n & (n - 1):
        p = 1 << (n - 1).bit_length()
        a = np.concatenate([a, np.zeros((*a.shape[:-1], p - n), a.dtype)], axis=-1)
        n = p
    while n > 1:
        n //= 2
        a = a[..., :n] + a[..., n:]
    return a


def importance(x: np.ndarray) -> np.ndarray:
    """Per-element weights ``|x| + rms(block)``, never all zero for a nonzero block."""
    rms = np.sqrt(tsum(x * x) / np.float32(x.shape[-1]))
    return np.abs(x) + rms


def _ls_scale(wx: np.ndarray, wt: np.ndarray, lev: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least-squares scale for signed levels ``lev`` and its score.

    Minimising ``sum wt (x - s lev)^2`` gives ``s = sum wx lev / sum wt lev^2``; the
    error is ``sum wt x^2 - score`` with ``score = s * sum wx lev`` (higher is better).
    """
    slx = tsum(wx * lev)
    sl2 = tsum(wt * (lev * lev))
    s = np.divide(slx, sl2, out=np.zeros_like(slx), where=sl2 > 0)
    return s, s * slx


def _lloyd(x: np.ndarray, wt: np.ndarray, wx: np.ndarray, s: np.ndarray, zp: np.ndarray | np.float32,
           score: np.ndarray, bits: int) -> np.ndarray:
    """Alternate rounding and least-squares scale with the zero point fixed; best scale."""
    for _ in range(LLOYD_ROUNDS):
        s_new, sc = _ls_scale(wx, wt, round_levels(x, s, zp, bits) - zp)
        s, score = keep_better(sc > score, (s_new, sc), (s, score))
    return s


def _symmetric(x: np.ndarray, bits: int) -> tuple[np.ndarray, None]:
    """Best per-block scale with the default zero point, ``(B, 1)``."""
    nmax = np.float32(1 << (bits - 1))
    wt = importance(x)
    wx = wt * x
    m = signed_absmax(x)
    inv_m = reciprocal(m)
    best_s, best = _ls_scale(wx, wt, round_levels(x, m / -nmax, nmax, bits) - nmax)  # RTN start
    for d in GRID:
        lev = np.floor(x * (-(nmax + d) * inv_m) + np.float32(0.5))
        np.clip(lev, -nmax, nmax - 1, out=lev)
        s, score = _ls_scale(wx, wt, lev)
        best_s, best = keep_better(score > best, (s, score), (best_s, best))
    return _lloyd(x, wt, wx, best_s, nmax, best, bits), None


def _asymmetric(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Best per-block scale and integer zero point, both ``(B, 1)`` float32."""
    qmax = np.float32((1 << bits) - 1)
    wt = importance(x)
    wx = wt * x
    sw = tsum(wt)
    swx = tsum(wx)
    s0, zp0 = asymmetric_scale_zp(x, bits)
    best_s, best = _ls_scale(wx, wt, round_levels(x, s0, zp0, bits) - zp0)  # RTN start
    best_zp = zp0
    lo = np.minimum(x.min(axis=-1, keepdims=True), 0)
    inv_rng = reciprocal(np.maximum(x.max(axis=-1, keepdims=True), 0) - lo)
    for d in GRID:
        iscale = (qmax + d) * inv_rng
        lev = np.floor((x - lo) * iscale + np.float32(0.5))
        np.clip(lev, 0, qmax, out=lev)
        # joint weighted least squares x ~ a * lev + b, then snap -b/a to an integer zero point
        swl, swl2, swlx = tsum(wt * lev), tsum(wt * (lev * lev)), tsum(wx * lev)
        det = sw * swl2 - swl * swl
        ok = det > 1e-12 * sw * swl2
        a = np.divide(sw * swlx - swx * swl, det, out=np.zeros_like(det), where=ok)
        b = np.divide(swl2 * swx - swl * swlx, det, out=np.zeros_like(det), where=ok)
        ok &= a > 0
        s_fit = np.where(ok, a, reciprocal(iscale))
        zp = np.where(ok, -b * reciprocal(s_fit), -lo * iscale)
        zp = np.clip(np.floor(zp + np.float32(0.5)), 0, qmax)
        s, score = _ls_scale(wx, wt, round_levels(x, s_fit, zp, bits) - zp)
        best_s, best_zp, best = keep_better(score > best, (s, zp, score), (best_s, best_zp, best))
    return _lloyd(x, wt, wx, best_s, best_zp, best, bits), best_zp


def _native(kernel, w: np.ndarray, bits: int, block_size: int, symmetric: bool) -> QuantizedWeight:
    """The C kernel's search: the same float32 operations in the same order, so the same bytes."""
    from onnxforge.quant.pack import from_levels

    blocks, k = to_blocks(w, block_size)
    n, kb, _ = blocks.shape
    scales = np.empty((n, kb), np.float32)
    zps = None if symmetric else np.empty((n, kb), np.float32)
    levels = np.empty(blocks.shape, np.uint8)
    args = (blocks, n * kb, block_size, bits, GRID, len(GRID), LLOYD_ROUNDS, scales)
    rc = kernel.kquant_symmetric(*args, levels) if symmetric else kernel.kquant_asymmetric(*args, zps, levels)
    if rc:
        raise RuntimeError("the k_quant C kernel refused to run on this CPU")
    return from_levels(levels, scales, zps, bits, block_size, k)


def quantize_kquant(w: np.ndarray, *, bits: int, block_size: int, symmetric: bool,
                    native: bool | None = None) -> QuantizedWeight:
    """k-quant style search of per-block scale (and integer zero point); see module docstring.

    ``native`` (default: when built) runs the C kernel, else the numpy reference; both give the same
    bytes (tests/test_quantizers.py checks it), the kernel about 9 times faster.
    """
    from onnxforge.quant._native import KQUANT

    check_params("k_quant", bits, block_size, KQUANT_BITS)
    if native is None:
        native = KQUANT is not None
    if native:
        if KQUANT is None:
            raise RuntimeError("the k_quant C kernel is not built (pip install -e . compiles it)")
        return _native(KQUANT, w, bits, block_size, symmetric)
    return quantize_blockwise(w, bits, block_size, symmetric,
                              lambda x: _symmetric(x, bits) if symmetric else _asymmetric(x, bits))
