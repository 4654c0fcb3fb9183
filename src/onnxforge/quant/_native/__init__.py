"""The C kernels, loaded with ctypes (which releases the GIL during a call); None when not built."""
from __future__ import annotations

import ctypes
import importlib.util
import os

import numpy as np

_F = np.ctypeslib.ndpointer(np.float32, flags="C_CONTIGUOUS")
_U8 = np.ctypeslib.ndpointer(np.uint8, flags="C_CONTIGUOUS")
_I64, _INT = ctypes.c_int64, ctypes.c_int


def _load() -> ctypes.CDLL | None:
    """The compiled k_quant kernel, or None (not built, this CPU cannot run it, or ONNXFORGE_NO_NATIVE=1)."""
    if os.environ.get("ONNXFORGE_NO_NATIVE", "") not in ("", "0"):
        return None
    try:
        spec = importlib.util.find_spec("onnxforge.quant._native._kquant")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    try:
        lib = ctypes.CDLL(spec.origin)
    except OSError:
        return None
    lib.kquant_symmetric.argtypes = [_F, _I64, _INT, _INT, _F, _INT, _INT, _F, _U8]
    lib.kquant_asymmetric.argtypes = [_F, _I64, _INT, _INT, _F, _INT, _INT, _F, _F, _U8]
    lib.kquant_symmetric.restype = lib.kquant_asymmetric.restype = lib.kquant_supported.restype = ctypes.c_int
    lib.kquant_supported.argtypes = []
    return lib if lib.kquant_supported() else None  # x86-64 without AVX2: the numpy reference


KQUANT = _load()
