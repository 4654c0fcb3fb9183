"""Quantized builds end to end: every method, both symmetries, placements, aliases, tied embeddings.

Correctness is checked against a computed reference: the transformers model whose weights are
replaced by onnxforge's dequantized weights (tests/quant_ref.py) must give the same logits within
1e-4. Closeness to fp32 is reported with a bound that 8 bits must meet (5% of the logit range).
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import genai_greedy, onnx_step_logits, prompt_and_decode, reference_greedy, reference_logits
from quant_ref import dequantized_reference

import onnxforge
from onnxforge.cli import main
from onnxforge.quant.recipe import Recipe, mixed_layer_gets_int8

METHODS = ["rtn", "k_quant", "hqq", "default"]


def Q(**kw) -> Recipe:
    """A recipe with accuracy_level 0 (fp32 compute), so the graph must equal the dequantized reference.
    The CPU default, 4, quantizes activations to int8 inside MatMulNBits: checked with a looser bound."""
    return Recipe(accuracy_level=0, **kw)


def _nodes(out):
    return onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node


def _nbits(out) -> dict[str, dict]:
    return {n.name: {a.name: a.i for a in n.attribute} | {"zp": len(n.input) > 3 and bool(n.input[3])}
            for n in _nodes(out) if n.op_type in ("MatMulNBits", "GatherBlockQuantized")}


def _check_against_dequantized(folder, out, tol=1e-4, min_top1=1.0):
    prompt, decode = prompt_and_decode()
    ref = reference_logits(dequantized_reference(folder, out), prompt + decode)
    got = onnx_step_logits(out, prompt, decode)
    diff = np.abs(got - ref).max()
    assert diff < tol, f"max abs diff vs dequantized reference {diff}"
    top1 = (got.argmax(-1) == ref.argmax(-1)).mean()
    assert top1 >= min_top1, f"top-1 agreement with the dequantized reference {top1}"
    return got


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_int4_methods_match_dequantized_reference(tiny_models, tmp_path, family, method, symmetric):
    folder, model = tiny_models(family)
    out = tmp_path / "out"
    onnxforge.build(folder, out, recipe=Q(precision="int4", method=method, symmetric=symmetric))
    nodes = _nbits(out)
    assert nodes and all(a["bits"] == 4 and a["block_size"] == 32 and a["zp"] == (not symmetric)
                         for a in nodes.values())
    _check_against_dequantized(folder, out)


@pytest.mark.parametrize("method", ["rtn", "k_quant"])
def test_int4_runs_in_genai(tiny_models, tmp_path, method):
    folder, _ = tiny_models("llama")
    out = tmp_path / "out"
    onnxforge.build(folder, out, recipe=Q(precision="int4", method=method, symmetric=False))
    prompt, _ = prompt_and_decode(1)
    deq = dequantized_reference(folder, out)
    assert genai_greedy(out, prompt) == reference_greedy(deq, prompt)


def test_int8_close_to_fp32(tiny_models, tmp_path):
    folder, model = tiny_models("qwen3")
    out = tmp_path / "out"
    onnxforge.build(folder, out, recipe=Q(precision="int8"))
    assert {a["bits"] for a in _nbits(out).values()} == {8}
    got = _check_against_dequantized(folder, out)
    prompt, decode = prompt_and_decode()
    ref = reference_logits(model, prompt + decode)
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


def test_int4_error_is_larger_than_int8(tiny_models, tmp_path):
    folder, model = tiny_models("llama")
    prompt, decode = prompt_and_decode()
    ref = reference_logits(model, prompt + decode)
    errs = {}
    for p in ("int4", "int8"):
        onnxforge.build(folder, tmp_path / p, recipe=Q(precision=p))
        errs[p] = np.abs(onnx_step_logits(tmp_path / p, prompt, decode) - ref).max()
    assert errs["int8"] < errs["int4"]


def test_last_matmul_int8_placement(tiny_models, tmp_path):
    folder, _ = tiny_models("llama")
    out = tmp_path / "out"
    onnxforge.build(folder, out, recipe=Q(precision="int4", method="k_quant", int8_last_matmul=True))
    nodes = _nbits(out)
    assert nodes["/lm_head/MatMul"]["bits"] == 8
    assert all(a["bits"] == 4 for n, a in nodes.items() if n != "/lm_head/MatMul")
    _check_against_dequantized(folder, out)


def test_mixed_layers_rule_on_more_layers(tiny_models, tmp_path):
    """16 layers so the llama.cpp rule picks a non-trivial set (0, 1, 4, 7, 10, 13, 14, 15)."""
    folder, _ = tiny_models("qwen2", num_hidden_layers=16)
    out = tmp_path / "out"
    onnxforge.build(folder, out, recipe=Q(precision="int4", int8_mixed_layers=True))
    nodes = _nbits(out)
    expected8 = {i for i in range(16) if mixed_layer_gets_int8(i, 16)}
    assert expected8 == {0, 1, 4, 7, 10, 13, 14, 15}
    for i in range(16):
        want = 8 if i in expected8 else 4
        assert nodes[f"/model/layers.{i}/attn/qkv_proj/MatMul"]["bits"] == want
        assert nodes[f"/model/layers.{i}/mlp/down_proj/MatMul"]["bits"] == want
        assert nodes[f"/model/layers.{i}/attn/o_proj/MatMul"]["bits"] == 4
        assert nodes[f"/model/layers.{i}/mlp/gate_up_proj/MatMul"]["bits"] == 4
    assert nodes["/lm_head/MatMul"]["bits"] == 4


def test_mixed_layers_with_unpacked_qkv_puts_v_at_8_bits(tiny_models, tmp_path):
    folder, _ = tiny_models("llama")
    out = tmp_path / "out"
    onnxforge.build(folder, out, recipe=Q(precision="int4", int8_mixed_layers=True, unpack_matmul=True))
    nodes = _nbits(out)
    assert not mixed_layer_gets_int8(0, 2) and mixed_layer_gets_int8(1, 2)
    assert nodes["/model/layers.1/attn/v_proj/MatMul"]["bits"] == 8
    assert nodes["/model/layers.1/attn/q_proj/MatMul"]["bits"] == 4
    assert nodes["/model/layers.0/attn/v_proj/MatMul"]["bits"] == 4
    _check_against_dequantized(folder, out)


def test_different_storage_unpacks_qkv_automatically(tiny_models, tmp_path):
    from onnxforge.quant.recipe import Rule
    from onnxforge.quant.storage import Storage

    folder, _ = tiny_models("llama")
    out = tmp_path / "out"
    rule = Rule("model.layers.*.self_attn.v_proj", Storage(bits=8, block_size=32))
    onnxforge.build(folder, out, recipe=Q(precision="int4", rules=(rule,)))
    nodes = _nbits(out)
    assert "/model/layers.0/attn/qkv_proj/MatMul" not in nodes
    assert nodes["/model/layers.1/attn/v_proj/MatMul"]["bits"] == 8 and nodes["/model/layers.1/attn/k_proj/MatMul"]["bits"] == 4
    assert "/model/layers.1/mlp/gate_up_proj/MatMul" in nodes  # still packed where storage agrees
    _check_against_dequantized(folder, out)


# -- anchor command lines -------------------------------------------------------------------------
ANCHOR_LINES = {
    "rtn asym unpacked": ["-p", "int4", "-e", "cpu", "--extra_options", "int4_is_symmetric=false", "unpack_matmul=true",
                          "int4_algo_config=rtn"],
    "k_quant": ["-p", "int4", "-e", "cpu", "--extra_options", "int4_algo_config=k_quant"],
    "shared fp16": ["-p", "fp16", "-e", "cpu", "--extra_options", "shared_embeddings=true"],
}


@pytest.mark.parametrize("line", list(ANCHOR_LINES))
def test_anchor_command_lines_run_unchanged(tiny_models, tmp_path, line, capsys):
    folder, _ = tiny_models("llama_tied")
    out = tmp_path / "out"
    assert main(["build", "-i", str(folder), "-o", str(out), "--quiet", *ANCHOR_LINES[line]]) == 0
    nodes = _nbits(out)
    if line == "rtn asym unpacked":
        assert nodes["/model/layers.0/attn/q_proj/MatMul"]["zp"] and "/model/layers.0/attn/qkv_proj/MatMul" not in nodes
    if line == "k_quant":
        report = json.loads((out / "build_report.json").read_text())
        assert report["recipe"]["method"] == "k_quant"
    if line == "shared fp16":
        ops = {n.op_type for n in _nodes(out)}
        assert "FusedMatMul" in ops  # lm_head reads the embedding table: stored once
        prompt, decode = prompt_and_decode()
        onnx_step_logits(out, prompt, decode)
    else:  # accuracy_level 4 (the CPU default) computes with int8 activations: 10% of the logit range
        attrs = _nbits(out)
        assert {a["accuracy_level"] for n, a in attrs.items() if n.endswith("/MatMul")} == {4}
        _check_against_dequantized(folder, out, tol=0.1 * _logit_range(folder), min_top1=0.9)


def _logit_range(folder) -> float:
    from quant_ref import load_reference

    prompt, decode = prompt_and_decode()
    return float(np.abs(reference_logits(load_reference(folder), prompt + decode)).max())


@pytest.mark.parametrize("alias,method,placement", [
    ("rtn_last", "rtn", {"/lm_head/MatMul"}),
    ("k_quant_last", "k_quant", {"/lm_head/MatMul"}),
    ("k_quant_mixed", "k_quant", "mixed"),
    ("k_quant_linear", "k_quant", set()),
])
def test_algo_aliases_give_promised_layout(tiny_models, tmp_path, alias, method, placement, capsys):
    folder, _ = tiny_models("qwen2")  # 3 layers: the mixed rule picks layer 2 only (n//8 = 0, 7n//8 = 2)
    out = tmp_path / "out"
    assert main(["build", "-m", str(folder), "-o", str(out), "-p", "int4", "--quiet", "--extra_options",
                 f"int4_algo_config={alias}"]) == 0
    nodes = _nbits(out)
    eight = {n for n, a in nodes.items() if a["bits"] == 8}
    if placement == "mixed":
        placement = {"/lm_head/MatMul"} | {f"/model/layers.{i}/{p}/MatMul" for i in (2,)
                                           for p in ("attn/qkv_proj", "mlp/down_proj")}
    assert eight == placement
    assert json.loads((out / "build_report.json").read_text())["recipe"]["method"] == method


# -- tied embeddings ------------------------------------------------------------------------------
def test_tied_int4_stores_table_once_and_matches_untied(tiny_models, tmp_path):
    """The untied twin has the same weights with lm_head = embed_tokens, stored separately."""
    import shutil

    from safetensors.numpy import load_file, save_file

    folder, _ = tiny_models("llama_tied")
    untied = tmp_path / "untied"
    shutil.copytree(folder, untied)
    tensors = load_file(str(untied / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    save_file(tensors, str(untied / "model.safetensors"))
    cfg = json.loads((untied / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    (untied / "config.json").write_text(json.dumps(cfg))

    recipe = Q(precision="int4", op_types=frozenset({"MatMul", "Gather"}))
    r_tied = onnxforge.build(folder, tmp_path / "tied_out", recipe=recipe)
    r_untied = onnxforge.build(untied, tmp_path / "untied_out", recipe=recipe)
    assert r_tied.shared_embeddings and not r_untied.shared_embeddings
    size = lambda out: (out / "model.onnx.data").stat().st_size
    V, H = cfg["vocab_size"], cfg["hidden_size"]
    table = V * H // 2 + V * (H // 32) * 4  # int4 data + fp32 scales
    assert size(tmp_path / "untied_out") - size(tmp_path / "tied_out") >= table - 1024
    prompt, decode = prompt_and_decode()
    a = onnx_step_logits(tmp_path / "tied_out", prompt, decode)
    b = onnx_step_logits(tmp_path / "untied_out", prompt, decode)
    assert np.abs(a - b).max() < 1e-5
    _check_against_dequantized(folder, tmp_path / "tied_out")


@pytest.mark.parametrize("bits,block", [(4, 64), (8, 32), (4, 16)])
def test_tied_sharing_is_generic_over_bits_and_block(tiny_models, tmp_path, bits, block):
    folder, _ = tiny_models("llama_tied")
    out = tmp_path / "out"
    report = onnxforge.build(folder, out, recipe=Q(precision=f"int{bits}", block_size=block))
    assert report.shared_embeddings
    gbq = [n for n in _nodes(out) if n.op_type == "GatherBlockQuantized"]
    assert len(gbq) == 1
    attrs = {a.name: a.i for a in gbq[0].attribute}
    assert attrs["bits"] == bits and attrs["block_size"] == block
    _check_against_dequantized(folder, out)


def test_tied_sharing_with_padding(tiny_models, tmp_path):
    """hidden 96 with block 64: rows are padded to 128 and the gather is sliced back to 96."""
    folder, _ = tiny_models("llama_tied", hidden_size=96, num_attention_heads=2, num_key_value_heads=1, head_dim=48)
    out = tmp_path / "out"
    report = onnxforge.build(folder, out, recipe=Q(precision="int4", block_size=64, symmetric=False))
    assert report.shared_embeddings and "Slice" in {n.op_type for n in _nodes(out)}
    _check_against_dequantized(folder, out)


def test_shared_embeddings_false_and_untied_error(tiny_models, tmp_path, capsys):
    folder, _ = tiny_models("llama_tied")
    out = tmp_path / "out"
    assert main(["build", "-m", str(folder), "-o", str(out), "-p", "int4", "--quiet", "--extra_options",
                 "shared_embeddings=false", "accuracy_level=0"]) == 0
    assert "GatherBlockQuantized" not in {n.op_type for n in _nodes(out)}
    _check_against_dequantized(folder, out)
    untied, _ = tiny_models("llama")
    code = main(["build", "-m", str(untied), "-o", str(tmp_path / "o2"), "-p", "int4", "--quiet",
                 "--extra_options", "shared_embeddings=true"])
    assert code == 2 and "does not tie them" in capsys.readouterr().err


def test_embedding_quantized_when_gather_in_op_types(tiny_models, tmp_path):
    folder, _ = tiny_models("qwen3")
    out = tmp_path / "out"
    onnxforge.build(folder, out, recipe=Q(precision="int4", op_types=frozenset({"MatMul", "Gather"})))
    assert "/model/embed_tokens/GatherBlockQuantized" in _nbits(out)
    _check_against_dequantized(folder, out)


def test_exclusions_and_rules_keep_float(tiny_models, tmp_path, capsys):
    folder, _ = tiny_models("llama")
    out = tmp_path / "out"
    assert main(["build", "-m", str(folder), "-o", str(out), "-p", "int4", "--quiet", "--extra_options",
                 "int4_nodes_to_exclude=/lm_head/MatMul,/model/layers.0/mlp/down_proj/MatMul", "accuracy_level=0"]) == 0
    nodes = _nbits(out)
    assert "/lm_head/MatMul" not in nodes and "/model/layers.0/mlp/down_proj/MatMul" not in nodes
    assert "/model/layers.1/mlp/down_proj/MatMul" in nodes
    _check_against_dequantized(folder, out)


def test_toml_recipe(tiny_models, tmp_path, capsys):
    folder, _ = tiny_models("llama")
    recipe = tmp_path / "r.toml"
    recipe.write_text('''
precision = "int4"
method = "hqq"
block_size = 64
symmetric = false
accuracy_level = 0

[[rules]]
match = "model.layers.*.mlp.down_proj"
scheme = "int8_wo"

[[rules]]
match = "/lm_head/MatMul"
keep_float = true
''')
    out = tmp_path / "out"
    assert main(["build", "-m", str(folder), "-o", str(out), "--recipe", str(recipe), "--quiet"]) == 0
    nodes = _nbits(out)
    assert nodes["/model/layers.0/mlp/down_proj/MatMul"]["bits"] == 8
    assert nodes["/model/layers.0/attn/qkv_proj/MatMul"] == {"K": 96, "N": 192, "bits": 4, "block_size": 64,
                                                              "accuracy_level": 0, "zp": True}
    assert "/lm_head/MatMul" not in nodes
    _check_against_dequantized(folder, out)
    recipe.write_text('precison = "int4"\n')
    assert main(["build", "-m", str(folder), "-o", str(tmp_path / "o2"), "--recipe", str(recipe), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "unknown recipe key(s) precison" in err and "precision" in err


def test_report_lists_storage_per_group(tiny_models, tmp_path):
    folder, _ = tiny_models("llama")
    report = onnxforge.build(folder, tmp_path / "out", recipe=Q(precision="int4", method="rtn",
                                                                    int8_last_matmul=True))
    by = report.by_storage()
    assert any(k.startswith("int4 rtn sym block 32") for k in by) and any(k.startswith("int8 rtn") for k in by)
    text = report.summary()
    assert "int4 rtn sym block 32" in text and "total" in text
    assert sum(b for _, b in by.values()) == sum(g["bytes"] for g in report.groups)


def test_two_bit_rule_where_the_op_allows(tiny_models, tmp_path):
    """MatMulNBits runs 2-bit weights on CPU; a rule can put any group there."""
    from onnxforge.quant.recipe import Rule
    from onnxforge.quant.storage import Storage

    folder, _ = tiny_models("llama")
    out = tmp_path / "out"
    onnxforge.build(folder, out, recipe=Q(precision="int4", rules=(Rule("*down_proj*", Storage(bits=2)),)))
    nodes = _nbits(out)
    assert nodes["/model/layers.0/mlp/down_proj/MatMul"]["bits"] == 2
    assert nodes["/model/layers.0/attn/o_proj/MatMul"]["bits"] == 4
    _check_against_dequantized(folder, out)
