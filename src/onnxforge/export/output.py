"""The output folder: refused where a build could hurt the user's files, locked while a build writes
it, built in a temporary sibling folder and renamed into place only when complete."""
from __future__ import annotations

import glob
import json
import os
import shutil
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable, Iterator

from ..errors import OutputError
from ..sources.hf import TOKENIZER_FILES

try:
    import fcntl
except ImportError:  # Windows: no lock; the checks and the atomic rename still apply
    fcntl = None

# what a build writes into its folder, and what `onnxforge verify` adds to it: --overwrite replaces
ADAPTER_SUFFIX = ".onnx_adapter"  # LoRA adapter files a build wrote (export/adapters.py), listed in its report
# a folder holding build_report.json and nothing else than these, or an empty one
BUILD_FILES = frozenset({"model.onnx", "model.onnx.data", "genai_config.json", "build_report.json",
                         "verify.json", "verify.png", *TOKENIZER_FILES})
OVERWRITE = "pass --overwrite (overwrite=True in Python)"


def claim_output(out: Path, model=None, overwrite: bool = False) -> Callable[[], None]:
    """Check `out` against the input, the user's places and its contents, and take its lock; all
    before the source is opened. Returns the function that releases the lock (call it when done)."""
    check_place(out, model)
    check_target(out, overwrite)
    held = ExitStack()
    try:
        held.callback(_remove_empty, _make_parents(out))  # runs last: the folders made for the lock, if still empty
        held.enter_context(output_lock(out))
        check_target(out, overwrite)  # again, now that no other build can be changing it
    except BaseException:
        held.close()
        raise
    return held.close


def check_place(out: Path, model=None) -> None:
    """Refuse, from the paths alone, an output whose replacement would take the user's files with it."""
    real = os.path.realpath(out)
    if real == os.path.dirname(real) or os.path.ismount(real):
        raise OutputError(f"output {out} is a filesystem root (or mount point); choose a new folder inside it")
    for what, place in (("the current folder", _cwd()), ("your home folder", _home())):
        if place and _within(os.path.realpath(place), real):
            how = "is" if os.path.realpath(place) == real else "holds"
            raise OutputError(f"output {out} {how} {what} ({place}); choose a new folder, e.g. {Path(place) / 'model-onnx'}")
    src = _input_path(model)
    if src is None:
        return
    src_real = os.path.realpath(src)
    if real == src_real:
        raise OutputError(f"output {out} is the input {src}; choose another output folder")
    if _within(src_real, real):
        raise OutputError(f"output {out} holds the input {src}; choose another output folder")
    if os.path.isdir(src_real) and _within(real, src_real):
        raise OutputError(f"output {out} lies inside the input checkpoint folder {src}; choose a folder outside it")


def check_target(out: Path, overwrite: bool) -> None:
    """Refuse an existing output that is not a folder, holds what no build wrote, or needs --overwrite."""
    if out.is_symlink():
        raise OutputError(f"output {out} is a symbolic link (to {os.path.realpath(out)}); name the folder itself")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} is a file, not a folder; choose another output folder")
    if not out.is_dir():
        return
    try:
        names = sorted(p.name for p in out.iterdir())
    except OSError as e:
        raise OutputError(f"cannot list the output folder {out}: {e.strerror}") from None
    if not names:
        return
    why = _not_a_build(out, names)
    if why:
        raise OutputError(f"output folder {out} {why}; --overwrite replaces only a previous onnxforge build or an "
                          "empty folder: choose another output folder, or move those files away yourself")
    if not overwrite:
        raise OutputError(f"output folder {out} holds a previous onnxforge build; {OVERWRITE} to replace it")


def _not_a_build(out: Path, names: list[str]) -> str | None:
    """Why `out` is not (only) a previous build, or None when it is. LoRA adapter files (NAME.onnx_adapter) count
    as the build's only where its report lists them among the files it wrote."""
    report = _report_of(out) if "build_report.json" in names else None
    written = report.get("files") if isinstance(report, dict) else None
    adapters = {n for n in written if n.endswith(ADAPTER_SUFFIX)} if isinstance(written, dict) else set()
    foreign = [n + "/" if (out / n).is_dir() else n for n in names
               if (n not in BUILD_FILES and n not in adapters) or (out / n).is_symlink() or not (out / n).is_file()]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        return f"holds files no onnxforge build wrote ({shown})"
    if "build_report.json" not in names:
        return "is not an onnxforge build (it has no build_report.json)"
    if not isinstance(report, dict) or not {"architecture", "input_sha256"} <= report.keys():
        return "has a build_report.json that onnxforge did not write"
    return None


def _report_of(out: Path) -> dict | None:
    try:
        return json.loads((out / "build_report.json").read_bytes()[: 16 << 20])
    except (OSError, ValueError):
        return None


def _within(child: str, parent: str) -> bool:
    return os.path.commonpath([child, parent]) == parent


def _cwd() -> str | None:
    try:
        return os.getcwd()
    except OSError:  # the current folder was removed
        return None


def _home() -> str | None:
    try:
        return str(Path.home())
    except (RuntimeError, KeyError):  # no HOME and no passwd entry
        return None


def _input_path(model) -> Path | None:
    if isinstance(model, (str, os.PathLike)):
        return Path(model)
    path = getattr(model, "path", None)  # a Source object: the folder or file it reads, when it has one
    return Path(path) if isinstance(path, (str, os.PathLike)) else None


def _make_parents(out: Path) -> list[Path]:
    """Create the folders above `out` that are missing; return them, deepest first."""
    made = [p for p in Path(os.path.abspath(out)).parents if not p.exists()]
    try:
        out.absolute().parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {out.absolute().parent}: {e.strerror}") from None
    return made


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first; a folder that holds anything stays
        try:
            folder.rmdir()
        except OSError:
            break


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold `.OUT.lock` beside `out` (an exclusive flock, never waited for): another build into `out`
    refuses at once. The holder removes the file when done, also one left by a killed build."""
    path = _lock_path(out)
    fd = _take_lock(path, out)
    try:
        yield
    finally:
        if fd is not None:
            try:
                if _same_file(fd, path):
                    os.unlink(path)  # while holding it: a build that opened it meanwhile sees it moved and retries
            except OSError:
                pass
            os.close(fd)  # releases the lock


def _lock_path(out: Path) -> Path:
    real = Path(os.path.realpath(out))
    return real.parent / f".{real.name}.lock"


def _take_lock(path: Path, out: Path) -> int | None:
    if fcntl is None:
        return None
    for _ in range(16):  # the file was removed by the build that held it between our open and our flock
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError(f"cannot create the lock file {path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            who = f" (pid {pid})" if pid.isdigit() else ""
            raise OutputError(f"another onnxforge build{who} is writing {out}; wait for it to finish, "
                              "or choose another output folder") from None
        except OSError:  # this filesystem has no flock (some network mounts): build without the lock
            os.close(fd)
            return None
        if _same_file(fd, path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)
    raise OutputError(f"cannot take the lock {path}: other builds keep replacing it")


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


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
        _replace(tmp, out, overwrite)
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


def _replace(tmp: Path, out: Path, overwrite: bool) -> None:
    check_target(out, overwrite)  # what the user may have put into `out` while the build ran is not moved aside
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
