"""MXFP4 (OCP microscaling FP4), GPT-OSS's own storage of its experts.

`<name>_blocks` uint8 (E, N, K/32, 16): two E2M1 codes per byte, low nibble first, 32 values per block;
`<name>_scales` uint8 (E, N, K/32): E8M0 exponents, the block's values are code value x 2^(scale - 127).
The rows are the projection's output features (GPT-OSS's fc1 rows alternate gate and up), so one
expert decodes to the (N, K) matrix the MoE op takes, as transformers' `convert_moe_packed_tensors`
computes it (before its transpose into the bf16 parameter layout).
"""
from __future__ import annotations

import numpy as np

from ..errors import CheckpointError

FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                      dtype=np.float32)


def mxfp4_shape(blocks_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The decoded (E, N, K) of a `_blocks` tensor's (E, N, K/32, 16)."""
    if len(blocks_shape) != 4 or blocks_shape[-1] != 16:
        raise CheckpointError(f"MXFP4 blocks must be (experts, rows, blocks, 16) bytes, got {tuple(blocks_shape)}")
    E, N, G, B = blocks_shape
    return (E, N, G * B * 2)


def decode_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32 (..., K) from blocks (..., K/32, 16) and E8M0 scales (..., K/32)."""
    blocks = np.asarray(blocks, dtype=np.uint8)
    scales = np.asarray(scales, dtype=np.uint8)
    if blocks.shape[:-1] != scales.shape:
        raise CheckpointError(f"MXFP4 blocks {blocks.shape} and scales {scales.shape} do not match")
    out = np.empty((*blocks.shape[:-1], blocks.shape[-1] * 2), dtype=np.float32)
    out[..., 0::2] = FP4_VALUES[blocks & 0x0F]
    out[..., 1::2] = FP4_VALUES[blocks >> 4]
    out *= np.ldexp(np.float32(1), scales.astype(np.int32) - 127)[..., None].astype(np.float32)
    return out.reshape(*blocks.shape[:-2], -1)


def mxfp4_expert(source, blocks: str, scales: str, e: int) -> np.ndarray:
    """Expert e's (N, K) float32 weight from a source holding `blocks` / `scales` as uint8 tensors."""
    read_slice = getattr(source, "read_slice", None)
    if read_slice is None:
        raise CheckpointError(f"{blocks}: this source cannot read MXFP4 blocks")
    return decode_mxfp4(read_slice(blocks, e, raw=True), read_slice(scales, e, raw=True))
