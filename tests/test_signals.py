"""Interrupts and dying workers end a build quickly and cleanly (issue 22, item 2).

`python -m onnxforge build` runs in its own session with quantization worker processes; once the workers
exist it gets SIGINT (alone, or to its whole process group as a terminal's Ctrl-C does), SIGTERM or SIGHUP,
or one of its workers gets SIGKILL (as the OOM killer does). Each must end within seconds with its exit code
(130 / 143 / 129; 2 for the dead worker), one line on stderr and no traceback from the build or a worker,
no `.OUT.partial-*` folder, the output folder absent or the previous build untouched, and no process of
the session left. The pool's own waits are bounded: a worker that never answers is an error after the
bound, and closing the pool ends a call in progress at once.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from onnxforge.errors import OnnxForgeError
from onnxforge.quant import pool
from test_interrupt import digests, session_processes, write_llama

pytestmark = pytest.mark.skipif(not pool.AVAILABLE, reason="worker processes need os.memfd_create (Linux)")

EXIT_SECONDS = 10.0  # from the signal to the build's exit, on a loaded 2-core machine
NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """(checkpoint, a complete earlier build of it)."""
    root = tmp_path_factory.mktemp("signals")
    model = write_llama(root / "ckpt")
    previous = root / "previous"
    subprocess.run([sys.executable, "-m", "onnxforge", "build", "-m", str(model), "-o", str(previous), "--quiet",
                    "-p", "int4", "--workers", "1"], check=True, capture_output=True, timeout=300)
    return model, previous


def build_cmd(model: Path, out: Path, *extra: str) -> list[str]:
    # hqq quantizes in worker processes and is slow enough that the workers are busy for seconds
    return [sys.executable, "-m", "onnxforge", "build", "-m", str(model), "-o", str(out), "--quiet", "-p", "int4",
            "--method", "hqq", "--workers", "2", *extra]


def kill_session(sid: int) -> None:
    for pid in session_processes(sid):  # only the session this test started
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for_workers(proc: subprocess.Popen, n: int = 2, timeout: float = 120.0) -> list[int]:
    """The PIDs of the build's worker processes, once `n` of them run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        workers = [pid for pid in session_processes(proc.pid) if pid != proc.pid]
        if len(workers) >= n:
            return workers
        time.sleep(0.02)
    rc = proc.poll()
    err = proc.communicate()[1] if rc is not None else ""
    pytest.fail(f"the build started no {n} worker processes (rc {rc}): {err[-3000:]}")


def finish(proc: subprocess.Popen, since: float) -> tuple[float, str]:
    """(seconds from `since` to the build's exit, its stderr); a build still running after the bound fails."""
    try:
        _, err = proc.communicate(timeout=EXIT_SECONDS)
    except subprocess.TimeoutExpired:
        kill_session(proc.pid)
        _, err = proc.communicate()
        pytest.fail(f"the build was still running {EXIT_SECONDS} s after the signal; stderr:\n{err[-3000:]}")
    return time.monotonic() - since, err


def assert_no_processes_left(sid: int, linger: float = 3.0) -> None:
    deadline, left = time.monotonic() + linger, session_processes(sid)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = session_processes(sid)
    assert not left, f"{len(left)} processes of the build are still running {linger} s after it ended"


def assert_one_line(err: str, pattern: str) -> None:
    assert "Traceback" not in err and "Error:" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"{len(lines)} lines on stderr:\n{err}"
    assert lines[0].startswith("onnxforge: ") and pattern in lines[0], lines[0]


def assert_no_partial(out: Path) -> None:
    left = sorted(p.name for p in out.parent.glob(f".{out.name}.*"))
    assert not left, f"left next to the output: {left}"


@pytest.mark.parametrize("sig,group,previous", [
    (signal.SIGINT, True, False),    # a terminal's Ctrl-C: the build and its workers
    (signal.SIGINT, False, False),
    (signal.SIGTERM, False, False),
    (signal.SIGHUP, False, True),    # --overwrite of an earlier build, which stays untouched
], ids=["SIGINT-group", "SIGINT", "SIGTERM", "SIGHUP-overwrite"])
def test_a_signal_ends_the_build_cleanly(ckpt, tmp_path, sig, group, previous):
    model, earlier = ckpt
    out = tmp_path / "out"
    extra = ()
    if previous:
        shutil.copytree(earlier, out)
        extra = ("--overwrite",)
    proc = subprocess.Popen(build_cmd(model, out, *extra), start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for_workers(proc)
        time.sleep(0.3)  # the workers are quantizing
        assert proc.poll() is None, "the build ended before the signal"
        (os.killpg if group else os.kill)(proc.pid, sig)
        seconds, err = finish(proc, time.monotonic())
        assert proc.returncode == 128 + sig, (proc.returncode, err)
        assert_one_line(err, f"interrupted ({NAMES[sig]})")
        assert str(out) in err
        assert_no_partial(out)
        if previous:
            assert digests(out) == digests(earlier), "the earlier build was changed"
        else:
            assert not out.exists()
        assert_no_processes_left(proc.pid)
        assert seconds < EXIT_SECONDS
    finally:
        kill_session(proc.pid)


def test_a_killed_worker_ends_the_build_with_one_error(ckpt, tmp_path):
    """A worker killed by the OOM killer (SIGKILL): the build stops within seconds with one clear error."""
    model, _ = ckpt
    out = tmp_path / "out"
    proc = subprocess.Popen(build_cmd(model, out), start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        workers = wait_for_workers(proc)
        time.sleep(0.3)
        assert proc.poll() is None, "the build ended before the kill"
        os.kill(workers[0], signal.SIGKILL)
        seconds, err = finish(proc, time.monotonic())
        assert proc.returncode == 2, (proc.returncode, err)
        assert_one_line(err, "error: a quantization worker process stopped unexpectedly (killed by SIGKILL)")
        assert "--workers 1" in err
        assert_no_partial(out)
        assert not out.exists()
        assert_no_processes_left(proc.pid)
    finally:
        kill_session(proc.pid)


@pytest.fixture
def silent_worker(tmp_path, monkeypatch):
    """Worker processes that read their requests and never answer."""
    script = tmp_path / "python"
    script.write_text("#!/bin/sh\nexec sleep 60\n")
    script.chmod(0o755)
    monkeypatch.setattr(pool, "sys", type("FakeSys", (), {"executable": str(script)}))
    monkeypatch.setattr(pool, "ANSWER_SECONDS", 1.0, raising=False)


def _in_thread(fn):
    """Run fn in a daemon thread; returns (thread, box) where box gets ('ok', value) or ('raised', exc)."""
    box = []

    def run():
        try:
            box.append(("ok", fn()))
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box.append(("raised", e))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def test_a_worker_that_never_answers_is_an_error_after_the_bound(silent_worker):
    p = pool.WorkerPool(1)
    try:
        start = time.monotonic()
        t, box = _in_thread(lambda: p.quantize(np.ones((4, 64), np.float32), bits=4, block_size=32, symmetric=True,
                                               method="default"))
        t.join(15)
        assert not t.is_alive(), "the call to a silent worker is still waiting 15 s later"
        assert box[0][0] == "raised" and isinstance(box[0][1], OnnxForgeError), box
        assert "did not answer" in str(box[0][1])
        assert time.monotonic() - start < 5
        # the pool is failed: the next call says so at once instead of waiting on a worker
        with pytest.raises(OnnxForgeError, match="did not answer"):
            p.quantize(np.ones((4, 64), np.float32), bits=4, block_size=32, symmetric=True, method="default")
    finally:
        start = time.monotonic()
        p.close()
        assert time.monotonic() - start < 3, "closing the pool waited on a worker"


def test_closing_the_pool_ends_a_call_in_progress(silent_worker, monkeypatch):
    """An interrupted build closes its pool while threads wait on workers: they end at once, and so do the
    workers; a thread waiting for a free worker ends too."""
    monkeypatch.setattr(pool, "ANSWER_SECONDS", 600.0, raising=False)
    p = pool.WorkerPool(1)
    calls = [_in_thread(lambda: p.quantize(np.ones((4, 64), np.float32), bits=4, block_size=32, symmetric=True,
                                           method="default")) for _ in range(2)]
    time.sleep(1.0)
    procs = [w.proc for w in p._all]
    assert len(procs) == 1 and all(t.is_alive() for t, _ in calls)
    start = time.monotonic()
    p.close()
    for t, box in calls:
        t.join(5)
        assert not t.is_alive(), "a thread still waits on the closed pool"
        assert box[0][0] == "raised" and isinstance(box[0][1], OnnxForgeError), box
    assert time.monotonic() - start < 3
    assert all(proc.poll() is not None for proc in procs), "a worker process outlived the pool"


def test_workers_ignore_a_terminal_interrupt():
    """Ctrl-C reaches the whole foreground process group: a worker keeps serving its build, which ends it."""
    p = pool.WorkerPool(1)
    try:
        p.quantize(np.ones((4, 64), np.float32), bits=4, block_size=32, symmetric=True, method="default")
        (worker,) = p._all
        os.kill(worker.proc.pid, signal.SIGINT)
        os.kill(worker.proc.pid, signal.SIGHUP)
        time.sleep(0.5)
        assert worker.proc.poll() is None, "the worker died of SIGINT/SIGHUP"
        q = p.quantize(np.ones((4, 64), np.float32), bits=4, block_size=32, symmetric=True, method="default")
        assert q.data.shape == (4, 2, 16)
    finally:
        p.close()


COMMAND = textwrap.dedent("""
    import sys, time
    from onnxforge import cli
    from onnxforge.verify import cli as verify_cli

    def long_command(args):  # stands in for a verify/run/perplexity that takes minutes
        print("ready", flush=True)
        time.sleep(60)
        return 0

    setattr(verify_cli, sys.argv[1], long_command)
    sys.exit(cli.main(sys.argv[2:]))
""")


@pytest.mark.parametrize("command,sig", [("verify", signal.SIGINT), ("run", signal.SIGTERM),
                                         ("perplexity", signal.SIGHUP)], ids=["verify-SIGINT", "run-SIGTERM",
                                                                              "perplexity-SIGHUP"])
def test_other_commands_end_on_a_signal_with_one_line(tmp_path, command, sig):
    func = {"verify": "cmd_verify", "run": "cmd_run", "perplexity": "cmd_perplexity"}[command]
    import onnxforge.verify.cli as verify_cli

    assert callable(getattr(verify_cli, func, None)), f"onnxforge.verify.cli has no {func}"
    argv = {"verify": ["verify", str(tmp_path), "--reference", str(tmp_path)], "run": ["run", str(tmp_path), "hi"],
            "perplexity": ["perplexity", str(tmp_path), "--text", str(tmp_path / "t.txt")]}[command]
    proc = subprocess.Popen([sys.executable, "-c", COMMAND, func, *argv], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.communicate()
        os.kill(proc.pid, sig)
        seconds, err = finish(proc, time.monotonic())
        assert proc.returncode == 128 + sig, (proc.returncode, err)
        assert_one_line(err, f"interrupted ({NAMES[sig]})")
        assert seconds < 5
    finally:
        kill_session(proc.pid)


def test_a_stopped_writer_does_not_wait_for_its_running_jobs(tmp_path):
    """A job fails while another is quantizing a large weight slice by slice: the writer raises at once and the
    other job's thread ends at its next slice (Python joins such threads at exit, so one that went on would hold
    an interrupted build's process for as long as the weight takes)."""
    import onnx_ir as ir

    from onnxforge.errors import CheckpointError
    from onnxforge.export.writer import WeightWriter
    from onnxforge.graph.builder import GraphBuilder, TensorSlot, WeightJob

    try:
        from onnxforge.cancel import check
    except ImportError:  # before cancellation existed
        def check():
            pass

    ended = threading.Event()

    def fails():
        time.sleep(0.3)
        raise CheckpointError("model.safetensors: truncated")

    def long_weight():
        try:
            for _ in range(200):  # 10 s of slices
                check()
                time.sleep(0.05)
            return [np.zeros(4, np.float32)]
        finally:
            ended.set()

    slot = TensorSlot("w", ir.DataType.FLOAT, (4,))
    builder = GraphBuilder(jobs=[WeightJob("a", (slot,), fails), WeightJob("b", (slot,), long_weight)])
    start = time.monotonic()
    t, box = _in_thread(lambda: WeightWriter(tmp_path, workers=2).run(builder))
    t.join(15)
    assert box and box[0][0] == "raised" and isinstance(box[0][1], CheckpointError), box
    assert time.monotonic() - start < 2, "the writer waited for a job it no longer needs"
    assert ended.wait(2), "the running job did not stop"


def test_an_interrupt_after_the_rename_does_not_say_nothing_was_written(tmp_path, capsys):
    """A signal in the instant after the build was renamed into place: the line says the build is complete."""
    import argparse

    from onnxforge import cli
    from onnxforge.interrupts import Interrupted

    out = tmp_path / "out"
    out.mkdir()
    args = argparse.Namespace(command="build", output=str(out))
    started = time.time() - 1
    assert cli._interrupted(Interrupted(signal.SIGTERM), args, started) == 143
    assert capsys.readouterr().err.strip().endswith(f"nothing was written to {out}")
    (out / "build_report.json").write_text("{}")  # the build this process just finished
    assert cli._interrupted(Interrupted(signal.SIGTERM), args, started) == 143
    assert capsys.readouterr().err.strip() == f"onnxforge: interrupted (SIGTERM); the build in {out} is complete"
    assert cli._interrupted(Interrupted(signal.SIGTERM), args, time.time() + 10) == 143  # an earlier build's
    assert "nothing was written" in capsys.readouterr().err


def test_an_ending_cli_does_not_wait_for_lingering_threads(monkeypatch):
    """Python joins non-daemon threads at exit (a hash of a large input running beside a stopped build):
    the CLI gives them LINGER_SECONDS, then exits with its code without them."""
    from onnxforge import interrupts

    exits = []
    monkeypatch.setattr(interrupts, "LINGER_SECONDS", 0.3)
    monkeypatch.setattr(interrupts.os, "_exit", exits.append)
    others = [t for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon]
    interrupts.exit_without_lingering_threads(143)
    assert exits == ([143] if any(t.is_alive() for t in others) else []), "exited although no thread lingered"
    exits.clear()
    stop = threading.Event()
    t = threading.Thread(target=stop.wait, args=(30,))
    t.start()
    try:
        start = time.monotonic()
        interrupts.exit_without_lingering_threads(143)
        assert exits == [143] and time.monotonic() - start < 2
    finally:
        stop.set()
        t.join()
