"""Stream weights into model.onnx.data: produce (read, transform, quantize) ahead on a thread
pool, write strictly in graph order, forget.

Order is fixed by the job list, so the file is byte-identical whatever the thread timing.
Memory stays bounded: at most `max_in_flight_bytes` of produced-but-unwritten output, plus what
the producing threads hold while they work.
"""
from __future__ import annotations

import errno
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx_ir as ir

from ..cancel import Cancelled, working_for
from ..errors import CheckpointError, OutputError
from ..graph.builder import GraphBuilder, Pieces, WeightJob

ALIGN = 64
WAIT_SLICE = 0.25  # the writer looks at the build's stop event this often while it waits for a job
open_data_file = open  # replaced in tests to simulate a full disk where no small file system can be mounted


@dataclass
class WrittenGroup:
    label: str
    storage: str
    nbytes: int
    sources: tuple[str, ...] = ()
    initializers: tuple[str, ...] = ()  # the slots' names, in order (verify maps them back to the sources)


def _check(job: WeightJob, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    if len(arrays) != len(job.slots):
        raise AssertionError(f"{job.label}: produced {len(arrays)} arrays for {len(job.slots)} slots")
    out = []
    for slot, arr in zip(job.slots, arrays):
        if not isinstance(arr, Pieces):
            arr = np.ascontiguousarray(arr)
        if slot.packed:  # int4/uint4: the bytes as ONNX packs them (low nibble first), made by the job
            wrong = arr.dtype != np.uint8 or tuple(arr.shape) != (slot.nbytes,)
        else:
            wrong = tuple(arr.shape) != slot.shape or arr.dtype.itemsize != slot.dtype.itemsize
        if wrong:
            raise CheckpointError(
                f"{slot.name}: expected shape {slot.shape} ({slot.dtype.name}), got {tuple(arr.shape)} ({arr.dtype}); "
                "the weights do not match config.json"
            )
        out.append(arr)
    return out


def _write_all(f, data: memoryview) -> None:
    try:
        f.write(data)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutputError(
                f"disk full while writing {f.name}: free some space or choose another output folder (-o)"
            ) from None
        raise OutputError(f"cannot write {f.name}: {e.strerror}") from None


def _write_slot(f, arr, name: str) -> int:
    """Write an array, or a Pieces' arrays one after the other; returns the bytes written."""
    if not isinstance(arr, Pieces):
        _write_all(f, memoryview(arr.reshape(-1).view(np.uint8)))
        return arr.nbytes
    want = int(np.prod(arr.shape, dtype=np.int64)) * np.dtype(arr.dtype).itemsize
    done = 0
    for piece in arr.pieces():
        piece = np.ascontiguousarray(piece, dtype=arr.dtype)
        _write_all(f, memoryview(piece.reshape(-1).view(np.uint8)))
        done += piece.nbytes
        del piece
    if done != want:
        raise CheckpointError(f"{name}: its pieces hold {done} bytes, not the {want} of shape {arr.shape}")
    return done


def _produce(job: WeightJob, cancel: threading.Event):
    """Run one job in a pool thread, marked as working for the build whose stop event is `cancel`."""
    if cancel.is_set():
        raise Cancelled("the build was stopped")
    with working_for(cancel):
        return job.produce()


def _result(fut: Future, cancel: threading.Event):
    """The job's arrays; waits in slices (a signal is handled between them) until it is done or the build stops."""
    while True:
        try:
            return fut.result(timeout=WAIT_SLICE)
        except FutureTimeout:
            if cancel.is_set():
                raise Cancelled("the build was stopped") from None


class WeightWriter:
    """Writes every job of a GraphBuilder to one external data file."""

    def __init__(self, folder: Path, filename: str = "model.onnx.data", *, workers: int | None = None,
                 max_in_flight_bytes: int = 256 << 20):
        self.folder = Path(folder)
        self.filename = filename
        self.workers = workers or min(4, os.cpu_count() or 1)
        self.max_in_flight_bytes = max_in_flight_bytes
        self.groups: list[WrittenGroup] = []

    def _write_jobs(self, f, builder: GraphBuilder, pool: ThreadPoolExecutor, cancel: threading.Event,
                    progress: Callable[[int], None] | None) -> int:
        """Produce the jobs ahead on `pool` and write them in order; returns the bytes written."""
        pending: deque[tuple[WeightJob, Future]] = deque()
        in_flight = offset = 0
        jobs = iter(builder.jobs)
        exhausted = False
        while True:
            while not exhausted and (not pending or (in_flight < self.max_in_flight_bytes and len(pending) < 4 * self.workers)):
                job = next(jobs, None)
                if job is None:
                    exhausted = True
                    break
                pending.append((job, pool.submit(_produce, job, cancel)))
                in_flight += job.nbytes
            if not pending:
                return offset
            job, fut = pending.popleft()
            try:
                arrays = _check(job, _result(fut, cancel))
            except BaseException:
                for _, other in pending:
                    other.cancel()
                raise
            for slot, arr in zip(job.slots, arrays):
                pad = (-offset) % ALIGN
                if pad:
                    _write_all(f, memoryview(b"\0" * pad))
                    offset += pad
                nbytes = _write_slot(f, arr, slot.name)
                builder.initializers[slot.name].const_value = ir.ExternalTensor(
                    self.filename, offset, nbytes, slot.dtype,
                    shape=ir.Shape(slot.shape), name=slot.name, base_dir=self.folder,
                )
                offset += nbytes
            del arrays
            in_flight -= job.nbytes
            self.groups.append(WrittenGroup(job.label, job.storage, job.nbytes, job.sources,
                                           tuple(slot.name for slot in job.slots)))
            if progress:
                progress(job.nbytes)

    def run(self, builder: GraphBuilder, progress: Callable[[int], None] | None = None) -> int:
        """Produce and write all jobs; returns the data file's size."""
        path = self.folder / self.filename
        try:
            data_file = open_data_file(path, "wb")
        except OSError as e:
            full = e.errno in (errno.ENOSPC, errno.EDQUOT)
            raise OutputError(f"{'disk full: ' if full else ''}cannot create {path}: {e.strerror}") from None
        cancel = threading.Event()
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="onnxforge")
        done = False
        try:
            with data_file as f:
                offset = self._write_jobs(f, builder, pool, cancel, progress)
                try:
                    f.flush()
                    os.fsync(f.fileno())
                except OSError as e:
                    raise OutputError(f"cannot write {path}: {e.strerror}") from None
            done = True
        finally:
            if not done:  # an error or an interrupt: the jobs still running stop at their next slice
                cancel.set()
            pool.shutdown(wait=done, cancel_futures=not done)
        return offset
