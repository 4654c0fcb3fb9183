"""GGUF block types onto MatMulNBits without changing a value.

Every linear GGUF type stores a weight as `scale x code` or `scale x code + min` per block (layouts in
llama.cpp's ggml-common.h; the element order below follows gguf-py's `gguf.quants` dequantizers, which
the tests compare against bit for bit). A transcoder turns a tensor's raw blocks, (rows, blocks per row,
bytes per block) uint8, into the arrays MatMulNBits takes:

- codes packed along K as MatMulNBits `B` (low nibble first at 4 bits),
- scales (rows, k_blocks) float32, computed with the same float32 products gguf-py uses,
- no zero points: every code is offset to the op's default zero point (8 at 4 bits, 128 at 8 bits),
- offsets (rows, k_blocks) float32 or None: a per-block additive term that the graph adds back as
  `ReduceSum(x per block) @ offsets`.

Types with a minimum (Q4_1, Q5_1, Q2_K, Q4_K, Q5_K: `w = d x q + m`, q in [0, 2^b)) are re-centred:
the codes are stored as q - c against the default zero point, with c = 2^(b-1) the middle of the code
range, and the offset becomes m + c x d (rounded once, in float32). The weight is the same up to that
one rounding: d x (q - c) is exact in float32 (a scale has at most 17 significant bits, fp16 times a
6-bit sub-block scale, and q - c at most 5), so the op's weight differs from gguf-py's d x q + m by at
most half an ulp of the offset plus the sum's own rounding (tests/test_prequant_gguf.py). The centring
matters at accuracy_level 4, where MatMulNBits quantizes the activations to int8 per block: with codes
stored against zero point 0 every block carries a large common term d x 7.5 that multiplies the
activations' rounding error; centred, that term moves to the offset, which the graph applies to the
exact float activations. (Measured on SmolLM2's Q4_1 file: perplexity +1.3% of fp32 before, +0.3% after,
and no zero-point tensor makes MatMulNBits faster.)

5- and 6-bit codes go into 8-bit storage, 2- and 3-bit ones into 4-bit storage (CPU MatMulNBits at 2
bits is fast only at block 32). Codebook (IQ*) and ternary (TQ*) types have no such form.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType as QT

QK_K = 256


@dataclass(frozen=True)
class BlockForm:
    """How one GGUF type maps onto MatMulNBits: storage bits, block size, zero points, offsets."""

    bits: int
    block_size: int
    zero_points: bool  # explicit (all-zero) packed zero points
    offsets: bool  # a per-block additive term
    code_bits: int  # bits the format itself spends on a code (for the report)


@dataclass(frozen=True)
class Transcoded:
    data: np.ndarray  # uint8 (rows, k_blocks, block_size * bits / 8)
    scales: np.ndarray  # float32 (rows, k_blocks)
    zero_points: np.ndarray | None  # packed uint8 (rows, ceil(k_blocks * bits / 8))
    offsets: np.ndarray | None  # float32 (rows, k_blocks)


def _f16(raw: np.ndarray) -> np.ndarray:
    """Two bytes per block (..., 2) -> float32 (..., 1), as gguf-py reads d / dmin."""
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Q4_0-style bytes (..., 16): element j is the low nibble of byte j, element j+16 its high nibble."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits(qh: np.ndarray, n: int) -> np.ndarray:
    """(..., 4) bytes holding one bit per element of a 32-element block -> (..., 32) in {0, 1}."""
    bits = np.ascontiguousarray(qh).view(np.uint32) >> np.arange(n, dtype=np.uint32)
    return (bits & 1).astype(np.uint8)


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K's twelve bytes of packed 6-bit scales and mins -> (..., 8) each (gguf-py get_scale_min)."""
    d, m, m_d = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _shifted(bytes_: np.ndarray, group: int, shifts: tuple[int, ...], mask: int) -> np.ndarray:
    """gguf-py's unpacking idiom: (..., n) bytes in groups of `group`, each group read at every shift."""
    lead = bytes_.shape[:-1]
    g = bytes_.reshape(*lead, -1, 1, group) >> np.array(shifts, dtype=np.uint8).reshape(1, -1, 1)
    return (g & np.uint8(mask)).reshape(*lead, -1)


# ----------------------------------------------------------------------------- per type
# Each returns (codes uint8 (rows, nb, elements per block), scales, offsets) with scales/offsets
# (rows, nb, sub-blocks per block); codes already include the offset to the storage's zero point, and
# the types with a minimum are centred by _centred.


def _centred(q: np.ndarray, scale: np.ndarray, minimum: np.ndarray, code_bits: int, storage_bits: int):
    """`scale x q + minimum`, q in [0, 2^code_bits) -> codes q - c against the storage's default zero
    point and offset `minimum + c x scale` (c = 2^(code_bits - 1)), in float32."""
    c = 1 << (code_bits - 1)
    zero_point = 1 << (storage_bits - 1)
    return q + np.uint8(zero_point - c), scale, (minimum + np.float32(c) * scale).astype(np.float32)

def _q4_0(raw):
    return _nibbles(raw[..., 2:]), _f16(raw[..., :2]), None


def _q4_1(raw):
    return _centred(_nibbles(raw[..., 4:]), _f16(raw[..., :2]), _f16(raw[..., 2:4]), 4, 4)


def _q5_0(raw):
    q = _nibbles(raw[..., 6:]) | (_high_bits(raw[..., 2:6], 32) << 4)
    return q + np.uint8(112), _f16(raw[..., :2]), None  # d x (q - 16): code q + 112 against zero point 128


def _q5_1(raw):
    q = _nibbles(raw[..., 8:]) | (_high_bits(raw[..., 4:8], 32) << 4)
    return _centred(q, _f16(raw[..., :2]), _f16(raw[..., 2:4]), 5, 8)


def _q8_0(raw):
    return raw[..., 2:] ^ np.uint8(0x80), _f16(raw[..., :2]), None  # int8 + 128


def _q2_k(raw):
    scales, qs = raw[..., :16], raw[..., 16:80]
    d, dmin = _f16(raw[..., 80:82]), _f16(raw[..., 82:84])
    q = _shifted(qs, 32, (0, 2, 4, 6), 3)
    dl = d * (scales & 0xF).astype(np.float32)
    ml = dmin * (scales >> 4).astype(np.float32)
    return _centred(q, dl, -ml, 2, 4)


def _q3_k(raw):
    hmask, qs, packed, d = raw[..., :32], raw[..., 32:96], raw[..., 96:108], _f16(raw[..., 108:110])
    low = _shifted(packed[..., :8], 8, (0, 4), 0x0F)
    high = _shifted(packed[..., 8:12], 4, (0, 2, 4, 6), 0x03)
    sc = ((low | (high << 4)).astype(np.int8) - np.int8(32)).astype(np.float32)
    ql = _shifted(qs, 32, (0, 2, 4, 6), 3)
    qh = _shifted(hmask, 32, tuple(range(8)), 1)
    q = ql + (qh << 2)  # gguf-py: ql - 4 x (1 - qh), in [-4, 3]; + 4 is ql + 4 qh in [0, 7]
    return q + np.uint8(4), d * sc, None  # code (q - 4) + 8 against zero point 8


def _q4_k(raw):
    d, dmin = _f16(raw[..., :2]), _f16(raw[..., 2:4])
    sc, mn = _k_scale_min(raw[..., 4:16])
    q = _shifted(raw[..., 16:144], 32, (0, 4), 0x0F)
    return _centred(q, d * sc.astype(np.float32), -(dmin * mn.astype(np.float32)), 4, 4)


def _q5_k(raw):
    d, dmin = _f16(raw[..., :2]), _f16(raw[..., 2:4])
    sc, mn = _k_scale_min(raw[..., 4:16])
    qh = _shifted(raw[..., 16:48], 32, tuple(range(8)), 1)
    q = _shifted(raw[..., 48:176], 32, (0, 4), 0x0F) | (qh << 4)
    return _centred(q, d * sc.astype(np.float32), -(dmin * mn.astype(np.float32)), 5, 8)


def _q6_k(raw):
    ql, qh = raw[..., :128], raw[..., 128:192]
    sc = np.ascontiguousarray(raw[..., 192:208]).view(np.int8).astype(np.float32)
    d = _f16(raw[..., 208:210])
    lo = _shifted(ql, 64, (0, 4), 0x0F)
    hi = _shifted(qh, 32, (0, 2, 4, 6), 3)
    return (lo | (hi << 4)) + np.uint8(96), d * sc, None  # d x sc x (q - 32): code q + 96 against 128


FORMS: dict[QT, tuple[BlockForm, Callable]] = {
    QT.Q4_0: (BlockForm(4, 32, False, False, 4), _q4_0),
    QT.Q4_1: (BlockForm(4, 32, False, True, 4), _q4_1),
    QT.Q5_0: (BlockForm(8, 32, False, False, 5), _q5_0),
    QT.Q5_1: (BlockForm(8, 32, False, True, 5), _q5_1),
    QT.Q8_0: (BlockForm(8, 32, False, False, 8), _q8_0),
    QT.Q2_K: (BlockForm(4, 16, False, True, 2), _q2_k),
    QT.Q3_K: (BlockForm(4, 16, False, False, 3), _q3_k),
    QT.Q4_K: (BlockForm(4, 32, False, True, 4), _q4_k),
    QT.Q5_K: (BlockForm(8, 32, False, True, 5), _q5_k),
    QT.Q6_K: (BlockForm(8, 16, False, False, 6), _q6_k),
}


def block_form(kind: QT) -> BlockForm | None:
    entry = FORMS.get(kind)
    return None if entry is None else entry[0]


def transcode(raw: np.ndarray, kind: QT) -> Transcoded:
    """Raw GGUF blocks (rows, blocks per row, bytes per block) -> MatMulNBits arrays for `kind`."""
    form, unpack = FORMS[kind]
    rows = raw.shape[0]
    codes, scales, offsets = unpack(raw)
    kb = codes.shape[1] * codes.shape[2] // form.block_size
    codes = codes.reshape(rows, kb, form.block_size)
    data = codes if form.bits == 8 else (codes[..., 0::2] | (codes[..., 1::2] << 4))
    zero_points = np.zeros((rows, -(-kb * form.bits // 8)), dtype=np.uint8) if form.zero_points else None
    return Transcoded(
        np.ascontiguousarray(data, dtype=np.uint8),
        np.ascontiguousarray(scales.reshape(rows, kb), np.float32),
        zero_points,
        None if offsets is None else np.ascontiguousarray(offsets.reshape(rows, kb), np.float32),
    )


def split_blocks(t: Transcoded, bits: int, block_size: int, to: int) -> Transcoded:
    """The same weight at a finer block: each block of `block_size` codes as block_size / `to` blocks of
    `to`, with its scale (and offset) repeated. No value changes (codes are packed in K order, so a
    block's first `to` codes are its first bytes)."""
    if to >= block_size:
        return t
    n, rows = block_size // to, t.data.shape[0]
    kb = t.scales.shape[1]
    repeat = (lambda a: None if a is None else np.ascontiguousarray(np.repeat(a, n, axis=1)))
    if t.zero_points is not None:  # packed per block: unpack, repeat, repack (4-bit: two per byte)
        zp = t.zero_points if bits == 8 else np.stack([t.zero_points & 0x0F, t.zero_points >> 4], -1).reshape(rows, -1)
        zp = np.repeat(zp[:, :kb], n, axis=1)
        if bits == 4:
            zp = np.pad(zp, ((0, 0), (0, zp.shape[1] % 2)))
            zp = zp[:, 0::2] | (zp[:, 1::2] << 4)
        zero_points = np.ascontiguousarray(zp, dtype=np.uint8)
    else:
        zero_points = None
    return Transcoded(np.ascontiguousarray(t.data.reshape(rows, kb * n, to * bits // 8)), repeat(t.scales),
                      zero_points, repeat(t.offsets))
