"""Granite, SmolLM3, Nemotron and ERNIE 4.5 (dense): fp32, int4, fp16, config spellings and GGUF.

The tiny models exercise each quirk: Granite's four multipliers (none of them 1, an attention scale
far from 1/sqrt(head_dim)) with biases on q/k/v/o; SmolLM3's NoPE layers (every second layer here) and
its sliding window on those layers, tied embeddings; Nemotron's LayerNorm1p with bias and its own
norm_eps, squared-ReLU MLP without gate, partial rotary 0.5 of a head of 32; ERNIE 4.5's head_dim 48
(hidden 64 / 2 heads would be 32), biases everywhere, interleaved rotary, tied embeddings.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import genai_greedy, onnx_step_logits, prompt_and_decode, reference_greedy, reference_logits
from family_check import check_fp16, check_fp32, check_int4

import onnxforge
from onnxforge.archs.registry import architecture_for

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CONFIGS = {
    "granite": dict(cls="GraniteConfig", hidden_size=64, num_attention_heads=2, num_key_value_heads=1,
                    intermediate_size=97, num_hidden_layers=2, embedding_multiplier=6.0, residual_multiplier=0.4,
                    attention_multiplier=0.05, logits_scaling=4.0, attention_bias=True),
    "smollm3": dict(cls="SmolLM3Config", hidden_size=64, num_attention_heads=4, num_key_value_heads=1,
                    intermediate_size=97, num_hidden_layers=4, no_rope_layer_interval=2, use_sliding_window=True,
                    sliding_window=6),
    "nemotron": dict(cls="NemotronConfig", hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=97, num_hidden_layers=2, partial_rotary_factor=0.5, norm_eps=1e-3),
    "ernie4_5": dict(cls="Ernie4_5Config", hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=48,
                     intermediate_size=97, num_hidden_layers=2, use_bias=True),
}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    from tiny import make_model

    cache: dict = {}

    def get(name: str, **config):
        if name not in cache:
            folder = tmp_path_factory.mktemp(name)
            cache[name] = (folder, make_model(name, folder, **(config or CONFIGS[name])))
        return cache[name]

    return get


def _graph(out):
    return onnx.load(str(out / "model.onnx"), load_external_data=False).graph


def _attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fp32(family, tmp_path, name):
    folder, model = family(name)
    out = tmp_path / "out"
    check_fp32(folder, model, out)
    g = _graph(out)
    gqa = [_attrs(n) for n in g.node if n.op_type == "GroupQueryAttention"]
    ops = {n.op_type for n in g.node}
    c = model.config
    if name == "granite":
        assert [a["scale"] for a in gqa] == pytest.approx([0.05] * 2)
        assert {"/model/embed_tokens/Mul", "/lm_head/Div", "/model/layers.0/mlp/residual/Mul"} <= {n.name for n in g.node}
    if name == "smollm3":
        assert [a.get("do_rotary", 0) for a in gqa] == c.no_rope_layers == [1, 0, 1, 0]
        assert [a["local_window_size"] for a in gqa] == [-1, 6, -1, 6]  # the window is on the NoPE layers
        assert c.layer_types == ["full_attention", "sliding_attention"] * 2
    if name == "nemotron":
        norms = [n for n in g.node if n.op_type in ("LayerNormalization", "SkipLayerNormalization")]
        assert len(norms) == 5 and all(_attrs(n)["epsilon"] == pytest.approx(1e-3) for n in norms)
        assert "Sigmoid" not in ops and "/model/layers.0/mlp/up_proj/MatMul" in {n.name for n in g.node}
        shapes = {t.name: tuple(t.dims) for t in g.initializer}
        assert shapes["cos_cache"] == (c.max_position_embeddings, 8)  # rotary 16 of 32
    if name == "ernie4_5":
        assert all(a["rotary_interleaved"] == 1 for a in gqa)
        assert {"/model/layers.0/attn/qkv_proj/Add", "/model/layers.0/mlp/down_proj/Add"} <= {n.name for n in g.node}


def test_ernie_rotary_is_interleaved_in_transformers(family, tmp_path):
    """The same weights with the halves layout would not match: the interleave is load-bearing."""
    import dataclasses

    from onnxforge.spec import RopeSpec

    folder, model = family("ernie4_5")
    cfg = json.loads((folder / "config.json").read_text())
    spec = architecture_for(cfg).make_spec(cfg)
    assert spec.rope == RopeSpec(500_000.0, 48, interleaved=True)
    out = tmp_path / "halves"
    onnxforge.build(folder, out, "fp32")
    model_path = out / "model.onnx"
    m = onnx.load(str(model_path))
    for n in m.graph.node:
        for a in n.attribute:
            if a.name == "rotary_interleaved":
                a.i = 0
    onnx.save(m, str(model_path), save_as_external_data=False)
    prompt, decode = prompt_and_decode()
    assert np.abs(onnx_step_logits(out, prompt, decode) - reference_logits(model, prompt + decode)).max() > 1e-2
    assert dataclasses.replace(spec.rope, interleaved=False) != spec.rope


@pytest.mark.parametrize("name", list(CONFIGS))
def test_int4(family, tmp_path, name):
    folder, _ = family(name)
    out = tmp_path / "out"
    check_int4(folder, out)
    nodes = {n.name: n.op_type for n in _graph(out).node}
    assert nodes["/model/layers.0/attn/qkv_proj/MatMul"] == nodes["/lm_head/MatMul"] == "MatMulNBits"


@pytest.mark.parametrize("name", ["granite", "nemotron"])
def test_fp16(family, tmp_path, name):
    folder, model = family(name)
    check_fp16(folder, model, tmp_path / "out")


# -- config.json spellings ----------------------------------------------------------------------------
def test_smollm3_fills_no_rope_layers_and_layer_types_as_transformers():
    base = {"architectures": ["SmolLM3ForCausalLM"], "model_type": "smollm3", "vocab_size": 320, "hidden_size": 64,
            "num_attention_heads": 4, "num_key_value_heads": 1, "intermediate_size": 97, "num_hidden_layers": 8}
    for extra in ({}, {"use_sliding_window": True, "sliding_window": 16}, {"no_rope_layer_interval": 3},
                  {"use_sliding_window": True, "sliding_window": 16, "no_rope_layers": [1, 0, 0, 1, 1, 1, 0, 1]},
                  {"sliding_window": 16}):
        raw = {**base, **extra}
        spec = architecture_for(raw).make_spec(raw)
        c = transformers.SmolLM3Config(**{k: v for k, v in raw.items() if k != "architectures"})
        assert [layer.rope is not None for layer in spec.layers] == [bool(x) for x in c.no_rope_layers], extra
        assert spec.layer_windows == tuple(c.sliding_window if t == "sliding_attention" else 0
                                           for t in c.layer_types), extra


def test_granite_attention_multiplier_defaults_to_one():
    raw = {"architectures": ["GraniteForCausalLM"], "model_type": "granite"}
    spec = architecture_for(raw).make_spec(raw)
    assert (spec.attention.scale, spec.embedding_scale, spec.residual_scale, spec.logit_scale) == (1.0, 1.0, 1.0, 1.0)


MINIMAL = {"GraniteForCausalLM": {"model_type": "granite"}, "SmolLM3ForCausalLM": {"model_type": "smollm3"},
           "NemotronForCausalLM": {"model_type": "nemotron"}, "Ernie4_5ForCausalLM": {"model_type": "ernie4_5"}}


@pytest.mark.parametrize("arch", list(MINIMAL))
def test_missing_keys_take_transformers_defaults(arch):
    raw = {"architectures": [arch], **MINIMAL[arch]}
    spec = architecture_for(raw).make_spec(raw)
    c = transformers.AutoConfig.for_model(**MINIMAL[arch])
    a = spec.attention
    assert (spec.hidden_size, spec.num_layers, spec.vocab_size, spec.mlp.intermediate_size, spec.context_length) == (
        c.hidden_size, c.num_hidden_layers, c.vocab_size, c.intermediate_size, c.max_position_embeddings)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = c.num_key_value_heads or c.num_attention_heads  # NemotronConfig leaves None (its modeling fails)
    assert (a.num_heads, a.num_kv_heads, a.head_dim) == (c.num_attention_heads, kv_heads, head_dim)
    assert spec.norm.eps == getattr(c, "norm_eps", getattr(c, "rms_norm_eps", None))
    assert spec.mlp.activation == c.hidden_act and spec.tie_embeddings == c.tie_word_embeddings
    rope = c.rope_parameters
    assert spec.rope.theta == rope["rope_theta"]
    assert spec.rope.rotary_dim == int(head_dim * rope.get("partial_rotary_factor", 1.0))
    assert [layer.rope is not None for layer in spec.layers] == [bool(x) for x in getattr(
        c, "no_rope_layers", [1] * c.num_hidden_layers)]


# -- GGUF: written as llama.cpp's converter classes write these families ---------------------------------
def write_gguf(path, model, vocab: dict) -> None:
    """TextModel.set_gguf_parameters, then GraniteModel / SmolLM3Model (LlamaModel: vocab size, rope
    dimension, Q/K weights and biases permuted; Granite drops head_dim and writes its multipliers),
    NemotronModel (layer_norm_eps, partial rope dimension, no rope scaling, norm weights + 1) or
    Ernie4_5Model (nothing more); gguf's HF->GGUF tensor names."""
    import gguf
    from test_gguf_source import add_vocab, llamacpp_permute, text_model_params, write_gguf_tensors

    c = model.config
    arch = c.model_type
    hp = json.loads(c.to_json_string())  # the hparams the converter reads (config.json)
    if arch == "granite":
        hp.pop("head_dim", None)
    w = gguf.GGUFWriter(path, arch)
    text_model_params(w, c)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(hp.get("rms_norm_eps", hp.get("norm_eps")))
    if hp.get("head_dim") is not None:
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    if arch in ("granite", "smollm3", "nemotron"):
        w.add_vocab_size(c.vocab_size)
    if arch in ("granite", "smollm3"):
        w.add_rope_dimension_count(hp.get("head_dim") or c.hidden_size // c.num_attention_heads)
    if arch == "granite":
        w.add_attention_scale(c.attention_multiplier)
        w.add_embedding_scale(c.embedding_multiplier)
        w.add_residual_scale(c.residual_multiplier)
        w.add_logit_scale(c.logits_scaling)
    if arch == "nemotron":
        w.add_layer_norm_eps(c.norm_eps)
        w.add_rope_dimension_count(int(c.rope_parameters["partial_rotary_factor"] * c.hidden_size)
                                   // c.num_attention_heads)
        w.add_rope_scaling_type(gguf.RopeScalingType.NONE)
    add_vocab(w, vocab)
    if arch == "nemotron":
        w.add_pad_token_id(0)
        w.add_unk_token_id(1)
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    if c.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # save_pretrained leaves it out; the converter writes no `output`
    for k in state:
        if arch in ("granite", "smollm3") and (k.endswith("q_proj.weight") or k.endswith("q_proj.bias")):
            state[k] = llamacpp_permute(state[k], c.num_attention_heads, c.num_attention_heads)
        if arch in ("granite", "smollm3") and (k.endswith("k_proj.weight") or k.endswith("k_proj.bias")):
            state[k] = llamacpp_permute(state[k], c.num_attention_heads, c.num_key_value_heads)
        if arch == "nemotron" and k.endswith("norm.weight"):
            state[k] = state[k] + 1
    write_gguf_tensors(w, state, arch, c.num_hidden_layers)


GGUF_CONFIGS = {
    **CONFIGS,
    # SmolLM3-3B has no sliding window, and llama.cpp's smollm3 none: the converter writes no window
    "smollm3": {**CONFIGS["smollm3"], "use_sliding_window": False, "sliding_window": None,
                "no_rope_layer_interval": 4},
    # the converter's rope dimension is partial * hidden / heads: head_dim must be hidden / heads
}


@pytest.mark.parametrize("name", list(GGUF_CONFIGS))
def test_gguf_equals_the_hf_build(tmp_path, name):
    from test_gguf_source import sentencepiece_vocab, train_byte_level_vocab
    from tiny import make_model

    vocab = sentencepiece_vocab() if name in ("nemotron", "ernie4_5") else train_byte_level_vocab()
    model = make_model(name, tmp_path / "hf", **GGUF_CONFIGS[name], vocab_size=len(vocab["tokens"]))
    path = tmp_path / f"{name}.gguf"
    write_gguf(path, model, vocab)
    onnxforge.build(tmp_path / "hf", tmp_path / "hf-out", "fp32")
    onnxforge.build(path, tmp_path / "gguf-out", "fp32")
    graphs = [_graph(tmp_path / o) for o in ("hf-out", "gguf-out")]
    attrs = [[(n.op_type, sorted(_attrs(n).items())) for n in g.node] for g in graphs]
    assert attrs[0] == attrs[1]  # same graph: scales, NoPE layers, norms, partial / interleaved rotary
    prompt, decode = prompt_and_decode()
    from_hf = onnx_step_logits(tmp_path / "hf-out", prompt, decode)
    from_gguf = onnx_step_logits(tmp_path / "gguf-out", prompt, decode)
    assert np.abs(from_gguf - from_hf).max() < 1e-4
    assert np.abs(from_gguf - reference_logits(model, prompt + decode)).max() < 1e-4
    if name in ("smollm3", "ernie4_5"):  # the GGUF's own tokenizer and genai config run in onnxruntime-genai
        assert genai_greedy(tmp_path / "gguf-out", prompt) == reference_greedy(model, prompt)
