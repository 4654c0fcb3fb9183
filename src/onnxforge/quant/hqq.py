"""Half-Quadratic Quantization (Badri & Shaji 2023), calibration-free, vectorised.

HQQ splits ``min_q ||W - Q^-1(Q(W))||_p`` (``p < 1``, robust to outlier errors) with an
auxiliary error variable ``W_e`` and alternates:

1. ``W_q = round(W / s + z)``, ``W_r = s (W_q - z)``;
2. ``W_e = shrink_p(W - W_r, beta)`` -- generalised soft-thresholding for the l_p norm,
   ``sign(e) relu(|e| - |e|^(p-1) / beta)``;
3. refit the quantizer parameters to the outlier-free target ``W - W_e`` (closed form);
4. ``beta *= kappa``.

Adaptations to MatMulNBits, all documented choices:

* Zero points are integers (uint8) in MatMulNBits, so HQQ's continuous zero cannot be
  stored. Step 3 therefore refits the *scale* by least squares (continuous) and, for
  asymmetric blocks, HQQ's mean-based zero update rounded to an integer.
  Symmetric requests keep the default zero point and optimise the scale only.
* Errors are measured in units of each block's initial quantization step, so the
  shrinkage (and ``beta``) behaves the same whatever the magnitude of the weights
  (HQQ's ``beta=10`` assumes unit-scale tensors).
* Each block keeps the iterate with the lowest plain squared error, starting from the
  RTN solution, so HQQ is never worse than RTN on any block.
"""
from __future__ import annotations

import numpy as np

from onnxforge.quant.pack import quantize_blockwise
from onnxforge.quant.rtn import asymmetric_scale_zp, symmetric_scale
from onnxforge.quant.types import (
    QuantizedWeight,
    check_params,
    dot,
    keep_better,
    reciprocal,
    round_levels,
)

HQQ_BITS = (2, 4, 8)
LP_NORM = 0.7
BETA = 10.0
KAPPA = 1.01
ITERS = 20


def shrink_lp(e: np.ndarray, beta: float, p: float) -> np.ndarray:
    """Generalised soft-thresholding: the proximal operator of the l_p norm (``p < 1``)."""
    mag = np.abs(e)
    thr = np.power(mag + np.float32(1e-8), np.float32(p - 1)) * np.float32(1.0 / beta)
    return np.sign(e) * np.maximum(mag - thr, 0)


def _sq_err(x: np.ndarray, s: np.ndarray, lev: np.ndarray) -> np.ndarray:
    r = x - s * lev
    return dot(r, r)


def _optimise(x: np.ndarray, s: np.ndarray, zp: np.ndarray, bits: int, fit_zero: bool
              ) -> tuple[np.ndarray, np.ndarray]:
    """HQQ proximal iterations on blocks ``x`` (B, bs); returns the best ``(scale, zp)``."""
    qmax = np.float32((1 << bits) - 1)
    unit = np.abs(s)
    inv_unit = reciprocal(unit)
    xn = x * inv_unit  # errors in quantization steps
    sn = np.where(unit > 0, np.sign(s), 0).astype(np.float32)  # scale in step units
    best_s, best_zp = sn, zp
    best = np.full_like(sn, np.inf)  # the first iteration scores the RTN start
    beta = BETA
    for _ in range(ITERS):
        q = round_levels(xn, sn, zp, bits)
        err = _sq_err(xn, sn, q - zp)
        best_s, best_zp, best = keep_better(err < best, (sn, zp, err), (best_s, best_zp, best))
        target = xn - shrink_lp(xn - sn * (q - zp), beta, LP_NORM)
        if fit_zero:  # HQQ's zero update mean(W_q - target / s), rounded to an integer
            z = q.mean(axis=-1, keepdims=True) - target.mean(axis=-1, keepdims=True) * reciprocal(sn)
            zp = np.clip(np.floor(z + np.float32(0.5)), 0, qmax)
        lev = q - zp
        l2 = dot(lev, lev)
        sn = np.divide(dot(target, lev), l2, out=sn.copy(), where=l2 > 0)
        beta *= KAPPA
    q = round_levels(xn, sn, zp, bits)
    err = _sq_err(xn, sn, q - zp)
    best_s, best_zp = keep_better(err < best, (sn, zp), (best_s, best_zp))
    return best_s * unit, best_zp


def quantize_hqq(w: np.ndarray, *, bits: int, block_size: int, symmetric: bool) -> QuantizedWeight:
    """HQQ-optimised block quantization of a (N, K) weight; see the module docstring."""
    check_params("hqq", bits, block_size, HQQ_BITS)

    def fit(x: np.ndarray):
        if symmetric:
            s0 = symmetric_scale(x, bits)
            s, _ = _optimise(x, s0, np.full_like(s0, 1 << (bits - 1)), bits, fit_zero=False)
            return s, None
        s0, zp0 = asymmetric_scale_zp(x, bits)
        return _optimise(x, s0, zp0, bits, fit_zero=True)

    return quantize_blockwise(w, bits, block_size, symmetric, fit)
