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
closes when the build's process dies, and the worker exits. Workers run in their own process group and
ignore SIGINT and SIGHUP (a terminal's Ctrl-C goes to the build alone, which ends them); no wait on a worker
is unbounded (see WorkerPool).
"""
from __future__ import annotations

import json
import mmap
import os
import queue
import select
import signal
import struct
import subprocess
import sys
import threading
import time
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


def _read_exact(f: BinaryIO, n: int, ready=None) -> bytes:
    """`n` bytes from `f`; `ready()`, when given, is called before each read and returns once data can be read
    (or raises), so the read never blocks without a bound."""
    buf = bytearray(n)
    view, done = memoryview(buf), 0
    while done < n:
        if ready is not None:
            ready()
        got = f.readinto(view[done:])
        if not got:
            raise EOFError
        done += got
    return bytes(buf)


def receive_header(f: BinaryIO, ready=None) -> dict:
    (size,) = _LEN.unpack(_read_exact(f, _LEN.size, ready))
    return json.loads(_read_exact(f, size, ready))


ANSWER_SECONDS = 600.0  # a worker that does not answer within this per 4M values (a slice: seconds of work) is an error
ANSWER_ELEMENTS = 1 << 22
CLOSE_SECONDS = 2.0  # how long an idle worker gets to exit on its own when the pool closes, before it is killed
WAIT_SLICE = 0.25  # waits look at the pool's state (closed, failed) this often


def _stopped(proc: subprocess.Popen) -> errors.OnnxForgeError:
    try:
        code = proc.wait(timeout=1.0)  # its pipe closed: it has exited or is about to
    except subprocess.TimeoutExpired:
        code = None
    if code is not None and code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
        how = f"killed by {name}"
    else:
        how = "still running, its pipe closed" if code is None else f"exit code {code}"
    return errors.OnnxForgeError(
        f"a quantization worker process stopped unexpectedly ({how}); it may have run out of "
        "memory: retry with fewer workers (--workers 1 quantizes in this process)")


def _closed_error() -> errors.OnnxForgeError:
    return errors.OnnxForgeError("the quantization worker pool is closed (the build was stopped)")


class _Worker:
    """One worker process. Its own process group: a terminal's Ctrl-C (SIGINT to the foreground group) reaches
    the build, which ends its workers; the worker ignores SIGINT and SIGHUP too, and exits when its stdin closes."""

    def __init__(self, closed: threading.Event) -> None:
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
                                         pass_fds=fds, process_group=0)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        self.inp, self.out = Buffer(fds[0]), Buffer(fds[1])
        self.closed = closed  # the pool's: set when it closes
        self.busy = threading.Lock()  # held for a whole call
        self.released = False

    def _ready(self, deadline: float, bound: float) -> None:
        """Return once the answer (or EOF: the worker died) can be read; raise when the pool closes or the
        worker has not answered by `deadline`."""
        poller = select.poll()
        poller.register(self.proc.stdout.fileno(), select.POLLIN)
        while not poller.poll(WAIT_SLICE * 1000):
            if self.closed.is_set():
                raise _closed_error()
            if time.monotonic() > deadline:
                raise errors.OnnxForgeError(
                    f"a quantization worker process did not answer within {bound:g} s (process "
                    f"{self.proc.pid}); retry with --workers 1, which quantizes in this process")

    def call(self, header: dict, arrays: list[np.ndarray | None]) -> tuple[dict, list[np.ndarray | None]]:
        with self.busy:
            if self.closed.is_set() or self.released:
                raise _closed_error()
            size = sum(a.size for a in arrays if a is not None)
            bound = ANSWER_SECONDS * max(1.0, size / ANSWER_ELEMENTS)
            deadline = time.monotonic() + bound
            try:
                send_header(self.proc.stdin, dict(header, arrays=self.inp.put(arrays)))
                answer = receive_header(self.proc.stdout, lambda: self._ready(deadline, bound))
            except (EOFError, OSError, ValueError) as err:  # ValueError: a pipe closed by the pool
                if self.closed.is_set():
                    raise _closed_error() from None
                raise _stopped(self.proc) from err
            return answer, self.out.get(answer.pop("arrays", []), copy=True)

    def end_input(self) -> None:
        """Close its stdin: an idle worker exits."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass

    def stop(self, deadline: float) -> None:
        """Let it exit until `deadline` if idle, else kill it now (a slice in progress is not wanted)."""
        if not self.busy.locked():
            try:
                self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                return
            except subprocess.TimeoutExpired:
                pass
        self.proc.kill()
        self.proc.wait()  # SIGKILL: at once

    def release(self) -> None:
        """Close its pipes and shared memory, once no call uses them (a call ends at once when the pool is closed
        and the worker dead)."""
        if not self.busy.acquire(timeout=10 * WAIT_SLICE):
            return  # left to the garbage collector rather than closed under a reader
        try:
            if not self.released:
                self.released = True
                self.end_input()
                self.proc.stdout.close()
                for buf in (self.inp, self.out):
                    buf.map = None
                    os.close(buf.fd)
        finally:
            self.busy.release()

    def end(self) -> None:
        """A worker that failed a call: kill it and free what it holds."""
        self.end_input()
        self.stop(time.monotonic())
        self.release()


class WorkerPool:
    """N worker processes, started on first use; `quantize` is safe to call from many threads.

    Every wait is bounded: a call waits at most ANSWER_SECONDS per 4M values for its worker, and waits for a
    free worker look every WAIT_SLICE at whether the pool was closed or has failed (a worker died: every later
    call fails with the same error at once). `close` ends the workers, which ends any call in progress."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._all: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._failed: errors.OnnxForgeError | None = None
        self._threads = None

    def _check(self) -> None:
        if self._closed.is_set():
            raise _closed_error()
        if self._failed is not None:
            raise errors.OnnxForgeError(str(self._failed))

    def _take(self) -> _Worker:
        while True:
            try:
                return self._idle.get_nowait()
            except queue.Empty:
                pass
            with self._lock:
                self._check()
                if len(self._all) < self.n:
                    worker = _Worker(self._closed)
                    self._all.append(worker)
                    return worker
            try:
                return self._idle.get(timeout=WAIT_SLICE)
            except queue.Empty:
                pass

    def _drop(self, worker: _Worker, err: BaseException) -> None:
        """A call failed: the worker's state is unknown, so it is ended; a dead or silent worker fails the pool."""
        with self._lock:
            if worker in self._all:
                self._all.remove(worker)
            if isinstance(err, errors.OnnxForgeError) and not self._closed.is_set() and self._failed is None:
                self._failed = err
        worker.end()

    def quantize(self, w: np.ndarray, *, bits: int, block_size: int, symmetric: bool, method: str) -> QuantizedWeight:
        worker = self._take()
        try:
            header, arrays = worker.call({"method": method, "bits": bits, "block_size": block_size,
                                          "symmetric": bool(symmetric)}, [w])
        except BaseException as err:
            self._drop(worker, err)  # a dead worker is not put back
            raise
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
        free up, so a lazy iterator reads them on demand. Stops with an error when the pool closes or
        fails, or the build this thread works for is cancelled."""
        from concurrent.futures import FIRST_COMPLETED, wait

        from onnxforge import cancel

        with self._lock:
            self._check()
            if self._threads is None:
                from concurrent.futures import ThreadPoolExecutor

                self._threads = ThreadPoolExecutor(2 * self.n, thread_name_prefix="onnxforge-chunk")
            threads = self._threads
        running, it = set(), iter(chunks)

        def submit() -> bool:
            nxt = next(it, None)
            if nxt is None:
                return False
            i, w = nxt  # (key, array): the key comes back with the result
            fut = threads.submit(self.quantize, w, bits=bits, block_size=block_size, symmetric=symmetric,
                                 method=method)
            fut.index = i
            running.add(fut)
            return True

        try:
            while len(running) < self.n and submit():
                pass
            while running:
                done, _ = wait(running, timeout=WAIT_SLICE, return_when=FIRST_COMPLETED)
                if not done:
                    cancel.check()
                    self._check()
                for fut in done:
                    running.discard(fut)
                    yield fut.index, fut.result()
                    submit()
        finally:
            for fut in running:
                fut.cancel()

    def close(self) -> None:
        """End the workers: idle ones exit when their stdin closes (killed after CLOSE_SECONDS), busy ones are
        killed at once, so a call in progress ends (EOF) and no thread waits on a worker after this."""
        with self._lock:
            self._closed.set()
            if self._threads is not None:
                self._threads.shutdown(wait=False, cancel_futures=True)
                self._threads = None
            workers, self._all = self._all, []
        for worker in workers:
            worker.end_input()
        deadline = time.monotonic() + CLOSE_SECONDS
        for worker in workers:
            worker.stop(deadline)
        for worker in workers:
            worker.release()


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
