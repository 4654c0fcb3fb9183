"""onnxruntime's own C++ block quantizer (``MlasQuantizeBlockwise``), as the "default" method.

Same conventions as :mod:`onnxforge.quant.rtn` (that module was written to match it);
kept as a cross-check and for bit-exact parity with ``MatMulNBitsQuantizer``. The
pybind call does not release the GIL, unlike the numpy methods.
"""
from __future__ import annotations

import numpy as np

from onnxforge.quant.types import QuantizedWeight, check_params, to_blocks

DEFAULT_BITS = (2, 4, 8)


def _kernel(bits: int):  # noqa: ANN202 - pybind builtin
    from onnxruntime.capi import _pybind_state as ort_c

    return getattr(ort_c, f"quantize_matmul_{bits}bits")


def quantize_ort_default(w: np.ndarray, *, bits: int, block_size: int, symmetric: bool) -> QuantizedWeight:
    """Quantize with ``onnxruntime.capi._pybind_state.quantize_matmul_{bits}bits``.

    The kernel takes the MatMul weight as a row-major (K, N) array (here the padded
    transpose of the HF weight) and fills MatMulNBits-layout outputs in place.
    """
    check_params("default", bits, block_size, DEFAULT_BITS)
    blocks, k = to_blocks(w, block_size)
    n, kb, _ = blocks.shape
    per = 8 // bits
    kn = np.ascontiguousarray(blocks.reshape(n, kb * block_size).T)
    data = np.zeros((n, kb, block_size // per), dtype=np.uint8)
    scales = np.zeros((n, kb), dtype=np.float32)
    zero_points = np.zeros((n, -(-kb // per)), dtype=np.uint8)
    _kernel(bits)(data, kn, scales, zero_points, block_size, n, kb * block_size, symmetric)
    return QuantizedWeight(data=data, scales=scales, zero_points=None if symmetric else zero_points,
                           bits=bits, block_size=block_size, K=k)
