"""Rotary tables equal transformers' own rotary classes (the ones its models call), for every rope
type, at positions 0, 1, the original maximum and twice it. Each position is asked of transformers
as the newest token (sequence length p + 1), which is how a KV-cached decode step sees it and which
decides dynamic NTK's base and LongRoPE's short/long switch."""
from __future__ import annotations

import numpy as np
import pytest

from onnxforge.graph.rope import cos_sin_cache
from onnxforge.spec import ropes_from_config

ORIG = 64
POSITIONS = [0, 1, ORIG - 1, ORIG, 2 * ORIG]
BASE = dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1, intermediate_size=32,
            vocab_size=32)

CASES = {
    "default": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, max_position_embeddings=ORIG),
    "linear": dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
                   max_position_embeddings=ORIG),
    "dynamic": dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0},
                    max_position_embeddings=ORIG),
    "llama3": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": ORIG},
                   max_position_embeddings=4 * ORIG),
    "yarn": dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                  "original_max_position_embeddings": ORIG}, max_position_embeddings=4 * ORIG),
    "yarn_mscale_no_truncate": dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                     "original_max_position_embeddings": ORIG, "mscale": 0.707,
                                                     "mscale_all_dim": 1.0, "truncate": False},
                                    max_position_embeddings=4 * ORIG),
    "yarn_partial_rotary": dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                                                 "original_max_position_embeddings": ORIG, "beta_fast": 16.0,
                                                 "beta_slow": 2.0, "partial_rotary_factor": 0.5},
                                max_position_embeddings=4 * ORIG),
}


def _reference(config_cls, rotary_cls, kw: dict, positions: list[int]):
    import torch

    config = config_cls(**kw)
    rows = []
    for p in positions:
        rot = rotary_cls(config)  # fresh: dynamic/longrope keep state between calls
        cos, sin = rot(torch.zeros(1, 1, 8), torch.tensor([[p]]))
        rows.append((cos[0, 0].numpy(), sin[0, 0].numpy()))
    return config, rows


def _ours(config, arch: str, context: int):
    cfg = config.to_dict() | {"architectures": [arch]}
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    rope = dict(ropes_from_config(cfg, head_dim, cfg["max_position_embeddings"]))["full_attention"]
    return rope, cos_sin_cache(rope, context), cos_sin_cache(rope, context, long=True)


def _max_err(rows, cache, positions, half):
    cos, sin = cache
    return max(max(np.abs(cos[p] - c[:half]).max(), np.abs(sin[p] - s[:half]).max()) for p, (c, s) in zip(positions, rows))


@pytest.mark.parametrize("case", sorted(CASES))
def test_rope_tables_match_transformers(case):
    import transformers
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config, rows = _reference(transformers.LlamaConfig, LlamaRotaryEmbedding, BASE | CASES[case], POSITIONS)
    rope, cache, _ = _ours(config, "LlamaForCausalLM", 2 * ORIG + 1)
    assert rope.kind == CASES[case]["rope_parameters"]["rope_type"]
    assert _max_err(rows, cache, POSITIONS, rope.rotary_dim // 2) < 1e-6


@pytest.mark.parametrize("partial", [1.0, 0.75])
def test_longrope_short_and_long_tables_match_phi3(partial):
    """Below the switch transformers uses the short factors, from original + 1 on the long ones; the
    decoder's If picks the long table exactly when the total length passes the original maximum."""
    import transformers
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    rng = np.random.default_rng(0)
    half = int(32 * partial) // 2
    kw = BASE | dict(max_position_embeddings=4 * ORIG, original_max_position_embeddings=ORIG,
                     rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": partial,
                                      "short_factor": (1 + rng.random(half)).tolist(),
                                      "long_factor": (2 + 4 * rng.random(half)).tolist(),
                                      "original_max_position_embeddings": ORIG})
    config, rows = _reference(transformers.Phi3Config, Phi3RotaryEmbedding, kw, POSITIONS)
    rope, short, long = _ours(config, "Phi3ForCausalLM", 2 * ORIG + 1)
    below = [i for i, p in enumerate(POSITIONS) if p + 1 <= ORIG]
    above = [i for i, p in enumerate(POSITIONS) if p + 1 > ORIG]
    # 5e-6: transformers forms the angles in float32 (position x inv_freq, then x the attention factor
    # 1.15), we in float64; a few float32 ulps of angles up to ~2 x ORIG radians
    assert _max_err([rows[i] for i in below], short, [POSITIONS[i] for i in below], half) < 5e-6
    assert _max_err([rows[i] for i in above], long, [POSITIONS[i] for i in above], half) < 5e-6
    assert np.abs(long[0][2 * ORIG] - short[0][2 * ORIG]).max() > 1e-2  # the two tables really differ


def test_dynamic_differs_from_default_past_the_original_length():
    """Guards the dynamic test above against a table that ignores the scaling."""
    cfg = BASE | dict(architectures=["LlamaForCausalLM"], max_position_embeddings=ORIG,
                      rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0})
    rope = dict(ropes_from_config(cfg, 32, ORIG))["full_attention"]
    plain = dict(ropes_from_config(cfg | {"rope_parameters": {"rope_type": "default"}}, 32, ORIG))["full_attention"]
    dyn, default = cos_sin_cache(rope, 2 * ORIG + 1), cos_sin_cache(plain, 2 * ORIG + 1)
    assert np.array_equal(dyn[0][:ORIG], default[0][:ORIG])
    assert np.abs(dyn[0][2 * ORIG] - default[0][2 * ORIG]).max() > 1e-2
