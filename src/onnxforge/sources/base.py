"""What every checkpoint reader provides to the builder.

A source speaks Hugging Face: `config` is a config.json dict and tensor names are the
transformers state-dict names (`model.layers.0.self_attn.q_proj.weight`, ...), whatever the
file format underneath. Tensors are read one at a time; nothing holds the whole model.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class NativeBlocks:
    """A weight stored in a block format that maps losslessly onto MatMulNBits.

    `data` uint8 (N, k_blocks, block_size*bits/8) packed like MatMulNBits `B`,
    `scales` float32 (N, k_blocks), `zero_points` packed uint8 (N, ceil(k_blocks*bits/8)) or None
    (None means the op's default 2**(bits-1)). `origin` names the source format, e.g. "Q4_0".
    `offsets` float32 (N, k_blocks) or None: a per-block term added to every weight of the block
    (w = scale x (code - zero point) + offset), which the graph adds back as a correction MatMul.
    """

    data: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int
    block_size: int
    origin: str
    offsets: np.ndarray | None = None


@dataclass(frozen=True)
class NativeFormat:
    """How a stored quantized tensor maps onto MatMulNBits, known without reading its data.

    `bits == 0`: quantized, but with no exact MatMulNBits form (codebook types): it is dequantized.
    """

    origin: str  # the source's own name: "Q4_K", "GPTQ int4 g128 asym"
    bits: int  # MatMulNBits storage bits (codes of 2-3 bits go into 4, of 5-6 bits into 8)
    block_size: int
    zero_points: bool  # explicit packed zero points
    offsets: bool  # a per-block additive term (see NativeBlocks.offsets)
    code_bits: int = 0  # bits the format itself spends on a code, where it says (GGUF: 5 for Q5_0 in 8-bit storage)


class Source(Protocol):
    """A lazily opened checkpoint."""

    path: Path
    config: dict
    generation_config: dict | None

    def tensor_names(self) -> list[str]: ...

    def has(self, name: str) -> bool: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str) -> np.ndarray:
        """The tensor as a float numpy array (float32, float16 or ml_dtypes.bfloat16)."""
        ...

    def native_blocks(self, name: str, bits: int, block_size: int) -> NativeBlocks | None:
        """Lossless MatMulNBits form of `name` at (bits, block_size), or None."""
        ...

    # optional (sources of pre-quantized weights):
    #   native_format(name) -> NativeFormat | None   what native_blocks would give, without reading data
    #   stored_format(name) -> str                    the tensor's own type ("Q4_K", "F16", "BF16")

    def write_tokenizer(self, out_dir: Path) -> list[str]:
        """Write tokenizer.json / tokenizer_config.json (and friends) into out_dir; return file names."""
        ...

    def fingerprint(self) -> str:
        """A SHA-256 hex digest identifying the input (config + tensor headers/bytes)."""
        ...

    def close(self) -> None: ...
