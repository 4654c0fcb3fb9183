"""Quantization in worker processes, so every core is busy whatever the method.

onnxruntime's C++ quantizer (method ``default``) holds the GIL, and the numpy methods (hqq, and
k_quant without its C kernel) release it only inside large numpy calls, so threads alone leave cores
idle. A build with more than one worker hands each slice of rows to one of N worker processes.

The workers are plain subprocesses running ``python -m onnxforge.quant.worker``: they never import
the caller's ``__main__`` (multiprocessing's spawn and forkserver do, which breaks a script that
calls :func:`onnxforge.build` without an ``if __name__ == "__main__"`` guard), and they share no
state with the parent (no fork of a threaded process). They talk over their stdin/stdout pipes in a
small framed format: a JSON header on a pipe, the arrays in two anonymous shared memory files
(memfd) per worker. No pickle. Where memfd does not exist (not Linux), builds quantize in threads.

The result of a slice does not depend on which process quantized it, so the output is
byte-identical to a one-worker build. Each worker holds one slice at a time; a worker's stdin
closes when the build's process dies, and the worker exits.
"""
from __future__ import annotations

import json
import mmap
import os
import queue
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import BinaryIO

import numpy as np

from onnxforge import errors
from onnxforge.quant import _native
from onnxforge.quant.types import QuantizedWeight

_LEN = struct.Struct("<Q")
# the methods worth a process: the pure-numpy rtn is as fast in threads (it releases the GIL in its
# large numpy calls), and moving its input to another process costs more than it saves; so is k_quant
# when its C kernel is built (ctypes releases the GIL for the whole search)
PROCESS_METHODS = frozenset({"default", "hqq"} | ({"k_quant"} if _native.KQUANT is None else set()))
AVAILABLE = hasattr(os, "memfd_create")  # Linux; elsewhere builds quantize in threads


def _dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


class Buffer:
    """An anonymous shared memory file (memfd) both processes map: arrays cross without a pipe copy."""

    def __init__(self, fd: int) -> None:
        self.fd, self.size, self.map = fd, 0, None

    def view(self, size: int, *, grow: bool) -> memoryview:
        if size > self.size or self.map is None:
            if grow and size > os.fstat(self.fd).st_size:
                os.ftruncate(self.fd, max(size, 2 * self.size))
            self.size = os.fstat(self.fd).st_size
            self.map = mmap.mmap(self.fd, self.size) if self.size else None
        return memoryview(self.map)[:size] if self.map is not None else memoryview(b"")

    def put(self, arrays: list[np.ndarray | None]) -> list:
        """Copy arrays in, one after the other (64-byte aligned); returns their [shape, dtype, offset]."""
        specs, offset = [], 0
        arrays = [None if a is None else np.ascontiguousarray(a) for a in arrays]
        for a in arrays:
            if a is None:
                specs.append(None)
                continue
            specs.append([list(a.shape), a.dtype.name, offset])
            offset += -(-a.nbytes // 64) * 64
        view = self.view(offset, grow=True)
        for a, spec in zip(arrays, specs):
            if a is not None:
                view[spec[2]:spec[2] + a.nbytes] = a.reshape(-1).view(np.uint8)
        return specs

    def get(self, specs: list, *, copy: bool) -> list[np.ndarray | None]:
        end = max((spec[2] + int(np.prod(spec[0], dtype=np.int64)) * _dtype(spec[1]).itemsize
                   for spec in specs if spec is not None), default=0)
        view = self.view(end, grow=False)
        out = []
        for spec in specs:
            if spec is None:
                out.append(None)
                continue
            shape, dtype, offset = spec
            dt = _dtype(dtype)
            n = int(np.prod(shape, dtype=np.int64))
            a = np.frombuffer(view, dtype=dt, count=n, offset=offset).reshape(shape)
            out.append(a.copy() if copy else a)
        return out


def send_header(f: BinaryIO, header: dict) -> None:
    head = json.dumps(header).encode()
    f.write(_LEN.pack(len(head)) + head)
    f.flush()


def _read_exact(f: BinaryIO, n: int) -> bytes:
    buf = bytearray(n)
    view, done = memoryview(buf), 0
    while done < n:
        got = f.readinto(view[done:])
        if not got:
            raise EOFError
        done += got
    return bytes(buf)


def receive_header(f: BinaryIO) -> dict:
    (size,) = _LEN.unpack(_read_exact(f, _LEN.size))
    return json.loads(_read_exact(f, size))


class _Worker:
    def __init__(self) -> None:
        import onnxforge

        env = dict(os.environ)
        root = str(Path(onnxforge.__file__).resolve().parent.parent)  # this very onnxforge, installed or not
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one core per worker
            env[var] = "1"
        fds = [os.memfd_create("onnxforge-in"), os.memfd_create("onnxforge-out")]
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "onnxforge.quant.worker", *map(str, fds)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, bufsize=0,
                                         pass_fds=fds)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        self.inp, self.out = Buffer(fds[0]), Buffer(fds[1])

    def call(self, header: dict, arrays: list[np.ndarray | None]) -> tuple[dict, list[np.ndarray | None]]:
        try:
            send_header(self.proc.stdin, dict(header, arrays=self.inp.put(arrays)))
            answer = receive_header(self.proc.stdout)
        except (EOFError, BrokenPipeError, OSError) as err:
            code = self.proc.poll()
            raise errors.OnnxForgeError(
                f"a quantization worker process stopped unexpectedly (exit code {code}); it may have run out of "
                "memory: retry with fewer workers (--workers 1 quantizes in this process)") from err
        return answer, self.out.get(answer.pop("arrays", []), copy=True)

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        for buf in (self.inp, self.out):
            buf.map = None
            os.close(buf.fd)


class WorkerPool:
    """N worker processes, started on first use; `quantize` is safe to call from many threads."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._all: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False
        self._threads = None

    def _take(self) -> _Worker:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            if self._closed:
                raise errors.OnnxForgeError("the quantization worker pool is closed")
            if len(self._all) < self.n:
                worker = _Worker()
                self._all.append(worker)
                return worker
        return self._idle.get()

    def quantize(self, w: np.ndarray, *, bits: int, block_size: int, symmetric: bool, method: str) -> QuantizedWeight:
        worker = self._take()
        try:
            header, arrays = worker.call({"method": method, "bits": bits, "block_size": block_size,
                                          "symmetric": bool(symmetric)}, [w])
        except errors.OnnxForgeError:
            raise  # a dead worker is not put back
        self._idle.put(worker)
        if not header.get("ok"):
            kind = getattr(errors, header.get("kind", ""), None)
            builtin = {"ValueError": ValueError, "KeyError": KeyError}.get(header.get("kind", ""), RuntimeError)
            cls = kind if isinstance(kind, type) and issubclass(kind, errors.OnnxForgeError) else builtin
            raise cls(header.get("message", "quantization failed in a worker process"))
        data, scales, zero_points = arrays
        return QuantizedWeight(data=data, scales=scales, zero_points=zero_points, bits=header["bits"],
                               block_size=header["block_size"], K=header["K"])

    def quantize_many(self, chunks, *, bits: int, block_size: int, symmetric: bool, method: str):
        """Yield (key, QuantizedWeight) for each (key, array) of `chunks` as they finish, up to n at once
        (the slices of one large weight on every worker); arrays are drawn from `chunks` only as workers
        free up, so a lazy iterator reads them on demand."""
        from concurrent.futures import FIRST_COMPLETED, wait

        with self._lock:
            if self._threads is None:
                from concurrent.futures import ThreadPoolExecutor

                self._threads = ThreadPoolExecutor(2 * self.n, thread_name_prefix="onnxforge-chunk")
        running, it = set(), iter(chunks)

        def submit() -> bool:
            nxt = next(it, None)
            if nxt is None:
                return False
            i, w = nxt  # (key, array): the key comes back with the result
            fut = self._threads.submit(self.quantize, w, bits=bits, block_size=block_size, symmetric=symmetric,
                                       method=method)
            fut.index = i
            running.add(fut)
            return True

        try:
            while len(running) < self.n and submit():
                pass
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    running.discard(fut)
                    yield fut.index, fut.result()
                    submit()
        finally:
            for fut in running:
                fut.cancel()

    def close(self) -> None:
        with self._lock:
            if self._threads is not None:
                self._threads.shutdown(wait=False, cancel_futures=True)
                self._threads = None
            self._closed = True
            workers, self._all = self._all, []
        for worker in workers:
            worker.close()


_current: WorkerPool | None = None
_users = 0
_guard = threading.Lock()


def active() -> WorkerPool | None:
    """The pool of the build in progress, if it quantizes in processes."""
    return _current


class processes:
    """Context manager: quantize in `n` worker processes while it is open (shared by concurrent builds
    of one process; the last to leave closes the workers). n <= 1 does nothing."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self):
        global _current, _users
        if self.n > 1 and AVAILABLE:
            with _guard:
                if _current is None:
                    _current = WorkerPool(self.n)
                _users += 1
        return self

    def __exit__(self, *exc) -> None:
        global _current, _users
        if self.n > 1 and AVAILABLE:
            with _guard:
                _users -= 1
                pool, done = _current, _users == 0
                if done:
                    _current = None
            if done and pool is not None:
                pool.close()
