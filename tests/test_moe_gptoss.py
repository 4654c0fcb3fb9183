"""GPT-OSS: attention sinks (GroupQueryAttention's head_sink), sliding and full layers alternating,
clamped SwiGLU (alpha 1.702, beta 1, limit), biases in attention, router and experts; checkpoints in
the bf16 form (transformers' save_pretrained: (E, H, 2I) experts, gate/up interleaved) and in the
original MXFP4 form (`*_blocks` / `*_scales`).

The MXFP4 checkpoint: transformers writes MXFP4 only through triton kernels fetched from the Hub
(`quantize_to_mxfp4`, GPU/triton >= 3.5), which cannot run here, so the test encodes the bf16 model's
experts with the OCP MX rule (E8M0 scale 2^(floor(log2 amax) - 2) per 32 values, E2M1 codes rounded to
nearest) in numpy below, and writes them under the checkpoint's names with its quantization_config.
What is checked is onnxforge's reading against transformers' own: the reference is transformers
loading that checkpoint (no triton: it dequantizes the blocks with `convert_moe_packed_tensors`).
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from family_check import FP32_TOL, check_fp32, max_diff
from moe_check import moe_reference, qmoe_nodes

import onnxforge
from onnxforge.errors import RecipeError
from onnxforge.quant.recipe import Recipe

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

GPT_OSS = dict(cls="GptOssConfig", hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
               intermediate_size=32, num_hidden_layers=3, num_local_experts=4, num_experts_per_tok=2,
               sliding_window=6, swiglu_limit=1.0)  # a low limit so the clamps act on the spread weights
E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)


def encode_mxfp4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(E, N, K) float -> blocks (E, N, K/32, 16) uint8, scales (E, N, K/32) uint8 (OCP MX, E2M1 + E8M0)."""
    E, N, K = w.shape
    x = w.reshape(E, N, K // 32, 32).astype(np.float32)
    amax = np.abs(x).max(-1)
    exp = np.where(amax > 0, np.floor(np.log2(np.maximum(amax, 1e-30))) - 2, 0).astype(np.int32)
    scaled = x / np.ldexp(1.0, exp)[..., None]
    mag = np.abs(np.clip(scaled, -6, 6))
    code = np.abs(mag[..., None] - E2M1).argmin(-1).astype(np.uint8) | np.where(scaled < 0, 8, 0).astype(np.uint8)
    code[mag == 0] = 0
    blocks = (code[..., 0::2] | (code[..., 1::2] << 4)).astype(np.uint8)
    return blocks, (exp + 127).astype(np.uint8)


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    """(bf16 folder, its transformers model, MXFP4 folder, transformers' dequantized MXFP4 model)."""
    from tiny import make_model

    bf16 = tmp_path_factory.mktemp("gpt_oss_bf16")
    model = make_model("gpt_oss", bf16, dtype="bfloat16", **GPT_OSS)
    mx = tmp_path_factory.mktemp("gpt_oss_mxfp4")
    write_mxfp4(bf16, mx)
    reference = transformers.AutoModelForCausalLM.from_pretrained(mx, dtype=torch.float32).eval()
    return bf16, model, mx, reference


def write_mxfp4(bf16, mx) -> None:
    """The bf16 checkpoint folder `bf16` in GPT-OSS's MXFP4 form (experts as `_blocks` / `_scales`) in `mx`."""
    from safetensors.numpy import load_file, save_file

    for f in bf16.iterdir():
        if not f.name.endswith(".safetensors"):
            (mx / f.name).write_bytes(f.read_bytes())
    import ml_dtypes  # noqa: F401 - safetensors.numpy reads bf16 as ml_dtypes.bfloat16

    tensors = load_file(str(bf16 / "model.safetensors"))
    out = {}
    for name, t in tensors.items():
        if name.endswith("mlp.experts.gate_up_proj") or name.endswith("mlp.experts.down_proj"):
            blocks, scales = encode_mxfp4(t.astype(np.float32).transpose(0, 2, 1))  # (E, N, K): rows are outputs
            out[name + "_blocks"], out[name + "_scales"] = blocks, scales
        else:
            out[name] = t
    save_file(out, str(mx / "model.safetensors"))
    cfg = json.loads((mx / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (mx / "config.json").write_text(json.dumps(cfg))


def test_bf16_fp32(gpt_oss, tmp_path):
    folder, model, _, _ = gpt_oss
    out = tmp_path / "out"
    check_fp32(folder, model, out)
    g = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    gqa = [n for n in g.node if n.op_type == "GroupQueryAttention"]
    assert all(len(n.input) == 12 and n.input[11].endswith("self_attn.sinks") for n in gqa)
    windows = [next(a.i for a in n.attribute if a.name == "local_window_size") for n in gqa]
    assert windows == [6, -1, 6]  # sliding, full, sliding
    moe = [n for n in g.node if n.op_type == "MoE"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in moe[0].attribute}
    assert (attrs["activation_alpha"], attrs["activation_beta"], attrs["swiglu_limit"]) == pytest.approx((1.702, 1.0, 1.0))
    assert moe[0].input[3] and moe[0].input[5]  # expert biases
    assert json.loads((out / "genai_config.json").read_text())["model"]["type"] == "gptoss"


def test_bf16_int4(gpt_oss, tmp_path):
    """The anchor cannot quantize this checkpoint (it needs the MXFP4 blocks); onnxforge's QMoE equals
    transformers with the experts the op holds."""
    folder, _, _, _ = gpt_oss
    out = tmp_path / "out"
    onnxforge.build(folder, out, recipe=Recipe(precision="int4", method="rtn", accuracy_level=0, qmoe_block_size=32))
    assert {(n["bits"], n["block"]) for n in qmoe_nodes(out)} == {(4, 32)}
    assert max_diff(out, moe_reference(folder, out)) < FP32_TOL


@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_quantized_keeps_routers_sinks_and_biases_float(gpt_oss, tmp_path, precision):
    """The gpt_oss template: routers (and their biases), attention sinks and the experts' biases stay float32
    in a quantized build, while attention, lm_head and experts are quantized."""
    folder, _, _, _ = gpt_oss
    out = tmp_path / "out"
    onnxforge.build(folder, out, recipe=Recipe(precision=precision, method="rtn"))
    g = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    dtypes = {t.name: t.data_type for t in g.initializer}
    FLOAT = onnx.TensorProto.FLOAT
    gqa = [n for n in g.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == GPT_OSS["num_hidden_layers"]
    assert all(dtypes[n.input[11]] == FLOAT for n in gqa)  # head_sink
    routers = [n for n in g.node if "/moe/router/" in n.name and n.op_type in ("MatMul", "MatMulNBits", "Add")]
    assert {n.op_type for n in routers} == {"MatMul", "Add"} and len(routers) == 2 * GPT_OSS["num_hidden_layers"]
    assert all(dtypes[i] == FLOAT for n in routers for i in n.input if i in dtypes)
    qmoe = [n for n in g.node if n.op_type == "QMoE"]
    assert len(qmoe) == GPT_OSS["num_hidden_layers"]
    assert all(n.input[4] and n.input[7] and dtypes[n.input[4]] == dtypes[n.input[7]] == FLOAT for n in qmoe)
    assert not [n.name for n in g.node if n.op_type == "MatMul" and n not in routers]  # the rest is quantized
    assert [n for n in g.node if n.op_type == "MatMulNBits"]


def test_mxfp4_fp32_matches_transformers_dequantized(gpt_oss, tmp_path):
    _, _, folder, reference = gpt_oss
    out = tmp_path / "out"
    report = onnxforge.build(folder, out, "fp32")
    assert not report.unread_tensors
    assert max_diff(out, reference) < FP32_TOL


@pytest.mark.parametrize("bits,block", [(4, 32), (8, 0)])
def test_mxfp4_requantized(gpt_oss, tmp_path, bits, block):
    """The CPU QMoE has no fp4 kernel: the decoded MXFP4 experts are re-encoded to int4 / int8."""
    _, _, folder, reference = gpt_oss
    out = tmp_path / "out"
    onnxforge.build(folder, out, recipe=Recipe(precision=f"int{bits}", method="rtn", accuracy_level=0,
                                               qmoe_block_size=block))
    assert {(n["bits"], n["block"]) for n in qmoe_nodes(out)} == {(bits, block)}
    ref = moe_reference(folder, out, transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32))
    assert max_diff(out, ref) < FP32_TOL


def test_mxfp4_kept_for_cuda(gpt_oss, tmp_path):
    """-e cuda with moe_quant_type=mxfp4: QMoE quant_type fp4 over the checkpoint's own codes and E8M0 scales
    (no CUDA here: the graph is inspected, and the codes are checked against the stored blocks)."""
    from onnx import numpy_helper
    from safetensors.numpy import load_file

    _, _, folder, _ = gpt_oss
    out = tmp_path / "out"
    onnxforge.build(folder, out, recipe=Recipe(precision="int4", provider="cuda", moe_quant_type="mxfp4"))
    model = onnx.load(str(out / "model.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type == "QMoE"]
    assert len(nodes) == GPT_OSS["num_hidden_layers"]
    stored = load_file(str(folder / "model.safetensors"))
    for i, n in enumerate(nodes):
        a = {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute}
        assert a["quant_type"] == b"fp4" and a["block_size"] == 32 and a["expert_weight_bits"] == 4
        assert inits[n.input[3]].data_type == onnx.TensorProto.FLOAT8E8M0
        assert n.input[15] and n.input[16]  # global scales
        blocks = stored[f"model.layers.{i}.mlp.experts.gate_up_proj_blocks"]
        weight = numpy_helper.to_array(inits[n.input[2]])  # (E, K, N/2): code of (n, k) at [k, n // 2], nibble n % 2
        codes = np.empty(blocks.shape[:2] + (blocks.shape[2] * 32,), np.uint8)
        codes[..., 0::2], codes[..., 1::2] = blocks.reshape(*blocks.shape[:2], -1) & 0x0F, blocks.reshape(
            *blocks.shape[:2], -1) >> 4
        got = np.empty_like(codes)
        got[:, 0::2, :] = (weight & 0x0F).transpose(0, 2, 1)
        got[:, 1::2, :] = (weight >> 4).transpose(0, 2, 1)
        assert np.array_equal(got, codes)
        scales = np.frombuffer(inits[n.input[3]].raw_data, np.uint8).reshape(blocks.shape[:3])
        assert np.array_equal(scales, stored[f"model.layers.{i}.mlp.experts.gate_up_proj_scales"])


def test_mxfp4_needs_the_blocks_and_cuda(gpt_oss, tmp_path):
    folder, _, _, _ = gpt_oss
    with pytest.raises(RecipeError, match="float experts"):
        onnxforge.build(folder, tmp_path / "a", recipe=Recipe(precision="int4", provider="cuda", moe_quant_type="mxfp4"))
    with pytest.raises(RecipeError, match="CUDA only"):
        Recipe(precision="int4", moe_quant_type="mxfp4")
