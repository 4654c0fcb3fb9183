"""Issue 22 item 3: every value that enters a build (CLI flags, TOML recipes, --extra_options, the Python
API) is typed and ranged; options are implemented or refused; patterns that match nothing, options that
contradict each other and defaults that cannot apply are said, not resolved silently."""
from __future__ import annotations

import contextlib
import json
import shutil

import numpy as np
import pytest

import onnxforge
from onnxforge.cli import main
from onnxforge.errors import RecipeError
from onnxforge.quant.options import apply_extra_options, load_recipe_file
from onnxforge.quant.recipe import Recipe


@pytest.fixture
def ckpt(tiny_models, tmp_path):
    src, _ = tiny_models("llama_tied")
    folder = tmp_path / "ckpt"
    shutil.copytree(src, folder)
    return folder


def _refuse_writer(mp) -> None:
    import onnxforge.api as api

    def refuse(*a, **k):
        raise AssertionError("a weight would be read before the error")

    mp.setattr(api, "WeightWriter", refuse)


@pytest.fixture
def no_weights_read(monkeypatch):
    """Fail the test if the writer (the only thing that reads weights) is ever constructed."""
    _refuse_writer(monkeypatch)


@pytest.fixture
def weights_unread():
    """A context in which constructing the writer fails the test (for the part of a test that must error)."""
    @contextlib.contextmanager
    def unread():
        with pytest.MonkeyPatch.context() as mp:
            _refuse_writer(mp)
            yield

    return unread


def build_cli(ckpt, out, capsys, *extra):
    """rc and stderr of `onnxforge build` (argparse errors exit with SystemExit(2))."""
    try:
        code = main(["build", "-m", str(ckpt), "-o", str(out), "--quiet", *extra])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1, err
    return lines[0]


# ---- TOML recipes: real types, the key and its line named -------------------------------------------
@pytest.mark.parametrize("key, text, wanted", [
    ("symmetric", 'symmetric = "false"', "a boolean"),
    ("prune_lm_head", 'prune_lm_head = "false"', "a boolean"),
    ("block_size", 'block_size = "32"', "an integer"),
    ("int8_last_matmul", "int8_last_matmul = 1", "a boolean"),
    ("block_size", "block_size = true", "an integer"),
])
def test_toml_value_of_the_wrong_type(tmp_path, key, text, wanted):
    path = tmp_path / "r.toml"
    path.write_text(f'# a recipe\nprecision = "int4"\n\n{text}\n')
    with pytest.raises(RecipeError) as e:
        load_recipe_file(path, Recipe())
    msg = str(e.value)
    assert f"{path}:4" in msg and key in msg and wanted in msg, msg


@pytest.mark.parametrize("text, key, line", [
    ('[[rules]]\nmatch = "*"\nbits = "8"\n', "bits", 5),
    ('[[rules]]\nmatch = "a"\nkeep_float = true\n\n[[rules]]\nmatch = "*"\nsymmetric = "false"\n', "symmetric", 9),
    ('[[rules]]\nmatch = "*"\nblock_size = "64"\n', "block_size", 5),
    ('[[rules]]\nmatch = "*"\nkeep_float = "true"\n', "keep_float", 5),
    ('[[rules]]\nmatch = 3\n', "match", 4),
    ('[[rules]]\nmatch = "*"\nblock_size = 48\n', "block_size", 5),
    ('[[rules]]\nmatch = "*"\n# eight\nbits = 3\n', "bits", 6),
])
def test_toml_rule_value_of_the_wrong_type(tmp_path, text, key, line):
    path = tmp_path / "r.toml"
    path.write_text(f'precision = "int4"\n\n{text}')
    with pytest.raises(RecipeError) as e:
        load_recipe_file(path, Recipe())
    assert f"{path}:{line}" in str(e.value) and key in str(e.value) and "rules[" in str(e.value), str(e.value)


def test_toml_internal_fields_are_not_recipe_keys(tmp_path):
    path = tmp_path / "r.toml"
    for key in ("native = 1", "seen = []", "template_float = [\"*\"]", "num_layers = 2"):
        path.write_text(f'precision = "int4"\n{key}\n')
        with pytest.raises(RecipeError, match=f"unknown recipe key.*{key.split()[0]}"):
            load_recipe_file(path, Recipe())


def test_toml_extra_options_table_needs_real_types(tmp_path):
    """Inside a TOML file the anchor's options take TOML's types too: a boolean option given "false" is an error
    (on the command line, --extra_options strings "true"/"false"/"1"/"0" stay the anchor's spelling)."""
    path = tmp_path / "r.toml"
    path.write_text('precision = "int4"\n[extra_options]\nint4_algo_config = "k_quant"\nint4_is_symmetric = "false"\n')
    with pytest.raises(RecipeError, match=r"r\.toml:4: extra_options\.int4_is_symmetric .*a boolean"):
        load_recipe_file(path, Recipe())
    path.write_text('precision = "int4"\n[extra_options]\nint4_block_size = "64"\n')
    with pytest.raises(RecipeError, match=r"r\.toml:3: extra_options\.int4_block_size .*an integer"):
        load_recipe_file(path, Recipe())
    path.write_text('precision = "int4"\n[extra_options]\nint4_algo_config = "k_quant"\nint4_is_symmetric = false\n'
                    "int4_block_size = 64\n")
    r = load_recipe_file(path, Recipe())
    assert (r.method, r.symmetric, r.block_size) == ("k_quant", False, 64)
    r = apply_extra_options(Recipe(precision="int4"), ["int4_is_symmetric=false", "int4_block_size=64"])
    assert (r.symmetric, r.block_size) == (False, 64)


def test_toml_type_error_from_the_cli(ckpt, tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text('precision = "int4"\nsymmetric = "false"\n')
    code, err = build_cli(ckpt, tmp_path / "out", capsys, "--recipe", str(recipe))
    assert code == 2 and f"{recipe}:2: symmetric" in error_line(err)
    assert not (tmp_path / "out").exists()


def test_python_api_recipe_types():
    for kw, wanted in [({"symmetric": "false"}, "a boolean"), ({"prune_lm_head": "false"}, "a boolean"),
                       ({"block_size": "32"}, "an integer"), ({"qmoe_block_size": True}, "an integer"),
                       ({"accuracy_level": "4"}, "an integer")]:
        with pytest.raises(RecipeError, match=f"{next(iter(kw))} .*{wanted}"):
            Recipe(precision="int4", **kw)


# ---- CLI flags and the Python API: ranges -----------------------------------------------------------
@pytest.mark.parametrize("flag, value, words", [
    ("--workers", "-1", "at least 1"), ("--workers", "0", "at least 1"), ("--workers", "two", "an integer"),
    ("--block-size", "0", "16, 32, 64, 128, 256"), ("--block-size", "48", "16, 32, 64, 128, 256"),
    ("--max-length", "-5", "at least 1"), ("--max-length", "0", "at least 1"),
])
def test_cli_flag_out_of_range(ckpt, tmp_path, capsys, flag, value, words):
    code, err = build_cli(ckpt, tmp_path / "out", capsys, "-p", "int4", flag, value)
    line = error_line(err)
    assert code == 2 and flag in line and words in line, err
    assert not (tmp_path / "out").exists()


def test_max_length_above_the_context(ckpt, tmp_path, capsys, weights_unread):
    with weights_unread():
        code, err = build_cli(ckpt, tmp_path / "out", capsys, "--max-length", "99999999")
        line = error_line(err)
        assert code == 2 and "99999999" in line and "context length (256)" in line, err
        assert not (tmp_path / "out").exists()
        with pytest.raises(RecipeError, match="context length"):
            onnxforge.build(ckpt, tmp_path / "out", max_length=257)
    onnxforge.build(ckpt, tmp_path / "out", max_length=256, workers=1)  # the context itself is fine
    cfg = json.loads((tmp_path / "out" / "genai_config.json").read_text())
    assert cfg["search"]["max_length"] == 256


def test_api_ranges_agree_with_the_cli(ckpt, tmp_path, no_weights_read):
    for kw, words in [({"workers": -1}, "workers must be at least 1"), ({"workers": 0}, "workers must be at least 1"),
                      ({"workers": 2.5}, "workers must be an integer"), ({"max_length": -5}, "at least 1"),
                      ({"max_length": True}, "max_length must be an integer"),
                      ({"overwrite": "false"}, "overwrite must be True or False"),
                      ({"strict": 1}, "strict must be True or False")]:
        with pytest.raises(RecipeError, match=words):
            onnxforge.build(ckpt, tmp_path / "out", **kw)
        assert not (tmp_path / "out").exists()


def test_api_precision_or_provider_against_its_recipe(ckpt, tmp_path, no_weights_read):
    """build(model, out, "fp16", recipe=Recipe(precision="int4")) used to build int4 without a word."""
    for kw, words in [({"precision": "fp16"}, "precision='fp16' contradicts the recipe's precision 'int4'"),
                      ({"provider": "cuda"}, "provider='cuda' contradicts the recipe's provider 'cpu'")]:
        with pytest.raises(RecipeError, match=words):
            onnxforge.build(ckpt, tmp_path / "out", recipe=Recipe(precision="int4"), **kw)
        assert not (tmp_path / "out").exists()


def test_api_precision_agreeing_with_its_recipe_builds(ckpt, tmp_path):
    report = onnxforge.build(ckpt, tmp_path / "out", "int4", "cpu", recipe=Recipe(precision="int4", method="rtn"))
    assert report.precision == "int4" and report.recipe["method"] == "rtn"


# ---- patterns that match nothing -----------------------------------------------------------------
def test_keep_float_typo(ckpt, tmp_path, capsys, weights_unread):
    """A typo is an error naming the closest names; the pattern meant builds; a template's patterns (MoE
    routers) may match nothing on a dense model."""
    from onnxforge.quant.templates import apply_template

    with weights_unread():
        code, err = build_cli(ckpt, tmp_path / "out", capsys, "-p", "int4", "--keep-float", "/model/layer.0/*")
        line = error_line(err)
        assert code == 2 and "'/model/layer.0/*' matches no weight" in line and "/model/layers.0/" in line, err
        assert not (tmp_path / "out").exists()
    recipe = apply_template(Recipe(precision="int4", keep_float=("/model/layers.0/*",)), "mixtral")
    report = onnxforge.build(ckpt, tmp_path / "out", recipe=recipe, workers=1)
    assert any("fp32" in g["storage"] and "layers.0" in g["label"] for g in report.groups)


def test_nodes_to_exclude_typo(ckpt, tmp_path, capsys, no_weights_read):
    code, err = build_cli(ckpt, tmp_path / "out", capsys, "-p", "int4", "--extra_options",
                          "int4_nodes_to_exclude=/lm_head/MatMull")
    line = error_line(err)
    assert code == 2 and "/lm_head/MatMull" in line and "'/lm_head/MatMul'" in line, err


def test_rule_matching_nothing(ckpt, tmp_path, no_weights_read):
    recipe = tmp_path / "r.toml"
    recipe.write_text('precision = "int4"\n[[rules]]\nmatch = "model.layers.*.mlp.dwon_proj"\nscheme = "int8_wo"\n')
    with pytest.raises(RecipeError, match=r"rule 'model\.layers\.\*\.mlp\.dwon_proj' matches no weight.*"
                                          r"model\.layers\.\d\.mlp\.down_proj"):
        onnxforge.build(ckpt, tmp_path / "out", recipe=load_recipe_file(recipe, Recipe()))


# ---- options implemented or refused ------------------------------------------------------------------
@pytest.mark.parametrize("option, words", [
    ("use_qdq=banana", "expected true or false"),
    ("enable_cuda_graph=banana", "expected true or false"),
    ("enable_cuda_graph=1", "enable_cuda_graph"),
    ("fuse_qk_norm_gqa=true", "fuse_qk_norm_gqa"),
    ("fuse_qk_norm_gqa=x", "expected true or false"),
    ("hf_token=hf_abc", "not in a recipe"),  # the command line takes it (tests/test_hub.py), never a recipe
])
def test_options_refused(option, words):
    with pytest.raises(RecipeError, match=words):
        apply_extra_options(Recipe(precision="int4"), [option])


@pytest.mark.parametrize("option", ["enable_cuda_graph", "fuse_qk_norm_gqa"])  # use_qdq: tests/test_qdq.py
def test_options_off_accepted_on_refused(option):
    base = Recipe(precision="int4")
    assert apply_extra_options(base, [f"{option}=false"]) == base
    assert apply_extra_options(base, {option: False}) == base
    with pytest.raises(RecipeError, match=option):
        apply_extra_options(base, [f"{option}=true"])


# ---- contradictions ----------------------------------------------------------------------------------
def test_precision_against_a_recipe_or_scheme(ckpt, tmp_path, capsys, weights_unread):
    recipe = tmp_path / "int4.toml"
    recipe.write_text('precision = "int4"\n')
    with weights_unread():
        code, err = build_cli(ckpt, tmp_path / "out", capsys, "-p", "fp16", "--recipe", str(recipe))
        line = error_line(err)
        assert code == 2 and "-p fp16" in line and "int4" in line and "int4.toml" in line, err
        code, err = build_cli(ckpt, tmp_path / "out", capsys, "-p", "int4", "--scheme", "int8_wo")
        line = error_line(err)
        assert code == 2 and "-p int4" in line and "int8_wo" in line and "int8" in line, err
        code, err = build_cli(ckpt, tmp_path / "out", capsys, "--recipe", str(recipe), "--scheme", "int8_wo")
        assert code == 2 and "the recipe" in error_line(err) and "int8_wo" in error_line(err), err
        assert not (tmp_path / "out").exists()
    # options that agree build
    code, _ = build_cli(ckpt, tmp_path / "a", capsys, "-p", "int4", "--recipe", str(recipe), "--workers", "1")
    assert code == 0
    code, _ = build_cli(ckpt, tmp_path / "b", capsys, "--scheme", "int8_wo", "--workers", "1")
    assert code == 0
    assert json.loads((tmp_path / "b" / "build_report.json").read_text())["precision"] == "int8"


@pytest.mark.parametrize("argv, words", [
    (["--extra_options", "int4_block_size=32", "block_size=64"], "int4_block_size and block_size contradict"),
    (["--extra_options", "int4_is_symmetric=true", "int4_is_symmetric=false"], "int4_is_symmetric is given twice"),
    (["--extra_options", "int4_algo_config=rtn_last", "int8_last_matmul=false"], "contradict each other"),
    (["--block-size", "64", "--extra_options", "int4_block_size=32"], "--block-size contradicts --extra_options"),
    (["--method", "hqq", "--extra_options", "int4_algo_config=rtn"], "--method contradicts --extra_options"),
    (["--asymmetric", "--extra_options", "int4_is_symmetric=true"], "--asymmetric contradicts --extra_options"),
])
def test_flags_against_extra_options(ckpt, tmp_path, capsys, weights_unread, argv, words):
    with weights_unread():
        code, err = build_cli(ckpt, tmp_path / "out", capsys, "-p", "int4", *argv)
        assert code == 2 and words in error_line(err), err
        assert not (tmp_path / "out").exists()
    if words.startswith("--block-size"):  # agreeing is fine
        code, err = build_cli(ckpt, tmp_path / "ok", capsys, "-p", "int4", "--workers", "1", "--block-size", "64",
                              "--extra_options", "int4_block_size=64", "block_size=64")
        assert code == 0, err


def test_method_options_on_a_float_build(ckpt, tmp_path, capsys, no_weights_read):
    code, err = build_cli(ckpt, tmp_path / "out", capsys, "-p", "fp16", "--block-size", "64", "--method", "hqq",
                          "--asymmetric")
    line = error_line(err)
    assert code == 2 and "fp16" in line and "method" in line and "block size" in line and "asymmetric" in line, err
    with pytest.raises(RecipeError, match="nothing is quantized"):
        onnxforge.build(ckpt, tmp_path / "out", recipe=Recipe(precision="fp32", method="hqq"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags", [("--method", "default"), ("--block-size", "32")])
def test_a_named_default_method_option_on_a_float_build(ckpt, tmp_path, capsys, no_weights_read, flags):
    """`-p fp32 --method default` named a method the float build would ignore (the fault fuzz's one open case)."""
    code, err = build_cli(ckpt, tmp_path / "out", capsys, "-p", "fp32", *flags)
    assert code == 2 and "nothing is quantized" in error_line(err), err


def test_an_empty_model_path_is_not_the_current_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["build", "-m", "", "-o", str(tmp_path / "out"), "--quiet"])
    assert code == 2 and "model path is empty" in capsys.readouterr().err
    with pytest.raises(onnxforge.errors.CheckpointError, match="model path is empty"):
        onnxforge.build(" ", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---- k_quant on any K, and the QMoE block default that adapts ------------------------------------------
def test_tsum_pads_to_a_power_of_two():
    from onnxforge.quant.kquant import tsum

    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 48)).astype(np.float32)
    padded = np.concatenate([a, np.zeros((5, 16), np.float32)], axis=1)
    assert np.array_equal(tsum(a), tsum(padded))
    assert np.allclose(tsum(a)[:, 0], a.sum(axis=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("symmetric", [True, False])
def test_kquant_per_channel_on_any_width(symmetric):
    from onnxforge.quant.qmoe import quantize_expert
    from onnxforge.quant.pack import dequantize

    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 48)).astype(np.float32)
    errors = {}
    for method in ("rtn", "k_quant"):
        q = quantize_expert(w, bits=4, block_size=0, symmetric=symmetric, method=method)
        errors[method] = float(((dequantize(q) - w) ** 2).sum())
    assert errors["k_quant"] <= errors["rtn"] * 1.0001


@pytest.fixture
def mixtral(tiny_models):
    pytest.importorskip("transformers")
    from moe_check import FAMILIES

    return tiny_models("mixtral", **FAMILIES["mixtral"])[0]  # expert width (intermediate size) 48


def test_qmoe_default_block_adapts(mixtral, tmp_path):
    from moe_check import qmoe_nodes

    out = tmp_path / "out"
    report = onnxforge.build(mixtral, out, recipe=Recipe(precision="int4", method="rtn"), workers=1)
    assert {n["block"] for n in qmoe_nodes(out)} == {16}
    assert any("QMoE block 16" in n and "48" in n for n in report.notes), report.notes
    assert "QMoE block 16" in report.summary()


def test_qmoe_explicit_block_that_cannot_apply(mixtral, tmp_path):
    with pytest.raises(RecipeError, match=r"qmoe_block_size 32 does not divide .*\(48\).*choose 16 or 0"):
        onnxforge.build(mixtral, tmp_path / "out", recipe=Recipe(precision="int4", qmoe_block_size=32))


def test_kquant_per_channel_experts_of_width_48(mixtral, tmp_path):
    from moe_check import qmoe_nodes

    out = tmp_path / "out"
    onnxforge.build(mixtral, out, recipe=Recipe(precision="int4", method="k_quant", qmoe_block_size=0), workers=1)
    assert {n["block"] for n in qmoe_nodes(out)} == {0}
