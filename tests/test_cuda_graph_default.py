"""CUDA graph capture (export/graph_capture.py): off by default, as the anchor writes, because onnxruntime-genai 0.18
fails a batch of more than one prompt under capture (measured on an H200, bench/RESULTS.md "CUDA decode"). A plain
decoder's note says `enable_cuda_graph=true` captures it for batch 1; fp32 (GroupQueryAttention on the CPU provider),
mixture of experts, sliding windows, non-attention layers and graphs with other ops (LongRoPE's If) say why capture
is not established; `=true` turns it on with a batch-1 note (refused at fp32); `=false` writes "0" with no note;
config_only writes the same; other providers are unchanged. -e cuda -p fp32 writes past_present_share_buffer false."""
from __future__ import annotations

import json

import pytest

import onnxforge
from onnxforge.errors import RecipeError
from onnxforge.quant.options import apply_extra_options
from onnxforge.quant.recipe import Recipe

pytest.importorskip("transformers")


def _build(folder, out, precision, provider="cuda", options=()):
    recipe = apply_extra_options(Recipe(precision=precision, provider=provider), list(options))
    report = onnxforge.build(folder, out, recipe=recipe)
    config = json.loads((out / "genai_config.json").read_text())
    notes = [n for n in report.notes if "CUDA graph" in n]
    return config["model"]["decoder"]["session_options"]["provider_options"], config["search"], notes


@pytest.mark.parametrize("precision", ["fp16", "bf16", "int4"])
def test_plain_decoder_says_how_to_capture(tiny_models, tmp_path, precision):
    folder, _ = tiny_models("llama")
    options, search, notes = _build(folder, tmp_path / "o", precision)
    assert options == [{"cuda": {"enable_cuda_graph": "0"}}]
    assert search["past_present_share_buffer"] is True  # genai refuses capture without it
    assert len(notes) == 1 and "enable_cuda_graph=true captures" in notes[0] and "batch" in notes[0], notes
    options, _, notes = _build(folder, tmp_path / "on", precision, options=["enable_cuda_graph=true"])
    assert options == [{"cuda": {"enable_cuda_graph": "1"}}]
    assert len(notes) == 1 and "batch 1 only" in notes[0] and "though" not in notes[0], notes


def test_opt_out_and_force(tiny_models, tmp_path):
    folder, _ = tiny_models("llama")
    options, _, notes = _build(folder, tmp_path / "off", "int4", options=["enable_cuda_graph=false"])
    assert options == [{"cuda": {"enable_cuda_graph": "0"}}] and not notes
    gemma2, _ = tiny_models("gemma2", **_configs()["gemma2"])  # not established (its sliding window): forced on
    options, _, notes = _build(gemma2, tmp_path / "on", "fp16", options=["enable_cuda_graph=true"])
    assert options == [{"cuda": {"enable_cuda_graph": "1"}}]
    assert len(notes) == 1 and "though sliding-window attention" in notes[0], notes
    with pytest.raises(RecipeError, match="at fp32 GroupQueryAttention runs on the CPU provider"):
        apply_extra_options(Recipe(precision="fp32", provider="cuda"), ["enable_cuda_graph=true"])
    options, _, notes = _build(folder, tmp_path / "cfg", "fp16", options=["config_only=true"])
    assert options == [{"cuda": {"enable_cuda_graph": "0"}}] and notes


def _configs() -> dict:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import gpu

    return gpu.tiny_configs()


def test_fp32_cuda_grows_the_cache(tiny_models, tmp_path):
    """-e cuda -p fp32: GroupQueryAttention runs on the CPU provider, so the KV cache is not a shared max_length
    buffer (which would be copied to the host and back whole each step), as the anchor writes for fp32 CUDA."""
    folder, _ = tiny_models("llama")
    _, search, _ = _build(folder, tmp_path / "fp32", "fp32")
    assert search["past_present_share_buffer"] is False
    report = json.loads((tmp_path / "fp32" / "build_report.json").read_text())
    assert any("past_present_share_buffer false" in n for n in report["notes"]), report["notes"]
    for provider, precision in (("cuda", "fp16"), ("cpu", "fp32")):
        assert _build(folder, tmp_path / provider, precision, provider)[1]["past_present_share_buffer"] is True


@pytest.mark.parametrize("name, precision, words", [
    ("llama", "fp32", "GroupQueryAttention runs on the CPU provider"),
    ("mixtral", "fp16", "mixture-of-experts"),
    ("gemma2", "fp16", "sliding-window"),
    ("lfm2", "fp16", "layers of kind conv"),
])
def test_says_why_not_established(tiny_models, tmp_path, name, precision, words):
    folder, _ = tiny_models(name, **_configs()[name]) if name != "llama" else tiny_models(name)
    options, _, notes = _build(folder, tmp_path / "o", precision)
    tf32 = {"use_tf32": "0"} if precision == "fp32" else {}  # fp32 computes in fp32 (test_runtime_options.py)
    assert options == [{"cuda": {"enable_cuda_graph": "0", **tf32}}]
    assert len(notes) == 1 and words in notes[0] and "enable_cuda_graph=true forces it" in notes[0], notes
    assert "CUDA graph capture off" in notes[0]


def test_longrope_if_keeps_it_off():
    from types import SimpleNamespace

    from onnxforge.export.graph_capture import cuda_graph_default

    spec = SimpleNamespace(layers=[SimpleNamespace(kind="attention")], moe=None, sliding_window=0)
    assert cuda_graph_default(spec, "fp16", {"MatMul", "GroupQueryAttention"})[0]
    on, why = cuda_graph_default(spec, "fp16", {"MatMul", "If", "Greater"})
    assert not on and "Greater, If" in why


def test_other_providers_unchanged(tiny_models, tmp_path):
    folder, _ = tiny_models("llama")
    assert _build(folder, tmp_path / "cpu", "int4", "cpu")[0] == []
    assert _build(folder, tmp_path / "dml", "fp16", "dml")[0] == [{"dml": {"enable_graph_capture": "1"}}]
