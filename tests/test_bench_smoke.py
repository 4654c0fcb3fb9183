"""The benchmarks run end to end on a tiny model (`--smoke`) and print their tables. No timing is asserted."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
RESULTS = BENCH / "RESULTS.md"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """One cache folder for the scripts, so the tiny checkpoint is made once."""
    return tmp_path_factory.mktemp("bench-work")


def _run(script: str, work) -> str:
    before = RESULTS.read_text() if RESULTS.exists() else None
    proc = subprocess.run([sys.executable, str(BENCH / script), "--smoke", "--work", str(work)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    after = RESULTS.read_text() if RESULTS.exists() else None
    assert before == after, "RESULTS.md changed without --write-results"
    return proc.stdout


def test_decode_smoke(work):
    out = _run("decode.py", work)
    assert "decode benchmark" in out and "anchor skipped" in out
    row = next(ln for ln in out.splitlines() if ln.startswith("ours int4"))
    size, prefill_ms, prefill_tps, decode_tps = (float(x) for x in row.split()[2:6])
    assert size > 0 and prefill_ms > 0 and decode_tps > 0


def test_quality_smoke(work):
    out = _run("quality.py", work)
    assert "quality benchmark" in out and "perplexity" in out
    rows = {ln.split("  ")[0].strip(): ln for ln in out.splitlines() if ln.startswith(("fp32 ", "int4 "))}
    for name in ("fp32", "int4 rtn sym", "int4 rtn asym", "int4 k_quant", "int4 hqq asym", "int4 default",
                 "int4 k_quant_mixed"):
        assert name in rows, out
    assert "+0.00%" in rows["fp32"]
    sizes = {name: float(ln.split()[-4]) for name, ln in rows.items()}
    assert all(sizes[n] < sizes["fp32"] for n in sizes if n != "fp32")


def test_prequant_smoke(work):
    """A tiny Q4_1 GGUF three ways: the as-stored build keeps the blocks, is smaller than fp32, computes the same."""
    pytest.importorskip("gguf")
    out = _run("prequant.py", work)
    assert "pre-quantized benchmark" in out
    rows = {name: ln for ln in out.splitlines() for name in ("fp32", "as stored", "int4 re-quantized")
            if ln.startswith(name + "  ")}
    assert set(rows) == {"fp32", "as stored", "int4 re-quantized"}, out
    cells = {name: ln[len(name):].split() for name, ln in rows.items()}
    assert cells["fp32"][2] == "+0.00%" and cells["fp32"][3:] == ["-", "-"]
    assert float(cells["as stored"][0]) < float(cells["fp32"][0])
    assert abs(float(cells["as stored"][2].rstrip("%"))) < 0.5  # same integers and scales, int8 activations
    assert all(float(cells[n][4]) > 0 for n in ("as stored", "int4 re-quantized"))
    assert "as stored: int4 block 16 + offsets (exact Q4_1); int4 block 32 + offsets (exact Q4_1)" in out
    assert "re-quantized Q4_1" in out and "decode speed as stored / int4 re-quantized" in out
    assert "llama.cpp (same file)" in out or "llama.cpp skipped" in out or "llama.cpp failed" in out
    assert "machine during the decode timing" in out


def test_moe_memory_smoke(work):
    """Each build runs, its graph holds the MoE / QMoE nodes its label names (checked by the script), and a
    peak RSS is measured."""
    out = _run("moe_memory.py", work)
    assert "MoE build peak RSS" in out and "FAILED" not in out, out
    rows = [ln.split() for ln in out.splitlines() if ln.startswith(("fp32 ", "int4 rtn ", "int8 per-channel "))]
    assert len(rows) == 6, out
    assert all(float(r[-5]) > 0 for r in rows), out  # peak GiB


def test_write_section_replaces_only_its_section(tmp_path, monkeypatch):
    sys.path.insert(0, str(BENCH))
    import common

    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n## build\n\nkeep me\n\n## decode\n\nold figures\n")
    monkeypatch.setattr(common, "RESULTS", path)
    common.write_section("decode", "new figures")
    common.write_section("quality", "ppl table")
    text = path.read_text()
    assert "keep me" in text and "new figures" in text and "old figures" not in text
    assert text.index("## build") < text.index("## decode") < text.index("## quality")
    common.write_section("build", "rebuilt")
    text = path.read_text()
    assert "keep me" not in text and "rebuilt" in text and "new figures" in text and "ppl table" in text
