"""A batch of prompts of different lengths through onnxruntime-genai, for the families whose layers carry a
recurrent state (graph/parts.py chunk_padding / conv_state_after). genai right-pads a batch's prompts (trailing pad
tokens, attention_mask 0), so a short prompt's conv and recurrent states must come out of the prompt run as its real
tokens left them: each sequence's greedy tokens in the batch equal transformers' greedy on that prompt alone.
Before the padding reached the mixers, the short prompt's tokens went wrong from the second token on (LFM2:
2/10 equal), while its first token (the prompt's own logits) was right."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import reference_greedy

import onnxforge

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
og = pytest.importorskip("onnxruntime_genai")

N = 12


def genai_batch_greedy(out, prompts: list[list[int]], n: int = N) -> list[list[int]]:
    """Greedy tokens of each prompt generated together, right-padded with the model's pad token as genai expects."""
    import json

    pad = json.loads((out / "genai_config.json").read_text())["model"]["pad_token_id"]
    width = max(map(len, prompts))
    ids = np.array([p + [pad] * (width - len(p)) for p in prompts], dtype=np.int32)
    model = og.Model(str(out))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=width + n, min_length=width + n, do_sample=False, batch_size=len(prompts))
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    got: list[list[int]] = [[] for _ in prompts]
    while not gen.is_done():
        gen.generate_next_token()
        for row, t in zip(got, gen.get_next_tokens()):
            row.append(int(t))
    return [row[:n] for row in got]


def _lfm2(folder):
    from test_family_hybrid import LFM2
    from tiny import make_model

    return make_model("lfm2", folder, **LFM2)


def _qwen35(folder):
    from test_family_qwen_next import FAMILIES, make_hybrid

    config_class, params = FAMILIES["qwen3_5"]
    return make_hybrid(folder, config_class, **params)


def _granite_hybrid(folder):
    from test_family_granite_hybrid import make

    return make(folder)


MODELS = {"lfm2 (short conv)": _lfm2, "qwen3_5 (gated delta)": _qwen35, "granite_hybrid (Mamba2)": _granite_hybrid}


@pytest.mark.parametrize("name", list(MODELS))
def test_padded_batch_equals_each_prompt_alone(name, tmp_path):
    model = MODELS[name](tmp_path / "hf")
    out = tmp_path / "out"
    onnxforge.build(tmp_path / "hf", out, "fp32")
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 200, 11).tolist(), rng.integers(3, 200, 4).tolist(), rng.integers(3, 200, 8).tolist()]
    got = genai_batch_greedy(out, prompts)
    want = [reference_greedy(model, p, N) for p in prompts]
    assert got == want, (got, want)
