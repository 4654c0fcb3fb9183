"""graph/'s layout: no import circle, the emitter at the bottom, and a layer's token mixer chosen by kind from
graph/kinds.py's table, whose state declarations generate the graph's state inputs/outputs and
genai_config.json's names (docs/design.md, "Layer kinds")."""
from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

import onnxforge
import onnxforge.api
from onnxforge.graph import kinds
from onnxforge.graph.state import SEQ, State

GRAPH = Path(onnxforge.__file__).parent / "graph"


def graph_imports() -> dict[str, set[str]]:
    """module -> the graph modules it imports (at the top, under TYPE_CHECKING or inside a function)."""
    mods = {p.stem for p in GRAPH.glob("*.py")}
    edges: dict[str, set[str]] = {}
    for p in GRAPH.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:  # from .x import y
                    deps.add(node.module.split(".")[0])
                else:  # from . import x
                    deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("onnxforge.graph."):
                deps.add(node.module.split(".")[2])
        edges[p.stem] = deps & mods
    return edges


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as a path of modules, or None."""
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for d in sorted(edges.get(m, ())):
            if state.get(d) == 1:
                return path[path.index(d):] + [d] if d in path else [m, d]
            if d not in state and (found := visit(d, path + [d])):
                return found
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (found := visit(m, [m])):
            return found
    return None


def test_the_cycle_finder_finds_one():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_graph_has_no_import_cycle():
    edges = graph_imports()
    assert {"emitter", "decoder", "parts", "blocks", "kinds", "moe", "experts"} <= set(edges)
    assert cycle(edges) is None, cycle(edges)


def test_emitter_at_the_bottom_decoder_on_top():
    edges = graph_imports()
    assert edges["emitter"] <= {"builder", "weights"}
    assert not [m for m, deps in edges.items() if "decoder" in deps], "decoder.py only composes: nothing imports it"
    for m in ("parts", "blocks", "moe", "experts", "kinds"):
        assert "emitter" in edges[m], m


# -- the layer-kind table ------------------------------------------------------------------------------
TOY = State("past.%d.toy", "present.%d.toy", "toy", ("batch_size", 64))
calls: list[int] = []


def toy_part(e, i, x, ctx, past):
    """A mixer that keeps a running sum of its input over the sequence: present = past + sum(x)."""
    calls.append(i)
    b, node = e.b, f"/model/layers.{i}/toy"
    total = b.op("ReduceSum", [x, b.const([1], np.int64)], f"{node}/ReduceSum", keepdims=0)
    present = b.op("Add", [past[0], total], f"{node}/Add")
    return b.op("Identity", [x], f"{node}/Identity"), (present,)


class ToyLayer1:
    """The llama architecture, with layer 1 of kind "toy"."""

    def __init__(self, arch):
        self.arch = arch

    def __getattr__(self, name):
        return getattr(self.arch, name)

    def make_spec(self, cfg):
        spec = self.arch.make_spec(cfg)
        layers = list(spec.layers)
        layers[1] = dataclasses.replace(layers[1], kind="toy")
        return dataclasses.replace(spec, layers=tuple(layers))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from tiny import write_random_llama

    return write_random_llama(tmp_path_factory.mktemp("llama"), hidden=64, layers=2)


def test_states_come_from_the_declarations(llama, tmp_path):
    """A plain build: the graph's state inputs/outputs are exactly what genai_config.json names, per layer."""
    onnxforge.build(llama, tmp_path / "out", "fp32")
    g = ir.load(tmp_path / "out" / "model.onnx").graph
    cfg = json.loads((tmp_path / "out" / "genai_config.json").read_text())["model"]["decoder"]
    ins = [cfg["inputs"][k] % i for i in range(2) for k in ("past_key_names", "past_value_names")]
    outs = [cfg["outputs"][k] % i for i in range(2) for k in ("present_key_names", "present_value_names")]
    assert [v.name for v in g.inputs] == ["input_ids", "attention_mask", *ins]
    assert [v.name for v in g.outputs] == [*outs, "logits"]
    assert ins[0] == "past_key_values.0.key" and outs[-1] == "present.1.value"
    assert list(g.inputs[2].shape) == ["batch_size", 2, "past_sequence_length", 16]
    assert list(g.outputs[0].shape) == ["batch_size", 2, "total_sequence_length", 16]


def test_a_new_kind_is_a_table_entry(llama, tmp_path, monkeypatch):
    """Registering a kind adds a part: the decoder, blocks and genai_config.json follow its declaration."""
    import onnxruntime as ort

    monkeypatch.setitem(kinds.MIXERS, "toy", kinds.Mixer(toy_part, lambda spec, i: (TOY,)))
    real = onnxforge.api.architecture_for
    monkeypatch.setattr(onnxforge.api, "architecture_for", lambda cfg: ToyLayer1(real(cfg)))
    calls.clear()
    onnxforge.build(llama, tmp_path / "out", "fp32")
    assert calls == [1]
    out = tmp_path / "out"
    g = ir.load(out / "model.onnx").graph
    assert [v.name for v in g.inputs][2:] == ["past_key_values.0.key", "past_key_values.0.value", "past.1.toy"]
    assert [v.name for v in g.outputs] == ["present.0.key", "present.0.value", "present.1.toy", "logits"]
    assert not [n for n in g if n.name.startswith("/model/layers.1/attn/")]
    cfg = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    assert cfg["inputs"]["past_toy_names"] == "past.%d.toy" and cfg["outputs"]["present_toy_names"] == "present.%d.toy"
    assert cfg["inputs"]["past_key_names"] == "past_key_values.%d.key"
    # the state is carried: present = past + (what the step adds), so two pasts differ by exactly their difference
    s = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = np.array([[5, 7, 9]], np.int64)
    empty = np.zeros((1, 2, 0, 16), np.float32)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "past_key_values.0.key": empty,
             "past_key_values.0.value": empty}
    zero = s.run(["present.1.toy"], {**feeds, "past.1.toy": np.zeros((1, 64), np.float32)})[0]
    past = np.arange(64, dtype=np.float32)[None]
    carried = s.run(["present.1.toy"], {**feeds, "past.1.toy": past})[0]
    assert zero.shape == (1, 64) and np.abs(zero).max() > 0
    np.testing.assert_allclose(carried - zero, past, atol=1e-4)


def test_an_unknown_kind_is_one_error(llama, tmp_path, monkeypatch):
    from onnxforge.errors import ConfigError

    real = onnxforge.api.architecture_for
    monkeypatch.setattr(onnxforge.api, "architecture_for", lambda cfg: ToyLayer1(real(cfg)))
    with pytest.raises(ConfigError, match="layer 1 is of kind 'toy', which has no token mixer; known: attention"):
        onnxforge.build(llama, tmp_path / "out", "fp32")
    assert not (tmp_path / "out").exists()


def test_state_shapes_and_start():
    kv = State("past_key_values.%d.key", "present.%d.key", "key", ("batch_size", 2, SEQ, 16))
    assert kv.starts == "empty" and TOY.starts == "zeros"
    assert kv.shape(present=False) == ["batch_size", 2, "past_sequence_length", 16]
    assert kv.shape(present=True) == ["batch_size", 2, "total_sequence_length", 16]
    assert TOY.shape(True) == TOY.shape(False) == ["batch_size", 64]
