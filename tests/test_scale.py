"""Scale: large weights in row slices, quantization in worker processes.

- one large weight quantized slice by slice (read with `read_rows`) equals the whole weight quantized at
  once, bit for bit, for every method; a large float table written in pieces equals the one-piece write;
- a build whose quantization runs in worker processes is byte-identical to a one-worker build (every
  method; tests/test_robustness.py compares whole builds at 1 and 4 workers too) and really used them;
- the workers are plain subprocesses: a script that calls onnxforge.build without an
  `if __name__ == "__main__"` guard builds once, and is never re-run by a worker.
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import onnxforge
from onnxforge.archs.names import Part
from onnxforge.graph import weights as W
from onnxforge.quant import pool
from onnxforge.quant.methods import quantize
from onnxforge.quant.recipe import Recipe
from onnxforge.quant.storage import Storage

METHODS = ["rtn", "k_quant", "hqq", "default"]


class RowSource:
    """One (N, K) weight; counts the rows each read returns."""

    def __init__(self, w: np.ndarray, slices: bool):
        self.w, self.reads = w, []
        if slices:
            self.read_rows = self._read_rows

    def shape(self, name):
        return self.w.shape

    def read(self, name):
        self.reads.append(self.w.shape[0])
        return self.w.copy()

    def _read_rows(self, name, start, stop):
        self.reads.append(stop - start)
        return self.w[start:stop].copy()


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("method", METHODS)
def test_slices_of_one_large_weight_equal_the_whole(monkeypatch, method, workers):
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((203, 96)) * rng.uniform(0.01, 2, (203, 1))).astype(np.float32)
    st = Storage(bits=4, block_size=32, symmetric=method != "hqq", method=method)
    whole = quantize(w, bits=4, block_size=32, symmetric=st.symmetric, method=method)
    slots = W.quant_slots("x", 203, 96, st, W.ir.DataType.FLOAT)
    monkeypatch.setattr(W, "CHUNK_ELEMENTS", 96 * 16)  # slices of 16 rows: 13 of them, the last one short
    source = RowSource(w, slices=True)
    with pool.processes(workers):
        outs = W.quantize_rows(source, [Part("w")], slots, st, np.float32, 96)
    assert source.reads == [16] * 12 + [11], "the weight was not read in slices"
    assert np.array_equal(outs[0], whole.data) and np.array_equal(outs[1], whole.scales)
    if not st.symmetric:
        assert np.array_equal(outs[2], whole.zero_points)
    # a source without read_rows: one read, the same slices
    unsliced = RowSource(w, slices=False)
    outs2 = W.quantize_rows(unsliced, [Part("w")], slots, st, np.float32, 96)
    assert unsliced.reads == [203] and all(np.array_equal(a, b) for a, b in zip(outs, outs2))


def test_a_large_float_table_is_written_in_pieces(tmp_path, monkeypatch):
    from tiny import write_random_llama

    ckpt = write_random_llama(tmp_path / "ckpt", vocab=512, hidden=64)
    onnxforge.build(ckpt, tmp_path / "one", "fp32")
    calls = []
    from onnxforge.sources.hf import HFSource

    real = HFSource.read_rows

    def spy(self, name, start, stop):
        calls.append((name, start, stop))
        return real(self, name, start, stop)

    monkeypatch.setattr(HFSource, "read_rows", spy)
    monkeypatch.setattr(W, "PIECES_BYTES", 1 << 10)
    monkeypatch.setattr(W, "CHUNK_ELEMENTS", 64 * 100)
    onnxforge.build(ckpt, tmp_path / "pieces", "fp32")
    embed = [c for c in calls if c[0] == "model.embed_tokens.weight"]
    assert [(a, b) for _, a, b in embed] == [(i, min(i + 100, 512)) for i in range(0, 512, 100)]
    assert _sha(tmp_path / "one" / "model.onnx.data") == _sha(tmp_path / "pieces" / "model.onnx.data")


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_a_gguf_is_read_a_slice_of_rows_at_a_time(tmp_path, monkeypatch, precision):
    """GGUF weights are dequantized a slice of rows at a time (no whole float32 lm_head), and the model is
    byte-identical to one built from whole reads."""
    pytest.importorskip("torch")
    from gguf import GGMLQuantizationType as QT
    from test_gguf_source import tiny_model, train_byte_level_vocab, write_gguf

    from onnxforge.quant.recipe import Recipe
    from onnxforge.sources.gguf import GGUFSource

    vocab = train_byte_level_vocab()
    path = tmp_path / "tiny.gguf"
    write_gguf(path, tiny_model("llama", len(vocab["tokens"])), vocab, QT.Q8_0)
    recipe = Recipe(precision=precision, requantize=True, block_size=32)
    monkeypatch.setattr(W, "CHUNK_ELEMENTS", 64 * 100)  # 100 rows of 64
    monkeypatch.setattr(W, "PIECES_BYTES", 1 << 10)
    whole = []
    real_read = GGUFSource.read
    monkeypatch.setattr(GGUFSource, "read", lambda self, name: whole.append(name) or real_read(self, name))
    rows = []
    real_rows = GGUFSource.read_rows
    monkeypatch.setattr(GGUFSource, "read_rows",
                        lambda self, name, a, b: rows.append((name, a, b)) or real_rows(self, name, a, b))
    onnxforge.build(path, tmp_path / "rows", recipe=recipe)
    embed = [(a, b) for n, a, b in rows if n == "model.embed_tokens.weight"]
    assert embed and all(b - a <= 100 for a, b in embed), embed
    assert not [n for n in whole if n.endswith("_proj.weight") or n.endswith("embed_tokens.weight")], whole
    monkeypatch.delattr(GGUFSource, "read_rows")
    onnxforge.build(path, tmp_path / "whole", recipe=recipe)
    for name in ("model.onnx", "model.onnx.data"):
        assert _sha(tmp_path / "rows" / name) == _sha(tmp_path / "whole" / name), name


def _two_workers_spied(monkeypatch) -> list[int]:
    """Two worker processes even on one core; returns the list each pool quantize call appends its size to."""
    monkeypatch.setattr(pool.os, "cpu_count", lambda: 2)  # processes = min(workers, cores)
    monkeypatch.setattr("onnxforge.api.os.cpu_count", lambda: 2)
    used = []
    real = pool.WorkerPool.quantize

    def spy(self, *args, **kwargs):
        used.append(self.n)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pool.WorkerPool, "quantize", spy)
    return used


@pytest.mark.parametrize("method", METHODS)
def test_worker_processes_are_used_and_change_no_byte(tmp_path, monkeypatch, method):
    from tiny import write_random_llama

    ckpt = write_random_llama(tmp_path / "ckpt", inter=256)
    recipe = Recipe(precision="int4", method=method, block_size=32)
    onnxforge.build(ckpt, tmp_path / "one", recipe=recipe, workers=1)
    used = _two_workers_spied(monkeypatch)
    onnxforge.build(ckpt, tmp_path / "two", recipe=recipe, workers=2)
    if method in pool.PROCESS_METHODS and pool.AVAILABLE:
        assert used and set(used) == {2}, "the build did not quantize in worker processes"
    else:
        assert not used  # rtn stays in threads
    for name in ("model.onnx", "model.onnx.data", "genai_config.json"):
        assert _sha(tmp_path / "one" / name) == _sha(tmp_path / "two" / name), name
    assert pool.active() is None, "the pool outlived the build"


def test_kquant_without_its_kernel_gives_the_same_model(tmp_path, monkeypatch):
    """k_quant's numpy reference in worker processes writes the same bytes as its C kernel in threads."""
    from tiny import write_random_llama

    from onnxforge.quant import _native

    ckpt = write_random_llama(tmp_path / "ckpt", inter=256)
    recipe = Recipe(precision="int4", method="k_quant", block_size=32, symmetric=False)
    onnxforge.build(ckpt, tmp_path / "kernel", recipe=recipe, workers=2)
    monkeypatch.setenv("ONNXFORGE_NO_NATIVE", "1")  # the worker processes inherit it
    monkeypatch.setattr(_native, "KQUANT", None)
    monkeypatch.setattr(pool, "PROCESS_METHODS", pool.PROCESS_METHODS | {"k_quant"})
    used = _two_workers_spied(monkeypatch)
    onnxforge.build(ckpt, tmp_path / "numpy", recipe=recipe, workers=2)
    assert used or not pool.AVAILABLE, "the numpy k_quant did not run in worker processes"
    for name in ("model.onnx", "model.onnx.data"):
        assert _sha(tmp_path / "kernel" / name) == _sha(tmp_path / "numpy" / name), name


def test_a_worker_error_is_the_same_error():
    if not pool.AVAILABLE:
        pytest.skip("worker processes need os.memfd_create (Linux)")
    from onnxforge.errors import RecipeError

    p = pool.WorkerPool(1)
    try:
        with pytest.raises(RecipeError, match="block_size"):
            p.quantize(np.ones((4, 64), np.float32), bits=4, block_size=24, symmetric=True, method="default")
        q = p.quantize(np.ones((4, 64), np.float32), bits=4, block_size=32, symmetric=True, method="default")
        assert q.data.shape == (4, 2, 16)  # the worker survived the error
    finally:
        p.close()


def test_a_script_without_main_guard_builds_once(tmp_path):
    """multiprocessing's spawn would re-run this script in every worker; our workers never import it."""
    from tiny import write_random_llama

    ckpt = write_random_llama(tmp_path / "ckpt", inter=256)
    runs = tmp_path / "runs.txt"
    script = tmp_path / "convert.py"
    script.write_text(textwrap.dedent(f"""
        import onnxforge
        from onnxforge.quant.recipe import Recipe
        with open({str(runs)!r}, "a") as f:
            f.write("run\\n")
        onnxforge.build({str(ckpt)!r}, {str(tmp_path / "out")!r}, recipe=Recipe(precision="int4", method="default"),
                        workers=2)
        print("built")
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "built"
    assert runs.read_text() == "run\n", "the script was run more than once"
    onnxforge.build(ckpt, tmp_path / "ref", recipe=Recipe(precision="int4", method="default"), workers=1)
    assert _sha(tmp_path / "out" / "model.onnx.data") == _sha(tmp_path / "ref" / "model.onnx.data")
