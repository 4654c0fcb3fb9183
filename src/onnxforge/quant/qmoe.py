"""Expert weights for com.microsoft QMoE: one expert's (N, K) projection at a time.

QMoE dequantizes `w[n, k] = (q[n, k] - zp) * scale` with the codes packed along K, low bits first,
`(E, N, K * bits / 8)`, exactly MatMulNBits' layout without the block axis:
  * block-wise (`block_size` 16-256, K divisible by it): scales `(E, N, K / block)`, packed zero
    points `(E, N, ceil(K / block * bits / 8))`, one per block as MatMulNBits packs them;
  * per-channel (`block_size` 0): scales `(E, N)`, zero points packed along N `(E, ceil(N * bits / 8))`.
Without zero points the op uses 2^(bits-1) (8 / 128): the symmetric encoding of onnxforge's quantizers.
Block-wise codes come from the recipe's INT4 method (rtn, k_quant, hqq, default); per-channel ones from
the same fits over one block of K values ("default" is rtn there: onnxruntime's quantizer is block-wise).
"""
from __future__ import annotations

import numpy as np

from ..errors import RecipeError
from .pack import dequantize, pack_bits, quantize_blockwise, unpack_bits, zero_point_levels
from .types import QuantizedWeight

QMOE_BITS = (4, 8)
QMOE_BLOCK_SIZES = (0, 16, 32, 64, 128, 256)  # 0: per channel
DEFAULT_QMOE_BLOCK = 32


def check_qmoe(bits: int, block_size: int, dims: dict[str, int]) -> None:
    """Raise RecipeError unless the op can take `bits` / `block_size` for projections of input sizes `dims`."""
    if bits not in QMOE_BITS:
        raise RecipeError(f"QMoE experts are stored at 4 or 8 bits, got {bits}")
    if block_size not in QMOE_BLOCK_SIZES:
        raise RecipeError(f"qmoe_block_size must be 0 (per channel) or one of 16, 32, 64, 128, 256, got {block_size}")
    for what, K in dims.items():
        if block_size and K % block_size:
            fits = [str(b) for b in QMOE_BLOCK_SIZES if b and all(k % b == 0 for k in dims.values())] + ["0"]
            choose = " or ".join([", ".join(fits[:-1]), fits[-1]] if len(fits) > 1 else fits)
            raise RecipeError(f"qmoe_block_size {block_size} does not divide the experts' {what} ({K}): QMoE needs "
                              f"whole blocks; choose {choose} (0: per-channel scales), or leave the option out "
                              "for the default, which adapts")
        if (K * bits) % 8:
            raise RecipeError(f"the experts' {what} ({K}) at {bits} bits is not a whole number of bytes")


def qmoe_block(requested: int | None, dims: dict[str, int]) -> tuple[int, str]:
    """The experts' QMoE block and a note for the report: an explicit choice as given (check_qmoe refuses one that
    cannot apply); by default 32, else the largest supported block that divides every size, else per-channel."""
    if requested is not None:
        return requested, ""
    block = next((b for b in (32, 16) if all(K % b == 0 for K in dims.values())), 0)
    if block == DEFAULT_QMOE_BLOCK:
        return block, ""
    sizes = ", ".join(f"{what} {K}" for what, K in dims.items())
    chosen = f"QMoE block {block}" if block else "per-channel QMoE scales (qmoe_block_size 0)"
    return block, (f"experts stored with {chosen}: the default block {DEFAULT_QMOE_BLOCK} does not divide the "
                   f"experts' sizes ({sizes}); --extra_options qmoe_block_size=N chooses")


def _per_channel_fit(method: str, bits: int, symmetric: bool):
    from .hqq import _optimise
    from .kquant import _asymmetric, _symmetric
    from .rtn import asymmetric_scale_zp, symmetric_scale

    if method in ("rtn", "default"):
        return lambda x: (symmetric_scale(x, bits), None) if symmetric else asymmetric_scale_zp(x, bits)
    if method == "k_quant":
        return lambda x: _symmetric(x, bits) if symmetric else _asymmetric(x, bits)
    if method == "hqq":
        def fit(x):
            if symmetric:
                s0 = symmetric_scale(x, bits)
                return _optimise(x, s0, np.full_like(s0, 1 << (bits - 1)), bits, fit_zero=False)[0], None
            s0, zp0 = asymmetric_scale_zp(x, bits)
            return _optimise(x, s0, zp0, bits, fit_zero=True)

        return fit
    raise RecipeError(f"quantization method {method!r} cannot store MoE experts; use rtn, k_quant, hqq or default")


def quantize_expert(w: np.ndarray, *, bits: int, block_size: int, symmetric: bool, method: str) -> QuantizedWeight:
    """One expert's (N, K) weight; `block_size` 0 gives one block of K per row (per channel)."""
    if block_size:
        from .methods import quantize

        return quantize(w, bits=bits, block_size=block_size, symmetric=symmetric, method=method)
    w = np.asarray(w)
    if w.ndim != 2 or not np.isfinite(w.astype(np.float32, copy=False)).all():
        raise RecipeError(f"an expert weight must be a finite (N, K) matrix, got shape {w.shape}")
    return quantize_blockwise(w, bits, w.shape[1], symmetric, _per_channel_fit(method, bits, symmetric))


def qmoe_arrays(q: QuantizedWeight, per_channel: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(codes (N, K*bits/8), scales (N, K/block) or (N,), zero points or None) of one expert, QMoE's layout."""
    data = q.data.reshape(q.N, -1)
    if not per_channel:
        return data, q.scales, q.zero_points
    zp = None if q.zero_points is None else pack_bits(zero_point_levels(q)[:, 0][None, :], q.bits)[0]
    return data, q.scales[:, 0], zp


def dequantize_qmoe(data: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int,
                    block_size: int) -> np.ndarray:
    """float32 (N, K) of one expert from its QMoE arrays, as the op computes it."""
    N = data.shape[0]
    K = data.shape[1] * 8 // bits
    levels = unpack_bits(data, bits, K).astype(np.float32)
    if block_size:
        kb = K // block_size
        zp = (np.full((N, kb), 1 << (bits - 1), np.float32) if zero_points is None
              else unpack_bits(zero_points, bits, kb).astype(np.float32))
        w = (levels.reshape(N, kb, block_size) - zp[..., None]) * scales.astype(np.float32)[..., None]
        return w.reshape(N, K)
    zp = (np.full(N, 1 << (bits - 1), np.float32) if zero_points is None
          else unpack_bits(zero_points[None, :], bits, N)[0].astype(np.float32))
    return (levels - zp[:, None]) * scales.astype(np.float32)[:, None]


# ----------------------------------------------------------------------------- carried over as stored
# A checkpoint's own blocks (sources: NativeBlocks of one expert, codes against the op's default zero point,
# gguf_blocks.py) become QMoE arrays without a quantizer. Types without a minimum keep every value: the same
# codes and scales, blocks split to the op's one block size where the two projections differ (Q4_0's 32 next
# to Q6_K's 16). QMoE has no per-block offset, so a type with a minimum (w = d x q + m, q in [0, 2^b)) is
# stored in its closest form: 8-bit codes k x q + t + zp with scale d / k and an 8-bit zero point zp per block,
# k the largest power of two (16 for 4-bit codes, 8 for 5-bit, 64 for 2-bit) for which t = round(m k / d) fits
# the byte; d x q is kept exactly (d / k is exact), the minimum moves by at most d / 2k (d / 32 for Q4_K).


def closest_min_form(data: np.ndarray, scales: np.ndarray, offsets: np.ndarray, bits: int, code_bits: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One expert's blocks with a minimum (MatMulNBits form: codes u against zero point 2^(bits-1), w = d x (u -
    2^(bits-1)) + offset) -> 8-bit (codes (N, kb, block), scales (N, kb), zero points (N, kb)) of the closest form."""
    N, kb = scales.shape
    u = unpack_bits(data.reshape(N, -1), bits, data.shape[1] * data.shape[2] * 8 // bits)
    c = 1 << (code_bits - 1)
    q = (u - np.uint8((1 << (bits - 1)) - c)).reshape(N, kb, -1)  # the format's own codes, 0 .. 2^code_bits - 1
    d = scales.astype(np.float32)
    m = (offsets.astype(np.float32) - np.float32(c) * d).astype(np.float64)
    top = (1 << code_bits) - 1
    k = np.zeros((N, kb), np.int64)
    t = np.zeros((N, kb), np.int64)
    unset = np.ones((N, kb), bool)
    kmax = 1 << int(np.floor(np.log2(255 // top)))
    nz = d != 0
    for kk in [kmax >> i for i in range(kmax.bit_length())]:  # kmax, kmax / 2, ..., 1
        tt = np.rint(np.divide(m * kk, d, out=np.zeros_like(m), where=nz)).astype(np.int64)
        fits = unset & nz & (tt >= -255) & (tt <= 255 - kk * top)
        k[fits], t[fits] = kk, tt[fits]
        unset &= ~fits
    left = unset & nz  # not even k = 1 fits: the nearest t in range (the report gives the error)
    k[left] = 1
    t[left] = np.clip(np.rint(m[left] / d[left]), -255, 255 - top).astype(np.int64)
    zero = ~nz  # d = 0: the block is m everywhere, as 1 x m
    t[zero] = (m[zero] != 0).astype(np.int64)
    s = np.where(nz, d / np.maximum(k, 1).astype(np.float32), np.where(m != 0, m, 1.0).astype(np.float32))
    zp = np.maximum(0, -t)
    codes = k.astype(np.uint8)[..., None] * q + (t + zp).astype(np.uint8)[..., None]  # k q + t + zp <= 255
    return codes, s.astype(np.float32), zp.astype(np.uint8)


def qmoe_from_blocks(nb, block: int, code_bits: int, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(codes (N, K*bits/8), scales (N, K/block), zero points or None) of one expert's stored blocks `nb`
    (sources.base.NativeBlocks) at QMoE block `block` (<= the format's, dividing it) and `bits` (>= the
    format's storage: 4-bit codes widen to 8 bits exactly, c + 120 against zero point 128)."""
    from ..sources.gguf_blocks import Transcoded, split_blocks

    N = nb.data.shape[0]
    t = Transcoded(nb.data, nb.scales, nb.zero_points, nb.offsets)
    if nb.offsets is not None:
        codes, scales, zp = closest_min_form(nb.data, nb.scales, nb.offsets, nb.bits, code_bits)
        t = Transcoded(codes, scales, zp, None)
    elif nb.bits != bits:
        if (nb.bits, bits) != (4, 8):
            raise ValueError(f"cannot widen {nb.origin} blocks from {nb.bits} to {bits} bits")
        kb = nb.scales.shape[1]
        u = unpack_bits(nb.data.reshape(N, -1), 4, kb * nb.block_size) + np.uint8(120)
        zp = None if nb.zero_points is None else unpack_bits(nb.zero_points, 4, kb) + np.uint8(120)
        t = Transcoded(u.reshape(N, kb, nb.block_size), nb.scales, zp, None)
    t = split_blocks(t, bits, nb.block_size, block)
    return t.data.reshape(N, -1), t.scales, t.zero_points


__all__ = ["QMOE_BITS", "QMOE_BLOCK_SIZES", "check_qmoe", "qmoe_block", "dequantize", "dequantize_qmoe", "qmoe_arrays",
           "quantize_expert", "closest_min_form", "qmoe_from_blocks"]
