"""The quantized-weight container shared by every block quantizer, and input checks.

Layout is exactly what ``com.microsoft.MatMulNBits`` consumes for a Hugging Face
``Linear`` weight of shape ``(N=out_features, K=in_features)``: blocks run along K.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxforge.errors import CheckpointError, RecipeError

BLOCK_SIZES = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class QuantizedWeight:
    """One block-quantized weight, ready to be written as MatMulNBits inputs.

    Dequantization (what MatMulNBits computes) is ``w[n, k] = (q - zp) * scale`` with
    ``q`` unsigned in ``[0, 2**bits - 1]`` and ``zp = 2**(bits - 1)`` when
    ``zero_points`` is None (symmetric).

    Attributes:
        data: uint8 ``(N, k_blocks, block_size * bits // 8)``: input B, packed along K,
            low bits first. Rows are zero-padded to ``k_blocks * block_size``.
        scales: float32 ``(N, k_blocks)``; may be negative (symmetric convention) or 0
            (all-zero block).
        zero_points: packed uint8 ``(N, ceil(k_blocks * bits / 8))`` or None.
        bits: 2, 4 or 8.
        block_size: elements per block along K.
        K: the original (unpadded) in_features.
    """

    data: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int
    block_size: int
    K: int

    def __post_init__(self) -> None:
        n, kb = self.scales.shape
        blob = self.block_size * self.bits // 8
        if self.data.dtype != np.uint8 or self.data.shape != (n, kb, blob):
            raise ValueError(f"data must be uint8 {(n, kb, blob)}, got {self.data.dtype} {self.data.shape}")
        if self.scales.dtype != np.float32:
            raise ValueError(f"scales must be float32, got {self.scales.dtype}")
        if kb != -(-self.K // self.block_size):
            raise ValueError(f"k_blocks={kb} does not match K={self.K}, block_size={self.block_size}")
        if self.zero_points is not None:
            zshape = (n, -(-kb * self.bits // 8))
            if self.zero_points.dtype != np.uint8 or self.zero_points.shape != zshape:
                raise ValueError(f"zero_points must be uint8 {zshape}, got "
                                 f"{self.zero_points.dtype} {self.zero_points.shape}")

    @property
    def N(self) -> int:  # noqa: N802 - matches the MatMulNBits attribute name
        """out_features (rows of the HF weight, attribute N of MatMulNBits)."""
        return int(self.scales.shape[0])

    @property
    def k_blocks(self) -> int:
        """Number of blocks per row, ``ceil(K / block_size)``."""
        return int(self.scales.shape[1])

    @property
    def symmetric(self) -> bool:
        """True when the op's default zero point ``2**(bits-1)`` is used."""
        return self.zero_points is None


def check_params(method: str, bits: int, block_size: int, allowed_bits: tuple[int, ...]) -> None:
    """Raise RecipeError unless ``bits`` and ``block_size`` are supported by ``method``."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or bits not in allowed_bits:
        raise RecipeError(f"quantization method {method!r} supports bits {list(allowed_bits)}, got {bits!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) \
            or block_size not in BLOCK_SIZES:
        raise RecipeError(f"block_size must be a power of two from 16 to 256 {list(BLOCK_SIZES)}, "
                          f"got {block_size!r}")


def to_blocks(w: np.ndarray, block_size: int) -> tuple[np.ndarray, int]:
    """Convert a (N, K) float weight to float32 blocks ``(N, k_blocks, block_size)``.

    Rows are zero-padded at the end of K; a padded zero never enlarges a block's range
    (asymmetric ranges always contain 0) so it cannot spoil the scales.

    Returns:
        The blocks and the original K.
    """
    w = np.asarray(w)
    if w.ndim != 2:
        raise RecipeError(f"only 2-D (out_features, in_features) weights can be block-quantized, "
                          f"got shape {w.shape}")
    n, k = w.shape
    if k <= 0 or n <= 0:
        raise RecipeError(f"cannot block-quantize an empty weight of shape {w.shape}")
    if w.dtype.kind != "f" and w.dtype.name != "bfloat16":
        raise RecipeError(f"expected a float weight (float32/float16/bfloat16), got {w.dtype}")
    w32 = w.astype(np.float32, copy=False)
    if not np.isfinite(w32).all():
        raise CheckpointError(f"weight of shape {w.shape} contains NaN or inf; it cannot be quantized")
    kb = -(-k // block_size)
    pad = kb * block_size - k
    if pad:
        w32 = np.pad(w32, ((0, 0), (0, pad)))
    return np.ascontiguousarray(w32).reshape(n, kb, block_size), k


def row_chunks(n_rows: int, row_elems: int, target: int = 1 << 18) -> list[slice]:
    """Row slices of about ``target`` elements each, to bound temporaries and stay in cache."""
    step = max(1, target // max(1, row_elems))
    return [slice(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]


def dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-block dot product over the last axis, keeping it: ``(..., 1)``."""
    return np.einsum("...k,...k->...", a, b)[..., None]


def keep_better(better: np.ndarray, new: tuple[np.ndarray, ...], old: tuple[np.ndarray, ...]
                ) -> tuple[np.ndarray, ...]:
    """Per block, ``new`` where ``better`` else ``old`` (element-wise over each pair)."""
    return tuple(np.where(better, n, o) for n, o in zip(new, old))


def safe_div(x: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``x / s`` with 0 where ``s == 0`` (all-zero blocks), never inf or NaN."""
    return np.divide(x, s, out=np.zeros(np.broadcast_shapes(x.shape, s.shape), np.float32), where=s != 0)


def reciprocal(s: np.ndarray) -> np.ndarray:
    """``1 / s`` as float32, with 0 where ``|s|`` is 0 or subnormal (``1 / s`` would overflow).

    A zero reciprocal sends the whole block to its zero point, i.e. dequantizes to 0.
    """
    return np.divide(np.float32(1), s, out=np.zeros(np.shape(s), np.float32),
                     where=np.abs(s) >= np.finfo(np.float32).tiny)


def round_levels(x: np.ndarray, scale: np.ndarray, zp: np.ndarray | float, bits: int) -> np.ndarray:
    """Unsigned levels ``clip(floor(x * (1 / scale) + zp + 0.5), 0, 2**bits - 1)``, float32.

    Multiplying by the reciprocal and rounding half up reproduce onnxruntime's C++
    quantizer bit for bit (numpy's half-to-even ``rint`` would not, on exact ties).
    ``scale`` broadcasts against ``x`` (e.g. shape ``(..., 1)``).
    """
    v = x * reciprocal(scale)
    v += zp
    v += np.float32(0.5)
    np.floor(v, out=v)
    return np.clip(v, 0, (1 << bits) - 1, out=v)
