"""Build into a temporary sibling folder and rename it into place only when complete."""
from __future__ import annotations

import glob
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import OutputError


def check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a folder; choose another output path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"output folder {out} exists and is not empty; pass --overwrite to replace it")


@contextmanager
def staged_folder(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a fresh temporary folder next to `out`; on success it replaces `out` atomically."""
    out = out.absolute()
    check_target(out, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {out.parent}: {e.strerror}") from None
    _clean_stale(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
    except OSError as e:
        raise OutputError(f"cannot create a folder next to {out}: {e.strerror}") from None
    try:
        yield tmp
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _clean_stale(out: Path) -> None:
    """Tidy up after builds into `out` that were killed (SIGKILL, power loss) before they could.

    `.OUT.partial-PID` folders of processes that no longer run are removed. A `.OUT.old-PID` folder
    is the previous complete build, moved aside in the instant before the new one was renamed in;
    if `out` is missing it is put back, otherwise it is removed.
    """
    for stale in sorted(out.parent.glob(f".{glob.escape(out.name)}.*-*")):
        kind, _, pid = stale.name[len(out.name) + 2:].rpartition("-")
        if kind not in ("partial", "old") or not pid.isdigit() or _alive(int(pid)) or not stale.is_dir():
            continue
        if kind == "old" and not out.exists():
            try:
                os.rename(stale, out)
                continue
            except OSError:
                pass
        shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours from an earlier build in this process, which cleans up after itself
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it runs, as another user
        return True
    return True


def _replace(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        try:
            os.rename(out, old)
        except OSError as e:
            raise OutputError(f"cannot move the previous build in {out} aside: {e.strerror}") from None
    try:
        os.rename(tmp, out)
    except OSError as e:
        if old is not None:
            os.rename(old, out)
        raise OutputError(f"cannot move the finished build to {out}: {e.strerror}") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(out.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
