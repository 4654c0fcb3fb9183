"""Cooperative cancellation of a build's background work.

When the writer stops early (an error, or a signal turned into an exception in the main thread), the
threads still producing its weights must end soon: Python joins them at exit, so a thread that goes on
quantizing a large weight would hold the process. The writer runs each job with its build's event
(`working_for`); loops over slices call `check()` between slices, which raises `Cancelled` once it is set.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

_local = threading.local()


class Cancelled(Exception):
    """The build this thread works for was stopped; nobody reads this result."""


@contextmanager
def working_for(event: threading.Event) -> Iterator[None]:
    """Mark the current thread as working for the build whose cancellation event is `event`."""
    previous = getattr(_local, "event", None)
    _local.event = event
    try:
        yield
    finally:
        _local.event = previous


def check() -> None:
    """Raise Cancelled if the build the current thread works for was stopped."""
    event = getattr(_local, "event", None)
    if event is not None and event.is_set():
        raise Cancelled("the build was stopped")
