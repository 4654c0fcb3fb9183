"""OLMo 1, 2 and 3: fp32, int4, fp16, config spellings and GGUF.

Tiny models exercise each quirk: OLMo 1's LayerNorm without weights (eps 1e-5 whatever the config),
clip_qkv small enough that the clamp changes the logits, biases on q/k/v/o, one KV head; OLMo 2's
post-norms and q/k RMSNorm over the whole projection; OLMo 3's three sliding layers (window 6, shorter
than the 24-token test sequence) and one full layer, the full layer with yarn rope (its own theta and
attention factor), the sliding layers with the default rope.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import genai_greedy, onnx_step_logits, prompt_and_decode, reference_greedy, reference_logits
from family_check import check_fp16, check_fp32, check_int4

import onnxforge
from onnxforge.archs.registry import architecture_for

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROPE3 = {"full_attention": {"rope_type": "yarn", "rope_theta": 50_000.0, "factor": 4.0,
                            "original_max_position_embeddings": 64, "attention_factor": 1.1},
         "sliding_attention": {"rope_type": "default", "rope_theta": 50_000.0}}
CONFIGS = {
    "olmo": dict(cls="OlmoConfig", hidden_size=64, num_attention_heads=2, num_key_value_heads=1, intermediate_size=97,
                 num_hidden_layers=2, clip_qkv=1.5, attention_bias=True),  # head 32
    "olmo2": dict(cls="Olmo2Config", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=97,
                  num_hidden_layers=2, rms_norm_eps=1e-6),  # head 16
    "olmo3": dict(cls="Olmo3Config", hidden_size=64, num_attention_heads=2, num_key_value_heads=1, intermediate_size=97,
                  num_hidden_layers=4, sliding_window=6, rope_parameters=ROPE3),
}


@pytest.fixture(scope="module")
def olmo(tmp_path_factory):
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
def test_fp32(olmo, tmp_path, name):
    folder, model = olmo(name)
    out = tmp_path / "out"
    check_fp32(folder, model, out)
    g = _graph(out)
    names = {n.name: n for n in g.node}
    gqa = [_attrs(n) for n in g.node if n.op_type == "GroupQueryAttention"]
    if name == "olmo":
        norms = [n for n in g.node if n.op_type in ("LayerNormalization", "SkipLayerNormalization")]
        assert norms and all(_attrs(n)["epsilon"] == pytest.approx(1e-5) for n in norms)
        assert not any(i.name.endswith("layernorm.weight") for i in g.initializer)  # no weights to read
        assert sum(n.op_type == "Clip" for n in g.node) == model.config.num_hidden_layers  # on the packed qkv
    else:
        assert not any("input_layernorm" in n for n in names)  # post-norms only
        assert "/model/layers.0/attn/q_norm/LayerNorm" in names and "/model/layers.0/post_feedforward_layernorm/LayerNorm" in names
    windows = [6 if t == "sliding_attention" else -1 for t in getattr(model.config, "layer_types", None) or []]
    assert [a["local_window_size"] for a in gqa] == (windows or [-1] * model.config.num_hidden_layers)
    if name == "olmo3":
        tables = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(out / "model.onnx")).graph.initializer
                  if "_cache" in t.name}
        assert set(tables) == {"cos_cache", "sin_cache", "cos_cache_sliding_attention", "sin_cache_sliding_attention"}
        full = np.cos(np.arange(256)[:, None] * 50_000.0 ** -(np.arange(0, 32, 2) / 32))  # the default table
        assert np.abs(tables["cos_cache_sliding_attention"] - full).max() < 1e-4  # float32
        assert np.abs(tables["cos_cache"] - full).max() > 0.05  # yarn, times the attention factor
        cos_in = {n.input[7] for n in g.node if n.op_type == "GroupQueryAttention"}
        assert len(cos_in) == 2


def test_olmo_clip_qkv_changes_the_logits(olmo):
    """The test model's q/k/v exceed clip_qkv, so the clamp matters (and fp32 matched with it)."""
    _, model = olmo("olmo")
    ids = sum(prompt_and_decode(), [])
    clipped = reference_logits(model, ids)
    model.config.clip_qkv = None
    try:
        assert np.abs(reference_logits(model, ids) - clipped).max() > 0.1
    finally:
        model.config.clip_qkv = CONFIGS["olmo"]["clip_qkv"]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_int4(olmo, tmp_path, name):
    folder, _ = olmo(name)
    out = tmp_path / "out"
    check_int4(folder, out)
    nodes = {n.name: n.op_type for n in _graph(out).node}
    assert nodes["/model/layers.0/attn/qkv_proj/MatMul"] == nodes["/lm_head/MatMul"] == "MatMulNBits"


@pytest.mark.parametrize("name", ["olmo", "olmo3"])
def test_fp16(olmo, tmp_path, name):
    folder, model = olmo(name)
    check_fp16(folder, model, tmp_path / "out")


# -- config.json spellings ----------------------------------------------------------------------------
def _olmo3_raw(**kw) -> dict:
    return {"architectures": ["Olmo3ForCausalLM"], "model_type": "olmo3", "vocab_size": 320, "hidden_size": 64,
            "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 97, "num_hidden_layers": 4,
            "max_position_embeddings": 256, "sliding_window": 6, **kw}


def test_olmo3_saved_by_transformers_5_and_the_4x_spelling_agree(olmo):
    folder, model = olmo("olmo3")
    import json

    saved = json.loads((folder / "config.json").read_text())
    spec = architecture_for(saved).make_spec(saved)
    ropes = dict(spec.ropes)
    assert (ropes["full_attention"].kind, ropes["full_attention"].theta) == ("yarn", 50_000.0)
    assert (ropes["sliding_attention"].kind, ropes["sliding_attention"].theta) == ("default", 50_000.0)
    assert [layer.rope for layer in spec.layers] == model.config.layer_types
    # the 4.x spelling (OLMo 3's own config.json files): rope_theta + rope_scaling for the full layers
    scaling = {k: v for k, v in ROPE3["full_attention"].items() if k != "rope_theta"}
    legacy = _olmo3_raw(rope_theta=50_000.0, rope_scaling=scaling, bos_token_id=1, eos_token_id=0, pad_token_id=0)
    assert architecture_for(legacy).make_spec(legacy) == spec
    # no rope_scaling, no layer_types, no rope_theta: every fourth layer full, 500000 for both tables
    bare = architecture_for(_olmo3_raw()).make_spec(_olmo3_raw())
    assert [layer.window for layer in bare.layers] == [6, 6, 6, 0]
    assert {r.theta for _, r in bare.ropes} == {500_000.0} and {r.kind for _, r in bare.ropes} == {"default"}
    parsed = transformers.Olmo3Config(**{k: v for k, v in _olmo3_raw().items() if k != "architectures"})
    assert parsed.rope_parameters["full_attention"] == {"rope_type": "default", "rope_theta": 500_000.0}
    assert parsed.rope_parameters["sliding_attention"] == {"rope_type": "default", "rope_theta": 500_000.0}


MINIMAL = {"OlmoForCausalLM": {"model_type": "olmo"}, "Olmo2ForCausalLM": {"model_type": "olmo2"},
           "Olmo3ForCausalLM": {"model_type": "olmo3"}}


@pytest.mark.parametrize("arch", list(MINIMAL))
def test_missing_keys_take_transformers_defaults(arch):
    raw = {"architectures": [arch], **MINIMAL[arch]}
    spec = architecture_for(raw).make_spec(raw)
    c = transformers.AutoConfig.for_model(**MINIMAL[arch])
    a = spec.attention
    assert (spec.hidden_size, spec.num_layers, spec.vocab_size, spec.mlp.intermediate_size, spec.context_length) == (
        c.hidden_size, c.num_hidden_layers, c.vocab_size, c.intermediate_size, c.max_position_embeddings)
    assert (a.num_heads, a.num_kv_heads, a.head_dim) == (c.num_attention_heads, c.num_key_value_heads,
                                                         c.hidden_size // c.num_attention_heads)
    assert spec.norm.eps == getattr(c, "rms_norm_eps", 1e-5) and spec.tie_embeddings == c.tie_word_embeddings
    assert spec.mlp.activation == c.hidden_act and a.clip_qkv == (getattr(c, "clip_qkv", None) or 0.0)
    params = c.rope_parameters if "full_attention" in c.rope_parameters else {"full_attention": c.rope_parameters}
    types = getattr(c, "layer_types", None) or ["full_attention"] * c.num_hidden_layers
    assert spec.layer_windows == tuple(c.sliding_window if t == "sliding_attention" else 0 for t in types)
    for layer, t in zip(spec.layers, types):
        assert spec.rope_for(layer.rope).theta == params.get(t, params["full_attention"])["rope_theta"]


# -- GGUF: written as llama.cpp's conversion/olmo.py OlmoModel / Olmo2Model write it --------------------
def write_olmo_gguf(path, model, vocab: dict) -> None:
    """TextModel.set_gguf_parameters plus OlmoModel's (layer_norm_eps 1e-5, clamp_kqv, Q/K permuted) or
    Olmo2Model's (sliding_window and its per-layer pattern); gguf's HF->GGUF tensor names."""
    import gguf
    from test_gguf_source import add_vocab, llamacpp_permute, text_model_params, write_gguf_tensors

    c = model.config
    arch = "olmo" if c.model_type == "olmo" else "olmo2"
    w = gguf.GGUFWriter(path, arch)
    text_model_params(w, c)
    rope = c.rope_parameters.get("full_attention", c.rope_parameters)
    if rope["rope_type"] == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        if "attention_factor" in rope:
            w.add_rope_scaling_yarn_attn_factor(rope["attention_factor"])
    w.add_rope_freq_base(rope["rope_theta"])
    if arch == "olmo2":
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    if arch == "olmo":
        w.add_layer_norm_eps(1e-5)
        if c.clip_qkv is not None:
            w.add_clamp_kqv(c.clip_qkv)
    if c.model_type == "olmo3":
        w.add_sliding_window(c.sliding_window)
        w.add_sliding_window_pattern([t == "sliding_attention" for t in c.layer_types])
    add_vocab(w, vocab)
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    if arch == "olmo":  # OlmoModel.modify_tensors permutes the q/k weights (not biases) for llama.cpp's rotary
        for k in state:
            if k.endswith("q_proj.weight"):
                state[k] = llamacpp_permute(state[k], c.num_attention_heads, c.num_attention_heads)
            if k.endswith("k_proj.weight"):
                state[k] = llamacpp_permute(state[k], c.num_attention_heads, c.num_key_value_heads)
    write_gguf_tensors(w, state, arch, c.num_hidden_layers)


GGUF_CONFIGS = {**CONFIGS, "olmo": {**CONFIGS["olmo"], "attention_bias": False}}  # OlmoModel permutes no bias


@pytest.mark.parametrize("name", list(GGUF_CONFIGS))
def test_gguf_equals_the_hf_build(tmp_path, name):
    from test_gguf_source import train_byte_level_vocab
    from tiny import make_model

    vocab = train_byte_level_vocab()
    model = make_model(name, tmp_path / "hf", **GGUF_CONFIGS[name], vocab_size=len(vocab["tokens"]))
    path = tmp_path / f"{name}.gguf"
    write_olmo_gguf(path, model, vocab)
    onnxforge.build(tmp_path / "hf", tmp_path / "hf-out", "fp32")
    onnxforge.build(path, tmp_path / "gguf-out", "fp32")
    graphs = [_graph(tmp_path / o) for o in ("hf-out", "gguf-out")]
    attrs = [[(n.op_type, sorted(_attrs(n).items())) for n in g.node] for g in graphs]
    assert attrs[0] == attrs[1]  # same graph: norms, clip, windows, rope tables per layer type
    prompt, decode = prompt_and_decode()
    from_hf = onnx_step_logits(tmp_path / "hf-out", prompt, decode)
    from_gguf = onnx_step_logits(tmp_path / "gguf-out", prompt, decode)
    assert np.abs(from_gguf - from_hf).max() < 1e-5
    assert np.abs(from_gguf - reference_logits(model, prompt + decode)).max() < 1e-4
    if name == "olmo3":  # the GGUF's own tokenizer and genai config run in onnxruntime-genai
        assert genai_greedy(tmp_path / "gguf-out", prompt) == reference_greedy(model, prompt)
