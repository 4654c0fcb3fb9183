"""Llama 4 (archs/llama4.py) on tiny random transformers models: chunked attention with a chunk of 5 under a
prompt of 12 and 20 decode steps (so tokens attend across chunk boundaries in prefill and in decode), NoPE
layers with the attention temperature (floor_scale 4, so it changes along the prompt), the L2 q/k norm, and
interleaved MoE layers (top-1 router scaling the expert's input, shared expert) beside dense ones.

fp32 logits equal transformers' within 1e-4 for the prefill and every cached decode step, and
onnxruntime-genai's greedy tokens equal transformers'; each of chunking, temperature and the q/k norm is
shown to matter (a build told otherwise misses by far more); the Llama4ForConditionalGeneration form builds
its text decoder as well; int4 equals transformers with the build's dequantized weights (MatMulNBits and
QMoE, accuracy level 0); fp16 runs close to fp32.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import genai_greedy, onnx_step_logits, reference_greedy, reference_logits
from family_check import FP32_TOL
from moe_check import dequantized_experts, qmoe_nodes

import onnxforge
from onnxforge.errors import ConfigError
from onnxforge.quant.recipe import Recipe

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TEXT = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=32,
            intermediate_size_mlp=96, num_hidden_layers=4, num_local_experts=4, num_experts_per_tok=1,
            interleave_moe_layer_step=2, attention_chunk_size=5, floor_scale=4, attn_scale=0.5, use_qk_norm=True)
PROMPT, DECODE = 12, 20


@pytest.fixture(scope="module")
def llama4(tmp_path_factory):
    from tiny import make_model

    folder = tmp_path_factory.mktemp("llama4")
    return folder, make_model("llama4", folder, cls="Llama4TextConfig", **TEXT)


def tokens(seed: int = 0) -> tuple[list[int], list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(2, 320, PROMPT).tolist(), rng.integers(2, 320, DECODE).tolist()


def diff(out, model, seed: int = 0) -> float:
    prompt, decode = tokens(seed)
    ref = reference_logits(model, prompt + decode)
    got = onnx_step_logits(out, prompt, decode)
    assert got.shape == ref.shape == (PROMPT + DECODE, 320)
    return float(np.abs(got - ref).max())


def test_spec(llama4):
    from onnxforge.archs.registry import architecture_for

    folder, _ = llama4
    cfg = json.loads((folder / "config.json").read_text())
    spec = architecture_for(cfg).make_spec(cfg)
    assert [layer.chunk for layer in spec.layers] == [5, 5, 5, 0]
    assert [layer.rope for layer in spec.layers] == ["full_attention"] * 3 + [None]  # every 4th layer: NoPE
    assert [layer.moe for layer in spec.layers] == [False, True, False, True]
    assert spec.attention.qk_norm == "l2" and spec.attention.nope_temperature == (4.0, 0.5)
    assert spec.rope.interleaved and spec.mlp.intermediate_size == 96 and spec.moe.shared_intermediate_size == 32


def test_fp32_prefill_decode_and_genai(llama4, tmp_path):
    folder, model = llama4
    out = tmp_path / "out"
    onnxforge.build(folder, out, "fp32")
    worst = diff(out, model)
    assert worst < FP32_TOL, f"max abs diff vs transformers {worst}"
    prompt, _ = tokens(1)
    assert genai_greedy(out, prompt) == reference_greedy(model, prompt)


@pytest.mark.parametrize("change", [{"attention_chunk_size": 64}, {"attn_temperature_tuning": False},
                                    {"use_qk_norm": False}])
def test_each_feature_matters(llama4, tmp_path, change):
    """The same weights built under a config without one feature miss transformers by far more than 1e-4."""
    folder, model = llama4
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, **change}))
    onnxforge.build(other, tmp_path / "out", "fp32")
    assert diff(tmp_path / "out", model) > 100 * FP32_TOL


def test_conditional_generation_form(tmp_path):
    """Llama4ForConditionalGeneration: the text decoder under language_model.*, the vision model left unread."""
    folder = tmp_path / "vl"
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28,
                  patch_size=14, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32)
    config = transformers.Llama4Config(text_config={**TEXT, "vocab_size": 320, "max_position_embeddings": 256,
                                                    "bos_token_id": 1, "eos_token_id": 0, "pad_token_id": 0},
                                       vision_config=vision)
    torch.manual_seed(0)
    model = transformers.Llama4ForConditionalGeneration(config).eval()
    from tiny import spread_weights, tokenizer_files

    spread_weights(model)
    model.save_pretrained(folder)
    tokenizer_files(folder)
    out = tmp_path / "out"
    onnxforge.build(folder, out, "fp32")
    assert diff(out, model) < FP32_TOL


def test_int4_equals_dequantized_reference(llama4, tmp_path):
    from quant_ref import dequantized_reference

    folder, _ = llama4
    out = tmp_path / "out"
    onnxforge.build(folder, out, recipe=Recipe(precision="int4", method="rtn", accuracy_level=0, qmoe_block_size=16))
    ref = dequantized_reference(folder, out)  # its own copy: the weights are replaced in place
    nodes = qmoe_nodes(out)
    assert [n["layer"] for n in nodes] == [1, 3]
    with torch.no_grad():
        for node in nodes:  # the op's (E, 2I, H) interleaved / (E, H, I) back to Llama 4's (E, H, 2I) / (E, I, H)
            fc1, fc2 = dequantized_experts(node)
            experts = ref.model.layers[node["layer"]].feed_forward.experts
            experts.gate_up_proj.copy_(torch.from_numpy(np.concatenate([fc1[:, 0::2], fc1[:, 1::2]], 1).transpose(0, 2, 1)))
            experts.down_proj.copy_(torch.from_numpy(fc2.transpose(0, 2, 1).copy()))
    worst = diff(out, ref)
    assert worst < FP32_TOL, f"max abs diff vs the dequantized reference {worst}"


def test_fp16_runs_close(llama4, tmp_path):
    folder, model = llama4
    out = tmp_path / "out"
    onnxforge.build(folder, out, "fp16")
    prompt, decode = tokens()
    ref = reference_logits(model, prompt + decode)
    got = onnx_step_logits(out, prompt, decode).astype(np.float32)
    assert np.abs(got - ref).max() < 0.02 * (ref.max() - ref.min())
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("change,words", [({"num_experts_per_tok": 2}, "num_experts_per_tok is 2"),
                                          ({"layer_types": ["sliding_attention"] * 4}, "'sliding_attention'"),
                                          ({"attention_chunk_size": None}, "attention_chunk_size")])
def test_refused_before_reading_weights(llama4, tmp_path, change, words):
    folder, _ = llama4
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ConfigError, match=words):
        onnxforge.build(other, tmp_path / "out", "fp32")
    assert not (tmp_path / "out").exists()
