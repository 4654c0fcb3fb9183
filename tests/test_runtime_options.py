"""Runtime options in genai_config.json (issue 26 item 5): the provider options each -e gets, enable_cuda_graph and
DirectML graph capture (enable_dml_graph), equal to what onnxruntime-genai 0.18's own builder writes (its
config_only mode, run on the same tiny checkpoint); options for another provider, and enable_webgpu_graph=true
(a graph form onnxforge does not build), are refused."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

import onnxforge
from onnxforge.errors import RecipeError
from onnxforge.quant.options import apply_extra_options
from onnxforge.quant.recipe import Recipe

CASES = [("cpu", "int4", []), ("cuda", "fp16", []), ("cuda", "fp16", ["enable_cuda_graph=true"]),
         ("cuda", "int4", ["enable_cuda_graph=false"]), ("dml", "fp16", []), ("dml", "fp16", ["enable_dml_graph=false"]),
         ("dml", "int4", ["enable_dml_graph=true"]), ("webgpu", "int4", []), ("webgpu", "fp16", ["enable_webgpu_graph=false"])]


@pytest.fixture(scope="module")
def ckpt(tiny_models):
    return tiny_models("llama")[0]


def anchor_session_options(ckpt, out, provider, precision, options) -> dict:
    done = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(ckpt), "-o", str(out),
                           "-p", precision, "-e", provider, "--extra_options", "config_only=true", *options],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["session_options"]


@pytest.mark.parametrize("provider, precision, options", CASES)
def test_provider_options_equal_the_anchors(ckpt, tmp_path, provider, precision, options):
    recipe = apply_extra_options(Recipe(precision=precision, provider=provider), options)
    onnxforge.build(ckpt, tmp_path / "ours", recipe=recipe)  # a full build: the options reach the real config
    ours = json.loads((tmp_path / "ours" / "genai_config.json").read_text())["model"]["decoder"]["session_options"]
    theirs = anchor_session_options(ckpt, tmp_path / "anchor", provider, precision, options)
    expected = theirs["provider_options"]
    assert ours["provider_options"] == expected, (ours, theirs)
    only = apply_extra_options(recipe, ["config_only=true"])  # config_only writes the same
    onnxforge.build(ckpt, tmp_path / "config", recipe=only)
    config = json.loads((tmp_path / "config" / "genai_config.json").read_text())["model"]["decoder"]["session_options"]
    assert config["provider_options"] == expected


@pytest.mark.parametrize("provider, option, words", [
    ("cpu", "enable_cuda_graph=true", "option of the cuda execution provider"),
    ("dml", "enable_cuda_graph=true", "option of the cuda execution provider"),
    ("cuda", "enable_dml_graph=false", "option of the dml execution provider"),
    ("webgpu", "enable_webgpu_graph=true", "WebGPU graph capture"),
    ("cuda", "enable_cuda_graph=maybe", "expected true or false"),
])
def test_options_for_another_provider_are_refused(provider, option, words):
    with pytest.raises(RecipeError, match=words):
        apply_extra_options(Recipe(precision="fp16", provider=provider), [option])


def test_cli_writes_cuda_graph(ckpt, tmp_path):
    from onnxforge.cli import main

    assert main(["build", "-m", str(ckpt), "-o", str(tmp_path / "o"), "-e", "cuda", "-p", "fp16", "--quiet",
                 "--extra_options", "enable_cuda_graph=1", "config_only=true"]) == 0
    config = json.loads((tmp_path / "o" / "genai_config.json").read_text())
    assert config["model"]["decoder"]["session_options"]["provider_options"] == [{"cuda": {"enable_cuda_graph": "1"}}]


def anchor_extra_options() -> list[str]:
    """Every key onnxruntime-genai 0.18's builder documents for --extra_options (its builder.py help text)."""
    import os
    import re

    import onnxruntime_genai

    src = open(os.path.join(os.path.dirname(onnxruntime_genai.__file__), "models", "builder.py")).read()
    text = src[src.index('"--extra_options"'):src.index('"--builder_config_version"')]
    return re.findall(r"^ {16}(\w+) = ", text, re.M)


def test_every_anchor_option_is_implemented_or_refused_with_a_reason():
    from onnxforge.quant.options import ANCHOR_NOT_BUILT, EXTRA_OPTIONS

    keys = anchor_extra_options()
    assert len(keys) > 50 and "use_qdq" in keys and "enable_webgpu_graph" in keys
    missing = [k for k in keys if k not in EXTRA_OPTIONS and k not in ANCHOR_NOT_BUILT]
    assert not missing, missing
    for key in ANCHOR_NOT_BUILT:  # a value that would change the build: one line naming the key and why
        with pytest.raises(RecipeError, match=rf"^{key}=\S+: .*; drop the option( or set it to false)?$"):
            apply_extra_options(Recipe(), [f"{key}=1"])
    assert apply_extra_options(Recipe(), ["use_paged_attention=false", "exclude_mtp=0"]) == Recipe()


def test_fuse_qkv_is_the_inverse_of_unpack_matmul():
    assert apply_extra_options(Recipe(), ["fuse_qkv=false"]).unpack_matmul is True
    assert apply_extra_options(Recipe(), ["fuse_qkv=true"]).unpack_matmul is False
    with pytest.raises(RecipeError, match="contradict"):
        apply_extra_options(Recipe(), ["fuse_qkv=true", "unpack_matmul=true"])


@pytest.mark.parametrize("precision, tf32", [("fp32", "0"), ("fp16", None), ("int4", None)])
def test_fp32_cuda_builds_turn_tf32_off(ckpt, tmp_path, precision, tf32):
    """onnxruntime's CUDA MatMuls default to TF32; an fp32 -e cuda build writes use_tf32 "0" (the anchor does not:
    on an H200 a tiny Gemma 2 fp32 build then left transformers' greedy path at the first token, bench/gpu_probe.py),
    and says so in the notes; fp16 / bf16 / int4 builds leave the provider's default."""
    report = onnxforge.build(ckpt, tmp_path / "o", precision, "cuda")
    options = json.loads((tmp_path / "o" / "genai_config.json").read_text())["model"]["decoder"]["session_options"]
    assert options["provider_options"][0]["cuda"].get("use_tf32") == tf32
    assert any("use_tf32 0" in n for n in report.notes) == (tf32 is not None)
