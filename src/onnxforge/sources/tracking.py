"""Which checkpoint tensors a build actually read.

`TrackingSource` wraps any source and records the names whose data was read (`read`, `native_blocks`
that returned blocks, and any other `read*` method a source adds). Asking `has()` or `shape()` is not a
read. Weights are read lazily by the writer's jobs, so `unused()` is meaningful only after the writer
has run; whatever was never read then is a tensor the built model does not contain.
"""
from __future__ import annotations

import fnmatch
import threading
from typing import Iterable

from ..errors import CheckpointError

# buffers older checkpoints saved next to the weights; the graph recomputes them from config.json
ALWAYS_IGNORED = ("*rotary_emb.inv_freq",)


class TrackingSource:
    def __init__(self, inner):
        self._inner = inner
        self._read: set[str] = set()
        self._lock = threading.Lock()  # jobs read from worker threads

    def _mark(self, name) -> None:
        if isinstance(name, str):
            with self._lock:
                self._read.add(name)

    def read(self, name: str):
        value = self._inner.read(name)
        self._mark(name)
        return value

    def native_blocks(self, name: str, *args, **kwargs):
        blocks = self._inner.native_blocks(name, *args, **kwargs)
        if blocks is not None:
            self._mark(name)
        return blocks

    def __getattr__(self, attr: str):
        value = getattr(self._inner, attr)
        if attr.startswith("read") and callable(value):  # e.g. a future read_rows(name, ...)
            def reading(name, *args, **kwargs):
                out = value(name, *args, **kwargs)
                self._mark(name)
                return out

            return reading
        return value

    @property
    def read_names(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._read)

    def unused(self, ignored: Iterable[str] = ()) -> tuple[list[str], list[str]]:
        """(tensors never read, tensors never read that `ignored` or ALWAYS_IGNORED expect to be unread),
        both in checkpoint order."""
        globs = (*ignored, *ALWAYS_IGNORED)
        done = self.read_names
        unread = [n for n in self._inner.tensor_names() if n not in done]
        expected = [n for n in unread if any(fnmatch.fnmatchcase(n, g) for g in globs)]
        skip = set(expected)
        return [n for n in unread if n not in skip], expected


def report_unused(report, source: TrackingSource, arch, strict: bool = False, left_out: Iterable[str] = ()) -> None:
    """Fill `report.unread_tensors` with the checkpoint tensors the build never read, and warn about them
    (raise CheckpointError with `strict`). Those the family expects to leave unread
    (`Architecture.ignored`, which api._ignored_note already notes, and ALWAYS_IGNORED) get a note; `left_out`
    (what the build's options leave out, which the build notes itself) neither."""
    from ..export.report import fold_layers

    family = tuple(getattr(arch, "ignored", ()))
    unread, expected = source.unused(family)
    skip = set(left_out)
    unread = [n for n in unread if n not in skip]
    report.unread_tensors = unread
    others = [n for n in expected if not any(fnmatch.fnmatchcase(n, g) for g in family)]
    if others:
        report.notes.append(f"{len(others)} checkpoint tensors left unread on purpose: {', '.join(fold_layers(others))} "
                            "(recomputed from config.json)")
    if not unread:
        return
    what = (f"{len(unread)} checkpoint tensors are not used by the {arch.name} build: {', '.join(fold_layers(unread))}. "
            "config.json may not describe the weights (e.g. fewer layers than the checkpoint has), or the checkpoint "
            "has parts onnxforge does not build")
    if strict:
        raise CheckpointError(what + "; nothing was written (without --strict this is a warning)")
    report.warnings.append(what)
