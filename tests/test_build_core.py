"""Checkpoint variants (sharded, bf16), fp16/bf16 builds, genai_config and the build report."""
from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import onnx
import pytest
from conftest import onnx_step_logits, prompt_and_decode, reference_logits

import onnxforge
import tiny
from onnxforge.sources.hf import HFSource


def _graph(out):
    return onnx.load(str(out / "model.onnx"), load_external_data=False).graph


def test_sharded_checkpoint_builds_and_matches(tiny_models, tmp_path):
    folder, model = tiny_models("qwen2", max_shard_size="100KB")
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) > 2 and (folder / "model.safetensors.index.json").is_file()
    onnxforge.build(folder, tmp_path / "out")
    prompt, decode = prompt_and_decode()
    diff = np.abs(onnx_step_logits(tmp_path / "out", prompt, decode) - reference_logits(model, prompt + decode)).max()
    assert diff < 1e-4


def test_bf16_checkpoint_builds_and_matches(tiny_models, tmp_path):
    folder, model = tiny_models("llama", dtype="bfloat16")
    st = HFSource(folder)
    assert st.read("model.embed_tokens.weight").dtype == ml_dtypes.bfloat16
    onnxforge.build(folder, tmp_path / "out")
    prompt, decode = prompt_and_decode()
    diff = np.abs(onnx_step_logits(tmp_path / "out", prompt, decode) - reference_logits(model, prompt + decode)).max()
    assert diff < 1e-4


@pytest.mark.parametrize("family", ["llama", "llama_tied", "qwen3"])
def test_fp16_close_to_fp32(tiny_models, tmp_path, family):
    """fp16 keeps ~3 significant digits per op; over a few layers the logits drift by a few 1e-3 relative.
    We allow 2% of the logit range and require the same argmax on at least 90% of positions."""
    folder, model = tiny_models(family)
    onnxforge.build(folder, tmp_path / "out", "fp16")
    assert {i.type.tensor_type.elem_type for i in _graph(tmp_path / "out").input[2:]} == {onnx.TensorProto.FLOAT16}
    prompt, decode = prompt_and_decode()
    ref = reference_logits(model, prompt + decode)
    got = onnx_step_logits(tmp_path / "out", prompt, decode)
    assert np.abs(got - ref).max() < 0.02 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_bf16_build_graph_and_weights(tiny_models, tmp_path):
    """onnxruntime's CPU provider has no bf16 MatMul: check dtypes, I/O and ops, and read the weights back."""
    folder, _ = tiny_models("qwen2")
    out = tmp_path / "out"
    onnxforge.build(folder, out, "bf16", "cuda")
    model = onnx.load(str(out / "model.onnx"))
    g = model.graph
    bf16 = onnx.TensorProto.BFLOAT16
    assert all(o.type.tensor_type.elem_type == bf16 for o in g.output)
    assert all(i.type.tensor_type.elem_type == bf16 for i in g.input if i.name.startswith("past"))
    ops = {n.op_type for n in g.node}
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization", "MatMul", "Gather"} <= ops
    inits = {t.name: t for t in g.initializer}
    src = HFSource(folder)
    w = onnx.numpy_helper.to_array(inits["model.layers.1.mlp.down_proj.weight"]).astype(np.float32)
    ref = src.read("model.layers.1.mlp.down_proj.weight").astype(ml_dtypes.bfloat16).astype(np.float32).T
    np.testing.assert_array_equal(w, ref)
    qkv = onnx.numpy_helper.to_array(inits["model.layers.0.attn.qkv_proj.weight"]).astype(np.float32)
    parts = [src.read(f"model.layers.0.self_attn.{p}_proj.weight") for p in "qkv"]
    np.testing.assert_array_equal(qkv, np.concatenate(parts).astype(ml_dtypes.bfloat16).astype(np.float32).T)
    for t in inits.values():
        if t.name.endswith(".weight") or "cache" in t.name:
            assert t.data_type == bf16, t.name


def test_genai_config_and_report(tiny_models, tmp_path):
    folder, model = tiny_models("mistral")
    out = tmp_path / "out"
    report = onnxforge.build(folder, out)
    cfg = json.loads((out / "genai_config.json").read_text())
    c = model.config
    d = cfg["model"]["decoder"]
    assert d["num_hidden_layers"] == c.num_hidden_layers and d["num_key_value_heads"] == c.num_key_value_heads
    assert d["head_size"] == c.hidden_size // c.num_attention_heads and cfg["model"]["type"] == "mistral"
    assert cfg["model"]["eos_token_id"] == c.eos_token_id and cfg["model"]["context_length"] == c.max_position_embeddings
    assert d["inputs"]["past_key_names"] == "past_key_values.%d.key"
    # ONNX Runtime's default thread count (one per physical core), which onnxruntime-genai accepts; without
    # the key genai runs the model on one thread
    assert d["session_options"]["intra_op_num_threads"] == 0
    og = pytest.importorskip("onnxruntime_genai")
    og.Model(str(out))
    assert {"tokenizer.json", "tokenizer_config.json", "model.onnx", "model.onnx.data"} <= set(p.name for p in out.iterdir())
    saved = json.loads((out / "build_report.json").read_text())
    assert saved["input_sha256"] == report.input_sha256 and len(report.input_sha256) == 64
    assert saved["total_bytes"] >= (out / "model.onnx.data").stat().st_size
    assert "peak memory" in report.summary()
    assert not list(tmp_path.glob(".out.partial*"))


def test_packed_and_unpacked_qkv_agree(tiny_models, tmp_path):
    from onnxforge.quant.recipe import Recipe

    folder, model = tiny_models("qwen2")
    onnxforge.build(folder, tmp_path / "packed")
    onnxforge.build(folder, tmp_path / "unpacked", recipe=Recipe(unpack_matmul=True))
    ops = lambda out: [n.name for n in _graph(out).node if n.op_type == "MatMul"]
    assert any("qkv_proj" in n for n in ops(tmp_path / "packed"))
    assert not any("qkv_proj" in n for n in ops(tmp_path / "unpacked"))
    assert any("/attn/q_proj/" in n for n in ops(tmp_path / "unpacked"))
    prompt, decode = prompt_and_decode()
    ref = reference_logits(model, prompt + decode)
    assert np.abs(onnx_step_logits(tmp_path / "unpacked", prompt, decode) - ref).max() < 1e-4


@pytest.mark.parametrize("provider", ["cuda", "dml", "webgpu"])
def test_gpu_providers_change_dtypes_and_config(tiny_models, tmp_path, provider):
    """GPU builds cannot run here: check the graph. int4 on a GPU computes in fp16 (activations, KV
    cache, MatMulNBits scales), keeps accuracy_level 0, and genai_config names the provider."""
    folder, _ = tiny_models("qwen3")
    out = tmp_path / "out"
    onnxforge.build(folder, out, "int4", provider)
    g = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    f16 = onnx.TensorProto.FLOAT16
    assert all(o.type.tensor_type.elem_type == f16 for o in g.output)
    assert all(i.type.tensor_type.elem_type == f16 for i in g.input if i.name.startswith("past"))
    scales = [t for t in g.initializer if t.name.endswith("weight_scales")]
    assert scales and all(t.data_type == f16 for t in scales)
    nbits = [n for n in g.node if n.op_type == "MatMulNBits"]
    assert nbits and all({a.name: a.i for a in n.attribute}["accuracy_level"] == 0 for n in nbits)
    cfg = json.loads((out / "genai_config.json").read_text())
    # the provider options the anchor writes for it (tests/test_runtime_options.py compares them with its output)
    expected = {"cuda": {"enable_cuda_graph": "0"}, "dml": {"enable_graph_capture": "1"},
                "webgpu": {"enableGraphCapture": "0", "validationMode": "basic"}}[provider]
    assert cfg["model"]["decoder"]["session_options"]["provider_options"] == [{provider: expected}]


def test_prune_lm_head(tiny_models, tmp_path):
    """prune_lm_head (the anchor's option): logits of the last position only, equal to that row of the full
    build's; onnxruntime-genai generates the same tokens; perplexity still scores every position."""
    from conftest import genai_greedy, reference_greedy

    from onnxforge.quant.options import apply_extra_options
    from onnxforge.quant.recipe import Recipe
    from onnxforge.verify.perplexity import ort_logits_fn

    folder, model = tiny_models("llama")
    onnxforge.build(folder, tmp_path / "full")
    onnxforge.build(folder, tmp_path / "pruned", recipe=apply_extra_options(Recipe(), {"prune_lm_head": "true"}))
    logits = next(o for o in _graph(tmp_path / "pruned").output if o.name == "logits")
    assert [d.dim_value for d in logits.type.tensor_type.shape.dim][1:] == [1, 320]
    prompt, decode = prompt_and_decode()
    ref = reference_logits(model, prompt + decode)
    got = onnx_step_logits(tmp_path / "pruned", prompt, decode)
    assert got.shape == (1 + len(decode), ref.shape[1])
    assert np.abs(got - ref[len(prompt) - 1:]).max() < 1e-4
    ids = np.asarray(prompt + decode)
    assert np.abs(ort_logits_fn(tmp_path / "pruned")(ids) - ort_logits_fn(tmp_path / "full")(ids)).max() < 1e-4
    assert genai_greedy(tmp_path / "pruned", prompt) == reference_greedy(model, prompt)
    from onnxforge.verify.parity import verify

    text = tmp_path / "text.txt"
    text.write_text(tiny.TEXT)
    r = verify(tmp_path / "pruned", folder, text=text, tokens=8, window=64, stride=64, plot=False, write=False)
    assert r["passed"] and r["metrics"]["max_abs_diff"] < 1e-4, r["failures"]
    assert all(p["positions"] == 1 + p["greedy_tokens"] for p in r["prompts"])  # the prompt's last + decoded
    ppl = r["perplexity"]
    assert abs(ppl["onnx"]["ppl"] / ppl["reference"]["ppl"] - 1) < 1e-4
