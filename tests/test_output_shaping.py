"""Output shaping, the anchor's options: exclude_embeds (an inputs_embeds input), exclude_lm_head (a hidden_states
output instead of logits), include_hidden_states (both), config_only (genai_config.json and the tokenizer only),
against transformers at fp32 for the prompt and cached decode steps."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import prompt_and_decode

import onnxforge
from onnxforge.errors import RecipeError
from onnxforge.quant.options import apply_extra_options
from onnxforge.quant.recipe import Recipe


def _recipe(**options) -> Recipe:
    return apply_extra_options(Recipe(precision="fp32"), {k: str(v).lower() for k, v in options.items()})


def _io(out):
    g = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    dims = lambda v: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]  # noqa: E731
    return ({i.name: (i.type.tensor_type.elem_type, dims(i)) for i in g.input},
            {o.name: (o.type.tensor_type.elem_type, dims(o)) for o in g.output})


def _run(out, key: str, chunks: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Feed `chunks` (the prompt, then one token at a time) under `key` through the KV cache; every non-state
    output of every step, concatenated along the sequence."""
    import onnxruntime as ort

    d = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    past = {f"past_key_values.{i}.{kv}": np.zeros((1, d["num_key_value_heads"], 0, d["head_size"]), np.float32)
            for i in range(d["num_hidden_layers"]) for kv in ("key", "value")}
    names = [o.name for o in sess.get_outputs()]
    steps, total = [], 0
    for chunk in chunks:
        total += chunk.shape[1]
        outs = dict(zip(names, sess.run(names, {key: chunk, "attention_mask": np.ones((1, total), np.int64), **past})))
        past = {k: outs["present" + k[len("past_key_values"):]] for k in past}
        steps.append(outs)
    return {n: np.concatenate([s[n][0] for s in steps]) for n in names if not n.startswith("present")}


def _reference(model, ids: list[int]) -> dict[str, np.ndarray]:
    """transformers' logits, its input embeddings and its last hidden state (after the final norm)."""
    import torch

    with torch.no_grad():
        t = torch.tensor([ids])
        out = model(t, output_hidden_states=True)
        return {"logits": out.logits[0].numpy(), "hidden_states": out.hidden_states[-1][0].numpy(),
                "embeds": model.get_input_embeddings()(t).numpy(),
                "last_hidden": model.model(t).last_hidden_state[0].numpy()}


def _chunks(seq: np.ndarray, prompt_len: int) -> list[np.ndarray]:
    return [seq[:, :prompt_len]] + [seq[:, i:i + 1] for i in range(prompt_len, seq.shape[1])]


@pytest.mark.parametrize("family", ["llama", "llama_tied"])
def test_exclude_embeds(tiny_models, tmp_path, family):
    folder, model = tiny_models(family)
    out = tmp_path / "out"
    report = onnxforge.build(folder, out, recipe=_recipe(exclude_embeds=True), strict=True)
    inputs, outputs = _io(out)
    H = model.config.hidden_size
    assert "input_ids" not in inputs and inputs["inputs_embeds"] == (onnx.TensorProto.FLOAT,
                                                                     ["batch_size", "sequence_length", H])
    assert "logits" in outputs and "hidden_states" not in outputs
    d = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    assert d["inputs"]["inputs_embeds"] == "inputs_embeds" and "input_ids" not in d["inputs"]
    assert not report.shared_embeddings and not report.unread_tensors and not report.warnings
    assert report.recipe["exclude_embeds"] is True
    prompt, decode = prompt_and_decode()
    ref = _reference(model, prompt + decode)
    got = _run(out, "inputs_embeds", _chunks(ref["embeds"], len(prompt)))
    assert np.abs(got["logits"] - ref["logits"]).max() < 1e-4
    # the input is really used: other embeddings give other logits
    other = _run(out, "inputs_embeds", _chunks(ref["embeds"][:, ::-1].copy(), len(prompt)))
    assert np.abs(other["logits"] - ref["logits"]).max() > 1e-2


def test_exclude_lm_head(tiny_models, tmp_path):
    folder, model = tiny_models("llama")
    out = tmp_path / "out"
    report = onnxforge.build(folder, out, recipe=_recipe(exclude_lm_head=True), strict=True)
    inputs, outputs = _io(out)
    H = model.config.hidden_size
    assert "logits" not in outputs and outputs["hidden_states"] == (onnx.TensorProto.FLOAT,
                                                                    ["batch_size", "sequence_length", H])
    d = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    assert "logits" not in d["outputs"] and d["inputs"]["input_ids"] == "input_ids"
    assert not report.unread_tensors and any("lm_head.weight not read" in n for n in report.notes)
    prompt, decode = prompt_and_decode()
    ref = _reference(model, prompt + decode)
    got = _run(out, "input_ids", _chunks(np.array([prompt + decode]), len(prompt)))
    # the anchor's hidden_states is the final norm's output: transformers' last hidden state
    assert np.abs(ref["hidden_states"] - ref["last_hidden"]).max() == 0
    assert np.abs(got["hidden_states"] - ref["hidden_states"]).max() < 1e-4
    lm_head = model.lm_head.weight.detach().numpy()
    assert np.abs(got["hidden_states"] @ lm_head.T - ref["logits"]).max() < 1e-4


def test_include_hidden_states(tiny_models, tmp_path):
    folder, model = tiny_models("llama")
    out = tmp_path / "out"
    onnxforge.build(folder, out, recipe=_recipe(include_hidden_states=True, exclude_embeds=True), strict=True)
    _, outputs = _io(out)
    assert {"logits", "hidden_states"} <= set(outputs)
    d = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    assert d["outputs"]["logits"] == "logits" and "hidden_states" not in d["outputs"]
    prompt, decode = prompt_and_decode(1)
    ref = _reference(model, prompt + decode)
    got = _run(out, "inputs_embeds", _chunks(ref["embeds"], len(prompt)))
    assert np.abs(got["logits"] - ref["logits"]).max() < 1e-4
    assert np.abs(got["hidden_states"] - ref["hidden_states"]).max() < 1e-4


def test_include_hidden_states_with_pruned_logits(tiny_models, tmp_path):
    """prune_lm_head prunes the logits only: hidden_states keeps every position."""
    folder, model = tiny_models("llama")
    out = tmp_path / "out"
    onnxforge.build(folder, out, recipe=_recipe(include_hidden_states=True, prune_lm_head=True))
    _, outputs = _io(out)
    assert outputs["logits"][1][1] == 1 and outputs["hidden_states"][1][1] == "sequence_length"
    prompt, _ = prompt_and_decode()
    got = _run(out, "input_ids", [np.array([prompt])])
    ref = _reference(model, prompt)
    assert np.abs(got["hidden_states"] - ref["hidden_states"]).max() < 1e-4
    assert np.abs(got["logits"][-1] - ref["logits"][-1]).max() < 1e-4


def test_config_only(tiny_models, tmp_path):
    folder, _ = tiny_models("llama")
    onnxforge.build(folder, tmp_path / "full", recipe=_recipe(exclude_embeds=True))
    out = tmp_path / "cfg"
    report = onnxforge.build(folder, out, recipe=_recipe(config_only=True, exclude_embeds=True))
    names = {p.name for p in out.iterdir()}
    full = {p.name for p in (tmp_path / "full").iterdir()}
    assert names == full - {"model.onnx", "model.onnx.data"} and "build_report.json" in names
    assert json.loads((out / "genai_config.json").read_text()) == \
        json.loads((tmp_path / "full" / "genai_config.json").read_text())
    saved = json.loads((out / "build_report.json").read_text())
    assert saved["recipe"]["config_only"] is True and saved["input_sha256"] == "" and not report.groups
    assert saved["recipe_sha256"] != json.loads((tmp_path / "full" / "build_report.json").read_text())["recipe_sha256"]
    with pytest.raises(RecipeError, match="strict"):
        onnxforge.build(folder, tmp_path / "strict", recipe=_recipe(config_only=True), strict=True)
    assert not (tmp_path / "strict").exists()
    # recognised as a build: --overwrite replaces it, and a full build may replace it
    onnxforge.build(folder, out, recipe=_recipe(config_only=True), overwrite=True)
    assert "inputs_embeds" not in (out / "genai_config.json").read_text()
    onnxforge.build(folder, out, overwrite=True)
    assert (out / "model.onnx").is_file()


def test_config_only_folder_gives_one_error(tiny_models, tmp_path, capsys):
    from onnxforge.cli import main

    folder, _ = tiny_models("llama")
    out = tmp_path / "cfg"
    onnxforge.build(folder, out, recipe=_recipe(config_only=True))
    for argv in (["run", str(out), "hello"], ["verify", str(out), "--reference", str(folder)], ["inspect", str(out)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("onnxforge: error:") == 1 and "config_only" in err and "Traceback" not in err, err


@pytest.mark.parametrize("option,flag", [("exclude_embeds", "input_ids"), ("exclude_lm_head", "logits")])
def test_run_and_verify_refuse_shaped_models(tiny_models, tmp_path, capsys, option, flag):
    from onnxforge.cli import main

    folder, _ = tiny_models("llama")
    out = tmp_path / "out"
    onnxforge.build(folder, out, recipe=_recipe(**{option: True}))
    for argv in (["run", str(out), "hello"], ["verify", str(out), "--reference", str(folder)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("onnxforge: error:") == 1 and option in err and "Traceback" not in err, err
    assert main(["inspect", str(out)]) == 0  # inspect reads any built graph


@pytest.mark.parametrize("options,words", [
    ({"exclude_lm_head": True, "include_hidden_states": True}, "include_hidden_states"),
    ({"exclude_lm_head": True, "prune_lm_head": True}, "prune_lm_head"),
    ({"exclude_lm_head": True, "int4_algo_config": "k_quant_last"}, "int8_last_matmul"),
    ({"exclude_lm_head": True, "shared_embeddings": True}, "shared_embeddings"),
    ({"exclude_embeds": True, "shared_embeddings": True}, "shared_embeddings"),
    ({"exclude_embeds": True, "int4_op_types_to_quantize": "MatMul/Gather"}, "Gather"),
    ({"config_only": True, "int4_block_size": 64}, "block_size"),
    ({"config_only": True, "prune_lm_head": True}, "prune_lm_head"),
    ({"config_only": True, "int4_algo_config": "rtn"}, "method"),
    ({"exclude_embeds": "maybe"}, "expected true or false"),
])
def test_contradictions_are_errors(options, words):
    with pytest.raises(RecipeError, match=words):
        apply_extra_options(Recipe(precision="int4"), {k: str(v).lower() for k, v in options.items()})


def test_options_change_the_recipe_hash():
    seen = {json.dumps(_recipe(**{k: True}).describe(), sort_keys=True)
            for k in ("exclude_embeds", "exclude_lm_head", "include_hidden_states", "config_only")}
    assert len(seen | {json.dumps(Recipe(precision="fp32").describe(), sort_keys=True)}) == 5


def test_genai_reads_the_shaped_configs(tiny_models, tmp_path):
    """onnxruntime-genai 0.18 parses each config and loads each model; it generates from the include_hidden_states
    one as transformers does; its text generation needs input_ids and logits (the README says so)."""
    import onnxruntime  # noqa: F401  (loads onnxruntime before onnxruntime_genai)
    from conftest import genai_greedy, reference_greedy

    og = pytest.importorskip("onnxruntime_genai")
    folder, model = tiny_models("llama")
    for option in ("exclude_embeds", "exclude_lm_head", "include_hidden_states"):
        out = tmp_path / option
        onnxforge.build(folder, out, recipe=_recipe(**{option: True}))
        og.Config(str(out))
        og.Model(str(out))
    prompt, _ = prompt_and_decode()
    assert genai_greedy(tmp_path / "include_hidden_states", prompt) == reference_greedy(model, prompt)
    for option, missing in (("exclude_embeds", "input_ids"), ("exclude_lm_head", "logits")):
        with pytest.raises(Exception, match=missing):
            genai_greedy(tmp_path / option, prompt, 2)


def _anchor_build(folder, out, option: str) -> None:
    """The real producer: onnxruntime-genai 0.18's builder on the same checkpoint, fp32 CPU."""
    import subprocess
    import sys

    code = ("import onnxruntime, runpy, sys; sys.argv = ['builder'] + sys.argv[1:]; "
            "runpy.run_module('onnxruntime_genai.models.builder', run_name='__main__')")
    argv = [sys.executable, "-c", code, "-i", str(folder), "-m", str(folder), "-o", str(out), "-p", "fp32", "-e", "cpu",
            "-c", str(out.parent / "anchor-cache"), "--extra_options", f"{option}=true"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("option", ["exclude_embeds", "exclude_lm_head", "include_hidden_states", "config_only"])
def test_same_io_and_config_as_the_anchor(tiny_models, tmp_path, option):
    """Graph inputs/outputs (names, order, dtypes, shapes) and genai_config.json's decoder inputs/outputs equal to
    those of onnxruntime-genai's builder; its hidden_states equal ours."""
    pytest.importorskip("onnxruntime_genai")
    folder, model = tiny_models("llama")
    anchor, ours = tmp_path / "anchor", tmp_path / "ours"
    _anchor_build(folder, anchor, option)
    onnxforge.build(folder, ours, recipe=_recipe(**{option: True}))
    assert {p.name for p in anchor.iterdir()} == {p.name for p in ours.iterdir()} - {"build_report.json"}
    a, o = (json.loads((d / "genai_config.json").read_text())["model"]["decoder"] for d in (anchor, ours))
    assert (a["inputs"], a["outputs"]) == (o["inputs"], o["outputs"])
    if option == "config_only":
        return
    # the states' head-size dim is symbolic in the anchor's graph (kv_cache_dim), a number in ours: not compared
    shaped = [[(k, v) for k, v in side.items() if not k.startswith(("past", "present"))] for d in (anchor, ours)
              for side in _io(d)]
    assert shaped[:2] == shaped[2:]
    if option != "exclude_embeds":
        prompt, decode = prompt_and_decode(2)
        seq = _chunks(np.array([prompt + decode]), len(prompt))
        assert np.abs(_run(anchor, "input_ids", seq)["hidden_states"] - _run(ours, "input_ids", seq)["hidden_states"]
                      ).max() < 1e-4


def test_python_api_verify_refuses_a_hidden_states_model(tiny_models, tmp_path):
    """The Python API's onnxruntime runner (verify, perplexity) says which option, instead of a StopIteration."""
    from onnxforge.errors import RunError
    from onnxforge.verify.ort_runner import OrtDecoder

    folder, _ = tiny_models("llama")
    onnxforge.build(folder, tmp_path / "out", recipe=_recipe(exclude_lm_head=True))
    with pytest.raises(RunError, match="exclude_lm_head"):
        OrtDecoder(tmp_path / "out")


def test_recipe_file_keys(tmp_path):
    """The same options as TOML recipe keys (typed: a string where a boolean belongs names the key and line)."""
    from onnxforge.quant.options import load_recipe_file

    good = tmp_path / "good.toml"
    good.write_text('precision = "fp32"\nexclude_embeds = true\n[extra_options]\ninclude_hidden_states = true\n')
    r = load_recipe_file(good, Recipe())
    assert r.exclude_embeds and r.include_hidden_states and not r.exclude_lm_head
    bad = tmp_path / "bad.toml"
    bad.write_text('precision = "fp32"\nexclude_lm_head = "true"\n')
    with pytest.raises(RecipeError, match=r"bad.toml:2: exclude_lm_head takes a boolean"):
        load_recipe_file(bad, Recipe())


def test_both_ends_excluded_on_a_tied_model(tiny_models, tmp_path):
    """exclude_embeds + exclude_lm_head on tied embeddings: the table is read by nothing, on purpose (strict
    builds), and the body maps transformers' embeddings to its last hidden state."""
    folder, model = tiny_models("llama_tied")
    out = tmp_path / "out"
    report = onnxforge.build(folder, out, recipe=_recipe(exclude_embeds=True, exclude_lm_head=True), strict=True)
    table = list(model.get_input_embeddings().weight.shape)
    inits = onnx.load(str(out / "model.onnx"), load_external_data=False).graph.initializer
    assert not report.unread_tensors and not [i.name for i in inits if list(i.dims) == table]
    inputs, outputs = _io(out)
    assert "inputs_embeds" in inputs and "hidden_states" in outputs and "logits" not in outputs
    prompt, decode = prompt_and_decode()
    ref = _reference(model, prompt + decode)
    got = _run(out, "inputs_embeds", _chunks(ref["embeds"], len(prompt)))
    assert np.abs(got["hidden_states"] - ref["hidden_states"]).max() < 1e-4
