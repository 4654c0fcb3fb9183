"""Signals that end a command: SIGINT (Ctrl-C), SIGTERM and SIGHUP become an exception in the main thread.

Python's default SIGTERM and SIGHUP end the process on the spot, so no `finally` runs: the staged
`.OUT.partial-PID` folder would stay and the worker processes would see a broken pipe. While a command runs
(`signals_as_exceptions`), each of the three raises `Interrupted` (a KeyboardInterrupt carrying the signal),
which unwinds the build: the writer's threads stop, the worker processes are ended, the partial folder is
removed. The CLI then prints one line and exits with 128 + the signal number.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator

SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
LINGER_SECONDS = 3.0  # how long an ending CLI waits for background threads before it exits without them


class Interrupted(KeyboardInterrupt):
    """The command was stopped by a signal (`signum`)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def signum_of(exc: KeyboardInterrupt) -> int:
    return exc.signum if isinstance(exc, Interrupted) else signal.SIGINT


def describe(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


@contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise Interrupted in the main thread while the block runs; the previous
    handlers come back afterwards. Only the first signal raises: later ones are ignored, so the cleanup of the
    first (bounded: seconds) is not itself interrupted. Outside the main thread this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised = []

    def handler(signum, frame):
        if not raised:
            raised.append(signum)
            raise Interrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def exit_without_lingering_threads(code: int) -> None:
    """For a CLI process that ends on an error or a signal: give background threads LINGER_SECONDS to finish
    (a stopped build's threads end at their next slice), then exit with `code` without waiting for any that
    remain (Python would join them at exit: e.g. a hash of a 100 GB input that runs beside the build)."""
    deadline = time.monotonic() + LINGER_SECONDS
    for t in threading.enumerate():
        if t is not threading.current_thread() and not t.daemon:
            t.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.current_thread()):
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
