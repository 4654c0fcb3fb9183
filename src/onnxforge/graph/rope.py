"""Rotary-embedding caches (cos, sin) for GroupQueryAttention, computed like transformers does.

float32 throughout, in the same order of operations as `transformers.modeling_rope_utils`, so the
caches agree with the reference to the last bit or two.
"""
from __future__ import annotations

import math

import numpy as np

from ..spec import RopeSpec


def inv_freq_and_scale(rope: RopeSpec, context_length: int, long: bool = False) -> tuple[np.ndarray, float]:
    dim = rope.rotary_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    pos_freqs = np.float32(rope.theta) ** exponents
    inv_freq = (np.float32(1.0) / pos_freqs).astype(np.float32)
    original = int(rope.param("original_max_position_embeddings", context_length) or context_length)
    if rope.kind == "linear":
        return (inv_freq / np.float32(rope.factor)).astype(np.float32), 1.0
    if rope.kind == "llama3":
        return _llama3(rope, inv_freq, original), 1.0
    if rope.kind == "yarn":
        return _yarn(rope, pos_freqs, original)
    if rope.kind == "longrope":
        return _longrope(rope, exponents, original, context_length, long)
    if rope.kind == "proportional":  # Gemma 4's global layers: the first rope_proportion of the pairs rotate
        angles = int(float(rope.param("rope_proportion", 1.0)) * dim // 2)  # type: ignore[arg-type]
        inv_freq[angles:] = 0.0  # the others are not rotated (cos 1, sin 0)
        return (inv_freq / np.float32(rope.factor)).astype(np.float32), 1.0
    # "default" and "dynamic": dynamic NTK equals default up to original_max_position_embeddings
    return inv_freq, 1.0


def _dynamic_inv_freq(rope: RopeSpec, original: int, context_length: int) -> np.ndarray:
    """Dynamic NTK past the original length: position p is rotated as transformers rotates it when it
    is the newest token (sequence length p + 1), the base growing with the length, in float32 as torch."""
    dim, factor = rope.rotary_dim, np.float32(rope.factor)
    lengths = np.arange(original + 1, context_length + 1, dtype=np.float32)
    base = np.float32(rope.theta) * ((factor * lengths / np.float32(original)) - (factor - 1)) ** np.float32(dim / (dim - 2))
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (np.float32(1.0) / base.astype(np.float32)[:, None] ** exponents[None, :]).astype(np.float32)


def _llama3(rope: RopeSpec, inv_freq: np.ndarray, original: int) -> np.ndarray:
    factor = rope.factor
    low, high = rope.param("low_freq_factor", 1.0), rope.param("high_freq_factor", 4.0)
    low_wavelen, high_wavelen = original / low, original / high
    wavelen = (2 * math.pi / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(factor), inv_freq).astype(np.float32)
    smooth = ((original / wavelen - low) / (high - low)).astype(np.float32)
    smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn(rope: RopeSpec, pos_freqs: np.ndarray, original: int) -> tuple[np.ndarray, float]:
    dim, base, factor = rope.rotary_dim, rope.theta, rope.factor

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.param("attention_factor")
    if attention_factor is None:
        m, m_all = rope.param("mscale"), rope.param("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast = rope.param("beta_fast") or 32
    beta_slow = rope.param("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.param("truncate", 1.0):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolation_factor = 1 - ramp
    extrapolation = (1.0 / pos_freqs).astype(np.float32)
    interpolation = (1.0 / (np.float32(factor) * pos_freqs)).astype(np.float32)
    inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq.astype(np.float32), float(attention_factor)


def _longrope(rope: RopeSpec, exponents: np.ndarray, original: int, context_length: int,
              long: bool = False) -> tuple[np.ndarray, float]:
    factor = rope.factor  # set from max / original max at spec time when the config gives none
    attention_factor = rope.param("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    ext = np.asarray(rope.param("long_factor" if long else "short_factor"), dtype=np.float32)
    inv_freq = 1.0 / (ext * np.float32(rope.theta) ** exponents)
    return inv_freq.astype(np.float32), float(attention_factor)


def cos_sin_cache(rope: RopeSpec, context_length: int, long: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(context_length, rotary_dim/2) float32 caches, already multiplied by the attention factor
    (`long`: LongRoPE's long factors, used past original_max_position_embeddings)."""
    inv_freq, scale = inv_freq_and_scale(rope, context_length, long)
    positions = np.arange(context_length, dtype=np.float32)
    freqs = np.outer(positions, inv_freq).astype(np.float32)
    if rope.kind == "dynamic":
        original = int(rope.param("original_max_position_embeddings", context_length) or context_length)
        freqs[original:] = positions[original:, None] * _dynamic_inv_freq(rope, original, context_length)
    return (np.cos(freqs) * np.float32(scale)).astype(np.float32), (np.sin(freqs) * np.float32(scale)).astype(np.float32)
