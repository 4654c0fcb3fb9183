"""Granite 4 hybrid (granitemoehybrid): Mamba2 layers (graph/mamba2.py: conv state + SSM state, carried by
onnxruntime-genai) beside attention layers, with and without the mixture of experts beside the shared MLP.
Tiny random models made by transformers, a prompt longer than the conv kernel: fp32 logits equal transformers'
within 1e-4 for a prefill and 20 cached decode steps, and with the prompt fed in two chunks (both states carried
across a prefill); onnxruntime-genai's greedy tokens equal transformers'; int4 equals transformers on the build's
dequantized weights (MatMulNBits and QMoE) within 1e-4; fp16 runs close.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from conftest import genai_greedy, reference_greedy, reference_logits
from family_check import FP32_TOL
from moe_check import moe_reference
from test_family_hybrid import PROMPT, Stepper, steps, tokens

import onnxforge
from onnxforge.quant.recipe import Recipe

GRANITE_HYBRID = dict(
    cls="GraniteMoeHybridConfig", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=32,
    shared_intermediate_size=48, num_hidden_layers=4, layer_types=["mamba", "attention", "mamba", "mamba"],
    mamba_n_heads=8, mamba_n_groups=2, mamba_d_state=16, mamba_d_head=16, mamba_d_conv=4, mamba_expand=2,
    num_local_experts=4, num_experts_per_tok=2, embedding_multiplier=2.0, residual_multiplier=0.5,
    logits_scaling=3.0, attention_multiplier=0.2)


def make(folder, **overrides):
    from tiny import make_model

    model = make_model("granitemoehybrid", folder, **{**GRANITE_HYBRID, **overrides})
    with torch.no_grad():  # the Mamba2 parameters as trained models have them: decays of several speeds
        for layer in model.model.layers:
            if layer.mamba is not None:
                n = layer.mamba.num_heads
                layer.mamba.A_log.copy_(torch.log(torch.linspace(0.5, 8.0, n)))
                layer.mamba.dt_bias.copy_(torch.linspace(-3.0, 0.5, n))
                layer.mamba.D.copy_(torch.linspace(0.5, 1.5, n))
    model.save_pretrained(folder, safe_serialization=True)
    return model


@pytest.fixture(scope="module", params=["moe", "dense"])
def granite(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"granite_hybrid_{request.param}")
    extra = {} if request.param == "moe" else {"num_local_experts": 0, "position_embedding_type": "rope"}
    return folder, make(folder, **extra)


def test_fp32_prefill_decode_chunks_and_genai(granite, tmp_path):
    folder, model = granite
    out = tmp_path / "out"
    onnxforge.build(folder, out, "fp32")
    prompt, decode = tokens()
    assert PROMPT > GRANITE_HYBRID["mamba_d_conv"]
    ref = reference_logits(model, prompt + decode)
    one = steps(out, [prompt] + [[t] for t in decode])
    two = steps(out, [prompt[:5], prompt[5:]] + [[t] for t in decode])
    assert np.abs(one - ref).max() < FP32_TOL, np.abs(one - ref).max()
    assert np.abs(two - ref).max() < FP32_TOL, np.abs(two - ref).max()
    zeroed = Stepper(out)  # the SSM state matters: decoding without it goes wrong
    zeroed(prompt)
    fresh = Stepper(out)
    zeroed.state = {k: fresh.state[k] if k.endswith("recurrent") else v for k, v in zeroed.state.items()}
    assert np.abs(zeroed(decode[:1]) - ref[PROMPT:PROMPT + 1]).max() > 1e-3
    p, _ = tokens(1)
    assert genai_greedy(out, p) == reference_greedy(model, p)


def test_graph_and_genai_config(granite, tmp_path):
    folder, _ = granite
    out = tmp_path / "out"
    onnxforge.build(folder, out, "fp32")
    g = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    shape = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    ins = {v.name: shape(v) for v in g.input}
    assert ins["past.0.conv"] == ["batch_size", 128 + 2 * 2 * 16, 3]
    assert ins["past.0.recurrent"] == ["batch_size", 8, 16, 16] and "past.1.recurrent" not in ins
    assert ins["past_key_values.1.key"] == ["batch_size", 2, "past_sequence_length", 16]
    assert sum(n.op_type == "LinearAttention" for n in g.node) == 3
    dec = json.loads((out / "genai_config.json").read_text())["model"]
    assert dec["type"] == "granitemoehybrid"
    assert dec["decoder"]["layer_types"] == ["linear_attention", "full_attention", "linear_attention",
                                             "linear_attention"]
    assert dec["decoder"]["inputs"]["past_recurrent_names"] == "past.%d.recurrent"
    assert dec["decoder"]["outputs"]["present_conv_names"] == "present.%d.conv"


def test_int4_equals_the_dequantized_reference_and_fp16_runs_close(granite, tmp_path):
    folder, model = granite
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


def test_gated_norm_squares_in_float32(granite, tmp_path):
    """The Mamba2 gated norm's inputs reach thousands here (as in trained models), so their squares overflow fp16
    (max 65504): the mean of squares must not be an fp16 ReduceMean of an fp16 Mul (4.1 off on an H200 at fp16,
    where those run in fp16) but SimplifiedLayerNormalization accumulating in float32 (stash_type 1)."""
    import torch

    folder, model = granite
    seen = []
    hooks = [layer.mamba.norm.register_forward_hook(lambda mod, inp, out: seen.append(float(inp[0].abs().max())))
             for layer in model.model.layers if layer.mamba is not None]
    prompt, decode = tokens()
    with torch.no_grad():
        model(torch.tensor([prompt + decode]))
    for h in hooks:
        h.remove()
    assert max(seen) ** 2 > np.finfo(np.float16).max, max(seen)  # the case the float32 accumulation is for
    onnxforge.build(folder, tmp_path / "fp16", "fp16")
    g = onnx.load(str(tmp_path / "fp16" / "model.onnx"), load_external_data=False).graph
    norms = [n for n in g.node if "/mamba/norm/" in n.name]
    assert norms and not any(n.op_type in ("ReduceMean", "Pow", "Sqrt") for n in norms)
    lns = [n for n in norms if n.op_type == "SimplifiedLayerNormalization"]
    assert lns and all({a.name: a.i for a in n.attribute if a.name == "stash_type"} == {"stash_type": 1} for n in lns)


def test_refusals(granite, tmp_path):
    """What the Mamba2 kernels cannot run is one ConfigError, before anything is written."""
    import shutil

    from onnxforge.archs.registry import architecture_for
    from onnxforge.errors import ConfigError

    folder, _ = granite
    cfg = json.loads((folder / "config.json").read_text())
    for bad, words in (({"time_step_limit": [0.0, "inf"]}, "time_step_limit"),
                       ({"mamba_n_groups": 3}, "mamba_n_groups"), ({"mamba_d_head": 7}, "mamba_d_head"),
                       ({"mamba_d_conv": 1}, "mamba_d_conv")):
        with pytest.raises(ConfigError, match=words):
            architecture_for(cfg).make_spec({**cfg, **bad})
    lfm2_moe = {"architectures": ["Lfm2MoeForCausalLM"], "model_type": "lfm2_moe", "hidden_size": 64,
                "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 320}
    with pytest.raises(ConfigError, match="layer_types"):
        architecture_for(lfm2_moe).make_spec(lfm2_moe)
    gelu = tmp_path / "gelu"
    shutil.copytree(folder, gelu)
    (gelu / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu"}))
    with pytest.raises(ConfigError, match="SiLU"):
        onnxforge.build(gelu, tmp_path / "out", "fp32")
    assert not (tmp_path / "out").exists()
