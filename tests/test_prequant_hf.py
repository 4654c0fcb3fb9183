"""Pre-quantized Hugging Face checkpoints carried over exactly (issue 13): GPTQ, AWQ, compressed-tensors, Quark.

Checkpoints are packed as their producers pack them (tests/prequant_producers.py: compressed-tensors'
own pack_to_int32; AutoGPTQ's and AutoAWQ's packers transcribed, since those do not install here). The
reference is the dequantized weight computed from the producer's integers before packing, never from
our reading of the packed tensors:
- each weight, dequantized by MatMulNBits itself over an identity matrix (accuracy_level 0), equals it
  bit for bit;
- the model built as stored gives the logits of the fp32 build of the same weights dequantized (1e-4).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import tiny
from conftest import onnx_step_logits, prompt_and_decode
from prequant_producers import write_prequantized
from test_prequant_gguf import op_dequantize

import onnxforge
from onnxforge.errors import CheckpointError
from onnxforge.quant.recipe import Recipe
from onnxforge.sources.open import open_source

pytest.importorskip("torch")
pytest.importorskip("transformers")

CASES = [  # method, bits, group (-1: per channel), symmetric
    ("gptq", 4, 128, True), ("gptq", 4, 32, False), ("gptq", 8, 64, False), ("gptq", 2, 32, False),
    ("awq", 4, 64, False), ("awq", 4, 128, False),
    ("compressed-tensors", 4, 128, True), ("compressed-tensors", 4, 32, False), ("compressed-tensors", 8, -1, True),
    ("quark-int4", 4, 128, True), ("quark-uint4", 4, 32, False),
]


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prequant_hf") / "float"
    tiny.make_model("llama", folder, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                    intermediate_size=256)
    return folder


def _case_id(case):
    method, bits, group, sym = case
    return f"{method}-int{bits}-g{group}-{'sym' if sym else 'asym'}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_prequantized_checkpoint_carried_over_exactly(case, float_dir, tmp_path):
    method, bits, group, symmetric = case
    if method == "compressed-tensors":
        pytest.importorskip("compressed_tensors")
    qdir, refdir = tmp_path / "q", tmp_path / "ref"
    deq = write_prequantized(float_dir, qdir, refdir, method, bits, group, symmetric)
    source = open_source(qdir)
    try:
        assert not any(n.endswith((".qweight", ".weight_packed", ".scales")) for n in source.tensor_names())
        for module, want in deq.items():
            fmt = source.native_format(f"{module}.weight")
            assert fmt.bits == (8 if bits == 8 else 4) and fmt.zero_points == (not symmetric), fmt
            N, K = want.shape
            np.testing.assert_array_equal(source.read(f"{module}.weight"), want, err_msg=module)
            got = op_dequantize(source.native_blocks(f"{module}.weight", fmt.bits, fmt.block_size), K, N)
            np.testing.assert_array_equal(got, want, err_msg=module)
    finally:
        source.close()
    report = onnxforge.build(qdir, tmp_path / "src", recipe=Recipe(precision="source", accuracy_level=0))
    onnxforge.build(refdir, tmp_path / "fp32", "fp32")
    prompt, decode = prompt_and_decode()
    diff = np.abs(onnx_step_logits(tmp_path / "src", prompt, decode[:3])
                  - onnx_step_logits(tmp_path / "fp32", prompt, decode[:3])).max()
    print(f"{_case_id(case)}: as stored vs fp32 of the dequantized weights, max abs logit diff {diff:.2e}")
    assert diff < 1e-4
    stored = {g["storage"] for g in report.groups if "layers" in g["label"] and "proj" in g["label"]}
    assert stored and all("(exact " in s for s in stored), stored
    assert report.precision == "source" and not report.unread_tensors


def test_no_precision_keeps_a_gptq_checkpoint_and_int4_requantizes_only_8_bit(float_dir, tmp_path):
    deq = write_prequantized(float_dir, tmp_path / "q8", tmp_path / "r8", "gptq", 8, 64, False)
    assert deq
    report = onnxforge.build(tmp_path / "q8", tmp_path / "default")
    assert report.precision == "source" and any("(exact GPTQ int8 g64 asym)" in g["storage"] for g in report.groups)
    report = onnxforge.build(tmp_path / "q8", tmp_path / "int4", recipe=Recipe(precision="int4"))
    assert any("(re-quantized GPTQ int8 g64 asym: 8-bit storage > int4)" in g["storage"] for g in report.groups)


def test_act_order_gptq_falls_back_to_requantizing_and_says_so(float_dir, tmp_path):
    write_prequantized(float_dir, tmp_path / "q", tmp_path / "ref", "gptq", 4, 32, False, act_order=True)
    report = onnxforge.build(tmp_path / "q", tmp_path / "out")
    stored = {g["storage"] for g in report.groups if "proj" in g["label"]}
    assert all("act-order g_idx: no exact MatMulNBits form" in s and s.startswith("int8 rtn") for s in stored), stored
    # the dequantized weights are still exactly the producer's: the fp32 build matches the reference's
    onnxforge.build(tmp_path / "q", tmp_path / "fp32", "fp32")
    onnxforge.build(tmp_path / "ref", tmp_path / "ref32", "fp32")
    prompt, decode = prompt_and_decode()
    diff = np.abs(onnx_step_logits(tmp_path / "fp32", prompt, decode[:2])
                  - onnx_step_logits(tmp_path / "ref32", prompt, decode[:2])).max()
    assert diff < 1e-5


@pytest.mark.parametrize("qcfg,what", [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "'bitsandbytes'"),
    ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "AWQ version 'gemv'"),
    ({"quant_method": "gptq", "bits": 3}, "GPTQ with 3 bits"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {}},
     "compressed-tensors format 'float-quantized'"),
    ({"quant_method": "quark", "global_quant_config": {"weight": {"dtype": "fp8_e4m3", "qscheme": "per_tensor"}}},
     "Quark fp8_e4m3 weights"),
])
def test_unsupported_formats_fail_with_one_clear_error(float_dir, tmp_path, qcfg, what):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(float_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": qcfg}))
    with pytest.raises(CheckpointError, match="supported: gptq, awq") as err:
        onnxforge.build(folder, tmp_path / "out")
    assert what in str(err.value)


def test_verify_reference_is_the_dequantized_checkpoint(float_dir, tmp_path):
    """`verify --reference` on a GPTQ folder: transformers' float model with the checkpoint's weights
    dequantized (as for a GGUF), equal to the float checkpoint of the same weights."""
    torch = pytest.importorskip("torch")
    from onnxforge.verify.parity import load_reference

    write_prequantized(float_dir, tmp_path / "q", tmp_path / "ref", "gptq", 4, 32, False)
    ids = torch.tensor([prompt_and_decode()[0]])
    with torch.no_grad():
        got = load_reference(tmp_path / "q")[0](ids).logits
        want = load_reference(tmp_path / "ref")[0](ids).logits
    assert torch.equal(got, want)
