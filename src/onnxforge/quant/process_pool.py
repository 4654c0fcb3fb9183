"""Run the `default` method (onnxruntime's C++ quantizer) in worker processes.

The pybind call keeps the GIL for its whole run, so threads would quantize one matrix at a time;
processes use every core. Workers are spawned (never forked from a threaded process), hold no
state, and only ever receive float arrays and return packed arrays.
"""
from __future__ import annotations

import atexit
import multiprocessing
import os
import threading
from concurrent.futures import Future, ProcessPoolExecutor

import numpy as np

_lock = threading.Lock()
_pool: ProcessPoolExecutor | None = None


def _exit_with_parent() -> None:
    """Worker initializer: end this worker as soon as the building process is gone (even SIGKILLed)."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        from multiprocessing.connection import wait

        wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _quantize(chunk: np.ndarray, bits: int, block_size: int, symmetric: bool):
    from .ort_default import quantize_ort_default

    q = quantize_ort_default(chunk, bits=bits, block_size=block_size, symmetric=symmetric)
    return q.data, q.scales, q.zero_points


def _get_pool() -> ProcessPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            workers = max(1, min(4, os.cpu_count() or 1))
            _pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_exit_with_parent)
            atexit.register(shutdown)
        return _pool


def submit(chunk: np.ndarray, bits: int, block_size: int, symmetric: bool) -> Future:
    """Quantize `chunk` (rows of an HF weight) with onnxruntime's quantizer in a worker process."""
    return _get_pool().submit(_quantize, np.ascontiguousarray(chunk), bits, block_size, symmetric)


def shutdown() -> None:
    global _pool
    with _lock:
        if _pool is not None:
            _pool.shutdown(wait=True, cancel_futures=True)
            _pool = None
