"""Interrupted builds: `python -m onnxforge build` killed with SIGKILL at points spread over the build.

After every kill the target folder must either not exist or hold a complete build (every file's
SHA-256 equal to a reference build's; build_report.json differs only in times and memory), and no
folder with the target's name may be partial. Stale `.NAME.partial-PID` folders (and the killed build's
`.NAME.lock`) may stay next to the target until the next build into it, which removes them and succeeds.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import onnxforge
import tiny
from onnxforge.errors import OutputError

KILLS = 5  # kill points per scenario, one in each fifth of the reference build's duration
BUILD_ARGS = ["-p", "int4"]


def write_llama(folder: Path, *, hidden=512, heads=8, kv_heads=4, layers=4, vocab=8000, inter=1376, seed=0) -> Path:
    """A random ~80 MB Llama checkpoint (numpy + safetensors, no torch): an int4 build takes ~1-2 s."""
    return tiny.write_random_llama(folder, hidden=hidden, heads=heads, kv_heads=kv_heads, layers=layers, vocab=vocab,
                                   inter=inter, seed=seed, scale=0.05, norm_offset=0.0)


def digests(folder: Path) -> dict[str, str]:
    """SHA-256 per file; build_report.json reduced to the fields that do not depend on timing."""
    out = {}
    for p in sorted(folder.iterdir()):
        if p.name == "build_report.json":
            report = json.loads(p.read_text())
            stable = {k: report[k] for k in ("input_sha256", "recipe_sha256", "recipe", "groups", "architecture")}
            out[p.name] = hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()
        else:
            out[p.name] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def build_cmd(model: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "onnxforge", "build", "-m", str(model), "-o", str(out), "--quiet",
            *BUILD_ARGS, *extra]


def session_processes(sid: int) -> list[int]:
    """PIDs of the processes still in session `sid` (the build and anything it started)."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                pids.append(int(d))
    return pids


def kill_build(cmd: list[str], after: float, linger: float = 0.0) -> tuple[bool, list[int], int]:
    """Start `cmd` in its own session, SIGKILL it `after` seconds later.

    Returns (it was still running when killed, PIDs of its session still alive `linger` s after the
    kill, its PID). Whatever is left of the session is killed before returning.
    """
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(after)
        running = proc.poll() is None
        proc.kill()
        proc.wait()
        deadline, left = time.monotonic() + linger, session_processes(proc.pid)
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = session_processes(proc.pid)
        return running, left, proc.pid
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # only the session this test started
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(checkpoint, reference build folder, its digests, build seconds)."""
    root = tmp_path_factory.mktemp("interrupt")
    model = write_llama(root / "ckpt")
    ref = root / "reference"
    start = time.perf_counter()
    subprocess.run(build_cmd(model, ref), check=True, capture_output=True)
    seconds = time.perf_counter() - start
    return model, ref, digests(ref), seconds


def check_state(target: Path, ref_digests: dict[str, str]) -> str:
    """'absent' or 'complete'; fails on anything else next to or at the target."""
    name = target.name
    for entry in target.parent.iterdir():
        if entry.name == name:
            continue
        if entry.name == f".{name}.lock":  # the killed build's lock, removed by the next build into the target
            continue
        assert re.fullmatch(rf"\.{re.escape(name)}\.(partial|old)-\d+", entry.name), f"unexpected {entry.name}"
        if ".old-" in entry.name:  # the previous build, moved aside the instant before the rename
            assert digests(entry) == ref_digests, f"{entry.name} is not a complete build"
    if not target.exists():
        return "absent"
    assert target.is_dir()
    assert digests(target) == ref_digests, "the target folder holds an incomplete or different build"
    return "complete"


def kill_points(seconds: float, seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    return [seconds * (i + rng.uniform(0.1, 0.9)) / KILLS for i in range(KILLS)]


@pytest.mark.parametrize("scenario,seed", [("fresh", 0), ("overwrite", 1)])
def test_killed_build_leaves_no_broken_output(reference, tmp_path, capsys, scenario, seed):
    model, ref, ref_digests, seconds = reference
    target = tmp_path / "site" / "model-out"
    target.parent.mkdir()
    extra = ("--overwrite",) if scenario == "overwrite" else ()
    states, running_kills, mid_write = [], 0, 0
    points = kill_points(seconds, seed)
    rng = np.random.default_rng(seed + 100)
    tried = []
    while points:
        after = points.pop(0)
        tried.append(after)
        if scenario == "fresh":
            shutil.rmtree(target, ignore_errors=True)
        elif not target.exists():
            shutil.copytree(ref, target)
        running, _, pid = kill_build(build_cmd(model, target, *extra), after)
        running_kills += running
        mid_write += (target.parent / f".{target.name}.partial-{pid}").is_dir()
        state = check_state(target, ref_digests)
        if scenario == "overwrite" and state == "absent":  # only possible between the two renames
            assert list(target.parent.glob(f".{target.name}.old-*")), "the previous build vanished"
        states.append(state)
        # the machine's speed varies: add kill points late in the build until one lands mid-write
        if not points and (mid_write < 1 or running_kills < 3) and len(states) < KILLS + 10:
            points.append(seconds * rng.uniform(0.3, 0.95))
    assert running_kills >= 3, f"only {running_kills} of {len(tried)} kills hit a running build (reference {seconds:.2f} s)"
    assert mid_write >= 1, "no kill landed while the weights were being written"
    if scenario == "overwrite":
        assert states.count("complete") + states.count("absent") == len(states)

    # the next build into the same target succeeds and removes the stale folders of killed builds
    stale_before = sorted(p.name for p in target.parent.glob(f".{target.name}.*"))
    done = subprocess.run(build_cmd(model, target, "--overwrite"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert digests(target) == ref_digests
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name], "stale folders were not cleaned up"
    with capsys.disabled():
        print(f"\ninterrupt {scenario}: {len(tried)} SIGKILLs at {', '.join(f'{t:.2f}' for t in tried)} s "
              f"(reference build {seconds:.2f} s; {running_kills} hit a running build, {mid_write} while it "
              f"wrote its partial folder): target "
              f"{states.count('absent')}x absent, {states.count('complete')}x complete; "
              f"{len(stale_before)} stale folders removed by the next build")


def test_killed_build_leaves_no_processes(reference):
    model, _, _, seconds = reference
    out = Path(reference[1]).parent / "orphans-out"
    hits = 0
    # while the int4 weights are being quantized; the machine's speed varies, so earlier points are
    # tried until two kills have hit a running build
    for share in (0.5, 0.7, 0.35, 0.25, 0.15, 0.1):
        running, left, _ = kill_build(build_cmd(model, out), seconds * share, linger=3.0)
        assert not left, f"{len(left)} processes of the killed build are still running 3 s later"
        hits += running
        if hits == 2:
            break
    assert hits == 2, f"only {hits} kills hit a running build (reference {seconds:.2f} s)"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_folders_of_dead_builds_are_cleaned_or_restored(reference, tmp_path, monkeypatch):
    """The next build removes `.OUT.partial-PID` of dead PIDs, keeps live ones, and puts a `.OUT.old-PID`
    (the previous build, moved aside just before a killed build's rename) back when OUT is missing."""
    import errno

    from onnxforge.export import writer

    model, ref, ref_digests, _ = reference
    out = tmp_path / "out"
    dead = _dead_pid()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / f".out.partial-{dead}").mkdir()
        (tmp_path / f".out.partial-{dead}" / "model.onnx.data").write_bytes(b"\0" * 100)
        (tmp_path / f".out.partial-{sleeper.pid}").mkdir()  # a build that is still running: left alone
        (tmp_path / ".other.partial-1").mkdir()  # another target's: not ours to touch
        shutil.copytree(ref, tmp_path / f".out.old-{dead}")

        class FullDisk:  # the new build fails inside the staged folder
            def __init__(self, path, mode):
                self._f, self.name = open(path, mode), str(path)

            def write(self, data):
                raise OSError(errno.ENOSPC, "No space left on device")

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self._f.close()

        monkeypatch.setattr(writer, "open_data_file", FullDisk)
        with pytest.raises(OutputError):
            onnxforge.build(model, out, "int4")
        assert digests(out) == ref_digests, "the previous build was not put back"
        names = sorted(p.name for p in tmp_path.iterdir())
        assert names == sorted(["out", f".out.partial-{sleeper.pid}", ".other.partial-1"]), names

        monkeypatch.undo()
        onnxforge.build(model, out, "int4", overwrite=True)
        assert digests(out) == ref_digests
        assert (tmp_path / f".out.partial-{sleeper.pid}").is_dir()
    finally:
        sleeper.kill()
        sleeper.wait()
