"""bf16 graphs are valid models (issue 28): `-e cuda -p bf16` builds of the families whose graphs have routing,
clipping or gating beside the big ops. onnxruntime's CPU provider has no bf16 MatMul, so a session is not run
here; creating one type-checks the whole graph first (an invalid model fails with INVALID_GRAPH before any
kernel is looked up), so "only a missing kernel" is the check: the graph resolved. Also checked:
  * TopK (no bf16 before ONNX opset 24: Qwen2-MoE / OLMoE / ERNIE routing), Clip (no bf16 kernel in onnxruntime's
    CUDA provider: OLMo's and OLMoE's clip_qkv, Mamba2's dt limits) and Softplus (Mamba2's dt) run in float32
    between Casts; nothing else of the graph changes;
  * numpy's finfo is never asked about bfloat16 (some numpy / ml_dtypes versions refuse it: ERNIE 4.5 MoE and
    PhiMoE failed to build on the GPU machine), ml_dtypes.finfo is;
  * QMoE with bf16 activations (-p bf16 moe_quant_type=int4) resolves too.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from moe_check import FAMILIES

import onnxforge
from onnxforge.quant.recipe import Recipe

pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")

BF16 = onnx.TensorProto.BFLOAT16


def _configs() -> dict[str, dict]:
    from test_family_granite_hybrid import GRANITE_HYBRID
    from test_family_olmo import CONFIGS

    return {**FAMILIES, "olmo": CONFIGS["olmo"], "granite_hybrid": GRANITE_HYBRID}


def _resolves(out) -> None:
    try:
        ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - the kind of failure is the point
        assert "NOT_IMPLEMENTED" in str(err), str(err)[:500]  # a CPU kernel missing, not an invalid graph


def _float32_islands(out, op: str) -> list[onnx.NodeProto]:
    """`op`'s nodes, each checked to be fed by a Cast to float32 and to feed a Cast back to bf16 (its first output)."""
    g = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    nodes = [n for n in g.node if n.op_type == op]
    for n in nodes:
        cast = producer[n.input[0]]
        assert cast.op_type == "Cast" and cast.attribute[0].i == onnx.TensorProto.FLOAT, n.name
        outs = consumers.get(n.output[0], [])
        assert outs and all(c.op_type == "Cast" and c.attribute[0].i == BF16 for c in outs), n.name
    return nodes


@pytest.mark.parametrize("name, ops", [("mixtral", ()), ("qwen2_moe", ("TopK",)), ("olmoe", ("TopK", "Clip")),
                                       ("ernie4_5_moe", ("TopK",)), ("phimoe", ()), ("olmo", ("Clip",)),
                                       ("granite_hybrid", ("Softplus",))])
def test_bf16_graph_resolves(tiny_models, tmp_path, monkeypatch, name, ops):
    import ml_dtypes

    finfo = np.finfo

    def no_bf16(dtype):  # what numpy does on the GPU machine
        if np.dtype(dtype) == np.dtype(ml_dtypes.bfloat16):
            raise ValueError("data type <class 'ml_dtypes.bfloat16'> not inexact")
        return finfo(dtype)

    monkeypatch.setattr(np, "finfo", no_bf16)
    folder, _ = tiny_models(name, **_configs()[name])
    out = tmp_path / "bf16"
    onnxforge.build(folder, out, recipe=Recipe(precision="bf16", provider="cuda"))
    monkeypatch.setattr(np, "finfo", finfo)
    _resolves(out)
    for op in ops:
        assert _float32_islands(out, op), op


def test_bf16_float32_islands_only_in_bf16(tiny_models, tmp_path):
    """The same OLMoE at fp16: TopK and Clip as they were, no Casts around them."""
    folder, _ = tiny_models("olmoe", **FAMILIES["olmoe"])
    onnxforge.build(folder, tmp_path / "fp16", recipe=Recipe(precision="fp16", provider="cuda"))
    g = onnx.load(str(tmp_path / "fp16" / "model.onnx"), load_external_data=False).graph
    producer = {o: n for n in g.node for o in n.output}
    for n in g.node:
        if n.op_type in ("TopK", "Clip"):
            assert producer[n.input[0]].op_type != "Cast", n.name


def test_bf16_qmoe_resolves(tiny_models, tmp_path):
    folder, _ = tiny_models("qwen2_moe", **FAMILIES["qwen2_moe"])
    out = tmp_path / "q"
    onnxforge.build(folder, out, recipe=Recipe(precision="bf16", provider="cuda", moe_quant_type="int4"))
    g = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    qmoe = [n for n in g.node if n.op_type == "QMoE"]
    assert qmoe
    scales = {t.name: t for t in g.initializer if t.name.endswith(".scales")}
    assert scales and all(t.data_type == BF16 for t in scales.values())
    _resolves(out)
