"""Method registry and the entry points the graph builders call.

``quantize`` and ``dequantize`` are pure functions of their arguments; the numpy methods
release the GIL inside numpy, so callers may run many of them in a thread pool.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from onnxforge.errors import RecipeError
from onnxforge.quant.hqq import quantize_hqq
from onnxforge.quant.kquant import quantize_kquant
from onnxforge.quant.ort_default import quantize_ort_default
from onnxforge.quant.pack import dequantize, to_gather_block_quantized
from onnxforge.quant.rtn import quantize_rtn
from onnxforge.quant.types import QuantizedWeight

__all__ = ["METHODS", "QuantizedWeight", "dequantize", "quantize", "to_gather_block_quantized"]

Quantizer = Callable[..., QuantizedWeight]  # (w, *, bits, block_size, symmetric) -> QuantizedWeight

METHODS: dict[str, Quantizer] = {
    "rtn": quantize_rtn,
    "k_quant": quantize_kquant,
    "hqq": quantize_hqq,
    "default": quantize_ort_default,
}
# the calibrated methods (onnxforge.calibrate) store what calibration computed; a weight no calibration data
# reaches (an lm_head under awq) is rounded to nearest, which is what they are without data (graph/weights.py
# says so in its storage); quantize() itself refuses them: it has no data
CALIBRATED_FALLBACK = {"gptq": "rtn", "awq": "rtn", "awq+gptq": "rtn"}


def quantize(w: np.ndarray, *, bits: int, block_size: int, symmetric: bool, method: str = "rtn",
             accuracy_level: int | None = None) -> QuantizedWeight:
    """Block-quantize a Hugging Face ``(out_features, in_features)`` weight for MatMulNBits.

    Args:
        w: float32, float16 or bfloat16 array ``(N, K)``; K need not divide block_size.
        bits: 2, 4 or 8 (every method supports all three).
        block_size: 16, 32, 64, 128 or 256.
        symmetric: True for no zero points (op default ``2**(bits-1)``).
        method: a key of :data:`METHODS`.
        accuracy_level: MatMulNBits' compute-precision attribute (0-4). It does not change
            the quantized weight; it is only validated here so recipes fail early.

    Raises:
        RecipeError: unknown method, unsupported bits/block_size/accuracy_level, non-2-D
            or empty weight.
        CheckpointError: the weight contains NaN or inf.
    """
    fn = METHODS.get(method)
    if fn is None:
        raise RecipeError(f"unknown quantization method {method!r}; choose one of {sorted(METHODS)}")
    if accuracy_level is not None and (isinstance(accuracy_level, bool) or accuracy_level not in range(5)):
        raise RecipeError(f"accuracy_level must be 0, 1, 2, 3 or 4, got {accuracy_level!r}")
    from onnxforge.quant import pool

    workers = pool.active()
    if workers is not None and method in pool.PROCESS_METHODS:
        return workers.quantize(w, bits=bits, block_size=block_size, symmetric=bool(symmetric), method=method)
    return fn(w, bits=bits, block_size=block_size, symmetric=bool(symmetric))
