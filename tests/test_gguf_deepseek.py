"""GGUF input for DeepSeek-V3 / Kimi-K2 (llama.cpp's deepseek2), from files written by llama.cpp's own
convert_hf_to_gguf.py (tests/real_converter.py, the llama-cpp-python 0.3.36 sdist) from tiny random
DeepseekV3ForCausalLM models made by transformers (fixed seed), and quantized by llama.cpp's own quantizer.

The converter writes latent attention as MQA over the latent (head_count_kv 1, key_length kv_lora_rank + rope
dims, the heads' sizes as key_length_mla / value_length_mla) and splits kv_b_proj into attn_k_b (each head's k rows
transposed: (heads, kv_lora_rank, nope)) and attn_v_b; sources/gguf_maps.py joins them back (a View of two parts).
Every tensor read back equals transformers' state dict exactly, names included; the fp32 build equals
transformers within 1e-4 over a 12-token prompt and 20 cached decode steps, and onnxruntime-genai's greedy 20
tokens equal transformers'. The tiny configs say scoring_func "sigmoid" as DeepSeek-V3's published config.json
does (without it the converter writes no expert_gating_func, which llama.cpp reads as DeepSeek-V2's softmax).
llama.cpp's own Q8_0 and Q4_K_M of it build as stored (the non-expert weights' blocks exact, logits = the fp32
build of the same file); an older file with attn_kv_b unsplit reads too; the yarn reading is checked against
libllama's logits on the same file (llama-cpp-python), including two mscale settings a GGUF cannot carry as
transformers computes them; a missing half of kv_b_proj and DeepSeek-V2's softmax routing are one clear error.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from family_check import FP32_TOL
from test_family_hybrid import steps
from test_family_qwen_next import tokens
from test_gguf_hybrid import (as_stored_matches_fp32, fp32_build_matches, quantize, split_stacked_experts,
                              stored_blocks_exact)

import onnxforge
from onnxforge.errors import CheckpointError, ConfigError
from onnxforge.sources.gguf import GGUFSource

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from conftest import reference_logits  # noqa: E402
from test_family_deepseek_v3 import BASE, YARN, make  # noqa: E402

PUBLISHED = dict(scoring_func="sigmoid", topk_method="noaux_tc")
# llama.cpp's deepseek2 graph rotates interleaved pairs and has no attention biases: both forms as it computes them
CONFIGS = {
    "q_lora": dict(BASE, **PUBLISHED, q_lora_rank=32, v_head_dim=24, rope_parameters=YARN),
    "plain_q": dict(BASE, **PUBLISHED, q_lora_rank=None, v_head_dim=48),
}
_CACHE: dict = {}


def converted(tmp_path_factory, name: str, **overrides):
    """(transformers model, F32 GGUF by llama.cpp's converter), once a session."""
    key = (name, json.dumps(overrides, sort_keys=True))
    if key not in _CACHE:
        from real_converter import real_convert

        folder = tmp_path_factory.mktemp(f"gguf-deepseek-{name}")
        model = make(folder / "hf", **{**CONFIGS[name], **overrides})
        _CACHE[key] = model, real_convert(folder / "hf", folder / "F32.gguf", "f32", pre="gpt-2")
    return _CACHE[key]


def hf_state(model) -> dict[str, np.ndarray]:
    """transformers' state dict with the stacked experts named as llama.cpp stores them (gate and up apart)."""
    out = {}
    for name, t in model.state_dict().items():
        a = t.detach().numpy()
        if not split_stacked_experts(name, a, out):
            out[name] = a
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_deepseek_gguf_fp32(tmp_path_factory, tmp_path, name):
    model, path = converted(tmp_path_factory, name)
    c = CONFIGS[name]
    with GGUFSource(path) as source:
        assert source._arch == "deepseek2" and source._key("attention.head_count_kv") == 1
        cfg = source.config
        assert cfg["architectures"] == ["DeepseekV3ForCausalLM"] and cfg["q_lora_rank"] == c["q_lora_rank"]
        for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_group", "topk_group",
                    "first_k_dense_replace", "n_shared_experts", "routed_scaling_factor", "num_experts_per_tok"):
            assert cfg[key] == c[key], key
        assert cfg["n_routed_experts"] == c["n_routed_experts"] and cfg["norm_topk_prob"] is True
        if "rope_parameters" in c:
            assert {k: cfg["rope_parameters"][k] for k in YARN} == pytest.approx(YARN), cfg["rope_parameters"]
        state = hf_state(model)
        assert sorted(source.tensor_names()) == sorted(state)
        for tensor in source.tensor_names():  # kv_b_proj joined from attn_k_b / attn_v_b, exactly
            got = source.read(tensor)
            assert got.shape == state[tensor].shape, tensor
            np.testing.assert_array_equal(got, state[tensor], err_msg=tensor)
    fp32_build_matches(path, tmp_path / "out", model, "DeepseekV3ForCausalLM", label=name)


KEEP_FLOAT = ("/model/layers.*/moe/experts/*", "/model/layers.*/attn/kv_b_proj/MatMul")


def test_deepseek_gguf_q8_0_as_stored(tmp_path_factory, tmp_path, name="q_lora"):
    """llama.cpp's Q8_0 of it, built as stored: every non-expert weight with a block form (q_a/q_b or q, kv_a, o,
    the dense MLP, shared experts, lm_head) is the file's blocks as they are: the graph's own MatMulNBits of them
    equals gguf-py's dequantization (gguf.quants) of the stored tensor bit for bit, and the report says "exact
    Q8_0"; kv_b_proj, joined from attn_k_b (F16: its 16-wide rows have no Q8_0 form) and attn_v_b (Q8_0) with a
    transpose, and the experts (8-bit QMoE quantizes its activations, tests/test_moe_as_stored.py) are kept float.
    The logits equal the fp32 build of the same file over the prompt and 20 cached decode steps. (q_lora_rank set
    only: llama.cpp's loader, which its quantizer runs, requires attention.q_lora_rank unless the model has 26 or 27
    layers, DeepSeek-V2-Lite's counts; the plain-q file is read at fp32 above.)"""
    _, f32 = converted(tmp_path_factory, name)
    path = quantize(f32, "Q8_0")
    with GGUFSource(path) as source:
        assert source.stored_format("model.layers.0.self_attn.kv_b_proj.weight") == "F16"  # attn_k_b's type
        assert source.native_format("model.layers.0.self_attn.kv_b_proj.weight").bits == 0  # joined: dequantized
        exact, _ = stored_blocks_exact(source, "Q8_0")
    linears = {"self_attn.q_a_proj", "self_attn.q_b_proj"} if CONFIGS[name]["q_lora_rank"] else {"self_attn.q_proj"}
    linears |= {"self_attn.kv_a_proj_with_mqa", "self_attn.o_proj"}
    want = {f"model.layers.{i}.{p}.weight" for i in range(3) for p in linears}
    want |= {f"model.layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    want |= {f"model.layers.{i}.mlp.shared_experts.{p}_proj.weight" for i in (1, 2) for p in ("gate", "up", "down")}
    assert want | {"lm_head.weight", "model.embed_tokens.weight"} <= exact, sorted(want - exact)
    report = as_stored_matches_fp32(path, tmp_path, KEEP_FLOAT, label=f"{name} Q8_0")
    storage = {g["label"]: g["storage"] for g in report["groups"]}
    exact_labels = {label for label, kind in storage.items() if kind.endswith("(exact Q8_0)")}
    assert all(kind.startswith("fp32") for label, kind in storage.items() if label not in exact_labels), storage
    assert len(exact_labels) == 1 + 3 * 3 + 2 + 2 * 2 + 1, storage  # embedding, q_a+kv_a / q_b / o, MLP, shared, head
    assert storage["/model/layers.0/attn/kv_b_proj"] == "fp32 (dequantized F16/Q8_0)", storage


def test_deepseek_gguf_bad_input_is_one_clear_error(tmp_path_factory, tmp_path):
    """Before any weight is read: a file missing one half of a layer's split kv_b_proj (attn_v_b) is one
    CheckpointError naming the tensor; a file routed on softmax scores (DeepSeek-V2's expert_gating_func 1) one
    ConfigError naming the key. Files rewritten by gguf-py; the unchanged copy reads."""
    import gguf
    from test_gguf_hybrid import rewrite

    _, path = converted(tmp_path_factory, "q_lora")
    reader = gguf.GGUFReader(path)
    bad = tmp_path / "no-v_b.gguf"
    writer = gguf.GGUFWriter(str(bad), "deepseek2")
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        array = f.types[0] == gguf.GGUFValueType.ARRAY
        writer.add_key_value(key, f.contents(), f.types[0], sub_type=f.types[-1] if array else None)
    for t in reader.tensors:
        if t.name != "blk.1.attn_v_b.weight":
            writer.add_tensor(t.name, np.array(t.data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"blk\.1\.attn_v_b\.weight is missing") as err:
        GGUFSource(bad)
    assert "re-convert" in str(err.value)
    softmax = rewrite(path, tmp_path / "softmax.gguf",
                      **{"deepseek2.expert_gating_func": (1, gguf.GGUFValueType.UINT32)})
    with pytest.raises(ConfigError, match="expert_gating_func 1"):
        GGUFSource(softmax)
    with GGUFSource(rewrite(path, tmp_path / "copy.gguf")) as source:
        assert source.config["architectures"] == ["DeepseekV3ForCausalLM"]


# K types need rows of 256: every projection's input 256 wide (o_proj's: 4 heads x v_head_dim 64)
WIDE = dict(hidden_size=256, intermediate_size=256, moe_intermediate_size=256, q_lora_rank=256, kv_lora_rank=256,
            v_head_dim=64)


def test_deepseek_gguf_q4_k_m_as_stored(tmp_path_factory, tmp_path):
    """llama.cpp's Q4_K_M of a DeepSeek-V3 whose projections take 256-wide rows: the non-expert weights are stored
    as Q4_K / Q5_K / Q6_K (attn_k_b as F16), carried over exactly (the graph's MatMulNBits of them equals gguf-py's
    dequantization), and the as-stored build's logits equal the fp32 build of the same file over the prompt and 20
    cached decode steps (experts and kv_b_proj kept float, as for Q8_0)."""
    _, f32 = converted(tmp_path_factory, "q_lora", **WIDE)
    path = quantize(f32, "Q4_K_M")
    with GGUFSource(path) as source:
        _, origins = stored_blocks_exact(source)
    assert {"Q4_K", "Q6_K"} <= origins, origins
    report = as_stored_matches_fp32(path, tmp_path, KEEP_FLOAT, label="Q4_K_M")
    storage = {g["label"]: g["storage"] for g in report["groups"]}
    assert "exact Q4_K" in storage["/model/layers.1/attn/q_b_proj"], storage
    assert all("exact" in kind or kind.startswith("fp32") for kind in storage.values()), storage


def test_deepseek_gguf_unsplit_kv_b(tmp_path_factory, tmp_path):
    """Files from llama.cpp's converter before it split kv_b_proj for the absorbed form (published DeepSeek-V3 /
    Kimi-K2 GGUFs of early 2025): attn_kv_b as transformers stores it, key_length / value_length a head's sizes, no
    *_mla keys. Made here by rewriting the vendored converter's file with gguf-py (attn_k_b / attn_v_b replaced by
    transformers' kv_b_proj); the fp32 build equals transformers within 1e-4."""
    import gguf

    model, path = converted(tmp_path_factory, "q_lora")
    c = CONFIGS["q_lora"]
    reader = gguf.GGUFReader(path)
    old = tmp_path / "unsplit.gguf"
    writer = gguf.GGUFWriter(str(old), "deepseek2")
    sizes = {"deepseek2.attention.key_length": c["qk_nope_head_dim"] + c["qk_rope_head_dim"],
             "deepseek2.attention.value_length": c["v_head_dim"]}
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key.endswith("_mla"):
            continue
        array = f.types[0] == gguf.GGUFValueType.ARRAY
        value = sizes.get(key, f.contents())
        writer.add_key_value(key, value, f.types[0], sub_type=f.types[-1] if array else None)
    state = model.state_dict()
    for t in reader.tensors:
        if t.name.endswith("attn_v_b.weight"):
            continue
        if t.name.endswith("attn_k_b.weight"):
            i = int(t.name.split(".")[1])
            kv_b = state[f"model.layers.{i}.self_attn.kv_b_proj.weight"].numpy()
            writer.add_tensor(f"blk.{i}.attn_kv_b.weight", kv_b)
        else:
            writer.add_tensor(t.name, np.array(t.data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with GGUFSource(old) as source:
        assert source.config["v_head_dim"] == c["v_head_dim"] and source.config["qk_nope_head_dim"] == 16
        assert not any("_b_proj" in n and "kv_b" not in n and "q_b" not in n for n in source.tensor_names())
    out = tmp_path / "out"
    onnxforge.build(old, out, "fp32")
    prompt, decode = tokens()
    ref = reference_logits(model, prompt + decode)
    got = steps(out, [prompt] + [[t] for t in decode])
    assert np.abs(got - ref).max() < FP32_TOL, np.abs(got - ref).max()


def llama_cpp_logits(path, ids: list[int]) -> np.ndarray:
    """llama.cpp's own logits for `ids` (llama-cpp-python's libllama, one batch, float32 KV cache)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the producers extra) runs the file")
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=64, n_threads=1, verbose=False,
                          type_k=0, type_v=0)  # GGML_TYPE_F32 cache (its default f16 one moves logits by ~2e-2)
    try:
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)], dtype=np.float32)
    finally:
        llm.close()


@pytest.mark.parametrize("mscale,mscale_all_dim", [(1.0, 1.0), (1.0, 0.707), (1.0, 0.0)])
def test_deepseek_gguf_yarn_as_llama_cpp_computes(tmp_path_factory, tmp_path, mscale, mscale_all_dim):
    """The file is read as llama.cpp computes it, checked against llama.cpp itself: the fp32 build's logits equal
    libllama's on the same GGUF within 1e-4 for DeepSeek-V3 / Kimi-K2's published yarn (mscale = mscale_all_dim =
    1, where both also equal transformers) and for two a GGUF cannot carry as transformers computes them: mscale 1
    with mscale_all_dim 0.707 (llama.cpp takes mscale = mscale_all_dim) and mscale_all_dim 0 (a
    yarn_log_multiplier of 0: llama.cpp scales the cos/sin and the softmax by 1 + 0.1 ln factor)."""
    yarn = dict(YARN, mscale=mscale, mscale_all_dim=mscale_all_dim)
    model, path = converted(tmp_path_factory, "q_lora", **({} if yarn == YARN else {"rope_parameters": yarn}))
    out = tmp_path / "out"
    onnxforge.build(path, out, "fp32")
    prompt, decode = tokens()
    got = steps(out, [prompt] + [[t] for t in decode])
    theirs = llama_cpp_logits(path, prompt + decode)
    ref = reference_logits(model, prompt + decode)
    print(f"yarn mscale {mscale} / {mscale_all_dim}: vs llama.cpp {np.abs(got - theirs).max():.3g}, "
          f"llama.cpp vs transformers {np.abs(theirs - ref).max():.3g}")
    assert np.abs(got - theirs).max() < FP32_TOL, np.abs(got - theirs).max()
    if mscale == mscale_all_dim:
        assert np.abs(got - ref).max() < FP32_TOL, np.abs(got - ref).max()
    else:  # what the file cannot say: transformers computes otherwise
        assert np.abs(theirs - ref).max() > 1e-2
