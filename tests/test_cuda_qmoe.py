"""CUDA QMoE layouts checked on CPU (graph/moe.py, graph/experts.py pad_intermediate).

onnxruntime's CUDA QMoE (int weights) needs the experts' intermediate size and the hidden size to be multiples of
64 (measured on an H200: 48- and 96-wide experts fail at run time). An -e cuda build zero-pads each expert's
intermediate dimension: fc1 gains zero rows (interleaved gate/up: the padded units come last), fc1's bias zeros, fc2
zero columns. Checked here:
  * the -e cuda graph: QMoE's fc1 (E, 2I', H/pack) and fc2 (E, H, I'/pack) with I' a multiple of 64, weights_prepacked
    0, the padded weights exactly 0 and the rest equal to an -e cpu build's experts (fp16 scales aside);
  * the same padding built for -e cpu (the internal switch PAD_EXPERTS_FOR) gives the unpadded CPU build's logits
    within 1e-5 (Mixtral at 48 and 96, GPT-OSS's interleaved clamped experts with biases);
  * what CUDA QMoE refuses is refused at build time: a hidden size off the tile, zero points with blocks < 32.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import onnx_step_logits, prompt_and_decode
from moe_check import FAMILIES, dequantized_experts, qmoe_nodes

import onnxforge
from onnxforge.errors import RecipeError
from onnxforge.graph import moe as moe_mod
from onnxforge.quant.recipe import Recipe

pytest.importorskip("transformers")

GPT_OSS = dict(cls="GptOssConfig", hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
               intermediate_size=32, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
               sliding_window=6, swiglu_limit=1.0)


def _mixtral(tiny_models, inter: int):
    return tiny_models("mixtral", **{**FAMILIES["mixtral"], "intermediate_size": inter})


@pytest.mark.parametrize("inter, bits", [(48, 4), (96, 8)])
def test_cuda_build_pads_the_experts(tiny_models, tmp_path, inter, bits):
    folder, _ = _mixtral(tiny_models, inter)
    prec = f"int{bits}"
    cuda = onnxforge.build(folder, tmp_path / "cuda", recipe=Recipe(precision=prec, provider="cuda", qmoe_block_size=16))
    onnxforge.build(folder, tmp_path / "cpu", recipe=Recipe(precision=prec, qmoe_block_size=16))
    padded = -(-inter // 64) * 64
    assert any(f"intermediate size {inter} zero-padded to {padded}" in n for n in cuda.notes), cuda.notes
    got, ref = qmoe_nodes(tmp_path / "cuda"), qmoe_nodes(tmp_path / "cpu")
    assert len(got) == len(ref) == 2
    for g, r in zip(got, ref):
        assert g["attrs"]["weights_prepacked"] == 0 and g["bits"] == bits and g["block"] == 16
        E = g["fc1"][0].shape[0]
        assert g["fc1"][0].shape == (E, 2 * padded, 64 * bits // 8)
        assert g["fc2"][0].shape == (E, 64, padded * bits // 8)
        assert g["fc1"][1].dtype == np.float16
        fc1, fc2 = dequantized_experts(g)
        rfc1, rfc2 = dequantized_experts(r)
        assert not fc1[:, 2 * inter:].any() and not fc2[:, :, inter:].any()  # the padding is exactly zero
        tol = 1e-3 * np.abs(rfc1).max()  # the CUDA build's scales are fp16
        np.testing.assert_allclose(fc1[:, :2 * inter], rfc1, rtol=0, atol=tol)
        np.testing.assert_allclose(fc2[:, :, :inter], rfc2, rtol=0, atol=1e-3 * np.abs(rfc2).max())


def _padded_on_cpu_matches(folder, tmp_path, monkeypatch, **recipe) -> float:
    prompt, decode = prompt_and_decode()
    onnxforge.build(folder, tmp_path / "plain", recipe=Recipe(accuracy_level=0, **recipe))
    monkeypatch.setattr(moe_mod, "PAD_EXPERTS_FOR", ("cuda", "cpu"))
    report = onnxforge.build(folder, tmp_path / "padded", recipe=Recipe(accuracy_level=0, **recipe))
    assert any("zero-padded to 64" in n for n in report.notes), report.notes
    plain = onnx_step_logits(tmp_path / "plain", prompt, decode)
    padded = onnx_step_logits(tmp_path / "padded", prompt, decode)
    return float(np.abs(plain - padded).max())


@pytest.mark.parametrize("inter, prec, block", [(48, "int4", 16), (48, "int8", 0)])
def test_padding_is_exact_mixtral(tiny_models, tmp_path, monkeypatch, inter, prec, block):
    folder, _ = _mixtral(tiny_models, inter)
    assert _padded_on_cpu_matches(folder, tmp_path, monkeypatch, precision=prec, qmoe_block_size=block) < 1e-5


def test_padding_is_exact_gpt_oss(tmp_path_factory, tmp_path, monkeypatch):
    """GPT-OSS: (E, H, 2I) experts with gate/up alternating, biases on both projections, clamped SwiGLU."""
    from tiny import make_model

    folder = tmp_path_factory.mktemp("gpt_oss_pad")
    make_model("gpt_oss", folder, **GPT_OSS)
    assert _padded_on_cpu_matches(folder, tmp_path, monkeypatch, precision="int4") < 1e-5
    monkeypatch.setattr(moe_mod, "PAD_EXPERTS_FOR", ("cuda",))
    onnxforge.build(folder, tmp_path / "cuda", recipe=Recipe(precision="int4", provider="cuda"))
    (node, *_) = qmoe_nodes(tmp_path / "cuda")
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(tmp_path / "cuda" / "model.onnx"))
    bias = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith("gate_up_proj.bias")}
    (b1,) = [b for n, b in bias.items() if "layers.0." in n]
    assert b1.shape == (4, 128) and b1.dtype == np.float16 and not b1[:, 64:].any() and b1[:, :64].any()
    assert node["fc1"][0].shape[1] == 128 and node["block"] == 32


def test_cuda_refuses_what_its_qmoe_cannot_run(tiny_models, tmp_path):
    folder, _ = _mixtral(tiny_models, 48)
    with pytest.raises(RecipeError, match="zero points .* only with blocks of 32 or more.*qmoe_block_size=32"):
        onnxforge.build(folder, tmp_path / "a", recipe=Recipe(precision="int4", provider="cuda", symmetric=False,
                                                              qmoe_block_size=16))
    folder, _ = tiny_models("mixtral", **{**FAMILIES["mixtral"], "hidden_size": 96, "num_attention_heads": 6})
    with pytest.raises(RecipeError, match="hidden size to be a multiple of 64.*moe_experts=fp16"):
        onnxforge.build(folder, tmp_path / "b", recipe=Recipe(precision="int4", provider="cuda"))
    report = onnxforge.build(folder, tmp_path / "c", recipe=Recipe(precision="int4", provider="cuda", moe_experts="fp16"))
    assert json.loads((tmp_path / "c" / "build_report.json").read_text()) and report


def test_verify_reads_padded_experts_back(tiny_models, tmp_path):
    """verify's stored reference takes a CUDA build's padded experts back at the checkpoint's width (the zero
    padding dropped): every expert read, none kept original."""
    from onnxforge.verify.parity import load_reference
    from onnxforge.verify.stored import load_stored_weights

    folder, _ = _mixtral(tiny_models, 48)
    onnxforge.build(folder, tmp_path / "cuda", recipe=Recipe(precision="int4", provider="cuda"))
    report = load_stored_weights(load_reference(folder)[0], tmp_path / "cuda")
    experts = {k: v for k, v in report.errors.items() if ".experts." in k}
    assert len(experts) == 2 * 2 * 4 and 0 < max(experts.values()) < 0.2, experts
    assert not report.kept, report.kept


def test_mxfp4_at_fp32_refused():
    """QMoE fp4 has a CUDA kernel for fp16 / bf16 activations only and no CPU kernel: -p fp32 could run nowhere."""
    with pytest.raises(RecipeError, match="mxfp4 with -p fp32.*use -p int4, fp16 or bf16"):
        Recipe(precision="fp32", provider="cuda", moe_quant_type="mxfp4")
    Recipe(precision="fp16", provider="cuda", moe_quant_type="mxfp4")
    Recipe(precision="int4", provider="cuda", moe_quant_type="mxfp4")
