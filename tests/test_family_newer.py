"""Seed-OSS, InternLM3, HunYuan dense, EXAONE 4 and the Qwen3-VL / Mistral 3 text decoders (archs/newer.py):
fp32 against transformers over a prefill and 24 cached decode steps, genai's greedy tokens, int4 and fp16.

The tiny models exercise each quirk: Seed-OSS's q/k/v and o biases (attention_out_bias); InternLM3 saved by
transformers as Llama, then given the published spelling (architectures InternLM3ForCausalLM, qkv_bias /
bias, an auto_map that is never followed); HunYuan's q/k norms after the rotary and its NTK-alpha rope
(alpha 1000); EXAONE 4's post-norms, q/k norms, a window of 6 on its sliding layers and no rotary on the
full ones; the wrappers with a tiny vision tower whose weights are left unread.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import onnx_step_logits, reference_logits, tiny
from family_check import check_fp16, check_fp32, check_int4

import onnxforge
from onnxforge.archs.registry import architecture_for
from onnxforge.errors import ConfigError, UnsupportedArchitectureError
from onnxforge.quant.recipe import Recipe

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

DECODE = 24
SMALL = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=97)
CONFIGS = {
    "seed_oss": dict(cls="SeedOssConfig", **SMALL, num_hidden_layers=2, attention_out_bias=True),
    "internlm3": dict(cls="InternLM3Config", **SMALL, num_hidden_layers=2, qkv_bias=True, bias=True),
    "hunyuan": dict(cls="HunYuanDenseV1Config", **SMALL, num_hidden_layers=2,
                    rope_parameters={"rope_type": "dynamic", "alpha": 1000.0, "factor": 1.0, "rope_theta": 10000.0}),
    "exaone4": dict(cls="Exaone4Config", **SMALL, num_hidden_layers=4, sliding_window=6, sliding_window_pattern=2),
}
ARCH = {"seed_oss": "SeedOssForCausalLM", "internlm3": "InternLM3ForCausalLM", "hunyuan": "HunYuanDenseV1ForCausalLM",
        "exaone4": "Exaone4ForCausalLM", "qwen3_vl": "Qwen3VLForConditionalGeneration",
        "mistral3": "Mistral3ForConditionalGeneration"}
VL = {
    "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration",
                 dict(text_config={**SMALL, "num_hidden_layers": 2, "rope_parameters": {
                     "rope_type": "default", "rope_theta": 50000.0, "mrope_section": [6, 5, 5], "mrope_interleaved": True}},
                      vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                                         patch_size=4, deepstack_visual_indexes=[0]), tie_word_embeddings=False)),
    "mistral3": ("Mistral3Config", "Mistral3ForConditionalGeneration",
                 dict(text_config={"model_type": "mistral", **SMALL, "num_hidden_layers": 2, "sliding_window": None,
                                   "rope_theta": 1e6},
                      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, head_dim=16, image_size=28, patch_size=14),
                      tie_word_embeddings=False)),
}


def _published_internlm3(folder) -> None:
    """config.json as internlm/internlm3-8b-instruct spells it (transformers saved it as Llama)."""
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg["qkv_bias"], cfg["bias"] = cfg.pop("attention_bias"), cfg.pop("mlp_bias")
    cfg.update(architectures=["InternLM3ForCausalLM"],
               auto_map={"AutoModelForCausalLM": "modeling_internlm3.InternLM3ForCausalLM"})
    path.write_text(json.dumps(cfg))


def _make_vl(name: str, folder):
    config_cls, model_cls, kw = VL[name]
    text = {**kw["text_config"], "vocab_size": tiny.VOCAB, "max_position_embeddings": 256, "bos_token_id": 1,
            "eos_token_id": 0, "pad_token_id": 0}
    config = getattr(transformers, config_cls)(**{**kw, "text_config": text})
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    tiny.spread_weights(model)
    model.generation_config.eos_token_id = 0
    model.save_pretrained(folder)
    tiny.tokenizer_files(folder)
    return model


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            folder = tmp_path_factory.mktemp(name)
            model = _make_vl(name, folder) if name in VL else tiny.make_model(name, folder, **CONFIGS[name])
            if name == "internlm3":
                _published_internlm3(folder)
            cache[name] = (folder, model)
        return cache[name]

    return get


def long_decode_diff(out, model) -> float:
    """Prefill of 16 tokens then 24 single-token decode steps through the carried KV cache."""
    rng = np.random.default_rng(7)
    prompt, decode = rng.integers(2, tiny.VOCAB, 16).tolist(), rng.integers(2, tiny.VOCAB, DECODE).tolist()
    ref = reference_logits(model, prompt + decode)
    got = onnx_step_logits(out, prompt, decode)
    assert got.shape == ref.shape
    return float(np.abs(got - ref).max())


def _gqa(out) -> list[dict]:
    g = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    return [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in g.node
            if n.op_type == "GroupQueryAttention"]


def _nodes(out) -> set[str]:
    return {n.name for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node}


@pytest.mark.parametrize("name", list(ARCH))
def test_fp32(family, tmp_path, name):
    folder, model = family(name)
    out = tmp_path / "out"
    check_fp32(folder, model, out)  # 8 decode steps and genai's 20 greedy tokens
    assert long_decode_diff(out, model) < 1e-4
    cfg = json.loads((out / "genai_config.json").read_text())
    assert cfg["model"]["type"] == architecture_for(json.loads((folder / "config.json").read_text())).model_type
    gqa, nodes = _gqa(out), _nodes(out)
    if name == "seed_oss":
        assert {"/model/layers.0/attn/qkv_proj/Add", "/model/layers.0/attn/o_proj/Add"} <= nodes
        assert "/model/layers.0/mlp/down_proj/Add" not in nodes
    if name == "internlm3":
        assert {"/model/layers.0/attn/o_proj/Add", "/model/layers.0/mlp/down_proj/Add"} <= nodes
    if name == "hunyuan":  # the rotary before the norms, outside GQA
        assert all(a.get("do_rotary", 0) == 0 for a in gqa)
        assert {"/model/layers.0/attn/q_rotary/RotaryEmbedding", "/model/layers.0/attn/q_norm/LayerNorm"} <= nodes
    if name == "exaone4":
        assert [a.get("do_rotary", 0) for a in gqa] == [1, 0, 1, 0]
        assert [a["local_window_size"] for a in gqa] == [6, -1, 6, -1]
        assert model.config.layer_types == ["sliding_attention", "full_attention"] * 2
    if name in VL:
        report = json.loads((out / "build_report.json").read_text())
        assert any("left unread" in n for n in report["notes"]), report["notes"]


def test_hunyuan_norms_after_rotary_are_load_bearing(family, tmp_path):
    """The same weights with the norms before the rotary (Qwen3's order) do not match transformers."""
    import dataclasses

    folder, model = family("hunyuan")
    cfg = json.loads((folder / "config.json").read_text())
    arch = architecture_for(cfg)
    spec = arch.make_spec(cfg)
    assert spec.rope.theta == pytest.approx(10000.0 * 1000.0 ** (32 / 30))
    swapped = dataclasses.replace(arch, spec={**arch.spec, "attention.qk_norm_after_rope": False})
    from onnxforge.archs import registry

    registry.REGISTRY[arch.name] = swapped
    try:
        onnxforge.build(folder, tmp_path / "before", "fp32")
    finally:
        registry.REGISTRY[arch.name] = arch
    assert long_decode_diff(tmp_path / "before", model) > 1e-2


class Renamed:
    """A wrapper model whose parameters answer to the checkpoint's names (quant_ref reads them by those):
    Mistral 3 saves its text decoder as `language_model.model.*` and `language_model.lm_head`."""

    def __init__(self, model):
        self.model = model

    def named_parameters(self):
        for n, p in self.model.named_parameters():
            yield n.replace("model.language_model.", "language_model.model.").replace(
                "lm_head.", "language_model.lm_head."), p

    def __call__(self, *args, **kw):
        return self.model(*args, **kw)

    def __getattr__(self, name):
        return getattr(self.model, name)


@pytest.mark.parametrize("name", list(ARCH))
def test_int4(family, tmp_path, name):
    import copy

    folder, model = family(name)
    ref = None
    if name in VL:  # a copy: the reference's weights are replaced by their dequantized values
        ref = copy.deepcopy(model) if name == "qwen3_vl" else Renamed(copy.deepcopy(model))
    check_int4(folder, tmp_path / "out", model=ref)


@pytest.mark.parametrize("name", list(ARCH))
def test_fp16(family, tmp_path, name):
    folder, model = family(name)
    check_fp16(folder, model, tmp_path / "out")


def test_internlm2_is_refused_by_name():
    with pytest.raises(UnsupportedArchitectureError, match="remote code"):
        architecture_for({"architectures": ["InternLM2ForCausalLM"]})


def test_internlm3_unequal_biases_are_refused_as_transformers_does():
    raw = {"architectures": ["InternLM3ForCausalLM"], "model_type": "internlm3", "qkv_bias": True, "bias": False}
    with pytest.raises(ConfigError, match="qkv_bias and bias differ"):
        architecture_for(raw).make_spec(raw)
    with pytest.raises(Exception, match="qkv_bias. different from .bias"):
        transformers.InternLM3Config(qkv_bias=True, bias=False)


def test_mistral3_other_text_models_are_refused():
    raw = {"architectures": ["Mistral3ForConditionalGeneration"], "model_type": "mistral3",
           "text_config": {"model_type": "ministral3", "hidden_size": 64, "num_attention_heads": 4,
                           "num_hidden_layers": 2, "vocab_size": 320, "intermediate_size": 97}}
    with pytest.raises(ConfigError, match="ministral3"):
        architecture_for(raw).make_spec(raw)


# -- GLM-4.5 / 4.6 MoE ---------------------------------------------------------------------------------------
GLM = dict(cls="Glm4MoeConfig", **SMALL, num_hidden_layers=3, moe_intermediate_size=32, n_routed_experts=8,
           num_experts_per_tok=2, n_shared_experts=2, first_k_dense_replace=1, use_qk_norm=True, attention_bias=True,
           routed_scaling_factor=2.5)


def make_glm(folder, **overrides):
    model = tiny.make_model("glm4_moe", folder, **{**GLM, **overrides})
    with torch.no_grad():  # a selection bias that changes which experts run
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.copy_(torch.linspace(-0.3, 0.3, 8).flip(0))
    model.save_pretrained(folder, safe_serialization=True)
    return model


@pytest.fixture(scope="module")
def glm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("glm4_moe")
    return folder, make_glm(folder)


def test_glm4_moe_fp32(glm, tmp_path):
    folder, model = glm
    out = tmp_path / "out"
    check_fp32(folder, model, out)
    assert long_decode_diff(out, model) < 1e-4
    gqa, nodes = _gqa(out), _nodes(out)
    g = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    shapes = {t.name: tuple(t.dims) for t in g.initializer}
    assert shapes["cos_cache"] == (256, 8)  # rotary 16 of a head of 32 (partial_rotary_factor 0.5)
    assert "/model/layers.0/mlp/down_proj/MatMul" in nodes and "/model/layers.1/moe/MoE" in nodes
    assert "/model/layers.1/shared_expert/down_proj/MatMul" in nodes
    assert {"/model/layers.0/attn/q_norm/LayerNorm", "/model/layers.0/attn/qkv_proj/Add"} <= nodes
    assert all(a["do_rotary"] == 1 for a in gqa)


def test_glm4_moe_selection_bias_and_scale_are_load_bearing(glm, tmp_path):
    """Without the selection bias (or with routed_scaling_factor 1) transformers' own logits move by far more
    than the tolerance: the test above would catch either being dropped."""
    import copy

    folder, model = glm
    rng = np.random.default_rng(7)
    ids = rng.integers(2, tiny.VOCAB, 24).tolist()
    ref = reference_logits(model, ids)
    for change in ("bias", "scale"):
        other = copy.deepcopy(model)
        with torch.no_grad():
            for layer in other.model.layers[1:]:
                if change == "bias":
                    layer.mlp.gate.e_score_correction_bias.zero_()
                else:
                    layer.mlp.gate.routed_scaling_factor = 1.0
        assert np.abs(reference_logits(other, ids) - ref).max() > 1e-2, change


def test_glm4_moe_int4_and_fp16(glm, tmp_path):
    from moe_check import moe_reference

    folder, model = glm
    rng = np.random.default_rng(7)
    prompt, decode = rng.integers(2, tiny.VOCAB, 16).tolist(), rng.integers(2, tiny.VOCAB, DECODE).tolist()
    out = tmp_path / "int4"
    onnxforge.build(folder, out, recipe=Recipe(precision="int4", accuracy_level=0))
    assert "/model/layers.1/moe/QMoE" in _nodes(out)
    got = onnx_step_logits(out, prompt, decode)
    ref = reference_logits(moe_reference(folder, out), prompt + decode)  # MatMulNBits and QMoE weights dequantized
    assert np.abs(got - ref).max() < 1e-4, np.abs(got - ref).max()
    out = tmp_path / "fp16"
    onnxforge.build(folder, out, "fp16")
    ref = reference_logits(model, prompt + decode)
    got = onnx_step_logits(out, prompt, decode).astype(np.float32)
    close = np.abs(got - ref).max(-1) < 0.02 * (ref.max() - ref.min())  # per position: a near-tied router may flip
    assert close.mean() >= 0.9, close.mean()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_glm4_moe_group_limited_selection(tmp_path):
    """n_group 4 / topk_group 2 (transformers' Glm4MoeTopkRouter: groups scored by their two best biased scores,
    the top k from the best two groups): fp32 logits and greedy equal transformers'; a grouping the experts do not
    split into is one ConfigError."""
    folder = tmp_path / "hf"
    model = make_glm(folder, n_group=4, topk_group=2)
    check_fp32(folder, model, tmp_path / "out")
    g = onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False).graph
    assert any("group" in n.name.lower() for n in g.node)  # the group mask is in the graph
    import copy

    ids = np.random.default_rng(7).integers(2, tiny.VOCAB, 24).tolist()
    ungrouped = copy.deepcopy(model)
    for layer in ungrouped.model.layers[1:]:
        layer.mlp.gate.topk_group = 4
    assert np.abs(reference_logits(ungrouped, ids) - reference_logits(model, ids)).max() > 1e-3  # load-bearing
    raw = {"architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", **SMALL, "num_hidden_layers": 2,
           "vocab_size": 320, "n_routed_experts": 8, "n_group": 3, "topk_group": 2}
    with pytest.raises(ConfigError, match="n_group 3"):
        architecture_for(raw).make_spec(raw)


def test_seed_oss_gguf_from_llamacpps_converter(tmp_path):
    """A GGUF written by llama.cpp's own convert_hf_to_gguf.py (tests/real_converter.py) from a tiny Seed-OSS
    as published (no o_proj bias): the fp32 build's logits equal transformers' over 24 cached decode steps."""
    from real_converter import real_convert

    model = tiny.make_model("seed_oss", tmp_path / "hf", **{**CONFIGS["seed_oss"], "attention_out_bias": False})
    path = real_convert(tmp_path / "hf", tmp_path / "hf" / "tiny.gguf", "f32", pre="gpt-2")
    out = tmp_path / "out"
    onnxforge.build(path, out, "fp32")
    assert long_decode_diff(out, model) < 1e-4
    report = json.loads((out / "build_report.json").read_text())
    assert report["architecture"] == "SeedOssForCausalLM" and not report.get("unread_tensors"), report


@pytest.mark.parametrize("window", [6, None])
def test_exaone4_gguf_from_llamacpps_converter(tmp_path, window):
    """EXAONE 4 converted by llama.cpp's convert_hf_to_gguf.py: with a window (its per-layer pattern: sliding
    layers rotate, full ones do not) and without one (every layer full and rotated, not the config class's
    default window of 4096), the fp32 build equals transformers."""
    from real_converter import real_convert

    types = {} if window else {"layer_types": ["full_attention"] * 4}  # Exaone4Config divides by the pattern (0)
    model = tiny.make_model("exaone4", tmp_path / "hf", **{**CONFIGS["exaone4"], "sliding_window": window, **types})
    path = real_convert(tmp_path / "hf", tmp_path / "hf" / "tiny.gguf", "f32", pre="gpt-2")
    out = tmp_path / "out"
    onnxforge.build(path, out, "fp32")
    assert long_decode_diff(out, model) < 1e-4
    gqa = _gqa(out)
    assert [a.get("do_rotary", 0) for a in gqa] == ([1, 0, 1, 0] if window else [1] * 4)
    assert [a["local_window_size"] for a in gqa] == ([6, -1, 6, -1] if window else [-1] * 4)


def test_hunyuan_gguf_from_llamacpps_converter(tmp_path):
    """HunYuan dense converted by llama.cpp's convert_hf_to_gguf.py (which bakes NTK-alpha into rope.freq_base and
    asserts a 32k or 256k max_position_embeddings): the fp32 build equals transformers."""
    from real_converter import real_convert

    model = tiny.make_model("hunyuan", tmp_path / "hf", **{**CONFIGS["hunyuan"], "max_position_embeddings": 32768})
    path = real_convert(tmp_path / "hf", tmp_path / "hf" / "tiny.gguf", "f32", pre="gpt-2")
    out = tmp_path / "out"
    onnxforge.build(path, out, "fp32")
    assert long_decode_diff(out, model) < 1e-4
    assert "/model/layers.0/attn/q_rotary/RotaryEmbedding" in _nodes(out)


def test_internlm3_gguf_builds_as_llama(tmp_path):
    """llama.cpp's converter writes InternLM3 as a llama GGUF (Q/K rows permuted, SentencePiece vocabulary), which
    onnxforge reads as LlamaForCausalLM: a tiny InternLM3 as published (no biases) equals transformers."""
    from real_converter import real_convert, sentencepiece_tokenizer

    model = tiny.make_model("internlm3", tmp_path / "hf", **{**CONFIGS["internlm3"], "qkv_bias": False, "bias": False})
    _published_internlm3(tmp_path / "hf")
    sentencepiece_tokenizer(tmp_path / "hf", tiny.VOCAB)
    path = real_convert(tmp_path / "hf", tmp_path / "hf" / "tiny.gguf", "f32")
    out = tmp_path / "out"
    onnxforge.build(path, out, "fp32")
    assert json.loads((out / "build_report.json").read_text())["architecture"] == "LlamaForCausalLM"
    assert long_decode_diff(out, model) < 1e-4


@pytest.mark.parametrize("name", list(VL))
def test_vl_text_decoder_gguf_from_llamacpps_converter(tmp_path, name):
    """The text GGUF llama.cpp's convert_hf_to_gguf.py writes from a Qwen3-VL (qwen3vl: mrope sections, deepstack
    count) or Mistral 3 (mistral3: Q/K permuted, no window) checkpoint builds as the plain text decoder, equal to
    the wrapper in transformers on text."""
    from real_converter import real_convert

    folder = tmp_path / "hf"
    folder.mkdir()
    model = _make_vl(name, folder)
    path = real_convert(folder, folder / "tiny.gguf", "f32", pre="gpt-2")
    out = tmp_path / "out"
    onnxforge.build(path, out, "fp32")
    assert long_decode_diff(out, model) < 1e-4
    assert all(a["local_window_size"] == -1 for a in _gqa(out))
