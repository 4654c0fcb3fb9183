"""Bad input: one clear message each, a non-zero exit, and no output folder left behind."""
from __future__ import annotations

import json
import shutil
import struct

import pytest

from onnxforge.cli import main


@pytest.fixture
def checkpoint(tiny_models, tmp_path):
    src, _ = tiny_models("llama_tied")
    folder = tmp_path / "ckpt"
    shutil.copytree(src, folder)
    return folder


def run_build(folder, out, capsys, *extra):
    code = main(["build", "-m", str(folder), "-o", str(out), "--quiet", *extra])
    err = capsys.readouterr().err
    return code, err


def assert_clean(out):
    assert not out.exists(), "an output folder was left behind"
    assert not list(out.parent.glob(f".{out.name}.partial*")), "a temporary folder was left behind"


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def _rewrite_safetensors(path, drop=None):
    """Rewrite a single-file checkpoint without tensor `drop`."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(path))
    tensors.pop(drop)
    save_file(tensors, str(path))


def test_unsupported_architecture(checkpoint, tmp_path, capsys):
    _edit_config(checkpoint, architectures=["BertForMaskedLM"])
    code, err = run_build(checkpoint, tmp_path / "out", capsys)
    assert code == 2 and "'BertForMaskedLM' is not supported" in err and "LlamaForCausalLM" in err
    assert_clean(tmp_path / "out")


def test_missing_tensor(checkpoint, tmp_path, capsys):
    _rewrite_safetensors(checkpoint / "model.safetensors", drop="model.layers.1.mlp.up_proj.weight")
    code, err = run_build(checkpoint, tmp_path / "out", capsys)
    assert code == 2 and "model.layers.1.mlp.up_proj.weight" in err and "missing" in err
    assert_clean(tmp_path / "out")


def test_shape_mismatch(checkpoint, tmp_path, capsys):
    _edit_config(checkpoint, intermediate_size=200)
    code, err = run_build(checkpoint, tmp_path / "out", capsys)
    assert code == 2 and "gate_proj.weight" in err and "(200, 64)" in err and "config.json" in err
    assert_clean(tmp_path / "out")


def test_truncated_shard(checkpoint, tmp_path, capsys):
    shard = checkpoint / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) * 2 // 3])
    code, err = run_build(checkpoint, tmp_path / "out", capsys)
    assert code == 2 and "truncated" in err and "model.safetensors" in err
    assert_clean(tmp_path / "out")


def test_lying_header_length(checkpoint, tmp_path, capsys):
    shard = checkpoint / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[:8] = struct.pack("<Q", 1 << 60)
    shard.write_bytes(bytes(data))
    code, err = run_build(checkpoint, tmp_path / "out", capsys)
    assert code == 2 and "header length" in err
    assert_clean(tmp_path / "out")


def test_unreadable_config(checkpoint, tmp_path, capsys):
    (checkpoint / "config.json").write_text("{not json")
    code, err = run_build(checkpoint, tmp_path / "out", capsys)
    assert code == 2 and "config.json is not valid JSON" in err
    assert_clean(tmp_path / "out")


def test_inconsistent_heads(checkpoint, tmp_path, capsys):
    _edit_config(checkpoint, num_key_value_heads=3)
    code, err = run_build(checkpoint, tmp_path / "out", capsys)
    assert code == 2 and "multiple of num_key_value_heads" in err
    assert_clean(tmp_path / "out")


def test_existing_output_needs_overwrite(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_build(checkpoint, out, capsys, "--overwrite")  # it replaces only a previous build
    assert code == 2 and "keep.txt" in err and "no onnxforge build wrote" in err
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    assert run_build(checkpoint, out, capsys)[0] == 0  # an empty folder is used
    code, err = run_build(checkpoint, out, capsys)
    assert code == 2 and "--overwrite" in err
    code, _ = run_build(checkpoint, out, capsys, "--overwrite")
    assert code == 0 and (out / "model.onnx").is_file()


def test_pickle_only_checkpoint(checkpoint, tmp_path, capsys):
    (checkpoint / "model.safetensors").unlink()
    (checkpoint / "pytorch_model.bin").write_bytes(b"not really a pickle")
    code, err = run_build(checkpoint, tmp_path / "out", capsys)
    assert code == 2 and "pytorch_model.bin" in err and "safetensors" in err and "never reads" in err
    assert_clean(tmp_path / "out")


def test_bad_option_value_and_unknown_key(checkpoint, tmp_path, capsys):
    code, err = run_build(checkpoint, tmp_path / "out", capsys, "-p", "int3")
    assert code == 2 and "unknown precision 'int3'" in err and "int4" in err
    code, err = run_build(checkpoint, tmp_path / "out", capsys, "--extra_options", "int4_block_sise=32")
    assert code == 2 and "int4_block_sise" in err and "int4_block_size" in err
    code, err = run_build(checkpoint, tmp_path / "out", capsys, "-p", "int4", "--extra_options", "int4_is_symmetric=maybe")
    assert code == 2 and "expected true or false" in err
    assert_clean(tmp_path / "out")


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs when this process may mount one (root on Linux), else None."""
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode == 0
    yield mnt if ok else None
    if ok:
        subprocess.run(["umount", str(mnt)], check=False)


class _FullDisk:
    """A file object that raises ENOSPC once `limit` bytes were written (the fallback)."""

    def __init__(self, path, mode, limit=20_000):
        self._f, self._left = open(path, mode), limit
        self.name = str(path)

    def write(self, data):
        import errno

        self._left -= len(data)
        if self._left < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def test_disk_full_leaves_nothing(checkpoint, capsys, monkeypatch, small_disk, tmp_path):
    if small_disk is None:
        from onnxforge.export import writer

        monkeypatch.setattr(writer, "open_data_file", _FullDisk)
        out = tmp_path / "out"
    else:
        out = small_disk / "out"
    code, err = run_build(checkpoint, out, capsys)
    assert code == 2 and "disk full" in err and "free some space" in err
    assert_clean(out)
