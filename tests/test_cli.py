"""`onnxforge inspect` and `onnxforge recipes`, and the run-time registries behind them."""
from __future__ import annotations

import pytest

import onnxforge
from onnxforge.cli import main
from onnxforge.errors import RecipeError
from onnxforge.inspect import model_facts
from onnxforge.quant.recipe import Recipe
from onnxforge.quant.schemes import get_scheme, register_scheme, schemes, unregister_scheme
from onnxforge.quant.storage import Storage
from onnxforge.quant.templates import Template, register_template, templates, unregister_template


def test_inspect_reports_what_the_build_wrote(tiny_models, tmp_path, capsys):
    folder, _ = tiny_models("llama_tied")
    out = tmp_path / "out"
    report = onnxforge.build(folder, out, recipe=Recipe(precision="int4", int8_last_matmul=True))
    facts = model_facts(out)
    assert facts["ops"]["GroupQueryAttention"] == 2 and facts["ops"]["GatherBlockQuantized"] == 1
    assert "MatMulNBits int8 block 32 sym" in facts["storage"] and "MatMulNBits int4 block 32 sym" in facts["storage"]
    quantized_bytes = sum(b for k, (_, b) in facts["storage"].items() if k.startswith("MatMulNBits"))
    report_bytes = sum(g["bytes"] for g in report.groups if g["storage"].startswith("int"))
    assert quantized_bytes == report_bytes  # every packed byte is accounted for, the shared table once
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "GatherBlockQuantized x1" in text and "type llama, 2 layers" in text and "past_key_values.0.key" in text


def test_inspect_without_a_model(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert "has no model.onnx" in capsys.readouterr().err


def test_recipes_lists_the_registries_including_user_entries(capsys):
    register_scheme("my_int4_g16", Storage(bits=4, block_size=16, symmetric=False, method="hqq"), "mine")
    register_template(Template("my_moe", keep_float=("*router*",), doc="mine too"))
    try:
        assert main(["recipes"]) == 0
        text = capsys.readouterr().out
        for name in list(schemes()) + list(templates()):
            assert name in text
        assert "k_quant_mixed" in text and "int4_block_size" in text
        assert get_scheme("my_int4_g16").block_size == 16
        with pytest.raises(RecipeError, match="already registered"):
            register_scheme("my_int4_g16", Storage(bits=4))
        with pytest.raises(RecipeError, match="already registered"):
            register_template(Template("my_moe"))
    finally:
        unregister_scheme("my_int4_g16")
        unregister_template("my_moe")
    assert "my_int4_g16" not in schemes() and "my_moe" not in templates()
    with pytest.raises(RecipeError, match="unknown scheme"):
        get_scheme("my_int4_g16")


def test_scheme_flag_sets_the_base_storage(tiny_models, tmp_path, capsys):
    from conftest import onnx_step_logits, prompt_and_decode

    folder, _ = tiny_models("qwen3")
    out = tmp_path / "out"
    assert main(["build", "-m", str(folder), "-o", str(out), "--scheme", "uint4_wo_64", "--quiet"]) == 0
    storage = model_facts(out)["storage"]
    assert set(k for k in storage if k.startswith("MatMulNBits")) == {"MatMulNBits int4 block 64 asym"}
    prompt, decode = prompt_and_decode()
    assert onnx_step_logits(out, prompt, decode).shape[0] == len(prompt) + len(decode)


def test_archs_lists_every_registered_architecture(capsys):
    from onnxforge.archs.registry import load_families

    assert main(["archs"]) == 0
    out = capsys.readouterr().out
    for name, arch in load_families().items():
        line = next(ln for ln in out.splitlines() if ln.startswith(name + " "))
        assert arch.model_type in line
    assert "longrope" in out and "sliding" in out
