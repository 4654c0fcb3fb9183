"""Sliding-window models in onnxruntime-genai: generation at a max_length shorter than the sequence
the window slides over, and longer, equals transformers' greedy generate token for token.

genai_config.json has no `sliding_window` key: onnxruntime-genai keeps the whole KV cache (max_length
long, shared past/present buffer) and GroupQueryAttention masks what lies outside the window with
`local_window_size`. The onnxruntime-genai builder writes a windowed KV cache instead, and its models
abort when max_length is below the window; these must not.
"""
from __future__ import annotations

import json

import pytest
from conftest import reference_greedy

import onnxforge

torch = pytest.importorskip("torch")

WINDOW, PROMPT, NEW = 16, 40, 64
# untied: with tests/tiny.py's spread, a tied Gemma repeats one token whatever the window
SMALL = dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=32, intermediate_size=97,
             sliding_window=WINDOW, tie_word_embeddings=False)
MODELS = {
    "mistral": dict(cls="MistralConfig", **SMALL, num_hidden_layers=2),
    "gemma2": dict(cls="Gemma2Config", **SMALL, num_hidden_layers=3, query_pre_attn_scalar=24,
                   attn_logit_softcapping=5.0, final_logit_softcapping=8.0),
    "gemma3": dict(cls="Gemma3TextConfig", **SMALL, num_hidden_layers=3,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from tiny import make_model

    cache: dict = {}

    def get(name: str):
        if name not in cache:
            folder = tmp_path_factory.mktemp(name)
            model = make_model(name, folder, **MODELS[name])
            out = tmp_path_factory.mktemp(f"{name}-onnx") / "onnx"  # beside the checkpoint, never inside
            onnxforge.build(folder, out, "fp32")
            cache[name] = (out, model, folder)
        return cache[name]

    return get


def genai_generate(out_dir, prompt: list[int], max_length: int, n: int) -> list[int]:
    """Greedy tokens from onnxruntime-genai until max_length or n tokens (EOS does not stop it)."""
    import onnxruntime_genai as og

    model = og.Model(str(out_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max_length, min_length=min(max_length, len(prompt) + n), do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    tokens: list[int] = []
    while not gen.is_done() and len(tokens) < n:
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    return tokens


def prompt_of(length: int) -> list[int]:
    import numpy as np

    return np.random.default_rng(7).integers(2, 320, length).tolist()


@pytest.mark.parametrize("name", list(MODELS))
def test_genai_config_has_no_window_and_gqa_masks_with_it(built, name):
    import onnx

    out, model, _ = built(name)
    assert "sliding_window" not in json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    g = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    windows = [a.i for n in g.node if n.op_type == "GroupQueryAttention" for a in n.attribute
               if a.name == "local_window_size"]
    types = getattr(model.config, "layer_types", None) or ["sliding_attention"] * model.config.num_hidden_layers
    assert windows == [WINDOW if t == "sliding_attention" else -1 for t in types]


@pytest.mark.parametrize("max_length", [48, 128])
@pytest.mark.parametrize("name", list(MODELS))
def test_generation_equals_transformers(built, name, max_length):
    out, model, _ = built(name)
    prompt = prompt_of(PROMPT)
    reference = reference_greedy(model, prompt, NEW)
    got = genai_generate(out, prompt, max_length, NEW)
    assert len(got) == min(NEW, max_length - PROMPT)  # at 48 generation stops at the max length
    assert got == reference[:len(got)]


@pytest.mark.parametrize("name", list(MODELS))
def test_max_length_below_the_window(built, name):
    """What aborts in the anchor's builds: a max_length (12) shorter than the window (16)."""
    out, model, _ = built(name)
    prompt = prompt_of(8)
    got = genai_generate(out, prompt, 12, NEW)
    assert got == reference_greedy(model, prompt, 4)


@pytest.mark.parametrize("name", list(MODELS))
def test_the_window_decides_the_tokens(built, name):
    """Without the window, transformers generates other tokens: the tests above would see a wrong window."""
    import transformers

    _, model, folder = built(name)
    full = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, sliding_window=4096).eval()
    prompt = prompt_of(PROMPT)
    windowed, unwindowed = reference_greedy(model, prompt, NEW), reference_greedy(full, prompt, NEW)
    assert len(set(windowed)) > NEW // 4  # not one token repeated
    assert windowed[:8] != unwindowed[:8] and windowed != unwindowed
