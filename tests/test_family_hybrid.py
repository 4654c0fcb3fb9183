"""Hybrid families: layers of another kind than attention, carrying their own state (graph/kinds.py).

LFM2 (short gated conv layers beside attention ones with per-head q/k norms): a tiny random model made by
transformers, with a prompt longer than the conv kernel. fp32 logits equal transformers' within 1e-4 for a
prefill and 20 cached decode steps (the conv state carried step to step), also with the prompt fed in two
chunks (the state carried across a prefill); onnxruntime-genai's greedy tokens equal transformers'; int4
equals transformers with the build's dequantized weights; fp16 runs close. The step loop here feeds every
state input the graph has, named by genai_config.json, starting as its declaration says (empty or zeros).
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import genai_greedy, onnx_step_logits, reference_greedy, reference_logits
from family_check import FP32_TOL
from quant_ref import dequantized_reference

import onnxforge
from onnxforge.quant.recipe import Recipe

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LFM2 = dict(cls="Lfm2Config", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
            num_hidden_layers=4, layer_types=["conv", "full_attention", "conv", "conv"], conv_L_cache=3,
            block_auto_adjust_ff_dim=True, block_multiple_of=16, block_ffn_dim_multiplier=1.0)
PROMPT, DECODE = 12, 20


@pytest.fixture(scope="module")
def lfm2(tmp_path_factory):
    from tiny import make_model

    folder = tmp_path_factory.mktemp("lfm2")
    return folder, make_model("lfm2", folder, **LFM2)


class Stepper:
    """Runs a build step by step in onnxruntime, carrying every state output to the next step's input."""

    def __init__(self, out):
        import onnxruntime as ort

        cfg = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
        self.s = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        names = {i.name for i in self.s.get_inputs()}
        self.pairs = [(cfg["inputs"][k] % i, cfg["outputs"]["present" + k[4:]] % i)
                      for k in cfg["inputs"] if k.startswith("past_") for i in range(cfg["num_hidden_layers"])
                      if cfg["inputs"][k] % i in names]
        assert {p for p, _ in self.pairs} == names - {"input_ids", "attention_mask"}
        dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
        self.state = {i.name: np.zeros([1 if d == "batch_size" else 0 if d == "past_sequence_length" else d
                                        for d in i.shape], dtype[i.type])
                      for i in self.s.get_inputs() if i.name in {p for p, _ in self.pairs}}
        self.length = 0

    def __call__(self, ids: list[int]) -> np.ndarray:
        self.length += len(ids)
        feeds = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, self.length), np.int64),
                 **self.state}
        outs = dict(zip([o.name for o in self.s.get_outputs()], self.s.run(None, feeds)))
        self.state = {p: outs[q] for p, q in self.pairs}
        return outs["logits"][0].astype(np.float32)


def steps(out, chunks: list[list[int]]) -> np.ndarray:
    run = Stepper(out)
    return np.concatenate([run(c) for c in chunks])


def tokens(seed: int = 0) -> tuple[list[int], list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(2, 320, PROMPT).tolist(), rng.integers(2, 320, DECODE).tolist()


def test_fp32_prefill_decode_and_chunks(lfm2, tmp_path):
    folder, model = lfm2
    out = tmp_path / "out"
    onnxforge.build(folder, out, "fp32")
    prompt, decode = tokens()
    ref = reference_logits(model, prompt + decode)
    one = steps(out, [prompt] + [[t] for t in decode])
    two = steps(out, [prompt[:5], prompt[5:]] + [[t] for t in decode])
    assert one.shape == ref.shape == two.shape
    assert np.abs(one - ref).max() < FP32_TOL, np.abs(one - ref).max()
    assert np.abs(two - ref).max() < FP32_TOL, np.abs(two - ref).max()
    np.testing.assert_array_equal(onnx_step_logits(out, prompt, decode), one)  # verify's runner carries them alike
    zeroed = Stepper(out)  # the state matters: decoding without the carried conv state goes wrong
    zeroed(prompt)
    fresh = Stepper(out)
    zeroed.state = {k: v if k.startswith("past_key") else fresh.state[k] for k, v in zeroed.state.items()}
    assert np.abs(zeroed(decode[:1]) - ref[PROMPT:PROMPT + 1]).max() > 1e-3
    p, _ = tokens(1)
    assert genai_greedy(out, p) == reference_greedy(model, p)


def test_graph_and_genai_config(lfm2, tmp_path):
    folder, _ = lfm2
    out = tmp_path / "out"
    onnxforge.build(folder, out, "fp32")
    g = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    shape = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    ins = {v.name: shape(v) for v in g.input}
    assert ins["past.0.conv"] == ["batch_size", 64, 2] and "past.1.conv" not in ins
    assert ins["past_key_values.1.key"] == ["batch_size", 2, "past_sequence_length", 16]
    assert "past_key_values.0.key" not in ins and "present.2.conv" in {v.name for v in g.output}
    assert sum(n.op_type == "CausalConvWithState" for n in g.node) == 3
    dec = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    assert dec["layer_types"] == LFM2["layer_types"] and dec["conv_cache_size"] == 2
    assert dec["inputs"]["past_conv_names"] == "past.%d.conv"
    assert dec["outputs"]["present_conv_names"] == "present.%d.conv"


def test_int4_equals_the_dequantized_reference(lfm2, tmp_path):
    folder, model = lfm2
    out = tmp_path / "out"
    onnxforge.build(folder, out, recipe=Recipe(precision="int4", accuracy_level=0))
    prompt, decode = tokens()
    ref = reference_logits(dequantized_reference(folder, out), prompt + decode)
    got = steps(out, [prompt] + [[t] for t in decode])
    assert np.abs(got - ref).max() < FP32_TOL


def test_fp16_runs_close(lfm2, tmp_path):
    folder, model = lfm2
    out = tmp_path / "out"
    onnxforge.build(folder, out, "fp16")
    prompt, decode = tokens()
    ref = reference_logits(model, prompt + decode)
    got = steps(out, [prompt] + [[t] for t in decode])
    assert np.abs(got - ref).max() < 0.02 * (ref.max() - ref.min())
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
