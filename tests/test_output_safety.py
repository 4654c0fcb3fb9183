"""An output folder that cannot hurt the user (issue 22, item 1).

`--overwrite` replaces only a previous onnxforge build or an empty folder; the output may not be the
input, hold it, lie inside it, be the current folder, the home folder or a root, or be a file; all of
that is refused before the source is opened. A lock beside the output makes a second concurrent
build into it refuse at once.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fuzzlib
import onnxforge
import tiny
from onnxforge import api
from onnxforge.cli import main
from onnxforge.errors import OutputError


@pytest.fixture
def ckpt(tmp_path):
    return tiny.write_random_llama(tmp_path / "ckpt")


@pytest.fixture
def no_source(monkeypatch):
    """Opening the source fails the test: a refusal must come before any weight (or header) is read."""
    def opened(*a, **k):
        raise AssertionError("the source was opened before the output was checked")

    monkeypatch.setattr(api, "open_source", opened)


def tree_digest(root: Path) -> dict[str, str]:
    """Every file and folder under `root` (relative path -> SHA-256, or 'dir')."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def build(model, out, capsys, *extra):
    code = main(["build", "-m", str(model), "-o", str(out), "--quiet", *extra])
    return code, capsys.readouterr().err


def refused(code, err, *words):
    assert code == 2, err
    assert err.startswith("onnxforge: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for w in words:
        assert w in err, (w, err)


def test_output_is_the_checkpoint(ckpt, capsys, no_source):
    before = tree_digest(ckpt)
    code, err = build(ckpt, ckpt, capsys, "--overwrite")
    refused(code, err, str(ckpt), "is the input")
    assert tree_digest(ckpt) == before


def test_output_holds_the_checkpoint(ckpt, tmp_path, capsys, no_source):
    before = tree_digest(tmp_path)
    code, err = build(ckpt, tmp_path, capsys, "--overwrite")
    refused(code, err, str(tmp_path), "holds the input")
    assert tree_digest(tmp_path) == before


def test_output_inside_the_checkpoint(ckpt, capsys, no_source):
    before = tree_digest(ckpt)
    code, err = build(ckpt, ckpt / "onnx", capsys)
    refused(code, err, str(ckpt / "onnx"), "inside the input")
    assert tree_digest(ckpt) == before


def test_output_is_the_current_folder(ckpt, tmp_path, capsys, monkeypatch, no_source):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code, err = build(ckpt, ".", capsys)  # even empty: building into the folder you stand in is refused
    refused(code, err, "current folder")
    assert list(work.iterdir()) == []
    (work / "draft.txt").write_text("mine")
    code, err = build(ckpt, ".", capsys, "--overwrite")
    refused(code, err, "current folder", str(work))
    assert (work / "draft.txt").read_text() == "mine"


def test_output_is_the_home_folder(ckpt, tmp_path, capsys, monkeypatch, no_source):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    code, err = build(ckpt, home, capsys)
    refused(code, err, "home folder")
    (home / ".bashrc").write_text("mine")
    code, err = build(ckpt, home, capsys, "--overwrite")
    refused(code, err, "home folder")
    assert (home / ".bashrc").read_text() == "mine"


def test_output_is_the_root(ckpt, capsys, no_source):
    code, err = build(ckpt, "/", capsys, "--overwrite")
    refused(code, err, "root")


def test_output_is_an_existing_file(ckpt, tmp_path, capsys, no_source):
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    for extra in ((), ("--overwrite",)):
        code, err = build(ckpt, path, capsys, *extra)
        refused(code, err, str(path), "is a file")
        assert path.read_text() == "mine"


def test_overwrite_keeps_a_folder_of_user_files(ckpt, tmp_path, capsys, no_source):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    (notes / "sub").mkdir()
    code, err = build(ckpt, notes, capsys, "--overwrite")
    refused(code, err, str(notes), "todo.txt", "sub")
    assert (notes / "todo.txt").read_text() == "mine" and (notes / "sub").is_dir()
    code, err = build(ckpt, notes, capsys)  # without --overwrite: --overwrite would not help, so it is not offered
    refused(code, err, str(notes), "todo.txt")
    assert "pass --overwrite" not in err


def test_gguf_input(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "models"
    folder.mkdir()
    fuzzlib.gguf_bytes(folder)
    gguf = folder / "base.gguf"
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    with monkeypatch.context() as m:
        m.setattr(api, "open_source", lambda *a, **k: pytest.fail("the source was opened"))
        for out in (gguf, folder):
            code, err = build(gguf, out, capsys, "--overwrite")
            refused(code, err, str(out), "the input")
    assert hashlib.sha256(gguf.read_bytes()).hexdigest() == digest
    code, err = build(gguf, folder / "onnx", capsys)  # beside the .gguf, in the same folder: fine
    assert code == 0, err
    assert (folder / "onnx" / "model.onnx").is_file()
    assert sorted(p.name for p in folder.iterdir()) == ["base.gguf", "onnx"]  # no lock or partial folder left
    assert hashlib.sha256(gguf.read_bytes()).hexdigest() == digest


def test_demo_alias_is_checked_as_the_file_it_names(tmp_path, capsys, monkeypatch, no_source):
    from onnxforge.sources import aliases

    cache = tmp_path / "cache"
    cache.mkdir()
    gguf = cache / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(aliases, "resolve_model", lambda name, **k: gguf)
    code = main(["build", "--demo", "-o", str(cache), "--overwrite", "--quiet"])
    refused(code, capsys.readouterr().err, str(cache), "holds the input")
    with pytest.raises(OutputError, match="is the input"):
        onnxforge.build("demo", gguf, overwrite=True)
    assert gguf.read_bytes() == b"GGUF"


def test_overwrite_replaces_a_previous_build_or_an_empty_folder(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    code, err = build(ckpt, out, capsys)  # an empty folder is used
    assert code == 0, err
    (out / "verify.json").write_text("{}")  # what `onnxforge verify` adds to a build
    (out / "verify.png").write_bytes(b"png")
    first = tree_digest(out)
    with pytest.raises(OutputError, match=r"overwrite=True"):  # the Python API names its own argument
        onnxforge.build(ckpt, out)
    assert tree_digest(out) == first
    onnxforge.build(ckpt, out, overwrite=True)  # a previous build (with verify's files) is replaced
    assert not (out / "verify.json").exists() and (out / "model.onnx").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out"]  # no lock, partial or old folder left

    (out / "mine.txt").write_text("mine")  # a build plus a foreign file is no longer only a build
    before = tree_digest(out)
    code, err = build(ckpt, out, capsys, "--overwrite")
    refused(code, err, str(out), "mine.txt")
    assert tree_digest(out) == before


def test_a_folder_without_a_build_report_is_not_a_build(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"someone else's model")
    code, err = build(ckpt, out, capsys, "--overwrite")
    refused(code, err, str(out), "build_report.json")
    assert (out / "model.onnx").read_bytes() == b"someone else's model"


def test_a_running_build_holds_the_output(ckpt, tmp_path, capsys):
    from onnxforge.export.output import output_lock

    out = tmp_path / "out"
    assert build(ckpt, out, capsys)[0] == 0
    before = tree_digest(out)
    with output_lock(out):  # as a build that is writing `out` holds it
        code, err = build(ckpt, out, capsys, "--overwrite")
        refused(code, err, f"pid {os.getpid()}", str(out), "another onnxforge build")
        with pytest.raises(OutputError, match="another onnxforge build"):
            onnxforge.build(ckpt, tmp_path / "out", overwrite=True)
    assert tree_digest(out) == before
    assert build(ckpt, out, capsys, "--overwrite")[0] == 0  # released: the next build goes ahead
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out"]


def test_a_lock_left_by_a_killed_build_does_not_block(ckpt, tmp_path, capsys):
    (tmp_path / ".out.lock").write_text("999999999\n")  # a build killed with SIGKILL leaves its lock file
    code, err = build(ckpt, tmp_path / "out", capsys)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out"]


def test_two_builds_started_at_once(ckpt, tmp_path):
    """Both into one new folder: one builds, the other refuses (either the lock or the finished folder)."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "onnxforge", "build", "-m", str(ckpt), "-o", str(out), "--quiet", "-p", "int4"]
    procs = [subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    err = next(e for rc, e in results if rc == 2)
    assert "Traceback" not in err and str(out) in err
    assert (out / "build_report.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out"]
