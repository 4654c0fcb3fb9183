"""verify's stored-weights reference on -e cuda MoE builds, checked on CPU (verify/stored_moe.py).

An -e cuda QMoE build zero-pads each expert's intermediate size to a multiple of 64 (graph/experts.py
pad_intermediate): fc1's last rows, fc2's last columns and fc1's bias' last columns are 0. The stored-weights reader
(`load_stored_weights`, what `onnxforge verify` and bench/gpu.py compare against) must cut them back to the
checkpoint's sizes. Measured on an H200 before the fix: GPT-OSS int4 / int8 -e cuda failed there with "operands could
not be broadcast together with shapes (4,128) (4,64)" (its (E, 2I) expert biases were read as a plain 2-D weight).
Checked here, without a GPU:
  * every MoE family's -e cuda int4 build reads back whole: nothing kept original, every reference parameter keeps
    the checkpoint's shape;
  * GPT-OSS (interleaved experts with biases) int4 / int8: the padded region is exactly 0 in the stored arrays, and the
    -e cuda build's stored experts and biases, read back, equal the -e cpu build's (up to the CUDA build's fp16 scales
    and biases); the same padding built for the CPU (fp32 scales) reads back exactly as the unpadded build, parameters
    and reference logits bit for bit;
  * `onnxforge verify` on an -e cuda MoE build on a machine without CUDA is one error line (rc 2), no traceback.
"""
from __future__ import annotations

import numpy as np
import pytest
from conftest import prompt_and_decode, reference_logits
from moe_check import FAMILIES, dequantized_experts, qmoe_nodes

import onnxforge
from onnxforge.quant.recipe import Recipe

pytest.importorskip("transformers")

GPT_OSS = dict(cls="GptOssConfig", hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
               intermediate_size=32, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
               sliding_window=6, swiglu_limit=1.0)


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    from tiny import make_model

    folder = tmp_path_factory.mktemp("gpt_oss_cuda_stored")
    make_model("gpt_oss", folder, **GPT_OSS)
    return folder


def _stored(folder, out):
    from onnxforge.verify.parity import load_reference
    from onnxforge.verify.stored import load_stored_weights

    model = load_reference(folder)[0]
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    report = load_stored_weights(model, out)
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == shapes
    assert not report.kept, report.notes
    return model, report


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_moe_family_reads_its_cuda_build_back(tiny_models, tmp_path, family):
    folder, _ = tiny_models(family, **FAMILIES[family])
    onnxforge.build(folder, tmp_path / "cuda", recipe=Recipe(precision="int4", provider="cuda"))
    _, report = _stored(folder, tmp_path / "cuda")
    experts = {k: v for k, v in report.errors.items() if ".experts." in k}
    assert experts and 0 < max(experts.values()) < 0.2, experts


@pytest.mark.parametrize("prec", ["int4", "int8"])
def test_gpt_oss_cuda_build_reads_back_as_the_cpu_build(gpt_oss, tmp_path, prec):
    cuda = onnxforge.build(gpt_oss, tmp_path / "cuda", recipe=Recipe(precision=prec, provider="cuda"))
    onnxforge.build(gpt_oss, tmp_path / "cpu", recipe=Recipe(precision=prec))
    assert any("intermediate size 32 zero-padded to 64" in n for n in cuda.notes), cuda.notes
    I = GPT_OSS["intermediate_size"]
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(tmp_path / "cuda" / "model.onnx")).graph
    biases = {t.name: numpy_helper.to_array(t) for t in graph.initializer if t.name.endswith("gate_up_proj.bias")}
    assert len(biases) == 2 and all(b.shape == (4, 4 * I) and not b[:, 2 * I:].any() for b in biases.values())
    for node in qmoe_nodes(tmp_path / "cuda"):  # the padded weights are exactly 0
        fc1, fc2 = dequantized_experts(node)
        assert fc1.shape[1] == 4 * I and not fc1[:, 2 * I:].any() and not fc2[:, :, I:].any()

    got, got_report = _stored(gpt_oss, tmp_path / "cuda")
    ref, ref_report = _stored(gpt_oss, tmp_path / "cpu")
    assert set(got_report.errors) == set(ref_report.errors)
    bias = [k for k in got_report.errors if k.endswith("_bias")]  # read in the module's layout: the fp32 ones exact
    assert len(bias) == 2 * GPT_OSS["num_hidden_layers"] and all(ref_report.errors[k] == 0 for k in bias)
    assert all(0 < got_report.errors[k] < 1e-3 for k in bias), {k: got_report.errors[k] for k in bias}
    params = dict(ref.named_parameters())
    for name, p in got.named_parameters():
        a, b = p.detach().numpy(), params[name].detach().numpy()
        if ".experts." not in name:
            continue
        if name.endswith("_bias"):  # the CUDA build's biases are the fp16 of the CPU build's fp32 ones
            np.testing.assert_array_equal(a, b.astype(np.float16).astype(np.float32), err_msg=name)
        else:  # the same codes; fp16 scales
            np.testing.assert_allclose(a, b, rtol=0, atol=2e-3 * np.abs(b).max(), err_msg=name)


@pytest.mark.parametrize("prec", ["int4", "int8"])
def test_gpt_oss_padded_reads_back_exactly(gpt_oss, tmp_path, monkeypatch, prec):
    """The same padding built for the CPU (fp32 scales and biases): read back, every parameter and the reference's
    logits equal the unpadded build's exactly."""
    import torch

    from onnxforge.graph import moe as moe_mod

    onnxforge.build(gpt_oss, tmp_path / "plain", recipe=Recipe(precision=prec))
    monkeypatch.setattr(moe_mod, "PAD_EXPERTS_FOR", ("cuda", "cpu"))
    report = onnxforge.build(gpt_oss, tmp_path / "padded", recipe=Recipe(precision=prec))
    assert any("zero-padded to 64" in n for n in report.notes), report.notes
    got, got_report = _stored(gpt_oss, tmp_path / "padded")
    ref, ref_report = _stored(gpt_oss, tmp_path / "plain")
    assert got_report.errors == ref_report.errors
    params = dict(ref.named_parameters())
    for name, p in got.named_parameters():
        assert torch.equal(p, params[name]), name
    prompt, decode = prompt_and_decode()
    np.testing.assert_array_equal(reference_logits(got, prompt + decode), reference_logits(ref, prompt + decode))


def test_verify_of_a_cuda_moe_build_without_cuda_is_one_line(gpt_oss, tmp_path, capsys):
    import onnxruntime as ort

    from onnxforge.cli import main

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine can run the -e cuda build")
    onnxforge.build(gpt_oss, tmp_path / "cuda", recipe=Recipe(precision="int4", provider="cuda"))
    code = main(["verify", str(tmp_path / "cuda"), "--reference", str(gpt_oss), "--no-plot", "--tokens", "2"])
    cap = capsys.readouterr()
    errors = [ln for ln in (cap.out + cap.err).splitlines() if ln.startswith("onnxforge: error: ")]
    assert code == 2 and "Traceback" not in cap.out + cap.err
    assert len(errors) == 1 and "-e cuda" in errors[0] and "rebuild it with -e cpu" in errors[0], errors
