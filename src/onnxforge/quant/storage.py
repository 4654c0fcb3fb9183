"""How one weight is stored: as floats of some dtype, or block-quantized for MatMulNBits."""
from __future__ import annotations

from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import onnx_ir as ir

FLOAT_DTYPES = {
    "fp32": (np.dtype(np.float32), ir.DataType.FLOAT),
    "fp16": (np.dtype(np.float16), ir.DataType.FLOAT16),
    "bf16": (np.dtype(ml_dtypes.bfloat16), ir.DataType.BFLOAT16),
}


@dataclass(frozen=True)
class Storage:
    """`bits == 0` means float storage in `dtype`; otherwise MatMulNBits-style blocks."""

    dtype: str = "fp32"
    bits: int = 0
    block_size: int = 32
    method: str = "rtn"
    symmetric: bool = True
    accuracy_level: int | None = None  # None: the recipe's (4 on CPU, as the anchor)
    offsets: bool = False  # method "source": a per-block additive term, added back by a correction MatMul
    origin: str = field(default="", compare=False)  # method "source": the format it is carried over from

    @property
    def quantized(self) -> bool:
        return self.bits > 0

    @property
    def np_dtype(self) -> np.dtype:
        return FLOAT_DTYPES[self.dtype][0]

    @property
    def ir_dtype(self) -> ir.DataType:
        return FLOAT_DTYPES[self.dtype][1]

    def describe(self) -> str:
        if not self.quantized:
            return self.dtype
        if self.method == "source":  # carried over as stored: no quantizer ran
            extra = ("" if self.symmetric else " zero points") + (" + offsets" if self.offsets else "")
            return f"int{self.bits} block {self.block_size}{extra} (exact {self.origin})"
        sym = "sym" if self.symmetric else "asym"
        return f"int{self.bits} {self.method} {sym} block {self.block_size}"

