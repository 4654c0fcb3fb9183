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
ROW_ELEMENTS = 1 << 24  # rows per slice: about 16M weights (64 MB in float32); fewer slices, fewer column loops


PANEL = 256  # columns per step of the in-place factorisations


def inverse_cholesky(h: np.ndarray, damp: float = DAMP) -> tuple[np.ndarray, np.ndarray]:
    """(U, dead): the upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` after dead channels get
    ``H[j, j] = 1``, and the dead channels' mask. Works in ``h``'s dtype, on a copy (``h`` is left as it is).

    No general inverse and no second matrix: the "UL" Cholesky ``H = R R^T`` with R upper triangular (what the
    Cholesky of ``J H J`` gives reversed, ``J`` the order-reversing permutation) gives ``H^-1 = R^-T R^-1``, so
    ``U = R^-1``, itself upper triangular. Both steps run in place, a panel of columns at a time: one K x K array
    and K x PANEL pieces (for a 70B shape's down_proj, K = 28672: 3.1 GiB, not the 3 to 4 copies of LAPACK
    calls plus a product), about K^3 / 3 multiply-adds each, against 5 K^3 for Cholesky, inverse, product and a
    second Cholesky (on a 2048-wide float32 Hessian 10x faster, and 1e5 times closer to the float64 answer)."""
    return _factor_inplace(np.array(h, copy=True), damp)


def input_factor(x: np.ndarray, kp: int, damp: float = DAMP) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
    """``(inverse_cholesky(H), diag H)`` for the Hessian ``H = x^T x`` of inputs x (T, K), zero-padded to kp
    columns, factored in H's own memory: one K x K array (plus K x PANEL pieces) is all a layer's widest input
    costs (bench/calibrate_scale.py)."""
    k = x.shape[1]
    h = x.T @ x
    if kp != k:
        h = np.pad(h, ((0, kp - k),) * 2)
    diag = np.einsum("ii->i", h).copy()
    return _factor_inplace(h, damp), diag


def _factor_inplace(h: np.ndarray, damp: float) -> tuple[np.ndarray, np.ndarray]:
    diag = np.einsum("ii->i", h)  # a view: writes go into h
    dead = diag == 0
    diag[dead] = 1
    diag += h.dtype.type(damp) * diag.mean()
    _ul_cholesky_inplace(h)
    _upper_inverse_inplace(h)
    return h, dead


def _ul_cholesky_inplace(a: np.ndarray) -> None:
    """``a = R R^T`` with R upper triangular, R written over a (its strict lower triangle zeroed): panels of
    columns from the bottom right, each ``R[j, j] = ul_chol(H[j, j] - R[j, >j] R[j, >j]^T)`` and
    ``R[<j, j] = (H[<j, j] - R[<j, >j] R[j, >j]^T) R[j, j]^-T``, reading H from a's upper triangle."""
    n = a.shape[0]
    for j1 in range(n, 0, -PANEL):
        j0 = max(0, j1 - PANEL)
        if j1 < n:
            a[j0:j1, j0:j1] -= a[j0:j1, j1:] @ a[j0:j1, j1:].T
        d = np.triu(a[j0:j1, j0:j1])
        d = d + np.triu(d, 1).T  # the panel's diagonal block from its upper triangle
        rjj = np.ascontiguousarray(np.linalg.cholesky(d[::-1, ::-1])[::-1, ::-1])  # upper, d = rjj rjj^T
        if j0:
            if j1 < n:
                a[:j0, j0:j1] -= a[:j0, j1:] @ a[j0:j1, j1:].T
            a[:j0, j0:j1] = a[:j0, j0:j1] @ np.linalg.inv(rjj).T
        a[j0:j1, j0:j1] = np.triu(rjj)
        a[j0:j1, :j0] = 0


def _upper_inverse_inplace(r: np.ndarray) -> None:
    """An upper-triangular matrix's inverse written over it, panels of columns from the left: with the leading
    block already inverted, ``[[A, B], [0, D]]^-1 = [[A^-1, -A^-1 B D^-1], [0, D^-1]]``."""
    n = r.shape[0]
    for j0 in range(0, n, PANEL):
        j1 = min(n, j0 + PANEL)
        d_inv = np.triu(np.linalg.inv(r[j0:j1, j0:j1]))
        if j0:
            r[:j0, j0:j1] = -((r[:j0, :j0] @ r[:j0, j0:j1]) @ d_inv)
        r[j0:j1, j0:j1] = d_inv


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


def gptq_quantize(w: np.ndarray, h: np.ndarray | None, *, bits: int, block_size: int, symmetric: bool,
                  damp: float = DAMP, act_order: bool = False, chol: tuple[np.ndarray, np.ndarray] | None = None,
                  diag: np.ndarray | None = None) -> QuantizedWeight:
    """GPTQ of a (N, K) weight given its inputs' Hessian ``h`` (K, K); see the module docstring.

    Computes in ``h``'s dtype (float32 in a build). ``chol``: ``inverse_cholesky(h, damp)`` (of ``h`` padded to
    a whole number of blocks) when the caller shares it between projections of one input (q, k and v); then
    ``h`` may be None, with ``diag`` (H's diagonal) for act_order (see `input_factor`)."""
    check_params("gptq", bits, block_size, GPTQ_BITS)
    n, k = w.shape
    kb = -(-k // block_size)
    kp = kb * block_size
    if h is not None:
        if h.shape != (k, k):
            raise ValueError(f"Hessian {h.shape} does not match the weight's {k} inputs")
        diag = np.einsum("ii->i", h)
        if chol is None:  # padded columns: dead channels, quantized to 0 like to_blocks' padding
            chol = inverse_cholesky(h if kp == k else np.pad(h, ((0, kp - k),) * 2), damp)
    elif chol is None:
        raise ValueError("gptq_quantize needs the Hessian or its inverse factor (chol)")
    u, dead = chol
    if u.shape != (kp, kp):
        raise ValueError(f"inverse factor {u.shape} does not match the weight's {k} inputs in blocks of {block_size}")
    dt = u.dtype
    order = None
    if act_order:
        if diag is None:
            raise ValueError("act_order needs the Hessian's diagonal")
        order = np.argsort(-np.pad(np.asarray(diag, dt), (0, kp - len(diag))), kind="stable")
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
    qmax = w.dtype.type((1 << bits) - 1)
    batch = max(BATCH, bs)
    for i1 in range(0, kp, batch):
        i2 = min(i1 + batch, kp)
        w1 = w[:, i1:i2].copy()
        err = np.empty_like(w1)
        u1 = u[i1:i2, i1:i2]
        g_at = -1
        for j in range(i2 - i1):
            c = i1 + j if order is None else int(order[i1 + j])
            g = c // bs
            if order is None and c % bs == 0:
                s, z = group_params(w1[:, j:j + bs], bits, symmetric)
                scale[:, g], zp[:, g] = s[:, 0], z[:, 0]
            if g != g_at:  # the group's scale with zeros as ones: a zero-scale group's columns stay exactly 0
                g_at, sc, z = g, scale[:, g], zp[:, g]
                divisor = np.where(sc != 0, sc, 1).astype(w.dtype)
            col = w1[:, j]
            q = np.clip(np.floor(col / divisor + z + 0.5), 0, qmax)
            levels[:, g, c % bs] = q
            e = (col - (q - z) * sc) / u1[j, j]
            w1[:, j + 1:] -= e[:, None] * u1[j, j + 1:]
            err[:, j] = e
        if i2 < kp:
            w[:, i2:] -= err @ u[i1:i2, i2:]
    return levels, scale.astype(np.float32), zp.astype(np.float32)


def _permuted_inverse(u: np.ndarray, order: np.ndarray) -> np.ndarray:
    """``H^-1`` with rows and columns in `order`, from its upper Cholesky factor."""
    h_inv = u.T @ u
    return h_inv[np.ix_(order, order)]
