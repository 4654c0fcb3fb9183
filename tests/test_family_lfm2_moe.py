"""LFM2-MoE: LFM2's conv and attention layers (graph/short_conv.py) with sigmoid-routed experts (graph/moe.py):
selection on sigmoid(logits) + expert_bias, the selected sigmoids renormalised (or not), times
routed_scaling_factor; the first num_dense_layers keep a dense MLP. A tiny random model made by transformers,
a prompt longer than the conv kernel: fp32 logits equal transformers' within 1e-4 for a prefill and 20 cached
decode steps, and with the prompt fed in two chunks; onnxruntime-genai's greedy tokens equal transformers';
int4 equals transformers on the build's dequantized weights (MatMulNBits and QMoE) within 1e-4; fp16 runs
close (per position: a near-tied router may pick another expert in fp16).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import genai_greedy, reference_greedy, reference_logits
from family_check import FP32_TOL
from moe_check import moe_reference
from test_family_hybrid import PROMPT, steps, tokens

import onnxforge
from onnxforge.quant.recipe import Recipe

LFM2_MOE = dict(cls="Lfm2MoeConfig", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4, num_dense_layers=1,
                layer_types=["conv", "full_attention", "conv", "conv"], conv_L_cache=3, num_experts=4,
                num_experts_per_tok=2, routed_scaling_factor=1.5)


def make(folder, **overrides):
    from tiny import make_model

    model = make_model("lfm2_moe", folder, **{**LFM2_MOE, **overrides})
    with torch.no_grad():  # a selection bias that changes which experts run
        for layer in model.model.layers:
            if hasattr(layer.feed_forward, "expert_bias"):
                layer.feed_forward.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]))
    model.save_pretrained(folder, safe_serialization=True)
    return model


@pytest.fixture(scope="module")
def lfm2_moe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lfm2_moe")
    return folder, make(folder)


def test_fp32_prefill_decode_chunks_and_genai(lfm2_moe, tmp_path):
    folder, model = lfm2_moe
    out = tmp_path / "out"
    onnxforge.build(folder, out, "fp32")
    prompt, decode = tokens()
    ref = reference_logits(model, prompt + decode)
    one = steps(out, [prompt] + [[t] for t in decode])
    two = steps(out, [prompt[:5], prompt[5:]] + [[t] for t in decode])
    assert np.abs(one - ref).max() < FP32_TOL, np.abs(one - ref).max()
    assert np.abs(two - ref).max() < FP32_TOL, np.abs(two - ref).max()
    dec = json.loads((out / "genai_config.json").read_text())["model"]
    assert dec["type"] == "lfm2_moe" and dec["decoder"]["inputs"]["past_conv_names"] == "past.%d.conv"
    p, _ = tokens(1)
    assert genai_greedy(out, p) == reference_greedy(model, p)


def test_unnormalised_routing(tmp_path):
    folder = tmp_path / "m"
    model = make(folder, norm_topk_prob=False, use_expert_bias=False)
    out = tmp_path / "out"
    onnxforge.build(folder, out, "fp32")
    prompt, decode = tokens()
    ref = reference_logits(model, prompt + decode[:3])
    got = steps(out, [prompt] + [[t] for t in decode[:3]])
    assert np.abs(got - ref).max() < FP32_TOL, np.abs(got - ref).max()


def test_int4_and_fp16(lfm2_moe, tmp_path):
    folder, model = lfm2_moe
    prompt, decode = tokens()
    out = tmp_path / "int4"
    onnxforge.build(folder, out, recipe=Recipe(precision="int4", accuracy_level=0))
    got = steps(out, [prompt] + [[t] for t in decode])
    ref = reference_logits(moe_reference(folder, out), prompt + decode)  # MatMulNBits and QMoE weights dequantized
    assert np.abs(got - ref).max() < FP32_TOL, np.abs(got - ref).max()
    out = tmp_path / "fp16"
    onnxforge.build(folder, out, "fp16")
    ref = reference_logits(model, prompt + decode)
    got = steps(out, [prompt] + [[t] for t in decode])
    close = np.abs(got - ref).max(-1) < 0.02 * (ref.max() - ref.min())  # per position: a near-tied router may flip
    assert close.mean() >= 0.9, close.mean()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
    assert PROMPT > LFM2_MOE["conv_L_cache"]
