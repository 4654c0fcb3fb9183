"""Gemma 4 (archs/gemma4.py) on tiny random transformers models (fixed seed): sliding layers of head size 16 and
2 kv heads beside full layers of head size 32 and 1 kv head (global_head_dim, num_global_key_value_heads), k = v on
the full layers (attention_k_eq_v), the proportional rotary there (partial_rotary_factor 0.25), the v norm, random
layer scalars, final logit softcapping, a window of 8 under a prompt of 12 and 20 decode steps.

fp32 logits equal transformers' within 1e-4 for the prefill and every cached decode step, in both forms
(Gemma4ForCausalLM and Gemma4ForConditionalGeneration with a vision tower, left unread); onnxruntime-genai runs
the build as is (per-layer KV shapes) and its greedy tokens equal transformers'; int4 equals transformers with the
build's dequantized weights; fp16 runs close to fp32. The parts Gemma 4 adds are each shown to matter.
The MoE block (enable_moe_block: 4 experts, top 2, beside the dense MLP, GeGLU experts computed densely, the
norm-scaled router with per-expert scales) and the E2B/E4B additions (per-layer inputs of width 8, the last 2 layers
attending to the keys and values of layers 0 and 1, their MLPs double-wide) pass the same checks in both forms.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import genai_greedy, onnx_step_logits, reference_greedy, reference_logits
from family_check import FP32_TOL, check_fp16, check_int4

import onnxforge
from onnxforge.errors import ConfigError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
TEXT = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
            num_global_key_value_heads=1, attention_k_eq_v=True, intermediate_size=96, num_hidden_layers=4,
            layer_types=TYPES, sliding_window=8, hidden_size_per_layer_input=0, final_logit_softcapping=30.0,
            max_position_embeddings=256)
PROMPT, DECODE = 12, 20


def _finish(model, layers, folder):
    from tiny import spread_weights, tokenizer_files

    spread_weights(model)
    with torch.no_grad():
        for layer in layers:  # a buffer of ones at init: random, so that a build without it shows
            layer.layer_scalar.uniform_(0.5, 1.5)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer_files(folder)
    return model


def make_causal(folder, **over):
    from tiny import VOCAB

    cfg = transformers.Gemma4TextConfig(**{**TEXT, **over}, vocab_size=VOCAB, bos_token_id=1, eos_token_id=0,
                                        pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    return _finish(model, model.model.layers, folder)


def make_wrapper(folder, **over):
    from tiny import VOCAB

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=16)
    cfg = transformers.Gemma4Config(text_config={**TEXT, **over, "vocab_size": VOCAB}, vision_config=vision,
                                    audio_config=None, bos_token_id=1, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.Gemma4ForConditionalGeneration(cfg).eval()
    return _finish(model, model.model.language_model.layers, folder)


@pytest.fixture(scope="module")
def gemma4(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gemma4")
    return folder, make_causal(folder)


def tokens(seed: int = 0) -> tuple[list[int], list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(2, 320, PROMPT).tolist(), rng.integers(2, 320, DECODE).tolist()


def diff(out, model, seed: int = 0) -> float:
    prompt, decode = tokens(seed)
    ref = reference_logits(model, prompt + decode)
    got = onnx_step_logits(out, prompt, decode)
    assert got.shape == ref.shape == (PROMPT + DECODE, 320)
    return float(np.abs(got - ref).max())


def spec_of(folder):
    from onnxforge.archs.registry import architecture_for

    cfg = json.loads((folder / "config.json").read_text())
    return architecture_for(cfg).make_spec(cfg)


def test_spec(gemma4):
    folder, _ = gemma4
    spec = spec_of(folder)
    assert [(spec.attention_of(i).head_dim, spec.attention_of(i).num_kv_heads) for i in range(4)] == \
        [(16, 2), (32, 1)] * 2
    assert [layer.k_eq_v for layer in spec.layers] == [False, True] * 2
    assert [layer.window for layer in spec.layers] == [8, 0] * 2
    full = spec.rope_for("full_attention")
    assert full.kind == "proportional" and full.rotary_dim == 32 and full.param("rope_proportion") == 0.25
    assert spec.attention.scale == 1.0 and spec.attention.v_norm and spec.norm.weight_offset == 0.0
    assert spec.layer_scalar and spec.final_softcap == 30.0 and spec.model_type == "gemma4_text"


def test_fp32_prefill_decode_and_genai(gemma4, tmp_path):
    folder, model = gemma4
    out = tmp_path / "out"
    onnxforge.build(folder, out, "fp32")
    worst = diff(out, model)
    assert worst < FP32_TOL, f"max abs diff vs transformers {worst}"
    decoder = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    assert decoder["head_size"] == 16 and decoder["num_key_value_heads"] == 2  # the sliding layers', as the anchor
    import onnx

    shapes = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim]
              for i in onnx.load(out / "model.onnx", load_external_data=False).graph.input}
    assert shapes["past_key_values.0.key"] == ["batch_size", 2, "past_sequence_length", 16]
    assert shapes["past_key_values.1.value"] == ["batch_size", 1, "past_sequence_length", 32]
    for seed in (1, 2):
        prompt, _ = tokens(seed)
        assert genai_greedy(out, prompt) == reference_greedy(model, prompt)


def test_wrapper_builds_its_text_decoder(tmp_path):
    folder = tmp_path / "wrapper"
    model = make_wrapper(folder)
    out = tmp_path / "out"
    onnxforge.build(folder, out, "fp32")
    worst = diff(out, model)
    assert worst < FP32_TOL, f"max abs diff vs transformers {worst}"
    report = json.loads((out / "build_report.json").read_text())
    assert not report["unread_tensors"] and any("model.vision_tower.*" in n for n in report["notes"])
    prompt, _ = tokens(1)
    assert genai_greedy(out, prompt) == reference_greedy(model, prompt)


@pytest.mark.parametrize("change", ["no_layer_scalar", "no_v_norm", "rope_whole", "v_proj_of_its_own"])
def test_each_part_matters(gemma4, tmp_path, change):
    """A build that leaves out one of Gemma 4's additions misses transformers by far more than the tolerance."""
    import dataclasses

    from onnxforge.archs import gemma4 as family
    from onnxforge.archs.registry import REGISTRY

    folder, model = gemma4
    arch = REGISTRY["Gemma4ForCausalLM"]

    def hook(cfg):
        out = family._gemma4(cfg)
        if change == "no_v_norm":
            out["attention.v_norm"] = False
        if change == "rope_whole":
            out["ropes"] = tuple((k, dataclasses.replace(r, kind="default")) for k, r in out["ropes"])
        if change == "v_proj_of_its_own":  # k = v off: the build looks for v_proj and finds none
            out["layers"] = tuple(dataclasses.replace(layer, k_eq_v=False) for layer in out["layers"])
        return out

    spec = {**arch.spec, "layer_scalar": change != "no_layer_scalar"}
    patched = dataclasses.replace(arch, hook=hook, spec=spec)
    out = tmp_path / "out"
    try:
        REGISTRY["Gemma4ForCausalLM"] = patched
        if change == "v_proj_of_its_own":
            with pytest.raises(Exception, match="v_proj"):
                onnxforge.build(folder, out, "fp32")
            return
        onnxforge.build(folder, out, "fp32")
    finally:
        REGISTRY["Gemma4ForCausalLM"] = arch
    assert diff(out, model) > 100 * FP32_TOL


def test_fp16_and_int4(tmp_path):
    folder = tmp_path / "model"
    model = make_causal(folder)
    check_fp16(folder, model, tmp_path / "fp16")
    check_int4(folder, tmp_path / "int4", model=model)  # loads the build's dequantized weights into `model`


@pytest.mark.parametrize("key, value, message", [
    ("num_kv_shared_layers", 4, "num_kv_shared_layers must be an integer from 0 to 3"),
    ("num_experts", None, "has no 'num_experts'"),  # with enable_moe_block
    ("use_bidirectional_attention", "all", "causal decoders only"),
])
def test_refusals(gemma4, tmp_path, key, value, message):
    """What is not built is one ConfigError naming it, from config.json alone, with nothing written."""
    folder, _ = gemma4
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg[key] = value
    cfg["enable_moe_block"] = key == "num_experts"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=message):
        onnxforge.build(bad, tmp_path / "out", "fp32")
    assert not (tmp_path / "out").exists()


MOE = dict(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32)


def _router_scales(model):
    """spread_weights leaves the router's scale vectors near 0 (1-D, no "norm" in their names): spread them."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("router.scale", "router.per_expert_scale")):
                p.uniform_(0.5, 1.5)


@pytest.fixture(scope="module")
def gemma4_moe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gemma4_moe")
    model = make_causal(folder, **MOE)
    _router_scales(model)
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model


def test_moe_fp32_prefill_decode_and_genai(gemma4_moe, tmp_path):
    folder, model = gemma4_moe
    spec = spec_of(folder)
    assert spec.block == "sandwich_moe" and all(layer.moe for layer in spec.layers)
    assert (spec.moe.num_experts, spec.moe.top_k, spec.moe.intermediate_size, spec.moe.mixer) == (4, 2, 32, "norm_scaled")
    out = tmp_path / "out"
    onnxforge.build(folder, out, "fp32")
    worst = diff(out, model)
    assert worst < FP32_TOL, f"max abs diff vs transformers {worst}"
    for seed in (1, 2):
        prompt, _ = tokens(seed)
        assert genai_greedy(out, prompt) == reference_greedy(model, prompt)


def test_moe_routing_matters(gemma4_moe, tmp_path):
    """Every expert mixed (top 4 of 4) instead of the top 2 misses transformers by far more than the tolerance."""
    import dataclasses

    from onnxforge.archs import gemma4 as family
    from onnxforge.archs.registry import REGISTRY

    folder, model = gemma4_moe
    arch = REGISTRY["Gemma4ForCausalLM"]

    def hook(cfg):
        out = family._gemma4(cfg)
        return {**out, "moe": dataclasses.replace(out["moe"], top_k=4)}

    try:
        REGISTRY["Gemma4ForCausalLM"] = dataclasses.replace(arch, hook=hook)
        onnxforge.build(folder, tmp_path / "out", "fp32")
    finally:
        REGISTRY["Gemma4ForCausalLM"] = arch
    assert diff(tmp_path / "out", model) > 100 * FP32_TOL


def test_moe_wrapper(tmp_path):
    folder = tmp_path / "wrapper"
    model = make_wrapper(folder, **MOE)
    _router_scales(model)
    model.save_pretrained(folder, safe_serialization=True)
    out = tmp_path / "out"
    onnxforge.build(folder, out, "fp32")
    worst = diff(out, model)
    assert worst < FP32_TOL, f"max abs diff vs transformers {worst}"
    prompt, _ = tokens(1)
    assert genai_greedy(out, prompt) == reference_greedy(model, prompt)


def selection_margins(model, ids) -> np.ndarray:
    """Per position, the smallest gap over the layers between the k-th and (k+1)-th router probability."""
    gaps = []
    hooks = [layer.router.register_forward_hook(
        lambda mod, inp, out: gaps.append((lambda s: s[:, mod.config.top_k_experts - 1] - s[:, mod.config.top_k_experts])(
            torch.sort(out[0], -1, descending=True).values).numpy())) for layer in model.model.layers]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return np.min(gaps, axis=0)


def test_moe_fp16_and_int4(tmp_path):
    """fp16: the family bound (2% of the logit range) wherever transformers' top-2 selection has a margin above
    fp16's rounding (1e-3) in every layer; at a near tie (this model has two: margins 8e-5 and 8e-4) fp16 may
    pick the other expert, as any fp16 router would; >= 90% equal argmax everywhere."""
    from conftest import prompt_and_decode

    folder = tmp_path / "model"
    model = make_causal(folder, **MOE)
    _router_scales(model)
    model.save_pretrained(folder, safe_serialization=True)
    onnxforge.build(folder, tmp_path / "fp16", "fp16")
    prompt, decode = prompt_and_decode()
    ref = reference_logits(model, prompt + decode)
    got = onnx_step_logits(tmp_path / "fp16", prompt, decode).astype(np.float32)
    clear = selection_margins(model, prompt + decode) > 1e-3
    assert clear.mean() > 0.75
    assert np.abs(got - ref)[clear].max() < 0.02 * (ref.max() - ref.min())
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
    check_int4(folder, tmp_path / "int4", model=model)  # the experts' two MatMuls at int4 (tests/quant_ref.py)


PLE = dict(hidden_size_per_layer_input=8, vocab_size_per_layer_input=320, num_kv_shared_layers=2,
           use_double_wide_mlp=True)  # transformers runs KV sharing only with per-layer inputs (its slicing)


@pytest.fixture(scope="module")
def gemma4_ple(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gemma4_ple")
    return folder, make_causal(folder, **PLE)


def test_per_layer_inputs_and_kv_sharing(gemma4_ple, tmp_path):
    folder, model = gemma4_ple
    spec = spec_of(folder)
    assert [layer.kv_source for layer in spec.layers] == [-1, -1, 0, 1]
    assert [layer.mlp_size for layer in spec.layers] == [0, 0, 192, 192] and spec.per_layer_input == 8
    assert [layer.k_eq_v for layer in spec.layers] == [False, True, False, False]  # layer 3 has no k/v at all
    out = tmp_path / "out"
    onnxforge.build(folder, out, "fp32")
    worst = diff(out, model)
    assert worst < FP32_TOL, f"max abs diff vs transformers {worst}"
    report = json.loads((out / "build_report.json").read_text())
    assert not report["unread_tensors"]
    for seed in (1, 2):
        prompt, _ = tokens(seed)
        assert genai_greedy(out, prompt) == reference_greedy(model, prompt)


def test_per_layer_inputs_and_kv_sharing_wrapper(tmp_path):
    folder = tmp_path / "wrapper"
    model = make_wrapper(folder, **PLE)
    out = tmp_path / "out"
    onnxforge.build(folder, out, "fp32")
    worst = diff(out, model)
    assert worst < FP32_TOL, f"max abs diff vs transformers {worst}"
    prompt, _ = tokens(1)
    assert genai_greedy(out, prompt) == reference_greedy(model, prompt)


def test_per_layer_inputs_need_token_ids(gemma4_ple, tmp_path):
    from onnxforge.quant.recipe import Recipe

    folder, _ = gemma4_ple
    with pytest.raises(ConfigError, match="exclude_embeds"):
        onnxforge.build(folder, tmp_path / "out", recipe=Recipe(precision="fp32", exclude_embeds=True))
    assert not (tmp_path / "out").exists()


def test_per_layer_inputs_fp16_and_int4(tmp_path):
    folder = tmp_path / "model"
    model = make_causal(folder, **PLE)
    check_fp16(folder, model, tmp_path / "fp16")
    check_int4(folder, tmp_path / "int4", model=model)


def test_verify_reads_the_dense_experts_back(gemma4_moe, tmp_path):
    """verify's conversion reference holds the int4 build's own experts (the two MatMuls of graph/dense_experts.py
    read back into transformers' stacked parameters) and the layer scalars (buffers): nothing kept original."""
    from onnxforge.quant.recipe import Recipe
    from onnxforge.verify.parity import load_reference
    from onnxforge.verify.stored import load_stored_weights

    folder, _ = gemma4_moe
    out = tmp_path / "int4"
    onnxforge.build(folder, out, recipe=Recipe(precision="int4", method="rtn", accuracy_level=0))
    report = load_stored_weights(load_reference(folder)[0], out)
    experts = {k: v for k, v in report.errors.items() if ".experts." in k}
    assert len(experts) == 2 * 4 and 0 < max(experts.values()) < 0.2, experts
    assert not report.kept, report.kept
