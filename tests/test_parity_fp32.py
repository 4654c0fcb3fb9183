"""End-to-end: tiny random models of each family built at fp32 match transformers."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import genai_greedy, onnx_step_logits, prompt_and_decode, reference_greedy, reference_logits

import onnxforge

FAMILIES = ["llama", "llama_tied", "mistral", "qwen2", "qwen3"]


@pytest.fixture(scope="module")
def built(tiny_models, tmp_path_factory):
    cache = {}

    def get(family):
        if family not in cache:
            folder, model = tiny_models(family)
            out = tmp_path_factory.mktemp(f"{family}-fp32") / "onnx"
            onnxforge.build(folder, out, "fp32")
            cache[family] = (out, model)
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_prefill_and_decode(built, family):
    out, model = built(family)
    prompt, decode = prompt_and_decode()
    ref = reference_logits(model, prompt + decode)
    got = onnx_step_logits(out, prompt, decode)
    assert got.shape == ref.shape
    diff = np.abs(got - ref).max()
    assert diff < 1e-4, f"{family}: max abs diff {diff}"


@pytest.mark.parametrize("family", FAMILIES)
def test_genai_greedy_matches_transformers(built, family):
    out, model = built(family)
    prompt, _ = prompt_and_decode(1)
    assert genai_greedy(out, prompt) == reference_greedy(model, prompt)


def test_mistral_window_is_exercised(built):
    """The prompt is longer than the window, so a wrong window would change logits."""
    out, model = built("mistral")
    assert model.config.sliding_window < 16
    import onnx

    g = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    windows = {a.i for n in g.node if n.op_type == "GroupQueryAttention" for a in n.attribute
               if a.name == "local_window_size"}
    assert windows == {model.config.sliding_window}
