"""Gemma 1, 2, 3 and the Gemma 3 vision-language wrapper's text decoder: fp32, int4, fp16 and GGUF.

Tiny models exercise every quirk: (1 + weight) norms (q/k norms too), sqrt(hidden) embedding scale
(hidden 96: sqrt is not exact in fp16), GELU-tanh, head_dim independent of hidden / heads, one KV
head, an odd intermediate size, sandwich norms, query_pre_attn_scalar != head_dim, attention and
final softcaps small enough to bend the values, sliding and full layers with a window shorter than
the 24-token test sequence, Gemma 3's own rope base (and a linear scaling) on its global layers.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import prompt_and_decode, reference_logits
from family_check import check_fp16, check_fp32, check_int4

from onnxforge.archs.registry import architecture_for
from onnxforge.spec import RopeSpec

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

COMMON = dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=32, intermediate_size=97)
CONFIGS = {
    "gemma": dict(cls="GemmaConfig", **{**COMMON, "hidden_size": 96, "head_dim": 48}, num_hidden_layers=2),
    "gemma2": dict(cls="Gemma2Config", **COMMON, num_hidden_layers=3, sliding_window=6, query_pre_attn_scalar=20,
                   attn_logit_softcapping=3.0, final_logit_softcapping=4.0),
    "gemma3": dict(cls="Gemma3TextConfig", **COMMON, num_hidden_layers=3, sliding_window=6, query_pre_attn_scalar=20,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                   rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100.0},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}),
}


def make_gemma(name: str, folder, **config):
    """tests/tiny.py's model with the tied table scaled down: at tiny.py's spread, each token's own
    embedding dominates the logits and greedy decoding repeats one token, which would prove little."""
    from tiny import make_model

    model = make_model(name, folder, **config)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(0.2)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """name -> (checkpoint folder, transformers model), made once per module (configs hold lists)."""
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            folder = tmp_path_factory.mktemp(name)
            cache[name] = (folder, make_gemma(name, folder, **CONFIGS[name]))
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fp32(gemma, tmp_path, name):
    folder, model = gemma(name)
    check_fp32(folder, model, tmp_path / "out")
    g = onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False).graph
    gqa = [{a.name: a for a in n.attribute} for n in g.node if n.op_type == "GroupQueryAttention"]
    windows = [a["local_window_size"].i for a in gqa]
    types = getattr(model.config, "layer_types", None) or ["full_attention"] * model.config.num_hidden_layers
    assert windows == [model.config.sliding_window if t == "sliding_attention" else -1 for t in types]
    if name != "gemma":
        assert {round(a["softcap"].f, 6) for a in gqa} == {model.config.attn_logit_softcapping or 0.0}
        assert [a["scale"].f for a in gqa] == pytest.approx([model.config.query_pre_attn_scalar ** -0.5] * len(gqa))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_int4_shares_the_tied_table(gemma, tmp_path, name):
    folder, model = gemma(name)
    out = tmp_path / "out"
    check_int4(folder, out)
    g = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    by_output = {o: n for n in g.node for o in n.output}
    (gather,) = [n for n in g.node if n.op_type == "GatherBlockQuantized"]
    (head,) = [n for n in g.node if n.name == "/lm_head/MatMul"]
    assert head.op_type == "MatMulNBits"
    assert by_output[gather.input[0]].input[0] == head.input[1]  # Reshape of the lm_head's packed weights
    assert list(gather.input[2:]) == list(head.input[2:len(gather.input)])  # the same scales
    assert json.loads((out / "build_report.json").read_text())["shared_embeddings"]


@pytest.mark.parametrize("name", ["gemma", "gemma3"])
def test_fp16_rounds_the_embedding_scale_as_transformers(gemma, tmp_path, name):
    folder, model = gemma(name)
    out = tmp_path / "out"
    check_fp16(folder, model, out)
    g = onnx.load(str(out / "model.onnx")).graph
    (mul,) = [n for n in g.node if n.name == "/model/embed_tokens/Mul"]
    scale = {t.name: onnx.numpy_helper.to_array(t) for t in g.initializer}[mul.input[1]]
    embed = model.get_input_embeddings()
    expected = embed.embed_scale.to(torch.float16).item()  # transformers: embed_scale.to(weight.dtype)
    assert scale.dtype == np.float16 and float(scale) == expected
    if name == "gemma":
        assert expected != model.config.hidden_size ** 0.5  # sqrt(96) is not exact in fp16


# -- Gemma 3 configs: transformers 5.23's own file and the 4.x spelling give the same spec ------------
def _text_config(**kw) -> dict:
    base = dict(vocab_size=320, num_hidden_layers=8, sliding_window=16, **COMMON)
    return {**base, **kw}


def test_gemma3_config_saved_by_transformers_5(tmp_path):
    cfg = transformers.Gemma3TextConfig(**_text_config(),
                                        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                            "rope_theta": 1_000_000.0},
                                                         "sliding_attention": {"rope_type": "default",
                                                                               "rope_theta": 10_000.0}})
    cfg.architectures = ["Gemma3ForCausalLM"]
    cfg.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["transformers_version"] == transformers.__version__
    spec = architecture_for(saved).make_spec(saved)
    ropes = dict(spec.ropes)
    assert ropes["full_attention"] == RopeSpec(1_000_000.0, 32, "linear", 8.0)
    assert ropes["sliding_attention"] == RopeSpec(10_000.0, 32)
    assert [(layer.window, layer.rope) for layer in spec.layers] == [
        (16, "sliding_attention") if t == "sliding_attention" else (0, "full_attention") for t in cfg.layer_types]
    assert spec.tie_embeddings and spec.mlp.activation == "gelu_pytorch_tanh" and spec.embedding_scale == 8.0
    # the 4.x spelling of the same model: rope_theta + rope_scaling + rope_local_base_freq, no layer_types
    legacy = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", **_text_config(),
              "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0, "sliding_window_pattern": 6,
              "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "query_pre_attn_scalar": 256,
              "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}
    assert architecture_for(legacy).make_spec(legacy) == spec
    # and with everything transformers defaults left out
    bare = {k: v for k, v in legacy.items() if k not in ("rope_theta", "rope_local_base_freq", "sliding_window_pattern",
                                                         "query_pre_attn_scalar")}
    assert architecture_for(bare).make_spec(bare) == spec


def test_gemma2_null_softcap_stays_off_missing_means_transformers_default():
    base = {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "vocab_size": 320, "hidden_size": 64,
            "num_attention_heads": 8, "num_hidden_layers": 2, "intermediate_size": 97}
    spec = architecture_for(base).make_spec(base)
    assert (spec.attention.softcap, spec.final_softcap) == (50.0, 30.0)
    assert spec.attention.head_dim == 256 and spec.attention.num_kv_heads == 4  # transformers' defaults
    assert spec.layer_windows == (4096, 0)
    off = {**base, "attn_logit_softcapping": None, "final_logit_softcapping": None}
    spec = architecture_for(off).make_spec(off)
    assert (spec.attention.softcap, spec.final_softcap) == (0.0, 0.0)


MINIMAL = {  # config.json files that leave most keys to transformers' defaults
    "GemmaForCausalLM": {"model_type": "gemma", "hidden_act": "gelu"},  # legacy "gelu" means the tanh form
    "Gemma2ForCausalLM": {"model_type": "gemma2"},
    "Gemma3ForCausalLM": {"model_type": "gemma3_text", "sliding_window": 512, "sliding_window_pattern": 6},
    # google/gemma-3-4b-it's text_config lists just these
    "Gemma3ForConditionalGeneration": {"model_type": "gemma3", "text_config": {
        "hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text", "num_hidden_layers": 34,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024}},
}


@pytest.mark.parametrize("arch", list(MINIMAL))
def test_missing_keys_take_transformers_defaults(arch):
    raw = {"architectures": [arch], **MINIMAL[arch]}
    spec = architecture_for(raw).make_spec(raw)
    config = transformers.AutoConfig.for_model(**{k: v for k, v in raw.items() if k != "architectures"})
    c = config.get_text_config()
    a = spec.attention
    assert (spec.hidden_size, spec.num_layers, spec.vocab_size, spec.mlp.intermediate_size, spec.context_length) == (
        c.hidden_size, c.num_hidden_layers, c.vocab_size, c.intermediate_size, c.max_position_embeddings)
    assert (a.num_heads, a.num_kv_heads, a.head_dim, spec.norm.eps) == (
        c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rms_norm_eps)
    assert spec.mlp.activation == (getattr(c, "hidden_activation", None) or c.hidden_act) == "gelu_pytorch_tanh"
    assert spec.tie_embeddings == config.tie_word_embeddings is True
    assert spec.embedding_scale == c.hidden_size ** 0.5 and spec.norm.weight_offset == 1.0
    types = getattr(c, "layer_types", None) or ["full_attention"] * c.num_hidden_layers
    assert spec.layer_windows == tuple(c.sliding_window if t == "sliding_attention" else 0 for t in types)
    params = c.rope_parameters if "full_attention" in c.rope_parameters else {"full_attention": c.rope_parameters}
    for layer, t in zip(spec.layers, types):
        rope, want = spec.rope_for(layer.rope), params.get(t, params["full_attention"])
        assert (rope.theta, rope.kind, rope.factor) == (want["rope_theta"], want["rope_type"], want.get("factor", 1.0))
    if arch != "GemmaForCausalLM":
        assert a.scale == c.query_pre_attn_scalar ** -0.5
        assert (a.softcap, spec.final_softcap) == (c.attn_logit_softcapping or 0.0, 0.0 if "Conditional" in arch
                                                   else c.final_logit_softcapping or 0.0)


# -- the Gemma 3 vision-language wrapper -------------------------------------------------------------
@pytest.fixture(scope="module")
def gemma3_vl(tmp_path_factory):
    """A tiny Gemma3ForConditionalGeneration saved by transformers (legacy `language_model.model.*`
    names) and the same weights under transformers 5's `model.language_model.*` names."""
    from safetensors.numpy import load_file, save_file
    from tiny import VOCAB, spread_weights, tokenizer_files

    text = {k: v for k, v in CONFIGS["gemma3"].items() if k != "cls"}
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    legacy = tmp_path_factory.mktemp("gemma3-vl")
    config = transformers.Gemma3Config(text_config={**text, "vocab_size": VOCAB, "max_position_embeddings": 256,
                                                    "bos_token_id": 1, "eos_token_id": 0, "pad_token_id": 0},
                                       vision_config=vision, mm_tokens_per_image=4)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    spread_weights(model)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(0.2)  # as make_gemma does
    model.save_pretrained(legacy)
    tokenizer_files(legacy)
    new = tmp_path_factory.mktemp("gemma3-vl-new")
    renamed = {}
    for k, v in load_file(str(legacy / "model.safetensors")).items():
        k = k.replace("language_model.model.", "model.language_model.")
        renamed[k if k.startswith("model.") else "model." + k] = v
    save_file(renamed, str(new / "model.safetensors"), metadata={"format": "pt"})
    for f in legacy.iterdir():
        if f.name != "model.safetensors":
            (new / f.name).write_bytes(f.read_bytes())
    return legacy, new, model


def test_gemma3_vl_text_decoder(gemma3_vl, tmp_path):
    legacy, new, model = gemma3_vl
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    names = json.loads((legacy / "config.json").read_text())
    assert "text_config" in names
    for folder in (legacy, new):
        out = tmp_path / folder.name
        check_fp32(folder, model, out)
        report = json.loads((out / "build_report.json").read_text())
        assert any("vision_tower.*" in n and "left unread" in n for n in report["notes"]), report["notes"]
        assert json.loads((out / "genai_config.json").read_text())["model"]["type"] == "gemma3_text"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(new, dtype=torch.float32).eval()
    prompt, decode = prompt_and_decode()
    assert np.abs(reference_logits(reloaded, prompt + decode) - reference_logits(model, prompt + decode)).max() == 0
    check_int4(new, tmp_path / "int4", model=reloaded)


def test_gemma3_vl_never_softcaps_logits():
    cfg = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
           "text_config": {"model_type": "gemma3_text", **_text_config(), "final_logit_softcapping": 30.0}}
    assert architecture_for(cfg).make_spec(cfg).final_softcap == 0.0
    cfg = {"architectures": ["Gemma3ForCausalLM"], **cfg["text_config"]}
    assert architecture_for(cfg).make_spec(cfg).final_softcap == 30.0


# -- GGUF: written as llama.cpp's convert_hf_to_gguf.py Gemma*Model classes write it -----------------
GGUF_CONFIGS = {  # query_pre_attn_scalar = head_dim: llama.cpp derives the scale, no GGUF key carries it
    "gemma": CONFIGS["gemma"],
    "gemma2": {**CONFIGS["gemma2"], "query_pre_attn_scalar": 32},
    # six layers: llama.cpp fixes Gemma 3's pattern at 5 sliding + 1 global
    "gemma3": {**{k: v for k, v in CONFIGS["gemma3"].items() if k != "layer_types"}, "num_hidden_layers": 6,
               "query_pre_attn_scalar": 32, "final_logit_softcapping": 6.0},
}


def write_gemma_gguf(path, model, vocab: dict, arch: str) -> None:
    """GemmaModel / Gemma2Model / Gemma3Model (conversion/gemma.py): metadata keys, norm weights + 1,
    no lm_head for Gemma 1/2 (tied), gguf's HF->GGUF tensor names."""
    import gguf
    from test_gguf_source import add_vocab, text_model_params, write_gguf_tensors

    c = model.config
    w = gguf.GGUFWriter(path, arch)
    text_model_params(w, c)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(c.attn_logit_softcapping)
        w.add_final_logit_softcapping(c.final_logit_softcapping)
        w.add_sliding_window(c.sliding_window)
    if arch == "gemma3":  # TextModel.set_gguf_parameters: rope of the full layers, the sliding layers' base
        full, local = c.rope_parameters["full_attention"], c.rope_parameters["sliding_attention"]
        if full["rope_type"] == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(full["factor"])
        w.add_rope_freq_base(full["rope_theta"])
        w.add_rope_freq_base_swa(local["rope_theta"])
        if c.final_logit_softcapping:
            w.add_final_logit_softcapping(c.final_logit_softcapping)
        w.add_sliding_window(c.sliding_window)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    add_vocab(w, vocab)
    w.add_add_space_prefix(False)
    if arch == "gemma":  # CodeGemma's special tokens, written for every Gemma
        for kind, token in (("prefix", 67), ("suffix", 69), ("middle", 68), ("fsep", 70)):
            w.add_uint32(f"tokenizer.ggml.{kind}_token_id", token)
    tensors = {}
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and (arch != "gemma3" or c.tie_word_embeddings):
            continue
        array = tensor.detach().float().numpy()
        tensors[hf_name] = array + 1 if hf_name.endswith("norm.weight") else array
    write_gguf_tensors(w, tensors, arch, c.num_hidden_layers)


@pytest.mark.parametrize("arch", list(GGUF_CONFIGS))
def test_gguf_equals_the_hf_build(tmp_path, arch):
    from conftest import genai_greedy, onnx_step_logits, reference_greedy
    from test_gguf_source import sentencepiece_vocab

    import onnxforge

    vocab = sentencepiece_vocab()
    model = make_gemma(arch, tmp_path / "hf", **GGUF_CONFIGS[arch], vocab_size=len(vocab["tokens"]))
    path = tmp_path / f"{arch}.gguf"
    write_gemma_gguf(path, model, vocab, arch)
    onnxforge.build(tmp_path / "hf", tmp_path / "hf-out", "fp32")
    onnxforge.build(path, tmp_path / "gguf-out", "fp32")
    hf_g, gguf_g = (onnx.load(str(tmp_path / f"{o}/model.onnx"), load_external_data=False).graph
                    for o in ("hf-out", "gguf-out"))
    attrs = [[(n.op_type, sorted((a.name, onnx.helper.get_attribute_value(a)) for a in n.attribute))
              for n in g.node] for g in (hf_g, gguf_g)]
    assert attrs[0] == attrs[1]  # same graph: windows, softcaps, scales, rope tables per layer type
    prompt, decode = prompt_and_decode()
    ref = reference_logits(model, prompt + decode)
    from_hf = onnx_step_logits(tmp_path / "hf-out", prompt, decode)
    from_gguf = onnx_step_logits(tmp_path / "gguf-out", prompt, decode)
    assert np.abs(from_gguf - from_hf).max() < 1e-5
    assert np.abs(from_gguf - ref).max() < 1e-4
    if arch == "gemma3":  # the GGUF's own tokenizer and genai config run in onnxruntime-genai
        assert genai_greedy(tmp_path / "gguf-out", prompt) == reference_greedy(model, prompt)
