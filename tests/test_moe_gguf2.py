"""GGUF input for OLMoE (`olmoe`), Granite MoE (`granitemoe`), ERNIE 4.5 MoE (`ernie4_5-moe`) and gpt-oss
(`gpt-oss`), each written as llama.cpp's convert_hf_to_gguf.py writes it (TextModel.set_gguf_parameters
plus the family's keys; gguf-py's own HF -> GGUF names; experts stacked per layer as ffn_{gate,up,down}_exps
(E, I, H)), and built against the HF build and transformers. PhiMoE (`phimoe`) is refused.

Where llama.cpp's graph fixes what the HF config states, the GGUF means llama.cpp's choice and the tiny
models are made to agree with it:
  * OLMoE: llama.cpp's olmoe graph never renormalises the top k and has no clip_qkv (the converter writes
    neither), its attn_k_norm is n_embd wide (kv heads = heads), and the converter writes rms eps 1e-5
    whatever the config says; the tiny model has norm_topk_prob false, no clip_qkv, 4 kv heads, eps 1e-5.
  * Granite MoE: Q/K permuted (GraniteModel is a LlamaModel), head_dim dropped, the multipliers as
    attention.scale / embedding_scale / residual_scale / logit_scale; input_linear split into gate / up.
  * ERNIE 4.5 MoE: llama.cpp's graph uses the q/k/v biases only (no o_proj / MLP / lm_head bias), so the
    model has use_bias false; MoE layers are i >= leading_dense_block_count with (i + 1) % step == 0 (no
    end index); the converter writes the shared experts' width as intermediate_size // kv heads, which the
    tiny model makes equal to moe_intermediate_size x moe_num_shared_experts as the real checkpoints are.
  * gpt-oss: swiglu_oai hard-codes alpha 1.702 and limit 7 (the tiny model uses limit 7), and llama.cpp's
    yarn always truncates the correction range (floor / ceil), where gpt-oss's config says truncate false:
    the tiny model is made with truncate true, as the GGUF is computed. Its experts are also written as
    MXFP4 (type 39) with gguf-py's quantizer; the reference then holds gguf-py's dequantization of them.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import onnx_step_logits, prompt_and_decode, reference_logits
from gguf import GGMLQuantizationType as QT

import onnxforge
from onnxforge.errors import ConfigError

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

_YARN = dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=True,
             original_max_position_embeddings=4096, rope_theta=150000.0)
CONFIGS = {  # 4 experts, top 2, 2 layers (ERNIE: layer 0 dense, layer 1 MoE; gpt-oss: sliding, full)
    "olmoe": dict(cls="OlmoeConfig", hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                  intermediate_size=32, num_hidden_layers=2, num_experts=4, num_experts_per_tok=2,
                  norm_topk_prob=False, rms_norm_eps=1e-5),
    "granitemoe": dict(cls="GraniteMoeConfig", hidden_size=64, num_attention_heads=4, num_key_value_heads=1,
                       intermediate_size=48, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
                       embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=2.0,
                       attention_multiplier=0.2),
    "ernie4_5_moe": dict(cls="Ernie4_5_MoeConfig", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2, moe_num_experts=4,
                         moe_k=2, moe_num_shared_experts=1, use_bias=False),
    "gpt_oss": dict(cls="GptOssConfig", hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                    intermediate_size=32, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
                    sliding_window=6, swiglu_limit=7.0, rope_parameters=_YARN),
}
ARCH = {"olmoe": "olmoe", "granitemoe": "granitemoe", "ernie4_5_moe": "ernie4_5-moe", "gpt_oss": "gpt-oss"}


def write_metadata(w, c, arch: str) -> None:
    """TextModel.set_gguf_parameters, then the family's set_gguf_parameters."""
    from test_gguf_source import text_model_params

    text_model_params(w, c)
    rope = c.rope_parameters
    if rope["rope_type"] == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        w.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
        w.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(1e-5 if arch == "olmoe" else c.rms_norm_eps)  # OlmoeModel overwrites it with 1e-5
    hp = c.to_dict()  # what find_hparam looks in
    if hp.get("num_local_experts") or hp.get("num_experts"):
        w.add_expert_count(hp.get("num_local_experts") or hp.get("num_experts"))
    if hp.get("num_experts_per_tok"):
        w.add_expert_used_count(hp["num_experts_per_tok"])
    if arch != "granitemoe" and hp.get("head_dim"):  # GraniteModel drops head_dim
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])
    if arch == "granitemoe":  # LlamaModel's, then GraniteModel's
        w.add_vocab_size(c.vocab_size)
        w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
        w.add_attention_scale(c.attention_multiplier)
        w.add_embedding_scale(c.embedding_multiplier)
        w.add_residual_scale(c.residual_multiplier)
        w.add_logit_scale(c.logits_scaling)
    if arch == "ernie4_5-moe":
        w.add_expert_count(c.moe_num_experts)
        w.add_expert_used_count(c.moe_k)
        w.add_interleave_moe_layer_step(c.moe_layer_interval)
        w.add_leading_dense_block_count(c.moe_layer_start_index)
        w.add_expert_feed_forward_length(c.moe_intermediate_size)
        w.add_expert_shared_count(c.moe_num_shared_experts)
        w.add_expert_shared_feed_forward_length(c.intermediate_size // c.num_key_value_heads)
    if arch == "gpt-oss":
        w.add_sliding_window(c.sliding_window)
        w.add_expert_feed_forward_length(c.intermediate_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)


def converted_tensors(model, arch: str) -> dict[str, np.ndarray]:
    """GGUF name -> array, as the family's modify_tensors writes them (from transformers 5's state dict,
    whose stacked experts are what the converter stacks from the per-expert checkpoint tensors)."""
    from test_gguf_source import llamacpp_permute

    c = model.config
    model_arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    names = gguf.get_tensor_name_map(model_arch, c.num_hidden_layers)
    exps = {part: gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, f"FFN_{part.upper()}_EXP")]
            for part in ("gate", "up", "down")}
    out = {}
    for k, t in model.state_dict().items():
        v = t.detach().float().numpy()
        if k == "lm_head.weight" and c.tie_word_embeddings:
            continue  # not in a tied checkpoint
        i = int(k.split("layers.")[1].split(".")[0]) if "layers." in k else None
        if k.endswith("experts.gate_up_proj"):
            if arch == "gpt-oss":  # (E, H, 2I), gate / up alternating: transposed, then split by row parity
                v = v.transpose(0, 2, 1)
                gate, up = v[:, 0::2], v[:, 1::2]
            else:  # (E, 2I, H): gate rows, then up rows (Granite's input_linear split alike)
                gate, up = np.split(v, 2, axis=1)
            out[exps["gate"].format(bid=i) + ".weight"], out[exps["up"].format(bid=i) + ".weight"] = gate, up
            continue
        if k.endswith("experts.gate_up_proj_bias"):
            out[exps["gate"].format(bid=i) + ".bias"], out[exps["up"].format(bid=i) + ".bias"] = v[:, 0::2], v[:, 1::2]
            continue
        if k.endswith("experts.down_proj"):
            out[exps["down"].format(bid=i) + ".weight"] = v.transpose(0, 2, 1) if arch == "gpt-oss" else v
            continue
        if k.endswith("experts.down_proj_bias"):
            out[exps["down"].format(bid=i) + ".bias"] = v
            continue
        if arch == "granitemoe":  # LlamaModel.modify_tensors permutes Q/K; the router is router.layer on the Hub
            if k.endswith("q_proj.weight"):
                v = llamacpp_permute(v, c.num_attention_heads, c.num_attention_heads)
            if k.endswith("k_proj.weight"):
                v = llamacpp_permute(v, c.num_attention_heads, c.num_key_value_heads)
            k = k.replace("block_sparse_moe.router.", "block_sparse_moe.router.layer.")
        k = k.replace("mlp.gate.moe_statics.e_score_correction_bias", "mlp.moe_statics.e_score_correction.bias")
        if k.endswith("self_attn.sinks"):
            k += ".weight"  # GptOssModel.filter_tensors
        stem, suffix = k.rsplit(".", 1)
        name = names.get_name(stem)
        assert name is not None, k
        out[f"{name}.{suffix}"] = v
    return out


def write_gguf(path, model, vocab: dict, qtype: QT | None = None) -> None:
    """The family's converter output; with `qtype`, the stacked experts quantized to it by gguf-py."""
    from test_gguf_source import add_vocab, finish_gguf

    arch = ARCH[model.config.model_type]
    w = gguf.GGUFWriter(path, arch)
    write_metadata(w, model.config, arch)
    add_vocab(w, vocab)
    finish_gguf(w, converted_tensors(model, arch), qtype, lambda name, v: v.ndim == 3)


def load_gguf_experts(model, path) -> None:
    """Put gguf-py's dequantization of the file's stacked experts into the transformers model."""
    from moe_check import experts_module

    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}

    def read(name):
        t = tensors[name]
        shape = tuple(int(d) for d in reversed(t.shape))
        return gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)

    gpt_oss = model.config.model_type == "gpt_oss"
    with torch.no_grad():
        for i in range(model.config.num_hidden_layers):
            if f"blk.{i}.ffn_down_exps.weight" not in tensors:
                continue
            gate, up, down = (read(f"blk.{i}.ffn_{p}_exps.weight") for p in ("gate", "up", "down"))
            experts = experts_module(model, i)
            if gpt_oss:
                gate_up = np.empty((gate.shape[0], gate.shape[2], 2 * gate.shape[1]), np.float32)
                gate_up[..., 0::2], gate_up[..., 1::2] = gate.transpose(0, 2, 1), up.transpose(0, 2, 1)
                down = down.transpose(0, 2, 1)
            else:
                gate_up = np.concatenate([gate, up], axis=1)
            experts.gate_up_proj.copy_(torch.from_numpy(np.ascontiguousarray(gate_up)))
            experts.down_proj.copy_(torch.from_numpy(np.ascontiguousarray(down)))


@pytest.mark.parametrize("name,qtype", [(name, None) for name in CONFIGS] + [("gpt_oss", "MXFP4"),
                                                                              ("ernie4_5_moe", "Q8_0")])
def test_gguf_equals_the_hf_build(tmp_path, name: str, qtype: str | None):
    """fp32: the GGUF build equals the HF build and transformers; quantized experts: it equals transformers
    holding gguf-py's dequantization of them."""
    from test_gguf_source import train_byte_level_vocab
    from tiny import make_model

    vocab = train_byte_level_vocab()
    model = make_model(name, tmp_path / "hf", **CONFIGS[name], vocab_size=len(vocab["tokens"]))
    path = tmp_path / f"{name}.gguf"
    write_gguf(path, model, vocab, qtype and QT[qtype])
    report = onnxforge.build(path, tmp_path / "gguf-out", "fp32")
    assert not report.unread_tensors
    prompt, decode = prompt_and_decode()
    from_gguf = onnx_step_logits(tmp_path / "gguf-out", prompt, decode)
    if qtype is None:
        onnxforge.build(tmp_path / "hf", tmp_path / "hf-out", "fp32")
        assert np.abs(from_gguf - onnx_step_logits(tmp_path / "hf-out", prompt, decode)).max() < 1e-4
        cfg = json.loads((tmp_path / "hf-out" / "genai_config.json").read_text())["model"]
        assert cfg["type"] == json.loads((tmp_path / "gguf-out" / "genai_config.json").read_text())["model"]["type"]
    else:
        load_gguf_experts(model, path)
    assert np.abs(from_gguf - reference_logits(model, prompt + decode)).max() < 1e-4


def converter_nibbles(blocks: np.ndarray) -> np.ndarray:
    """GptOssModel.transform_nibble_layout (numpy): HF MXFP4 bytes (value 2k low, 2k + 1 high) -> ggml's
    (value j low, j + 16 high)."""
    t = ((blocks & 0x0F) << 4) | (blocks >> 4)
    a, b = t[..., :8], t[..., 8:]
    a = np.stack([a & 0xF0, a << 4], axis=-1).reshape(t.shape)
    b = np.stack([b >> 4, b & 0x0F], axis=-1).reshape(t.shape)
    out = a | b
    return ((out & 0xF0) >> 4) | ((out & 0x0F) << 4)


def test_mxfp4_blocks_are_onnxforges_mxfp4():
    """The HF checkpoint's MXFP4 blocks repacked as GptOssModel.repack_mxfp4 does (the scale byte, then the
    nibbles in ggml's order) dequantize with gguf-py to what onnxforge decodes from the HF blocks; and
    gguf-py's own MXFP4 quantizer (used for the test files above) rounds as the OCP MX rule does."""
    from test_moe_gptoss import encode_mxfp4

    from onnxforge.quant.mxfp4 import decode_mxfp4

    w = np.random.default_rng(0).normal(0, 1, (2, 4, 64)).astype(np.float32)
    blocks, scales = encode_mxfp4(w)
    repacked = np.concatenate([scales[..., None], converter_nibbles(blocks)], axis=-1).reshape(2, 4, -1)
    decoded = decode_mxfp4(blocks, scales)
    assert np.array_equal(gguf.quants.dequantize(repacked, QT.MXFP4), decoded)
    assert np.array_equal(gguf.quants.dequantize(gguf.quants.quantize(w, QT.MXFP4), QT.MXFP4), decoded)


def _minimal_gguf(path, arch: str, tensors: dict[str, np.ndarray] | None = None, **keys) -> None:
    from test_gguf_source import add_vocab, finish_gguf, train_byte_level_vocab

    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(1)
    w.add_embedding_length(64)
    w.add_feed_forward_length(48)
    w.add_head_count(4)
    for key, value in keys.items():
        getattr(w, f"add_{key}")(value)
    add_vocab(w, train_byte_level_vocab())
    finish_gguf(w, {"token_embd.weight": np.zeros((4, 64), np.float32), **(tensors or {})})


def test_phimoe_is_refused(tmp_path):
    """llama.cpp computes PhiMoE otherwise than transformers (softmax top-2 renormalised, not the sparse
    mixer; RMSNorm, not LayerNorm), so its GGUF cannot be built faithfully to both."""
    _minimal_gguf(tmp_path / "phimoe.gguf", "phimoe")
    with pytest.raises(ConfigError, match=r"'phimoe'.*sparse mixer.*Hugging Face folder"):
        onnxforge.build(tmp_path / "phimoe.gguf", tmp_path / "out", "fp32")


def test_granitemoe_shared_is_refused(tmp_path):
    """GraniteMoeShared is written as granitemoe with expert_shared_feed_forward_length; no HF family here."""
    _minimal_gguf(tmp_path / "shared.gguf", "granitemoe", expert_shared_feed_forward_length=32)
    with pytest.raises(ConfigError, match="GraniteMoeShared"):
        onnxforge.build(tmp_path / "shared.gguf", tmp_path / "out", "fp32")


def test_gpt_oss_fused_gate_up_is_refused(tmp_path):
    """convert_hf_to_gguf.py --fuse-gate-up-exps writes gpt-oss's gate and up as one ffn_gate_up_exps
    (gate rows, then up rows), which onnxforge does not read for gpt-oss (its HF experts alternate them)."""
    from onnxforge.errors import CheckpointError

    fused = {"blk.0.ffn_gate_up_exps.weight": np.zeros((4, 64, 64), np.float32)}
    _minimal_gguf(tmp_path / "fused.gguf", "gpt-oss", fused)
    with pytest.raises(CheckpointError, match=r"'blk.0.ffn_gate_up_exps.weight'.*'gpt-oss'.*not supported"):
        onnxforge.build(tmp_path / "fused.gguf", tmp_path / "out", "fp32")


def test_mxfp4_experts_requantized_on_cpu_carried_over_for_cuda(tmp_path):
    """A GGUF's MXFP4 experts: on CPU (no fp4 QMoE kernel) re-quantized, and the report says so; with -e cuda
    and moe_quant_type=mxfp4, QMoE fp4 over the file's own codes and E8M0 scales, which decode (E2M1 values
    times 2^(e - 127)) to exactly gguf-py's dequantization of the GGUF tensors (no CUDA here: the graph's
    initializers are inspected)."""
    from onnx import numpy_helper
    from test_gguf_source import train_byte_level_vocab
    from tiny import make_model

    from onnxforge.quant.options import apply_extra_options
    from onnxforge.quant.recipe import Recipe

    vocab = train_byte_level_vocab()
    c = CONFIGS["gpt_oss"]
    model = make_model("gpt_oss", tmp_path / "hf", **c, vocab_size=len(vocab["tokens"]))
    path = tmp_path / "gpt-oss.gguf"
    write_gguf(path, model, vocab, QT.MXFP4)
    onnxforge.build(path, tmp_path / "cpu", "int4")
    report = json.loads((tmp_path / "cpu" / "build_report.json").read_text())
    experts = [g["storage"] for g in report["groups"] if "QMoE" in g["storage"]]
    assert len(experts) == 4 and all(s.endswith("(re-quantized MXFP4: no exact QMoE form)") for s in experts), experts

    cuda = apply_extra_options(Recipe(precision="int4", provider="cuda"), {"moe_quant_type": "mxfp4"})
    onnxforge.build(path, tmp_path / "cuda", recipe=cuda)
    graph = onnx.load(str(tmp_path / "cuda" / "model.onnx")).graph
    inits = {t.name: t for t in graph.initializer}
    nodes = [n for n in graph.node if n.op_type == "QMoE"]
    assert len(nodes) == c["num_hidden_layers"]
    reader = gguf.GGUFReader(path)
    ref = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors if "_exps.weight" in t.name}
    e2m1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)
    for i, n in enumerate(nodes):
        a = {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute}
        assert a["quant_type"] == b"fp4" and a["block_size"] == 32 and a["expert_weight_bits"] == 4
        gate_up = np.empty_like(ref[f"blk.{i}.ffn_gate_exps.weight"], shape=(c["num_local_experts"],
                                                                           2 * c["intermediate_size"],
                                                                           c["hidden_size"]))
        gate_up[:, 0::2], gate_up[:, 1::2] = ref[f"blk.{i}.ffn_gate_exps.weight"], ref[f"blk.{i}.ffn_up_exps.weight"]
        for (w, sc), want in (((n.input[2], n.input[3]), gate_up),
                              ((n.input[5], n.input[6]), ref[f"blk.{i}.ffn_down_exps.weight"])):
            weight = numpy_helper.to_array(inits[w])  # (E, K, N/2): code of (n, k) at [k, n // 2], nibble n % 2
            assert inits[sc].data_type == onnx.TensorProto.FLOAT8E8M0
            codes = np.empty(want.shape, np.uint8)
            codes[:, 0::2, :], codes[:, 1::2, :] = (weight & 0x0F).transpose(0, 2, 1), (weight >> 4).transpose(0, 2, 1)
            e8m0 = np.frombuffer(inits[sc].raw_data, np.uint8).reshape(*want.shape[:2], -1)
            got = e2m1[codes] * np.repeat(np.exp2(e8m0.astype(np.float32) - 127), 32, axis=-1)
            assert np.array_equal(got, want.astype(np.float32))
