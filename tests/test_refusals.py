"""Refuse what cannot be right (issue 23, item 2): a model shape no execution provider runs, scaled dtypes
without their scales, quantization_config fields onnxforge cannot reproduce, tensors the config promises.

Each case feeds the checkpoint or config that used to build silently wrong, and checks the one error (or,
with an explicit opt-in, the warning in the summary and build_report.json)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from tiny import write_random_llama

import onnxforge
from onnxforge.cli import main
from onnxforge.errors import CheckpointError, ConfigError

PROVIDERS = ("cpu", "cuda", "dml", "webgpu")


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def _cli_build(folder, out, capsys, *extra):
    code = main(["build", "-m", str(folder), "-o", str(out), "--quiet", *extra])
    return code, capsys.readouterr().err.strip().splitlines()


# -- shapes GroupQueryAttention cannot run, on any provider -----------------------------------------
def gqa_runs(head_dim: int, rotary_dim: int) -> bool:
    """onnxruntime's own answer: does a GroupQueryAttention node of this shape run (CPU provider)?"""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto as T
    from onnx import helper as h

    q_w, kv_w = 2 * head_dim, head_dim
    ins = [h.make_tensor_value_info(n, T.FLOAT, [1, 3, w]) for n, w in (("q", q_w), ("k", kv_w), ("v", kv_w))]
    inits = [h.make_tensor("sk", T.INT32, [1], [2]), h.make_tensor("tl", T.INT32, [], [3])]
    names, attrs = ["q", "k", "v", "", "", "sk", "tl"], {}
    if rotary_dim:
        cache = np.ones((8, rotary_dim // 2), np.float32)
        inits += [onnx.numpy_helper.from_array(cache, "cos"), onnx.numpy_helper.from_array(cache * 0, "sin")]
        names += ["cos", "sin"]
        attrs["do_rotary"] = 1
    node = h.make_node("GroupQueryAttention", names, ["o", "pk", "pv"], domain="com.microsoft", num_heads=2,
                       kv_num_heads=1, **attrs)
    graph = h.make_graph([node], "g", ins, [h.make_tensor_value_info("o", T.FLOAT, None)], inits)
    model = h.make_model(graph, ir_version=10,
                         opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1)])
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feeds = {n: np.ones((1, 3, w), np.float32) for n, w in (("q", q_w), ("k", kv_w), ("v", kv_w))}
    try:
        sess.run(None, feeds)
        return True
    except Exception:  # onnxruntime's own shape check said no
        return False


@pytest.mark.parametrize("head_dim,rotary_dim", [(32, 32), (32, 16), (48, 32), (48, 48), (24, 0), (40, 0),
                                                 (24, 24), (24, 16), (32, 24), (12, 0), (12, 12), (64, 40)])
def test_the_shape_rule_is_onnxruntimes(head_dim, rotary_dim):
    """rotary_in_gqa / attention_shape_problem say yes exactly where onnxruntime's GroupQueryAttention runs."""
    from onnxforge.runs_on import attention_shape_problem, rotary_in_gqa

    runs = attention_shape_problem(head_dim) is None and (not rotary_dim or rotary_in_gqa(head_dim, rotary_dim))
    assert runs == gqa_runs(head_dim, rotary_dim), (head_dim, rotary_dim)


def _phi(folder, partial: float, hidden: int = 64):
    """A tiny Phi-2 (a family with partial rotary): two heads of hidden/2, rotary head_dim x partial."""
    pytest.importorskip("torch")
    import tiny

    return tiny.make_model("phi", folder, cls="PhiConfig", hidden_size=hidden, num_attention_heads=2,
                           num_key_value_heads=1, intermediate_size=97, num_hidden_layers=2,
                           partial_rotary_factor=partial)


def _attention_ops(out):
    import onnx

    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    gqa = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in graph.node
           if n.op_type == "GroupQueryAttention"]
    return gqa, [n for n in graph.node if n.op_type == "RotaryEmbedding"]


@pytest.mark.parametrize("hidden,partial", [(64, 0.75), (48, 1.0), (80, 0.5)], ids=["head32-rotary24",
                                                                                   "head24-rotary24",
                                                                                   "head40-rotary20"])
def test_a_rotary_gqa_cannot_take_is_applied_before_it(tmp_path, hidden, partial):
    """Refused for CPU before: now q and k go through RotaryEmbedding and GQA runs without rotary; fp32 logits
    equal transformers' (prefill + 8 cached steps, 1e-4) and onnxruntime-genai's greedy 20 tokens equal its."""
    from family_check import check_fp32

    model = _phi(tmp_path / "ckpt", partial, hidden)
    check_fp32(tmp_path / "ckpt", model, tmp_path / "out")
    gqa, rope = _attention_ops(tmp_path / "out")
    assert len(rope) == 4 and all("do_rotary" not in g for g in gqa), (len(rope), gqa)


@pytest.mark.parametrize("provider", ["cuda", "webgpu"])
def test_the_rewrite_is_built_for_the_gpu_providers(tmp_path, provider):
    """-e cuda used to build rotary 24 into GQA, which CUDA's shared shape check rejects at run time."""
    _phi(tmp_path / "ckpt", 0.75)
    onnxforge.build(tmp_path / "ckpt", tmp_path / "out", "fp16", provider)
    gqa, rope = _attention_ops(tmp_path / "out")
    assert len(rope) == 4 and all("do_rotary" not in g for g in gqa)
    assert {a.name: a.i for n in rope for a in n.attribute}["rotary_embedding_dim"] == 24


def test_dml_cannot_take_a_partial_rotary_outside_gqa(tmp_path, capsys):
    """DirectML's RotaryEmbedding rotates whole heads: a partial rotary there is refused, naming what runs."""
    _phi(tmp_path / "ckpt", 0.75)
    capsys.readouterr()
    code, err = _cli_build(tmp_path / "ckpt", tmp_path / "out", capsys, "-p", "fp16", "-e", "dml")
    assert code == 2 and len(err) == 1 and "rotary dimension 24" in err[0] and "-e cpu, cuda and webgpu" in err[0]
    assert not (tmp_path / "out").exists()
    _phi(tmp_path / "full", 1.0, hidden=48)  # head_dim 24, whole-head rotary: DirectML's op takes it
    onnxforge.build(tmp_path / "full", tmp_path / "out-full", "fp16", "dml")


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_head_dim_no_provider_runs_is_refused_for_every_provider(tmp_path, provider, capsys):
    folder = write_random_llama(tmp_path / "ckpt", hidden=48, heads=4, kv_heads=2)  # head_dim 12
    code, err = _cli_build(folder, tmp_path / "out", capsys, "-p", "fp16", "-e", provider)
    assert code == 2 and len(err) == 1, err
    assert "head_dim 12 is not a multiple of 8" in err[0] and "any execution provider" in err[0], err
    assert not (tmp_path / "out").exists()


# -- FP8 (and integer) weights without the scales or the config that applies them ----------------------
def _retype(folder, name, dtype, extra=None):
    """Rewrite `folder`'s single safetensors file with tensor `name` stored as torch `dtype`, plus `extra`."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    tensors[name] = tensors[name].to(dtype)
    tensors.update(extra or {})
    save_file(tensors, str(folder / "model.safetensors"))
    return torch


@pytest.fixture
def llama(tmp_path):
    return write_random_llama(tmp_path / "ckpt", hidden=64, heads=4, kv_heads=2)


@pytest.mark.parametrize("dtype,shown", [("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")])
def test_fp8_weights_without_quantization_config_are_refused(llama, tmp_path, capsys, dtype, shown):
    torch = pytest.importorskip("torch")
    _retype(llama, "model.layers.1.mlp.down_proj.weight", getattr(torch, dtype))
    code, err = _cli_build(llama, tmp_path / "out", capsys)
    assert code == 2 and len(err) == 1, err
    assert "'model.layers.1.mlp.down_proj.weight'" in err[0] and shown in err[0], err
    assert "no quantization_config" in err[0] and "no scale tensor" in err[0], err
    assert not (tmp_path / "out").exists()


def test_fp8_weights_with_scales_but_no_config_name_the_scales(llama, tmp_path):
    """DeepSeek-style blocks (weight_scale_inv beside the F8 weight): without quantization_config, refused when
    the checkpoint is opened, naming the scales; with quant_method fp8, the one unsupported-format error."""
    torch = pytest.importorskip("torch")
    name = "model.layers.0.self_attn.q_proj.weight"
    _retype(llama, name, torch.float8_e4m3fn,
            {"model.layers.0.self_attn.q_proj.weight_scale_inv": torch.ones(1, 1)})
    from onnxforge.sources.open import open_source

    with pytest.raises(CheckpointError, match=r"q_proj.weight'.*F8_E4M3.*no quantization_config.*"
                                              r"q_proj.weight_scale_inv beside it"):
        open_source(llama)  # before any weight is read
    _edit_config(llama, quantization_config={"quant_method": "fp8", "activation_scheme": "dynamic",
                                             "weight_block_size": [128, 128]})
    with pytest.raises(CheckpointError, match=r"'fp8' format.*supported: gptq, awq"):
        onnxforge.build(llama, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_fp8_tensor_beside_a_gptq_config_is_refused(tmp_path):
    """A supported quantization_config does not cover FP8 tensors it does not describe."""
    torch = pytest.importorskip("torch")
    import tiny
    from prequant_producers import write_prequantized

    from onnxforge.sources.open import open_source

    tiny.make_model("llama", tmp_path / "float", hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=32, intermediate_size=256)
    write_prequantized(tmp_path / "float", tmp_path / "q", tmp_path / "ref", "gptq", 4, 32, False)
    _retype(tmp_path / "q", "lm_head.weight", torch.float8_e4m3fn)
    with pytest.raises(CheckpointError, match=r"'lm_head.weight'.*F8_E4M3.*describes GPTQ int4 g32 asym weights"):
        open_source(tmp_path / "q")


def test_integer_weights_are_refused_when_the_checkpoint_is_opened(llama):
    """int8 weights with no quantization_config: refused at open (before the writer), not at their read."""
    from safetensors.numpy import load_file, save_file

    from onnxforge.sources.open import open_source

    tensors = load_file(str(llama / "model.safetensors"))
    tensors["model.layers.0.mlp.up_proj.weight"] = (tensors["model.layers.0.mlp.up_proj.weight"] * 50).astype(np.int8)
    save_file(tensors, str(llama / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"up_proj.weight'.*stored as int8.*no quantization_config"):
        open_source(llama)


# -- every warning the README promises is in build_report.json ------------------------------------------
def test_act_order_gptq_warning_reaches_build_report_json(tmp_path, capsys):
    """README: "an act-order GPTQ (g_idx not in group order) is re-quantized, with a warning in the report"."""
    pytest.importorskip("torch")
    import tiny
    from prequant_producers import write_prequantized

    float_dir = tmp_path / "float"
    tiny.make_model("llama", float_dir, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                    intermediate_size=256)
    write_prequantized(float_dir, tmp_path / "q", tmp_path / "ref", "gptq", 4, 32, False, act_order=True)
    assert main(["build", "-m", str(tmp_path / "q"), "-o", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr()
    saved = json.loads((tmp_path / "out" / "build_report.json").read_text())
    warned = [w for w in saved["warnings"] if "act-order g_idx" in w and "re-quantized" in w]
    assert len(warned) == 1 and "8 weight groups" in warned[0], saved["warnings"]  # 2 layers x qkv, o, gate_up, down
    assert "WARNING: " + warned[0] in printed.out + printed.err or warned[0] in printed.err

    # a GPTQ checkpoint in group order is carried over exactly: no warning
    write_prequantized(float_dir, tmp_path / "q2", tmp_path / "ref2", "gptq", 4, 32, False)
    report = onnxforge.build(tmp_path / "q2", tmp_path / "out2")
    assert report.warnings == [], report.warnings


# -- every field of a quantization_config is read ---------------------------------------------------------
@pytest.fixture(scope="module")
def prequant_dirs(tmp_path_factory):
    """A tiny Llama quantized as GPTQ, AWQ and Quark write it (tests/prequant_producers.py)."""
    pytest.importorskip("torch")
    import tiny
    from prequant_producers import write_prequantized

    root = tmp_path_factory.mktemp("refusals_prequant")
    tiny.make_model("llama", root / "float", hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=32, intermediate_size=256)
    for method in ("gptq", "awq", "quark-int4"):
        write_prequantized(root / "float", root / method, root / f"{method}-ref", method, 4, 32, method == "quark-int4")
    return root


def _with_qconfig(prequant_dirs, method, tmp_path, edit):
    folder = tmp_path / method
    shutil.copytree(prequant_dirs / method, folder)
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg["quantization_config"])
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def _set(**kv):
    return lambda q: q.update(kv)


def _set_in(key, **kv):
    return lambda q: q[key].update(kv)


REFUSED = [  # method, edit of its quantization_config, the field and value the error must name
    ("gptq", _set(dynamic={"-:.*down_proj": {}}), 'quantization_config.dynamic = {"-:.*down_proj": {}}'),
    ("gptq", _set(rotation="hadamard"), "quantization_config.rotation = 'hadamard'"),
    ("gptq", _set(pack_dtype="int16"), "quantization_config.pack_dtype = 'int16'"),
    ("gptq", _set(act_bits=8), "quantization_config.act_bits = 8"),
    ("awq", _set(act_quant={"bits": 8}), 'quantization_config.act_quant = {"bits": 8}'),
    ("quark-int4", _set(algo_config=[{"name": "rotation"}]), "quantization_config.algo_config[0]"),
    ("quark-int4", _set_in("export", weight_format="fake_quantized"),
     "quantization_config.export.weight_format = 'fake_quantized'"),
    ("quark-int4", lambda q: q["global_quant_config"]["weight"].update(is_dynamic=True),
     "quantization_config.global_quant_config.weight.is_dynamic = True"),
    ("quark-int4", _set(kv_cache_quant_config={"*v_proj": {"dtype": "fp8_e4m3"}}),
     "quantization_config.kv_cache_quant_config"),
    ("quark-int4", _set_in("global_quant_config", input_tensors={"dtype": "int8", "qscheme": "per_tensor",
                                                                 "is_dynamic": True}),
     'quantization_config.global_quant_config.input_tensors = {"dtype": "int8"'),
]


@pytest.mark.parametrize("method,edit,field", REFUSED, ids=[f"{m}-{f.split(' =')[0].split('.')[-1]}"
                                                            for m, _, f in REFUSED])
def test_quantization_config_fields_onnxforge_cannot_reproduce_are_refused(prequant_dirs, tmp_path, method, edit,
                                                                           field):
    from onnxforge.sources.open import open_source

    folder = _with_qconfig(prequant_dirs, method, tmp_path, edit)
    with pytest.raises(ConfigError) as err:
        open_source(folder)
    assert field in str(err.value) and "original float checkpoint" in str(err.value), str(err.value)


def test_a_refused_field_is_one_cli_line(prequant_dirs, tmp_path, capsys):
    folder = _with_qconfig(prequant_dirs, "gptq", tmp_path, _set(dynamic={"+:.*": {"bits": 8}}))
    code, err = _cli_build(folder, tmp_path / "out", capsys)
    assert code == 2 and len(err) == 1 and "quantization_config.dynamic" in err[0], err
    assert not (tmp_path / "out").exists()
    # the counterpart: what transformers' own GPTQConfig / AwqConfig write (calibration settings), and unknown
    # keys left at null/false, are carried over
    from transformers import AwqConfig, GPTQConfig

    def producer(cfg):
        return lambda q: q.update({k: getattr(v, "value", v) for k, v in cfg.to_dict().items()})

    gptq = producer(GPTQConfig(bits=4, group_size=32, sym=False, dataset="c4", model_seqlen=2048, desc_act=False))
    folder = _with_qconfig(prequant_dirs, "gptq", tmp_path / "inert", lambda q: (
        gptq(q), q.update(some_future_flag=False, dynamic=None, lm_head=False)))
    report = onnxforge.build(folder, tmp_path / "out")
    assert report.precision == "source" and report.warnings == []
    folder = _with_qconfig(prequant_dirs, "awq", tmp_path / "inert", producer(AwqConfig(
        bits=4, group_size=32, zero_point=True, version="gemm")))
    onnxforge.build(folder, tmp_path / "out-awq")
    folder = _with_qconfig(prequant_dirs, "quark-int4", tmp_path / "inert", _set(algo_config=[{"name": "awq"}]))
    onnxforge.build(folder, tmp_path / "out-quark")


def write_compressed_tensors(float_dir, out, preset: str, group: int = 32):
    """A checkpoint made by compressed-tensors itself, as llm-compressor saves one: the preset scheme applied
    to every Linear but the lm_head, scales from each group's min/max (the library's calculate_qparams), then
    ModelCompressor packs the weights ("pack-quantized") and writes quantization_config into config.json."""
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32)
    scheme = preset_name_to_scheme(preset, ["Linear"])
    scheme.weights.group_size = group
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "weight_scale"):
                w = module.weight.reshape(module.weight.shape[0], -1, group)
                scale, zero = calculate_qparams(w.amin(-1), w.amax(-1), module.quantization_scheme.weights)
                module.weight_scale.copy_(scale.reshape(module.weight_scale.shape))
                module.weight_zero_point.copy_(zero.reshape(module.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(out)
    for extra in float_dir.iterdir():
        if extra.name.startswith("tokenizer"):
            shutil.copy(extra, out / extra.name)
    return out


def test_compressed_tensors_w4a8_is_refused_naming_its_activation_quantization(prequant_dirs, tmp_path, capsys):
    """llm-compressor's W4A8 (int8 dynamic per-token activations) is not carried over as an "exact" W4A16."""
    pytest.importorskip("compressed_tensors")
    from onnxforge.sources.open import open_source

    w4a8 = write_compressed_tensors(prequant_dirs / "float", tmp_path / "w4a8", "W4A8")
    capsys.readouterr()  # the producer's progress bars
    with pytest.raises(ConfigError) as err:
        open_source(w4a8)
    msg = str(err.value)
    assert "quantization_config.config_groups.group_0.input_activations = {" in msg and '"strategy": "token"' in msg
    assert '"num_bits": 8' in msg and "quantized activations" in msg and "W4A16" in msg, msg
    code, lines = _cli_build(w4a8, tmp_path / "out", capsys)
    assert code == 2 and len(lines) == 1 and "input_activations" in lines[0] and not (tmp_path / "out").exists()
    assert "drop_activation_quant=true" in lines[0]
    # the counterpart: the same producer's W4A16 (every field of its config read) is carried over exactly
    w4a16 = write_compressed_tensors(prequant_dirs / "float", tmp_path / "w4a16", "W4A16")
    report = onnxforge.build(w4a16, tmp_path / "out16")
    stored = {g["storage"] for g in report.groups if "proj" in g["label"] and "lm_head" not in g["label"]}
    assert stored and all("(exact compressed-tensors int4 g32 sym)" in s for s in stored), stored
    assert report.warnings == []


def test_drop_activation_quant_is_an_explicit_opt_in_with_a_warning(prequant_dirs, tmp_path, capsys):
    """--extra_options drop_activation_quant=true builds a W4A8 checkpoint's weights alone: the warning names what
    was dropped, in the summary and in build_report.json; on a checkpoint with nothing to drop it is refused."""
    pytest.importorskip("compressed_tensors")
    w4a8 = write_compressed_tensors(prequant_dirs / "float", tmp_path / "w4a8", "W4A8")
    capsys.readouterr()
    code = main(["build", "-m", str(w4a8), "-o", str(tmp_path / "out"), "--extra_options",
                 "drop_activation_quant=true"])
    printed = capsys.readouterr()
    saved = json.loads((tmp_path / "out" / "build_report.json").read_text())
    warned = [w for w in saved["warnings"] if "drop_activation_quant=true" in w]
    assert code == 0 and len(warned) == 1, saved["warnings"]
    assert "config_groups.group_0.input_activations" in warned[0] and '"strategy": "token"' in warned[0]
    assert warned[0] in printed.out + printed.err
    assert saved["recipe"]["drop_activation_quant"] is True
    stored = {g["storage"] for g in saved["groups"] if "proj" in g["label"] and "lm_head" not in g["label"]}
    assert stored and all("(exact compressed-tensors int4 g32 sym)" in s for s in stored), stored
    code, err = _cli_build(prequant_dirs / "gptq", tmp_path / "out2", capsys, "--extra_options",
                           "drop_activation_quant=true")
    assert code == 2 and len(err) == 1 and "no quantized activations to drop" in err[0], err
    assert not (tmp_path / "out2").exists()


# -- a tensor the config says exists is an error naming it --------------------------------------------
@pytest.mark.parametrize("key,missing", [("attention_bias", "model.layers.0.self_attn.q_proj.bias"),
                                         ("mlp_bias", "model.layers.0.mlp.gate_proj.bias")])
def test_a_bias_the_config_promises_is_missing(llama, tmp_path, capsys, key, missing):
    """(Already refused before this issue; kept as the guard.)"""
    _edit_config(llama, **{key: True})
    code, err = _cli_build(llama, tmp_path / "out", capsys)
    assert code == 2 and len(err) == 1 and repr(missing) in err[0] and "missing" in err[0], err
    assert not (tmp_path / "out").exists()


def test_a_qwen2_checkpoint_without_its_qkv_bias_is_refused(tmp_path):
    """Qwen2 always has q/k/v biases (no config key): one that lacks them is refused, naming the tensor."""
    pytest.importorskip("torch")
    import tiny
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "qwen2"
    tiny.make_model("qwen2", folder)
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"'model.layers.1.self_attn.k_proj.bias' is missing"):
        onnxforge.build(folder, tmp_path / "out", "fp32")
    assert not (tmp_path / "out").exists()
