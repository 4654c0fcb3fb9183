"""Mixture-of-experts families (archs/moe.py, graph/moe.py) on tiny random transformers models.

fp32 (MoE op): logits equal transformers' within 1e-4 for a prefill and 8 cached decode steps, and
onnxruntime-genai's greedy 20 tokens equal transformers' generate, for Mixtral (sliding window),
Qwen3-MoE (a dense layer between MoE layers, renormalised top-k), Qwen2-MoE (shared expert with its
sigmoid gate, top-k not renormalised, a dense first layer, q/k/v biases), OLMoE (q/k norms then
clip_qkv), Granite-MoE (multipliers, stacked experts), ERNIE 4.5 MoE (selection on softmax + bias,
shared expert, interleaved rotary, biases), PhiMoE (sparse mixer, LayerNorm).
int4 / int8 (QMoE): equal to transformers with the experts the op holds and every MatMulNBits weight
dequantized, within 1e-4 (accuracy level 0); and within stated bounds of the fp32 logits.
Also: dense layers chosen by decoder_sparse_step and ERNIE's moe_layer_* keys; PhiMoE's sparse mixer with
another top-k refused; routers and shared-expert gates float in quantized builds (the templates); the
anchor's MoE options accepted and refused as it does.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import onnx_step_logits, prompt_and_decode, reference_logits
from family_check import FP32_TOL, check_fp32, max_diff
from moe_check import FAMILIES, moe_reference, qmoe_nodes

import onnxforge
from onnxforge.errors import ConfigError, RecipeError
from onnxforge.quant.recipe import Recipe

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def moe_model(tiny_models):
    def get(name: str):
        return tiny_models(name, **FAMILIES[name])

    return get


def _nodes(out, op: str) -> list:
    g = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    return [n for n in g.node if n.op_type == op]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_fp32(moe_model, tmp_path, name):
    folder, model = moe_model(name)
    out = tmp_path / "out"
    check_fp32(folder, model, out)
    report = json.loads((out / "build_report.json").read_text())
    assert not report.get("unread_tensors"), report.get("unread_tensors")  # every expert tensor was read
    moe_layers = [i for i, layer in enumerate(model.model.layers)
                  if hasattr(getattr(layer, "mlp", None), "experts") or hasattr(layer, "block_sparse_moe")]
    ops = _nodes(out, "MoE")
    assert sorted({int(n.name.split("layers.")[1].split("/")[0]) for n in ops}) == moe_layers
    for n in ops:
        a = {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute}
        assert a["swiglu_fusion"] == 1 and a["activation_type"] == b"swiglu"
        assert a["normalize_routing_weights"] == 1  # see graph/moe.py: 0 is wrong in onnxruntime 1.31.1


# Dense layers chosen by the families' own keys (the tiny FAMILIES configs use mlp_only_layers and ERNIE's
# default start index): Qwen's decoder_sparse_step, ERNIE's moe_layer_end_index / moe_layer_interval.
LAYER_KEYS = {
    "qwen3_moe": (dict(decoder_sparse_step=2, mlp_only_layers=[]), [1]),
    "qwen2_moe": (dict(decoder_sparse_step=2, mlp_only_layers=[]), [1]),
    "ernie4_5_moe": (dict(moe_layer_start_index=0, moe_layer_end_index=1, moe_layer_interval=1), [0, 1]),
    "ernie4_5_moe-interval": (dict(moe_layer_start_index=0, moe_layer_interval=2), [1]),
}


@pytest.mark.parametrize("case", list(LAYER_KEYS))
def test_moe_layers_from_config_keys(tiny_models, tmp_path, case):
    """fp32 against transformers (prefill, cached decode, 20 greedy tokens in onnxruntime-genai) where the
    config's layer keys make dense layers beside the MoE ones; MoE nodes exactly on transformers' MoE layers."""
    name = case.split("-")[0]
    keys, expected = LAYER_KEYS[case]
    folder, model = tiny_models(name, **{**FAMILIES[name], **keys})
    moe_layers = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]
    assert moe_layers == expected  # the keys took effect in transformers
    out = tmp_path / "out"
    check_fp32(folder, model, out)
    assert sorted(int(n.name.split("layers.")[1].split("/")[0]) for n in _nodes(out, "MoE")) == moe_layers


def test_sparse_mixer_runs_as_two_passes(moe_model, tmp_path):
    """PhiMoE: the CPU kernel ignores use_sparse_mixer, so the mixer is two k=1 passes over shared weights."""
    folder, _ = moe_model("phimoe")
    onnxforge.build(folder, tmp_path / "out", "fp32")
    ops = _nodes(tmp_path / "out", "MoE")
    assert len(ops) == 2 * FAMILIES["phimoe"]["num_hidden_layers"]
    for n in ops:
        a = {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute}
        assert a["k"] == 1 and a.get("use_sparse_mixer", 0) == 0
    first, second = ops[0], ops[1]
    assert first.input[2:] == second.input[2:]  # same expert initializers


def test_sparse_mixer_needs_top2(moe_model, tmp_path):
    """PhiMoE's sparse mixer picks exactly two experts: any other top-k is a clear error, nothing written."""
    folder, _ = moe_model("phimoe")
    bad = _copy_with_config(folder, tmp_path / "bad", num_experts_per_tok=1)
    with pytest.raises(ConfigError, match="the sparse mixer selects 2 experts, but the config asks for 1"):
        onnxforge.build(bad, tmp_path / "out", "fp32")
    assert not (tmp_path / "out").exists()


def _copy_with_config(folder, dest, **changes):
    dest.mkdir()
    for f in folder.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((folder / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**cfg, **changes}))
    return dest


def _quant(bits: int, block: int, method: str = "rtn", symmetric: bool = True) -> Recipe:
    return Recipe(precision=f"int{bits}", method=method, accuracy_level=0, symmetric=symmetric, qmoe_block_size=block)


@pytest.mark.parametrize("name,bits,block,method,symmetric", [
    ("mixtral", 4, 16, "rtn", True),
    ("qwen3_moe", 4, 0, "rtn", True),
    ("qwen2_moe", 4, 32, "k_quant", False),
    ("ernie4_5_moe", 4, 16, "rtn", True),
    ("phimoe", 4, 16, "hqq", True),
    ("olmoe", 8, 0, "rtn", True),
    ("granitemoe", 4, 16, "default", True),
])
def test_quantized_equals_dequantized_reference(moe_model, tmp_path, name, bits, block, method, symmetric):
    folder, model = moe_model(name)
    out = tmp_path / "out"
    onnxforge.build(folder, out, recipe=_quant(bits, block, method, symmetric))
    nodes = qmoe_nodes(out)
    assert nodes and all(n["bits"] == bits and n["block"] == block for n in nodes)
    assert all((n["fc1"][2] is None) == symmetric for n in nodes)
    routers = [n for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node
               if "/moe/router/MatMul" in n.name]
    assert routers and all(n.op_type == "MatMul" for n in routers)  # routers stay float (templates)
    diff = max_diff(out, moe_reference(folder, out))
    assert diff < FP32_TOL, f"max abs diff vs the dequantized reference {diff}"


# Experts alone quantized (fp32 elsewhere), tiny Mixtral, logit range ~16, 24 positions; measured
# (max / mean abs diff vs fp32): int4 block 16: 3.7 / 0.31, int4 per-channel: 3.1 / 0.34,
# int8 block 16 (int8 activations on CPU): 0.18 / 0.029, int8 per-channel: 0.16 / 0.022.
# The random tiny model is far more sensitive than a trained one (its weights are spread on purpose).
BOUNDS = {("int4", 16): (5.0, 0.5), ("int4", 0): (5.0, 0.5), ("int8", 16): (0.4, 0.06), ("int8", 0): (0.4, 0.05)}


@pytest.mark.parametrize("kind,block", list(BOUNDS))
def test_quantized_near_fp32(moe_model, tmp_path, kind, block):
    folder, model = moe_model("mixtral")
    out = tmp_path / "out"
    onnxforge.build(folder, out, recipe=Recipe(precision="fp32", moe_quant_type=kind, qmoe_block_size=block,
                                               method="rtn"))
    assert {(n["bits"], n["block"]) for n in qmoe_nodes(out)} == {(int(kind[3:]), block)}
    prompt, decode = prompt_and_decode()
    ref = reference_logits(model, prompt + decode)
    got = onnx_step_logits(out, prompt, decode)
    worst, mean = float(np.abs(got - ref).max()), float(np.abs(got - ref).mean())
    bound_max, bound_mean = BOUNDS[(kind, block)]
    assert worst < bound_max and mean < bound_mean, f"{kind} block {block}: max {worst}, mean {mean} vs fp32"


def test_moe_options(moe_model, tmp_path):
    """The anchor's options: moe_quant_type / use_8bits_moe pick the experts' bits, qmoe_block_size the block;
    a block that does not divide the expert sizes is an error before anything is written."""
    from onnxforge.quant.options import apply_extra_options

    folder, _ = moe_model("mixtral")
    base = Recipe(precision="int4", method="rtn")
    r = apply_extra_options(base, {"use_8bits_moe": "1", "qmoe_block_size": "0"})
    out = tmp_path / "int8"
    onnxforge.build(folder, out, recipe=r)
    assert {(n["bits"], n["block"]) for n in qmoe_nodes(out)} == {(8, 0)}
    assert {a.i for n in _nodes(out, "MatMulNBits") for a in n.attribute if a.name == "bits"} == {4}
    r = apply_extra_options(Recipe(precision="fp32"), {"moe_quant_type": "int4", "qmoe_block_size": "16"})
    out = tmp_path / "experts_only"
    onnxforge.build(folder, out, recipe=r)
    assert {(n["bits"], n["block"]) for n in qmoe_nodes(out)} == {(4, 16)} and not _nodes(out, "MatMulNBits")
    with pytest.raises(RecipeError, match="qmoe_block_size 32 does not divide the experts' intermediate size"):
        onnxforge.build(folder, tmp_path / "bad", recipe=apply_extra_options(base, {"qmoe_block_size": "32"}))
    assert not (tmp_path / "bad").exists()
    for bad in ({"qmoe_block_size": "24"}, {"moe_quant_type": "nvfp4"}, {"moe_quant_type": "mxfp4"},
                {"qmoe_weights_prepacked": "1"}, {"qmoe_weights_prepacked": "2"}):
        with pytest.raises(RecipeError):
            apply_extra_options(base, bad)


def test_moe_options_accepted(moe_model, tmp_path):
    """The anchor's values it builds with are accepted: qmoe_weights_prepacked 0 / -1 (onnxforge writes the raw
    layout either way), use_8bits_moe false (int4 experts), moe_quant_type over use_8bits_moe whatever the order;
    the same through the command line."""
    from onnxforge.cli import main
    from onnxforge.quant.options import apply_extra_options

    base = Recipe(precision="int4", method="rtn")
    for value in ("0", "-1"):
        assert apply_extra_options(base, {"qmoe_weights_prepacked": value}).qmoe_weights_prepacked == int(value)
    assert apply_extra_options(base, {"use_8bits_moe": "false"}).moe_quant_type == "int4"
    assert apply_extra_options(base, {"use_8bits_moe": "true"}).moe_quant_type == "int8"
    for pair in ({"moe_quant_type": "int4", "use_8bits_moe": "1"}, {"use_8bits_moe": "1", "moe_quant_type": "int4"}):
        assert apply_extra_options(base, pair).moe_quant_type == "int4"
    folder, _ = moe_model("mixtral")
    out = tmp_path / "cli"
    assert main(["build", "-m", str(folder), "-o", str(out), "-p", "int4", "--method", "rtn", "--quiet",
                 "--extra_options", "use_8bits_moe=1", "qmoe_block_size=16", "qmoe_weights_prepacked=0"]) == 0
    assert {(n["bits"], n["block"]) for n in qmoe_nodes(out)} == {(8, 16)}
    assert all("weights_prepacked" not in n["attrs"] for n in qmoe_nodes(out))  # CPU: the op's raw layout


def test_moe_options_refused(moe_model, tmp_path, capsys):
    """Block sizes the op does not take, a block that does not divide the hidden size (64) or the experts'
    intermediate size (48), values that are not numbers: errors naming the option, before anything is written."""
    from onnxforge.cli import main
    from onnxforge.quant.options import apply_extra_options

    folder, _ = moe_model("mixtral")
    base = Recipe(precision="int4", method="rtn")
    for value in ("8", "24", "512", "-32"):
        with pytest.raises(RecipeError, match=f"qmoe_block_size must be 0 \\(per channel\\) or one of 16, 32, 64, 128, "
                                              f"256, got {value}"):
            apply_extra_options(base, {"qmoe_block_size": value})
    for bad in ({"qmoe_block_size": "abc"}, {"qmoe_weights_prepacked": "x"}, {"use_8bits_moe": "maybe"}):
        with pytest.raises(RecipeError, match=next(iter(bad))):
            apply_extra_options(base, bad)
    with pytest.raises(RecipeError, match=r"qmoe_block_size 128 does not divide the experts' hidden size \(64\)"):
        onnxforge.build(folder, tmp_path / "a", recipe=apply_extra_options(base, {"qmoe_block_size": "128"}))
    fp32_experts_int8 = apply_extra_options(Recipe(precision="fp32"),
                                            {"moe_quant_type": "int8", "qmoe_block_size": "32"})
    with pytest.raises(RecipeError, match=r"qmoe_block_size 32 does not divide the experts' intermediate size \(48\)"):
        onnxforge.build(folder, tmp_path / "b", recipe=fp32_experts_int8)
    assert main(["build", "-m", str(folder), "-o", str(tmp_path / "c"), "-p", "int4", "--quiet",
                 "--extra_options", "qmoe_block_size=48"]) != 0
    assert "qmoe_block_size must be 0 (per channel) or one of 16, 32, 64, 128, 256, got 48" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in "abc")


def test_int8_placement_targets_experts(moe_model, tmp_path):
    """llama.cpp's mixed rule bumps ffn down: on the MoE layers it picked, the experts go to 8 bits."""
    folder, _ = moe_model("mixtral")
    out = tmp_path / "out"
    onnxforge.build(folder, out, recipe=Recipe(precision="int4", method="rtn", int8_mixed_layers=True, qmoe_block_size=16))
    assert {n["layer"]: n["bits"] for n in qmoe_nodes(out)} == {0: 4, 1: 8}  # of 2 layers the rule picks layer 1


@pytest.mark.parametrize("name,precision", [(name, "int4") for name in FAMILIES] + [("qwen2_moe", "int8")])
def test_routers_and_shared_gates_stay_float(moe_model, tmp_path, name, precision):
    """AMD Quark's MoE templates (quant/templates.py): in a quantized build the routers, their biases
    (ERNIE's selection bias) and Qwen2-MoE's shared-expert gates stay float MatMuls over float32 tensors,
    reported as such, while every other linear layer is quantized."""
    folder, _ = moe_model(name)
    out = tmp_path / "out"
    onnxforge.build(folder, out, recipe=Recipe(precision=precision, method="rtn", qmoe_block_size=16))  # 16 | 48
    g = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    dtypes = {t.name: t.data_type for t in g.initializer}
    kept = [n for n in g.node if "/moe/router/" in n.name or "/shared_expert_gate/" in n.name]
    routers = [n for n in kept if n.name.endswith("/moe/router/MatMul")]
    gates = [n for n in kept if n.name.endswith("/shared_expert_gate/MatMul")]
    assert len(routers) == len({n["layer"] for n in qmoe_nodes(out)}) > 0
    assert len(gates) == (len(routers) if name == "qwen2_moe" else 0)
    for n in kept:
        assert n.op_type != "MatMulNBits", n.name
        weights = [i for i in n.input if i in dtypes and not i.startswith("/model/constants/")]
        assert all(dtypes[i] == onnx.TensorProto.FLOAT for i in weights), (n.name, weights)
    assert all(n.op_type == "MatMul" and any(i in dtypes for i in n.input) for n in routers + gates)
    others = [n.name for n in g.node if n.op_type == "MatMul" and n not in routers + gates]
    assert not others and _nodes(out, "MatMulNBits"), others  # everything else is quantized
    report = json.loads((out / "build_report.json").read_text())
    floats = [gr for gr in report["groups"] if "/moe/router" in gr["label"] or "shared_expert_gate" in gr["label"]]
    assert floats and all(gr["storage"] == "fp32" for gr in floats), floats


def test_bad_expert_config(tmp_path, moe_model):
    folder, _ = moe_model("mixtral")
    cfg = json.loads((folder / "config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in folder.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "config.json").write_text(json.dumps({**cfg, "num_experts_per_tok": 9}))
    with pytest.raises(ConfigError, match="experts per token"):
        onnxforge.build(bad, tmp_path / "out", "fp32")


def test_stacked_expert_checkpoint(moe_model, tmp_path):
    """transformers 5's own parameter layout (`mlp.experts.gate_up_proj` (E, 2I, H), `down_proj` (E, H, I)),
    as a checkpoint saved from the in-memory state dict holds it: read one expert at a time, same logits."""
    from safetensors.torch import save_file

    folder, model = moe_model("qwen3_moe")
    fused = tmp_path / "fused"
    fused.mkdir()
    for f in folder.iterdir():
        if not f.name.endswith(".safetensors"):
            (fused / f.name).write_bytes(f.read_bytes())
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, str(fused / "model.safetensors"))
    out = tmp_path / "out"
    onnxforge.build(fused, out, "fp32")
    assert max_diff(out, model) < FP32_TOL
    report = json.loads((out / "build_report.json").read_text())
    assert not report.get("unread_tensors")
    assert any("mlp.experts.gate_up_proj" in s for g in report["groups"] for s in g["sources"])
