"""Mixture-of-experts families (archs/moe.py, graph/moe.py) on tiny random transformers models.

fp32 (MoE op): logits equal transformers' within 1e-4 for a prefill and 8 cached decode steps, and
onnxruntime-genai's greedy 20 tokens equal transformers' generate, for Mixtral (sliding window),
Qwen3-MoE (a dense layer between MoE layers, renormalised top-k), Qwen2-MoE (shared expert with its
sigmoid gate, top-k not renormalised, a dense first layer, q/k/v biases), OLMoE (q/k norms then
clip_qkv), Granite-MoE (multipliers, stacked experts), ERNIE 4.5 MoE (selection on softmax + bias,
shared expert, interleaved rotary, biases), PhiMoE (sparse mixer, LayerNorm).
int4 / int8 (QMoE): equal to transformers with the experts the op holds and every MatMulNBits weight
dequantized, within 1e-4 (accuracy level 0); and within stated bounds of the fp32 logits.
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


def test_int8_placement_targets_experts(moe_model, tmp_path):
    """llama.cpp's mixed rule bumps ffn down: on the MoE layers it picked, the experts go to 8 bits."""
    folder, _ = moe_model("mixtral")
    out = tmp_path / "out"
    onnxforge.build(folder, out, recipe=Recipe(precision="int4", method="rtn", int8_mixed_layers=True, qmoe_block_size=16))
    assert {n["layer"]: n["bits"] for n in qmoe_nodes(out)} == {0: 4, 1: 8}  # of 2 layers the rule picks layer 1


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
