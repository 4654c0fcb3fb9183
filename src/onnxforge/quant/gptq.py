"""GPTQ (Frantar et al. 2022): block quantization that compensates each column's rounding error with the
inverse Hessian of the layer's inputs, without torch.

For a weight ``W`` (N, K) whose input rows ``x`` have ``H = sum x^T x`` (K, K), the columns are rounded one
at a time; the error of column ``j`` is spread over the columns not rounded yet through the upper Cholesky
factor ``U`` of ``H^-1`` (``W[:, j+1:] -= (w_j - q_j) / U[j, j] * U[j, j+1:]``), which minimises the
output error ``||x W^T - x Q^T||`` column by column. Choices, all standard GPTQ:

* damping ``damp * mean(diag(H))`` added to the diagonal; input channels that are never nonzero ("dead",
  ``H[j, j] == 0``) get weight 0 and ``H[j, j] = 1``;
* the group (MatMulNBits block) of ``block_size`` columns gets its scale (and zero point) from its columns'
  current values when its first column is reached (RTN's rule: signed absmax / -2^(bits-1), or min/max
  with an integer zero point), so blocks are contiguous along K as MatMulNBits needs;
* ``act_order``: columns in order of decreasing ``H[j, j]``; the groups' parameters are then fixed up
  front from the weights before any update (GPTQ's "static groups"), as a group's columns are no longer
  reached together;
* lazy batches of 128 columns (a multiple of the block) update the rest of ``W`` at once: the same result
  as updating after every column, in fewer passes over memory.

Rows are independent (each has its own blocks), so ``W`` is processed a slice of rows at a time: memory
is the Hessian's K x K (a few copies while it is inverted) plus one slice.
"""
from __future__ import annotations

import numpy as np

from onnxforge.quant.pack import from_levels
from onnxforge.quant.types import QuantizedWeight, check_params

GPTQ_BITS = (2, 4, 8)
DAMP = 0.01
BATCH = 128
ROW_ELEMENTS = 1 << 21  # rows per slice: about 2M weights (8 MB in float32)


def inverse_cholesky(h: np.ndarray, damp: float = DAMP) -> tuple[np.ndarray, np.ndarray]:
    """(U, dead): the upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` after dead channels get
    ``H[j, j] = 1``, and the dead channels' mask. Works in ``h``'s dtype; at most three K x K arrays live."""
    h = np.array(h, copy=True)
    diag = np.einsum("ii->i", h)  # a view: writes go into h
    dead = diag == 0
    diag[dead] = 1
    diag += h.dtype.type(damp) * diag.mean()
    low = np.linalg.cholesky(h)
    del h
    low_inv = np.linalg.inv(low)
    del low
    h_inv = low_inv.T @ low_inv
    del low_inv
    return np.ascontiguousarray(np.linalg.cholesky(h_inv).T), dead


def group_params(x: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """RTN's scale and zero point for blocks ``x`` (..., block): both (..., 1), in x's dtype."""
    if symmetric:
        hi, lo = x.max(axis=-1, keepdims=True), x.min(axis=-1, keepdims=True)
        m = np.where(np.abs(hi) > np.abs(lo), hi, lo)
        return m / x.dtype.type(-(1 << (bits - 1))), np.full(m.shape, 1 << (bits - 1), x.dtype)
    qmax = (1 << bits) - 1
    lo = np.minimum(x.min(axis=-1, keepdims=True), 0)
    hi = np.maximum(x.max(axis=-1, keepdims=True), 0)
    scale = (hi - lo) / x.dtype.type(qmax)
    zp = np.clip(np.floor(np.divide(-lo, scale, out=np.zeros_like(lo), where=scale != 0) + 0.5), 0, qmax)
    return scale, zp


def round_to(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, bits: int) -> np.ndarray:
    """Levels ``clip(floor(x / scale + zp + 0.5), 0, 2^bits - 1)``; a zero scale gives the zero point."""
    v = np.divide(x, scale, out=np.zeros(np.broadcast_shapes(x.shape, scale.shape), x.dtype), where=scale != 0)
    return np.clip(np.floor(v + zp + 0.5), 0, (1 << bits) - 1)


def gptq_quantize(w: np.ndarray, h: np.ndarray, *, bits: int, block_size: int, symmetric: bool,
                  damp: float = DAMP, act_order: bool = False, chol: tuple[np.ndarray, np.ndarray] | None = None
                  ) -> QuantizedWeight:
    """GPTQ of a (N, K) weight given its inputs' Hessian ``h`` (K, K); see the module docstring.

    Computes in ``h``'s dtype (float32 in a build). ``chol``: ``inverse_cholesky(h, damp)`` when the caller
    shares it between projections of one input (q, k and v)."""
    check_params("gptq", bits, block_size, GPTQ_BITS)
    n, k = w.shape
    if h.shape != (k, k):
        raise ValueError(f"Hessian {h.shape} does not match the weight's {k} inputs")
    dt = h.dtype
    kb = -(-k // block_size)
    kp = kb * block_size
    if kp != k:  # padded columns: dead channels, quantized to 0 like to_blocks' padding
        hp = np.zeros((kp, kp), dt)
        hp[:k, :k] = h
        h = hp
    u, dead = chol if chol is not None else inverse_cholesky(h, damp)
    order = np.argsort(-np.einsum("ii->i", h), kind="stable") if act_order else None
    levels = np.empty((n, kb, block_size), np.uint8)
    scales = np.empty((n, kb), np.float32)
    zps = np.empty((n, kb), np.float32)
    step = max(1, ROW_ELEMENTS // kp)
    for r in range(0, n, step):
        rows = slice(r, min(r + step, n))
        wr = np.zeros((rows.stop - rows.start, kp), dt)
        wr[:, :k] = w[rows]
        wr[:, dead] = 0
        lv, sc, zp = _quantize_rows(wr, u, order, bits, block_size, symmetric)
        levels[rows], scales[rows], zps[rows] = lv, sc, zp
    return from_levels(levels, scales, None if symmetric else zps, bits, block_size, k)


def _quantize_rows(w: np.ndarray, u: np.ndarray, order: np.ndarray | None, bits: int, bs: int, symmetric: bool):
    n, kp = w.shape
    kb = kp // bs
    scale = np.zeros((n, kb), w.dtype)
    zp = np.zeros((n, kb), w.dtype)
    if order is not None:  # static groups from the weights before any update, then the columns permuted
        s, z = group_params(w.reshape(n, kb, bs), bits, symmetric)
        scale[:], zp[:] = s[..., 0], z[..., 0]
        w = np.ascontiguousarray(w[:, order])
        u = np.linalg.cholesky(_permuted_inverse(u, order)).T
    levels = np.empty((n, kb, bs), np.uint8)
    batch = max(BATCH, bs)
    for i1 in range(0, kp, batch):
        i2 = min(i1 + batch, kp)
        w1 = w[:, i1:i2].copy()
        err = np.empty_like(w1)
        u1 = u[i1:i2, i1:i2]
        for j in range(i2 - i1):
            c = i1 + j if order is None else int(order[i1 + j])
            g = c // bs
            if order is None and c % bs == 0:
                s, z = group_params(w1[:, j:j + bs], bits, symmetric)
                scale[:, g], zp[:, g] = s[:, 0], z[:, 0]
            col = w1[:, j]
            q = round_to(col, scale[:, g], zp[:, g], bits)
            levels[:, g, c % bs] = q
            e = (col - (q - zp[:, g]) * scale[:, g]) / u1[j, j]
            w1[:, j + 1:] -= np.outer(e, u1[j, j + 1:])
            err[:, j] = e
        if i2 < kp:
            w[:, i2:] -= err @ u[i1:i2, i2:]
    return levels, scale.astype(np.float32), zp.astype(np.float32)


def _permuted_inverse(u: np.ndarray, order: np.ndarray) -> np.ndarray:
    """``H^-1`` with rows and columns in `order`, from its upper Cholesky factor."""
    h_inv = u.T @ u
    return h_inv[np.ix_(order, order)]
