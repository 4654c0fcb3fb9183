"""GGUF input for the MoE families llama.cpp converts, written as convert_hf_to_gguf.py writes them:
Mixtral as `llama` (expert_count / expert_used_count, Q/K permuted, experts stacked per layer as
ffn_{gate,up,down}_exps (E, I, H)), Qwen3-MoE as `qwen3moe` and Qwen2-MoE as `qwen2moe`
(expert_feed_forward_length, expert_shared_feed_forward_length, ffn_*_shexp, ffn_gate_inp_shexp);
gguf-py's own HF -> GGUF tensor names. The GGUF build equals the HF build and transformers."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import onnx_step_logits, prompt_and_decode, reference_logits
from gguf import GGMLQuantizationType as QT

import onnxforge

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

CONFIGS = {  # llama.cpp's graphs: every layer MoE, qwen3moe renormalises the top k, qwen2moe does not
    "mixtral": dict(cls="MixtralConfig", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=32, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(cls="Qwen3MoeConfig", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2, num_experts=4,
                      num_experts_per_tok=2, norm_topk_prob=True, tie_word_embeddings=False),
    "qwen2_moe": dict(cls="Qwen2MoeConfig", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                      num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, norm_topk_prob=False),
}
ARCH = {"mixtral": "llama", "qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe"}


def write_gguf(path, model, vocab: dict, qtype=None) -> None:
    """TextModel.set_gguf_parameters (+ expert counts), LlamaModel's Q/K permutation for Mixtral,
    Qwen2MoeModel's expert lengths; experts stacked per layer into 3-D tensors as modify_tensors does."""
    from test_gguf_source import add_vocab, finish_gguf, llamacpp_permute, text_model_params

    c = model.config
    arch = ARCH[c.model_type]
    w = gguf.GGUFWriter(path, arch)
    text_model_params(w, c)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    if getattr(c, "head_dim", None) and arch != "llama":
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
    w.add_expert_count(getattr(c, "num_local_experts", None) or c.num_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    if arch in ("qwen2moe", "qwen3moe"):
        w.add_expert_feed_forward_length(c.moe_intermediate_size)
    if arch == "qwen2moe":
        w.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)
    if arch == "llama":
        w.add_vocab_size(c.vocab_size)
        w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    add_vocab(w, vocab)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], c.num_hidden_layers)
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    tensors = {}
    for k, v in state.items():
        if k.endswith("mlp.experts.gate_up_proj"):  # transformers 5's stacked gate|up: the converter's w1 / w3
            I = v.shape[1] // 2
            tensors[k.replace("gate_up_proj", "gate_proj")], tensors[k.replace("gate_up_proj", "up_proj")] = v[:, :I], v[:, I:]
            continue
        if arch == "llama" and k.endswith("q_proj.weight"):
            v = llamacpp_permute(v, c.num_attention_heads, c.num_attention_heads)
        if arch == "llama" and k.endswith("k_proj.weight"):
            v = llamacpp_permute(v, c.num_attention_heads, c.num_key_value_heads)
        tensors[k] = v
    named = {}
    for k, v in tensors.items():
        stem, suffix = (k, "weight") if k.endswith(("experts.gate_proj", "experts.up_proj", "experts.down_proj")) \
            else k.rsplit(".", 1)
        named[f"{names.get_name(stem)}.{suffix}"] = v
    finish_gguf(w, named, qtype, lambda name, v: v.ndim == 3)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gguf_equals_the_hf_build(tmp_path, name):
    from test_gguf_source import train_byte_level_vocab
    from tiny import make_model

    vocab = train_byte_level_vocab()
    model = make_model(name, tmp_path / "hf", **CONFIGS[name], vocab_size=len(vocab["tokens"]))
    path = tmp_path / f"{name}.gguf"
    write_gguf(path, model, vocab)
    onnxforge.build(tmp_path / "hf", tmp_path / "hf-out", "fp32")
    report = onnxforge.build(path, tmp_path / "gguf-out", "fp32")
    assert not report.unread_tensors
    prompt, decode = prompt_and_decode()
    from_hf = onnx_step_logits(tmp_path / "hf-out", prompt, decode)
    from_gguf = onnx_step_logits(tmp_path / "gguf-out", prompt, decode)
    assert np.abs(from_gguf - from_hf).max() < 1e-4
    assert np.abs(from_gguf - reference_logits(model, prompt + decode)).max() < 1e-4
    cfg = json.loads((tmp_path / "gguf-out" / "genai_config.json").read_text())["model"]
    assert cfg["type"] == json.loads((tmp_path / "hf-out" / "genai_config.json").read_text())["model"]["type"]


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0])
def test_quantized_experts_read_one_at_a_time(tmp_path, qtype):
    """A quantized stacked tensor: one expert's read equals gguf-py's dequantization of the whole tensor."""
    from test_gguf_source import train_byte_level_vocab
    from tiny import make_model

    from onnxforge.sources.gguf import GGUFSource

    vocab = train_byte_level_vocab()
    model = make_model("qwen3_moe", tmp_path / "hf", **CONFIGS["qwen3_moe"], vocab_size=len(vocab["tokens"]))
    path = tmp_path / "q.gguf"
    write_gguf(path, model, vocab, qtype)
    src = GGUFSource(path)
    try:
        name = "model.layers.1.mlp.experts.down_proj.weight"
        assert src.shape(name) == (4, 64, 32)
        reader = gguf.GGUFReader(path)
        t = next(t for t in reader.tensors if t.name == "blk.1.ffn_down_exps.weight")
        whole = gguf.quants.dequantize(t.data, t.tensor_type).reshape(4, 64, 32)
        for e in range(4):
            assert np.array_equal(src.read_slice(name, e), whole[e])
    finally:
        src.close()
    report = onnxforge.build(path, tmp_path / "out", "fp32")
    assert not report.unread_tensors
