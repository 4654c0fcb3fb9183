"""Fault injection into `python -m onnxforge build` subprocesses (bench/fault_fuzz.py, tests/test_fault_fuzz.py).

Each case starts an int4 build of a random ~10-80 MB llama checkpoint with two worker processes, in its
own session, and injects one fault at a random point of it: SIGINT to the whole process group (Ctrl-C in
a terminal), SIGTERM or SIGHUP to the build, SIGKILL to a worker or to the build, a disk that fills up
(a small tmpfs), a read-only output filesystem (a tmpfs remounted read-only), or a second build into the
same output at once. Then it checks: the build ended within a bound, no traceback on stderr, the rc is
the fault's (130/-2, 143/-15, 129/-1; 2 for a dying worker, a full disk or a read-only folder; 0 when the
build finished first), no `.OUT.*` folder (a build killed with SIGKILL cannot clean up: its partial
folder is counted as `stale`, which the next build removes), the output absent or complete (loads in
onnxruntime), no process of the session left, and the checkpoint byte-identical. A SIGINT that lands
while the interpreter itself starts (its `site` module, ~0.1 s, before any onnxforge code runs) gets
Python's own KeyboardInterrupt traceback: counted as `startup`, apart from the tracebacks.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

import tiny

FAULTS = ("sigint_group", "sigterm", "sighup", "kill9_worker", "kill9_build", "disk_full", "readonly", "concurrent")
BAD = ("traceback", "hang", "unclear", "partial", "orphans", "input_changed")
COLUMNS = ("cases", "built", "ended", "stale", "startup", "skipped", *BAD)
SIGNAL_RC = {"sigint_group": {130, -2}, "sigterm": {143, -15}, "sighup": {129, -1}}
END_SECONDS = 30  # how long a build may take to end after its fault (on top of its own duration)
LINGER = 5.0  # seconds the session's processes may take to go after the build ended


def make_checkpoint(folder: Path, seed: int, layers: int | None = None, vocab: int | None = None) -> Path:
    """A random llama checkpoint of 20-80 MB (1-4 layers of width 512, vocab 2000-8000)."""
    rng = np.random.default_rng(seed)
    layers, vocab = layers or int(rng.integers(1, 5)), vocab or int(rng.choice([2000, 4000, 8000]))
    return tiny.write_random_llama(folder, hidden=512, heads=8, kv_heads=4, layers=layers, vocab=vocab, inter=1376,
                                   seed=seed, scale=0.05, norm_offset=0.0)


def folder_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    h.update(chunk)
    return h.hexdigest()


def build_cmd(model: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "onnxforge", "build", "-m", str(model), "-o", str(out), "--quiet", "-p", "int4",
            "--workers", "2"]


def proc_stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def session_processes(sid: int) -> list[int]:
    """Live (not zombie) processes of session `sid`."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            f = proc_stat(int(d))
            if f and int(f[3]) == sid and f[0] != "Z":
                out.append(int(d))
    return out


def children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            f = proc_stat(int(d))
            if f and int(f[1]) == pid and f[0] != "Z":
                out.append(int(d))
    return out


class Mount:
    """A tmpfs of `size` at `path` (root on Linux), read-only if asked; `ok` False where mount fails."""

    def __init__(self, path: Path, size: str, readonly: bool = False):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self.ok = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                 capture_output=True).returncode == 0
        if self.ok and readonly:
            self.ok = subprocess.run(["mount", "-o", "remount,ro", str(path)], capture_output=True).returncode == 0

    def close(self) -> None:
        if self.ok:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


class Build:
    """One `onnxforge build` subprocess in its own session, stderr to a file."""

    def __init__(self, model: Path, out: Path, log: Path):
        self.log = log
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(build_cmd(model, out), start_new_session=True, stdout=subprocess.DEVNULL,
                                         stderr=err)
        self.pid = self.proc.pid

    def wait(self, seconds: float) -> int | None:
        try:
            return self.proc.wait(seconds)
        except subprocess.TimeoutExpired:
            return None

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def end(self) -> list[int]:
        """PIDs of the session still alive LINGER s after the build ended; then kills what is left."""
        deadline, left = time.monotonic() + LINGER, session_processes(self.pid)
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = session_processes(self.pid)
        try:
            os.killpg(self.pid, signal.SIGKILL)  # only the session this case started
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        return left


def kill_worker(build: Build, until: float) -> str:
    """SIGKILL one worker process of `build` once one exists (before `until`, a monotonic time)."""
    while time.monotonic() < until and build.proc.poll() is None:
        workers = [c for c in children(build.pid) if b"onnxforge.quant.worker" in _cmdline(c)]
        if workers:
            os.kill(workers[0], signal.SIGKILL)
            return "killed"
        time.sleep(0.02)
    return "missed"


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def output_state(out: Path) -> str:
    """'' when `out` is absent or a complete build (fuzzcases.incomplete's rule), else what is wrong."""
    from fuzzcases import incomplete

    return incomplete(out).removeprefix("rc 0 but ") if out.exists() else ""


class Checkpoint:
    """A checkpoint, its digest and its reference int4 build time."""

    def __init__(self, folder: Path, seed: int, **shape):
        self.path = make_checkpoint(folder, seed, **shape)
        self.digest = folder_digest(self.path)
        ref = folder.parent / f"{folder.name}-ref"
        start = time.perf_counter()
        done = subprocess.run(build_cmd(self.path, ref), capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"the reference build of {self.path} failed (rc {done.returncode}): {done.stderr[-800:]}")
        self.seconds = time.perf_counter() - start
        self.mb = sum(p.stat().st_size for p in self.path.iterdir()) / 1e6
        self.out_mb = sum(p.stat().st_size for p in ref.iterdir()) / 1e6
        shutil.rmtree(ref)


def run_fault(fault: str, ckpt: Checkpoint, rng: np.random.Generator, site: Path) -> tuple[str, str]:
    """One fault case in the empty folder `site`; returns (column, detail)."""
    mount = None
    if fault in ("disk_full", "readonly"):
        size = f"{int(rng.integers(1, max(2, int(ckpt.out_mb * 0.9))))}m" if fault == "disk_full" else "4m"
        mount = Mount(site / "fs", size, readonly=fault == "readonly")
        if not mount.ok:
            return "skipped", "mount -t tmpfs is not allowed here"
    out = (mount.path if mount else site) / "out"
    # a second build must reach its output check while the first still runs to meet the lock
    at = float(rng.uniform(0.0, 0.6 if fault == "concurrent" else 0.95)) * ckpt.seconds
    try:
        builds, what = inject(fault, ckpt, out, site, at)
        return judge(fault, builds, out, ckpt, f"{fault} at {at:.2f} s of {ckpt.seconds:.2f} s ({what}), "
                                               f"{ckpt.mb:.0f} MB checkpoint")
    finally:
        if mount:
            mount.close()


def inject(fault: str, ckpt: Checkpoint, out: Path, site: Path, at: float) -> tuple[list[tuple[Build, int | None]], str]:
    """Start the build(s), inject the fault `at` seconds in, wait for the end; [(build, rc or None: hung)]."""
    first = Build(ckpt.path, out, site / "stderr-1")
    builds, what = [first], ""
    if fault == "kill9_worker":
        what = kill_worker(first, time.monotonic() + max(at, 0.5) + ckpt.seconds)
    elif fault in ("disk_full", "readonly"):
        what = "the output filesystem"
    else:
        first.wait(at)
        what = "it had ended" if first.proc.poll() is not None else "it was running"
        if fault == "concurrent":
            builds.append(Build(ckpt.path, out, site / "stderr-2"))
        elif fault in SIGNAL_RC or fault == "kill9_build":
            sig = {"sigint_group": signal.SIGINT, "sigterm": signal.SIGTERM, "sighup": signal.SIGHUP,
                   "kill9_build": signal.SIGKILL}[fault]
            try:
                os.killpg(first.pid, sig) if fault == "sigint_group" else first.proc.send_signal(sig)
            except ProcessLookupError:
                pass
    limit = time.monotonic() + END_SECONDS + 3 * ckpt.seconds
    return [(b, b.wait(max(0.1, limit - time.monotonic()))) for b in builds], what


def judge(fault: str, builds: list[tuple[Build, int | None]], out: Path, ckpt: Checkpoint, what: str) -> tuple[str, str]:
    left = [pid for b, _ in builds for pid in b.end()]
    rcs = [rc for _, rc in builds]
    text = "\n".join(b.stderr() for b, _ in builds)
    detail = f"{what}: rc {rcs}, stderr {text.strip()[-300:]!r}"
    if folder_digest(ckpt.path) != ckpt.digest:
        return "input_changed", detail
    if any(rc is None for rc in rcs):
        return "hang", detail
    if "Traceback (most recent call last)" in text:
        return ("startup" if in_startup(text) else "traceback"), detail
    if left:
        return "orphans", f"{len(left)} processes of the session still alive {LINGER:.0f} s after the end; {detail}"
    broken = output_state(out)
    if broken:
        return "partial", f"{broken}; {detail}"
    temporaries = sorted(p.name for p in out.parent.glob(f".{out.name}.*"))
    if temporaries:
        return ("stale", detail) if fault == "kill9_build" and rcs[0] == -9 else ("partial", f"{temporaries}; {detail}")
    expected = expected_rcs(fault)
    if not all(rc in expected for rc in rcs) or (fault == "concurrent" and 0 not in rcs):
        return "unclear", f"rc not one of {sorted(expected)}; {detail}"
    if any(rc not in (0, -9) and "error" not in text and "interrupted" not in text and rc > 0 for rc in rcs):
        return "unclear", f"no message; {detail}"
    return ("built" if all(rc == 0 for rc in rcs) else "ended"), detail


def in_startup(text: str) -> bool:
    """A KeyboardInterrupt while Python's `site` ran (a .pth file's imports), before any onnxforge code
    could install a handler: the interpreter prints that traceback itself."""
    return "<frozen site>" in text and "onnxforge" not in text and text.rstrip().endswith("KeyboardInterrupt")


def expected_rcs(fault: str) -> set[int]:
    return {0} | SIGNAL_RC.get(fault, set()) | ({-9} if fault == "kill9_build" else set()) | (
        {2} if fault in ("kill9_worker", "disk_full", "readonly", "concurrent") else set())


def run_faults(n: int, scratch: Path, seed: int = 0, checkpoints: int = 3, log=print) -> tuple[dict, list]:
    """`n` fault cases (the FAULTS in turn, random points) on `checkpoints` random checkpoints.

    Returns ({fault: Counter of columns}, [(fault, column, detail)] of the bad ones)."""
    rng = np.random.default_rng(seed)
    ckpts = [Checkpoint(scratch / f"ckpt{i}", seed + i) for i in range(checkpoints)]
    log("fault checkpoints: " + ", ".join(f"{c.mb:.0f} MB (int4 build {c.seconds:.2f} s)" for c in ckpts))
    table, bad = {f: Counter() for f in FAULTS}, []
    for i in range(n):
        fault, ckpt = FAULTS[i % len(FAULTS)], ckpts[int(rng.integers(len(ckpts)))]
        site = scratch / f"site{i}"
        site.mkdir()
        column, detail = run_fault(fault, ckpt, rng, site)
        table[fault]["cases"] += 1
        table[fault][column] += 1
        if column in BAD:
            bad.append((fault, column, detail))
            log(f"fault {i} {fault}: {column}: {detail}")
        shutil.rmtree(site, ignore_errors=True)
    return table, bad


def format_table(table: dict) -> str:
    rows = [("fault", *COLUMNS)] + [(k, *(str(v[c]) for c in COLUMNS)) for k, v in table.items() if v["cases"]]
    rows.append(("total", *(str(sum(v[c] for v in table.values())) for c in COLUMNS)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows)
