"""AWQ (Lin et al. 2023): activation-aware per-input-channel scales, without torch.

Input channels that carry large activations matter more; scaling a weight's input channel up by ``s`` (and
the activation down by ``s``, folded into the previous norm's weight or the previous projection's rows)
leaves the float function unchanged while giving those channels finer quantization steps. The scale is
``s = mean|x|^alpha`` per channel, normalised by ``sqrt(max(s) * min(s))``; ``alpha`` is chosen on a grid
``0, 1/grid, ..., (grid-1)/grid`` by the squared error of the projections' outputs on calibration inputs
(``alpha = 0`` is plain quantization, so AWQ is never worse than it on the data it searched).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

GRID = 20


def awq_scales(x_mean: np.ndarray, alpha: float) -> np.ndarray:
    """``s = x_mean^alpha / sqrt(max * min)`` (float32, all > 0); ``x_mean`` is the per-channel mean |x|."""
    s = np.power(np.maximum(x_mean.astype(np.float64), 1e-4), alpha)
    s = s / np.sqrt(s.max() * s.min())
    return s.astype(np.float32)


def awq_search(x: np.ndarray, x_mean: np.ndarray, weights: Sequence[np.ndarray],
               fake_quant: Callable[[np.ndarray], np.ndarray], grid: int = GRID) -> tuple[np.ndarray, float, list[float]]:
    """The best scales for projections `weights` ((N_i, K) each) that read `x` (T, K).

    `fake_quant(w)` returns the dequantized quantization of a (N, K) weight. Returns ``(s, alpha, errors)``
    with errors per grid point (mean squared output error over all projections)."""
    x = np.asarray(x, np.float32)
    refs = [x @ w.T for w in weights]
    errors, best, best_s, best_alpha = [], np.inf, None, 0.0
    for g in range(grid):
        alpha = g / grid
        s = awq_scales(x_mean, alpha)
        xs = x / s
        err = 0.0
        count = 0
        for w, ref in zip(weights, refs):
            d = xs @ fake_quant(w * s).T
            d -= ref  # in place: d is (T, N), the largest array of the search
            np.square(d, out=d)
            err += float(d.sum(dtype=np.float64))
            count += d.size
        err /= max(count, 1)
        errors.append(err)
        if err < best:
            best, best_s, best_alpha = err, s, alpha
    return best_s, best_alpha, errors
