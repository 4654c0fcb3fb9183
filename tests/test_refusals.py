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
    model = h.make_model(graph, ir_version=10, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1)])
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
                                                 (24, 24), (24, 16), (32, 24), (12, 0), (64, 40)])
def test_the_shape_rule_is_onnxruntimes(head_dim, rotary_dim):
    """attention_shape_problem says no exactly where onnxruntime's GroupQueryAttention does."""
    from onnxforge.runs_on import attention_shape_problem

    refused = attention_shape_problem(head_dim, [rotary_dim] if rotary_dim else []) is not None
    assert refused == (not gqa_runs(head_dim, rotary_dim)), (head_dim, rotary_dim)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_partial_rotary_gqa_cannot_run_is_refused_for_every_provider(tmp_path, provider, capsys):
    folder = write_random_llama(tmp_path / "ckpt", hidden=128, heads=4, kv_heads=2)  # head_dim 32
    _edit_config(folder, partial_rotary_factor=0.75)  # rotary 24
    code, err = _cli_build(folder, tmp_path / "out", capsys, "-p", "fp16", "-e", provider)
    assert code == 2 and len(err) == 1, err
    assert "rotary dimension 24" in err[0] and "any execution provider" in err[0] and "multiple of 16" in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("provider", PROVIDERS)
def test_head_dim_gqa_cannot_rotate_is_refused_for_every_provider(tmp_path, provider):
    folder = write_random_llama(tmp_path / "ckpt", hidden=96, heads=4, kv_heads=2)  # head_dim 24, rotary 24
    with pytest.raises(ConfigError, match="head_dim 24 is not a multiple of 16.*any execution provider"):
        onnxforge.build(folder, tmp_path / "out", "fp16", provider)
    assert not (tmp_path / "out").exists()


def test_a_rotary_dimension_that_gqa_runs_still_builds(tmp_path):
    """The wrong input's counterpart: head_dim 32 with rotary 16 (partial 0.5) builds and runs."""
    folder = write_random_llama(tmp_path / "ckpt", hidden=128, heads=4, kv_heads=2)
    _edit_config(folder, partial_rotary_factor=0.5)
    onnxforge.build(folder, tmp_path / "out", "fp32")
    assert (tmp_path / "out" / "model.onnx").exists()
