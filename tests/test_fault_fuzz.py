"""Generated bad inputs and injected faults, at the normal suite's scale.

bench/fault_fuzz.py runs the same kinds at scale (10,000 generated inputs and 100+ faults) and prints
the counts; here each kind of generated input (safetensors, gguf, config, tokenizer, toml, cli) runs
its pinned cases and GENERATED drawn ones through `onnxforge build`'s command line in this process,
and each fault (tests/faultlib.py) runs once against a real build subprocess. Every case must build
or be refused with one error line; no traceback, hang, partial folder, changed input or silently
accepted invalid value. The checkers are fed bad outcomes too.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

import faultlib
import onnxforge.cli
from fuzzargs import all_kinds
from fuzzcases import Case, Counts, run_case, user_files
from fuzzkinds import build_argv, plain_checkpoint, run_kind, write_files
from fuzzlib import LLAMA_CONFIG

REAL_MAIN = onnxforge.cli.main  # the fakes below replace it
GENERATED = 50
KINDS = {k.name: k for k in all_kinds()}
# inputs the 10,000-case run of bench/fault_fuzz.py found ending in a traceback, each run exactly here:
# (kind, a file of the case folder, its bytes, the build's extra argv)
FOUND = {
    "generation_config list bos id": ("tokenizer", "ckpt/generation_config.json",
                                      b'{"bos_token_id": [0, 1000000], "eos_token_id": 0}', []),
    "generation_config list pad id": ("tokenizer", "ckpt/generation_config.json",
                                      b'{"bos_token_id": 1, "eos_token_id": 0, "pad_token_id": [3, 0]}', []),
    "config.json empty eos list": ("config", "ckpt/config.json",
                                   json.dumps(dict(LLAMA_CONFIG, eos_token_id=[])).encode(), []),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_generated_inputs(kind, tmp_path, capsys):
    counts = Counts(keep=10**6)
    run_kind(KINDS[kind](tmp_path), GENERATED, counts, tmp_path)
    row = counts.table[kind]
    with capsys.disabled():
        print(f"\nfault-fuzz {kind}: " + ", ".join(f"{c} {row[c]}" for c in row))
    assert row["cases"] >= GENERATED and row["built"] >= 1 and row["refused"] >= 1
    assert counts.bad() == 0, "\n".join(f"{c}: {r}\n  -> {d}" for c, r, d in counts.failures[kind])


@pytest.mark.parametrize("name", list(FOUND))
def test_found_case(name, tmp_path):
    kind, path, data, extra = FOUND[name]
    folder = tmp_path / "case"
    folder.mkdir()
    user_files(folder)
    write_files(folder / "ckpt", plain_checkpoint())
    (folder / path).write_bytes(data)
    counts = Counts()
    column = run_case(counts, Case(kind, build_argv("ckpt", None, *extra), name), folder)
    assert column in ("refused", "built"), counts.failures[kind]


def fake_case(tmp_path: Path, monkeypatch, behaviour, invalid=()) -> str:
    """Run a case whose `onnxforge.cli.main` is `behaviour` (called in the case folder); its column."""
    folder = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
    folder.mkdir()
    user_files(folder)
    write_files(folder / "ckpt", plain_checkpoint())
    monkeypatch.setattr(onnxforge.cli, "main", lambda argv: behaviour())
    counts = Counts()
    case = Case("fake", ["build", "-m", "ckpt", "-o", "out"], "fake", invalid=list(invalid))
    return run_case(counts, case, folder, seconds=1)


def _refuse(text="onnxforge: error: no"):
    import sys

    print(text, file=sys.stderr)
    return 2


def _build_then(fn):
    def behaviour():
        rc = REAL_MAIN(["build", "-m", "ckpt", "-o", "out", "--quiet"])
        fn()
        return rc
    return behaviour


def test_run_case_catches_each_bad_outcome(tmp_path, monkeypatch):
    def partial():
        Path(".out.partial-1").mkdir()
        return _refuse()

    def touch_input():
        Path("ckpt/config.json").write_text("{}")
        return _refuse()

    assert fake_case(tmp_path, monkeypatch, _refuse) == "refused"
    assert fake_case(tmp_path, monkeypatch, lambda: [][1]) == "traceback"
    assert fake_case(tmp_path, monkeypatch, lambda: time.sleep(5)) == "hang"
    assert fake_case(tmp_path, monkeypatch, lambda: _refuse("Traceback (most recent call last):\nerror: x")) == "traceback"
    assert fake_case(tmp_path, monkeypatch, lambda: _refuse("nothing said")) == "unclear"
    assert fake_case(tmp_path, monkeypatch, lambda: 3) == "unclear"
    assert fake_case(tmp_path, monkeypatch, partial) == "partial"
    assert fake_case(tmp_path, monkeypatch, lambda: 0) == "partial"  # rc 0 and no output
    assert fake_case(tmp_path, monkeypatch, touch_input) == "input_changed"
    assert fake_case(tmp_path, monkeypatch, _build_then(lambda: None)) == "built"
    assert fake_case(tmp_path, monkeypatch, _build_then(lambda: None), invalid=["a bad value"]) == "accepted"
    assert fake_case(tmp_path, monkeypatch, _build_then(lambda: os.remove("notes.txt"))) == "input_changed"
    assert fake_case(tmp_path, monkeypatch, _build_then(lambda: os.remove("out/model.onnx"))) == "partial"


# ----------------------------------------------------------------------------- faults


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A ~20 MB checkpoint (1 layer, vocab 2000) and its reference int4 build time."""
    return faultlib.Checkpoint(tmp_path_factory.mktemp("faults") / "ckpt", seed=0, layers=1, vocab=2000)


@pytest.mark.parametrize("fault", faultlib.FAULTS)
def test_fault(fault, checkpoint, tmp_path, capsys):
    rng = np.random.default_rng(faultlib.FAULTS.index(fault))
    column, detail = faultlib.run_fault(fault, checkpoint, rng, tmp_path)
    if column == "skipped":
        pytest.skip(detail)
    with capsys.disabled():
        print(f"\nfault {column}: {detail[:200]}")
    assert column not in faultlib.BAD, detail


class FakeBuild:
    def __init__(self, text="", left=()):
        self.text, self.left = text, list(left)

    def stderr(self):
        return self.text

    def end(self):
        return self.left


def test_fault_judge_catches_each_bad_outcome(checkpoint, tmp_path):
    out = tmp_path / "out"

    def judge(fault, rc, build=None):
        return faultlib.judge(fault, [(build or FakeBuild("onnxforge: interrupted"), rc)], out, checkpoint, "fake")[0]

    assert judge("sigterm", 143) == "ended"
    assert judge("sigterm", None) == "hang"
    assert judge("sigterm", 1) == "unclear"
    assert judge("sigterm", 143, FakeBuild("Traceback (most recent call last):\nKeyboardInterrupt")) == "traceback"
    startup = 'Traceback (most recent call last):\n  File "<frozen site>", line 616, in <module>\nKeyboardInterrupt\n'
    assert judge("sigint_group", 1, FakeBuild(startup)) == "startup"
    assert judge("sigint_group", 1, FakeBuild(startup.replace("<frozen site>", "onnxforge/cli.py"))) == "traceback"
    assert judge("sigterm", 143, FakeBuild("x", left=[1])) == "orphans"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"")
    assert judge("sigterm", 0) == "partial"
    out.joinpath("model.onnx").unlink()
    out.rmdir()
    (tmp_path / ".out.partial-7").mkdir()
    assert judge("sigterm", 143) == "partial"
    assert judge("kill9_build", -9) == "stale"
    (tmp_path / ".out.partial-7").rmdir()
    digest, checkpoint.digest = checkpoint.digest, "0" * 64
    try:
        assert judge("sigterm", 143) == "input_changed"
    finally:
        checkpoint.digest = digest


def test_failed_safetensors_file_closes_its_descriptor_once(tmp_path):
    """Found by bench/fault_fuzz.py: a header that failed validation closed the file in __init__ and again
    in __del__, by then a descriptor another file had (the bench's next rmtree failed with EBADF)."""
    import gc

    from onnxforge.errors import CheckpointError
    from onnxforge.sources.safetensors_file import SafetensorsFile

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\0\0\0\0\0\0\0[]      ")  # the header is not a JSON object

    def attempt():
        try:
            SafetensorsFile(bad)
        except CheckpointError as e:
            return e  # keeps the frame, and the half-made object, alive

    error = attempt()
    assert error is not None
    other = os.open(tmp_path / "bad.safetensors", os.O_RDONLY)  # takes the number just freed
    try:
        del error
        gc.collect()
        os.fstat(other)  # EBADF if the failed file closed it
    finally:
        os.close(other)
