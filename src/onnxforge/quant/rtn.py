"""Round-to-nearest block quantization with onnxruntime's conventions.

Symmetric (zero point fixed at ``2**(bits-1)``): take the value ``m`` of largest
magnitude in the block *with its sign* and set ``scale = m / -2**(bits-1)``, so ``m``
maps exactly to level 0 and the full range ``[-2**(bits-1), 2**(bits-1) - 1]`` is used
(llama.cpp Q4_0 / MLAS ``MlasQuantizeBlockwise``; the sign of the scale may be negative).
Asymmetric: ``scale = (max(x, 0) - min(x, 0)) / (2**bits - 1)`` and
``zp = round(-min / scale)``; the range includes 0 because an integer zero point in
``[0, 2**bits - 1]`` can only describe such ranges.
"""
from __future__ import annotations

import numpy as np

from onnxforge.quant.pack import from_levels
from onnxforge.quant.types import QuantizedWeight, check_params, round_levels, safe_div, to_blocks

RTN_BITS = (2, 4, 8)


def signed_absmax(x: np.ndarray) -> np.ndarray:
    """Per-block value of largest magnitude, keeping its sign; ``(..., 1)``.

    On a tie between ``+a`` and ``-a`` the negative one wins (as in onnxruntime).
    """
    hi = x.max(axis=-1, keepdims=True)
    lo = x.min(axis=-1, keepdims=True)
    return np.where(np.abs(hi) > np.abs(lo), hi, lo)


def symmetric_scale(x: np.ndarray, bits: int) -> np.ndarray:
    """RTN symmetric scale ``signed_absmax / -2**(bits-1)``, shape ``(..., 1)``."""
    return signed_absmax(x) / np.float32(-(1 << (bits - 1)))


def asymmetric_scale_zp(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """RTN asymmetric scale and integer zero point (float32), both ``(..., 1)``."""
    qmax = (1 << bits) - 1
    lo = np.minimum(x.min(axis=-1, keepdims=True), 0)
    hi = np.maximum(x.max(axis=-1, keepdims=True), 0)
    scale = (hi - lo) / np.float32(qmax)
    zp = np.clip(np.floor(safe_div(-lo, scale) + np.float32(0.5)), 0, qmax)
    return scale.astype(np.float32), zp.astype(np.float32)


def _rtn_levels(w: np.ndarray, bits: int, block_size: int, symmetric: bool):
    """(levels (N, k_blocks, block_size), scale (..., 1), zero point (..., 1) or the op default, K) in float32."""
    check_params("rtn", bits, block_size, RTN_BITS)
    x, k = to_blocks(w, block_size)
    if symmetric:
        scale, zp = symmetric_scale(x, bits), np.float32(1 << (bits - 1))
    else:
        scale, zp = asymmetric_scale_zp(x, bits)
    return round_levels(x, scale, zp, bits), scale, zp, k


def quantize_rtn(w: np.ndarray, *, bits: int, block_size: int, symmetric: bool) -> QuantizedWeight:
    """Round-to-nearest block quantization of a (N, K) weight; see the module docstring."""
    levels, scale, zp, k = _rtn_levels(w, bits, block_size, symmetric)
    return from_levels(levels, scale[..., 0], None if symmetric else zp[..., 0], bits, block_size, k)


def fake_quantize_rtn(w: np.ndarray, *, bits: int, block_size: int, symmetric: bool) -> np.ndarray:
    """``dequantize(quantize_rtn(w, ...))`` without packing: float32 ``(N, K)``, bit for bit the same values (the
    levels minus the zero point, times the scale, in float32 as MatMulNBits computes them). AWQ's grid search
    (quant/awq.py) evaluates it 20 times per projection group."""
    v, scale, zp, k = _rtn_levels(w, bits, block_size, symmetric)
    v -= zp
    v *= scale
    return v.reshape(v.shape[0], -1)[:, :k]
