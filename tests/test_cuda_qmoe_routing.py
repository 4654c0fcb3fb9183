"""ERNIE 4.5 MoE's biased selection in -e cuda QMoE builds (graph/moe.py ROUTER_WEIGHTS_FOR), checked on CPU.

ERNIE selects the top k of softmax(logits) + e_score_correction_bias and mixes with the softmax renormalised over them.
On the CPU, QMoE takes that as router_probs = softmax + bias (selection) and router_weights = softmax (input 14,
mixing). onnxruntime's CUDA QMoE never reads input 14 (contrib_ops/cuda/moe/moe_quantization.cc ComputeInternal: the
routing is softmax + top k of router_probs, used for selection and mixing alike), so on an H200 the int4 / int8 -e cuda
builds mixed softmax(softmax + bias) and missed transformers by 5.6 (greedy 3/20, 1/20), while the float MoE op's
builds (the masked form) were fine. -e cuda now routes as the float op does: the unselected logits pushed to the
dtype's lowest, the op's own softmax renormalising over the selected ones. Checked here:
  * the -e cuda graphs (int4, int8) feed QMoE no input 14, their router_probs the masked logits; -e cpu keeps input 14;
  * that masked form, built for the CPU, equals transformers on the stored weights within 1e-4 (fp32), also with
    input 14 dropped (what the CUDA kernel reads);
  * the router_weights form with input 14 dropped does not (CUDA's reading of the old -e cuda graph on the CPU);
  * bench/qmoe_cuda_bias.py (the GPU reproduction) runs on the CPU provider, every case within its bound.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from family_check import FP32_TOL, max_diff
from moe_check import FAMILIES, moe_reference

import onnxforge
from onnxforge.graph import moe as moe_mod
from onnxforge.quant.recipe import Recipe

pytest.importorskip("transformers")


@pytest.fixture
def ernie(tiny_models):
    return tiny_models("ernie4_5_moe", **FAMILIES["ernie4_5_moe"])[0]


def _qmoe(out) -> list:
    return [n for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node if n.op_type == "QMoE"]


def _router_weights(node) -> str:
    return node.input[14] if len(node.input) > 14 else ""


def _as_cuda_reads_it(out, dest):
    """A copy of the build whose QMoE nodes have no input 14: what onnxruntime's CUDA QMoE computes."""
    shutil.copytree(out, dest)
    model = onnx.load(str(dest / "model.onnx"), load_external_data=False)
    for n in model.graph.node:
        if n.op_type == "QMoE" and len(n.input) > 14:
            n.input[14] = ""
    onnx.save(model, str(dest / "model.onnx"))
    return dest


@pytest.mark.parametrize("prec", ["int4", "int8"])
def test_cuda_qmoe_is_fed_no_router_weights(ernie, tmp_path, prec):
    onnxforge.build(ernie, tmp_path / "cuda", recipe=Recipe(precision=prec, provider="cuda"))
    onnxforge.build(ernie, tmp_path / "cpu", recipe=Recipe(precision=prec))
    cuda, cpu = _qmoe(tmp_path / "cuda"), _qmoe(tmp_path / "cpu")
    assert len(cuda) == len(cpu) == 2  # layers 1 and 2 (moe_layer_start_index 1)
    assert all(not _router_weights(n) and n.input[1].endswith("/router/Add_1/output_0") for n in cuda)
    assert all(_router_weights(n).endswith("/router/Softmax/output_0") for n in cpu)


def test_masked_routing_equals_transformers(ernie, tmp_path, monkeypatch):
    recipe = Recipe(precision="int4", method="rtn", accuracy_level=0, qmoe_block_size=16)
    onnxforge.build(ernie, tmp_path / "weights", recipe=recipe)  # CPU: router_weights (input 14)
    monkeypatch.setattr(moe_mod, "ROUTER_WEIGHTS_FOR", ())
    onnxforge.build(ernie, tmp_path / "masked", recipe=recipe)  # what -e cuda writes, for the CPU
    assert not any(_router_weights(n) for n in _qmoe(tmp_path / "masked"))
    ref = moe_reference(ernie, tmp_path / "masked")
    assert max_diff(tmp_path / "masked", ref) < FP32_TOL
    assert max_diff(_as_cuda_reads_it(tmp_path / "masked", tmp_path / "masked_cuda"), ref) < FP32_TOL
    assert max_diff(tmp_path / "weights", ref) < FP32_TOL  # the same stored weights, the CPU form
    old = max_diff(_as_cuda_reads_it(tmp_path / "weights", tmp_path / "weights_cuda"), ref)
    print(f"router_weights form read as CUDA reads it: max |logits - reference| {old:.3g}")
    assert old > 0.1, old


def test_bench_script_runs_on_the_cpu():
    script = Path(__file__).resolve().parents[1] / "bench" / "qmoe_cuda_bias.py"
    run = subprocess.run([sys.executable, str(script), "--cpu"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    rows = [ln for ln in run.stdout.splitlines() if ln.startswith("| ") and not ln.startswith("| case")]
    assert "CPUExecutionProvider" in run.stdout and len(rows) == 14, run.stdout
    assert all(ln.endswith("| ok |") for ln in rows), run.stdout
    ernie = [ln for ln in rows if "router_weights (input 14)" in ln]
    assert all(float(ln.split("|")[6]) > 0.1 for ln in ernie), ernie  # ignoring input 14 would be far off
