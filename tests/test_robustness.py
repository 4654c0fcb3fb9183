"""Robustness: no code from model files, reproducible output, input/recipe hashes, safe paths."""
from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

import onnxforge
import tiny
from onnxforge.errors import CheckpointError, OnnxForgeError
from onnxforge.quant.recipe import Recipe

SRC = Path(onnxforge.__file__).parent


# ----------------------------------------------------------------------------- a checkpoint, no torch


def write_llama(folder: Path, *, hidden=64, heads=4, kv_heads=2, layers=2, vocab=tiny.VOCAB, inter=128, seed=0,
                tokenizer=True) -> Path:
    """A random Llama checkpoint written with numpy + safetensors (and the tiny BPE tokenizer)."""
    return tiny.write_random_llama(folder, hidden=hidden, heads=heads, kv_heads=kv_heads, layers=layers, vocab=vocab,
                                   inter=inter, seed=seed, context=128, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_llama(tmp_path_factory.mktemp("robust") / "ckpt")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def report_of(out: Path) -> dict:
    return json.loads((out / "build_report.json").read_text())


def assert_clean(out: Path) -> None:
    assert not out.exists(), "an output folder was left behind"
    assert not list(out.parent.glob(f".{out.name}.partial*")), "a temporary folder was left behind"


# ----------------------------------------------------------------------------- no code from model files

# (module, function) pairs whose call runs code stored in data.
UNSAFE_CALLS = {
    ("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("_pickle", "load"), ("_pickle", "loads"),
    ("cPickle", "load"), ("cPickle", "loads"), ("dill", "load"), ("dill", "loads"), ("cloudpickle", "load"),
    ("cloudpickle", "loads"), ("joblib", "load"), ("marshal", "load"), ("marshal", "loads"), ("shelve", "open"),
    ("torch", "load"), ("jit", "load"), ("yaml", "unsafe_load"), ("yaml", "full_load"),
}
UNSAFE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
CODE_BUILTINS = {"eval", "exec", "compile", "__import__"}


def _dotted(node: ast.AST) -> list[str]:
    """`a.b.c` -> ["a", "b", "c"]; a chain on anything but a name (`f().eval`) -> ["<expr>", "eval"]."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    parts.append(node.id if isinstance(node, ast.Name) else "<expr>")
    return parts[::-1]


def _is_false(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value in (False, None)


def unsafe_uses(source: str, filename: str = "<src>") -> list[str]:
    """Every place in `source` that could run code taken from a model file."""
    found = []
    tree = ast.parse(source, filename)
    jinja_names = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                   and (n.module or "").split(".")[0] == "jinja2" for a in n.names
                   if a.name in ("Environment", "Template")}
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom):
            mod = (node.module or "").split(".")[0]
            if mod in UNSAFE_MODULES:
                found.append(f"{where}: from {node.module} import ...")
            if mod == "torch" and any(a.name == "load" for a in node.names):
                found.append(f"{where}: from torch import load")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            kwargs = {k.arg: k.value for k in node.keywords if k.arg}
            if len(name) >= 2 and (name[-2], name[-1]) in UNSAFE_CALLS:
                found.append(f"{where}: {'.'.join(name)}(...)")
            if name and name[-1] == "load" and name[0] in ("torch",):
                found.append(f"{where}: {'.'.join(name)}(...)")
            if name == ["yaml", "load"] and "Loader" not in kwargs:
                found.append(f"{where}: yaml.load without a safe Loader")
            constant = bool(node.args) and isinstance(node.args[0], ast.Constant)  # __import__("datetime")
            if (name[0] in CODE_BUILTINS and len(name) == 1 or name[-2:-1] == ["builtins"]
                    and name[-1] in CODE_BUILTINS) and not constant:
                found.append(f"{where}: {'.'.join(name)}(...)")
            if (name[0] == "jinja2" and name[-1] in ("Environment", "Template")) or (
                    len(name) == 1 and name[0] in jinja_names):
                found.append(f"{where}: {'.'.join(name)}(...) renders templates unsandboxed")
            if name[-1:] == ["load"] and name[:1] in (["np"], ["numpy"]) and "allow_pickle" in kwargs \
                    and not _is_false(kwargs["allow_pickle"]):
                found.append(f"{where}: numpy.load(..., allow_pickle=...)")
            if "trust_remote_code" in kwargs and not _is_false(kwargs["trust_remote_code"]):
                found.append(f"{where}: trust_remote_code=...")
            for k in node.keywords:  # **{"trust_remote_code": True}
                if k.arg is None and isinstance(k.value, ast.Dict) and any(
                        isinstance(key, ast.Constant) and key.value == "trust_remote_code" for key in k.value.keys):
                    found.append(f"{where}: **{{'trust_remote_code': ...}}")
    return found


def test_scanner_finds_every_pattern():
    bad = {
        "import pickle\npickle.load(f)": 2,
        "from pickle import loads": 1,
        "import torch\ntorch.load('x.bin')": 1,
        "import torch\ntorch.load('x.bin', weights_only=True)": 1,
        "from torch import load": 1,
        "torch.jit.load('m.pt')": 1,
        "AutoModel.from_pretrained(p, trust_remote_code=True)": 1,
        "AutoModel.from_pretrained(p, trust_remote_code=flag)": 1,
        "AutoModel.from_pretrained(p, **{'trust_remote_code': True})": 1,
        "eval(text)": 1,
        "exec(code)": 1,
        "compile(src, 'f', 'exec')": 1,
        "np.load(path, allow_pickle=True)": 1,
        "numpy.load(path, allow_pickle=yes)": 1,
        "yaml.load(text)": 1,
        "import marshal": 1,
        "builtins.exec(code)": 1,
        "__import__(name)": 1,
        "jinja2.Environment().from_string(template)": 1,
        "from jinja2 import Environment\nEnvironment(loader=None)": 1,
    }
    for code, n in bad.items():
        assert len(unsafe_uses(code)) >= n, code
    good = ["np.load(path)", "np.load(path, allow_pickle=False)", "json.loads(s)", "safe_open(p)",
            "from_pretrained(p, trust_remote_code=False)", "yaml.load(t, Loader=yaml.SafeLoader)", "model.eval()",
            "re.compile('x')", "AutoModel.from_pretrained(p).eval()", "__import__('datetime')",
            "ImmutableSandboxedEnvironment().from_string(t)", "Template('x', 'y')"]
    for code in good:
        assert unsafe_uses(code) == [], code


def test_package_never_runs_code_from_model_files():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20, f"expected the whole package under {SRC}"
    found = []
    for path in files:
        found += unsafe_uses(path.read_text(encoding="utf-8"), str(path.relative_to(SRC.parent)))
    assert not found, "code could be run from model files:\n" + "\n".join(found)


# ----------------------------------------------------------------------------- reproducible output

RECIPES = {
    "fp32": Recipe(precision="fp32"),
    "fp16": Recipe(precision="fp16"),
    "int8": Recipe(precision="int8"),
    "int4-rtn": Recipe(precision="int4", method="rtn"),
    "int4-k_quant": Recipe(precision="int4", method="k_quant", symmetric=False),
    "int4-hqq": Recipe(precision="int4", method="hqq", block_size=16),
    "int4-default": Recipe(precision="int4", method="default"),
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_builds_are_byte_identical(ckpt, tmp_path, name):
    recipe = RECIPES[name]
    outs = {}
    for label, workers in (("a", 1), ("b", 4), ("c", 4)):
        out = tmp_path / label
        onnxforge.build(ckpt, out, recipe=recipe, workers=workers)
        outs[label] = out
    a = outs["a"]
    names = sorted(p.name for p in a.iterdir())
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json"} <= set(names)
    for label in ("b", "c"):
        other = outs[label]
        assert sorted(p.name for p in other.iterdir()) == names
        for fname in names:
            if fname == "build_report.json":  # holds times and memory; its hashes are compared below
                continue
            assert sha(a / fname) == sha(other / fname), f"{name}: {fname} differs between builds (workers 1 vs 4)"
        for key in ("input_sha256", "recipe_sha256", "groups", "files", "recipe"):
            assert report_of(a)[key] == report_of(other)[key], key


def test_input_hash_covers_weight_bytes_and_side_files(ckpt, tmp_path):
    def input_hash(folder: Path, out: str) -> str:
        return onnxforge.build(folder, tmp_path / out).input_sha256

    base = input_hash(ckpt, "base")
    copy = tmp_path / "copy"
    shutil.copytree(ckpt, copy)
    assert input_hash(copy, "out-copy") == base, "the input hash must not depend on where the checkpoint lives"
    assert report_of(tmp_path / "out-copy")["input_sha256"] == base

    # one byte deep inside the last tensor's data (the header stays the same)
    shard = copy / "model.safetensors"
    data = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    data[8 + n + end - 3] ^= 0x01
    shard.write_bytes(bytes(data))
    seen = {base}
    changed = input_hash(copy, "byte")
    assert changed not in seen, "a changed weight byte must change input_sha256"
    seen.add(changed)

    edits = {
        "config.json": lambda p: p.write_text(p.read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05')),
        "tokenizer_config.json": lambda p: p.write_text(p.read_text().replace("256", "255")),
        "generation_config.json": lambda p: p.write_text(json.dumps({"eos_token_id": [0, 1]})),
    }
    for i, (fname, edit) in enumerate(edits.items()):
        edit(copy / fname)
        digest = input_hash(copy, f"edit{i}")
        assert digest not in seen, f"changing {fname} must change input_sha256"
        seen.add(digest)


def test_recipe_hash_changes_with_every_option(ckpt, tmp_path):
    base = Recipe(precision="int4")
    variants = {
        "base": base,
        "precision": Recipe(precision="int8"),
        "fp16": Recipe(precision="fp16"),
        "method": Recipe(precision="int4", method="rtn"),
        "block_size": Recipe(precision="int4", block_size=64),
        "symmetric": Recipe(precision="int4", symmetric=False),
        "accuracy_level": Recipe(precision="int4", accuracy_level=1),  # (CPU default: 4)
        "int8_last_matmul": Recipe(precision="int4", int8_last_matmul=True),
        "int8_mixed_layers": Recipe(precision="int4", int8_mixed_layers=True),
        "keep_float": Recipe(precision="int4", keep_float=("/model/layers.0/*",)),
        "unpack_matmul": Recipe(precision="int4", unpack_matmul=True),
        "provider": Recipe(precision="int4", provider="cuda"),
    }
    hashes = {}
    for name, recipe in variants.items():
        report = onnxforge.build(ckpt, tmp_path / name, recipe=recipe)
        assert report.recipe_sha256 == report_of(tmp_path / name)["recipe_sha256"]
        assert len(report.recipe_sha256) == 64
        hashes[name] = report.recipe_sha256
    same = [(a, b) for a in hashes for b in hashes if a < b and hashes[a] == hashes[b]]
    assert not same, f"recipes with different options share a recipe_sha256: {same}"
    again = onnxforge.build(ckpt, tmp_path / "again", recipe=Recipe(precision="int4"))
    assert again.recipe_sha256 == hashes["base"]
    assert len({report_of(tmp_path / n)["input_sha256"] for n in variants}) == 1


# ----------------------------------------------------------------------------- paths


@pytest.fixture
def folder(ckpt, tmp_path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(ckpt, dst)
    return dst


def test_tokenizer_symlink_out_of_the_checkpoint_is_refused(folder, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET-TOKEN-4242")
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.json").symlink_to(secret)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="points out of the checkpoint folder") as e:
        onnxforge.build(folder, out)
    assert "tokenizer.json" in str(e.value) and "copy the real file in" in str(e.value)
    assert_clean(out)
    # a relative link that climbs out is refused the same way
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.json").symlink_to(Path("..") / "secret.txt")
    with pytest.raises(CheckpointError, match="points out of the checkpoint folder"):
        onnxforge.build(folder, out)
    assert_clean(out)
    # so is a link via another file name in the list (sentencepiece model, chat template)
    (folder / "tokenizer.json").unlink()
    (folder / "chat_template.jinja").symlink_to(secret)
    with pytest.raises(CheckpointError, match="chat_template.jinja"):
        onnxforge.build(folder, out)
    assert_clean(out)


def test_tokenizer_symlink_inside_the_checkpoint_is_followed(folder, tmp_path):
    real = folder / "tokenizer.real.json"
    (folder / "tokenizer.json").rename(real)
    (folder / "tokenizer.json").symlink_to(real.name)
    onnxforge.build(folder, tmp_path / "out")
    copied = tmp_path / "out" / "tokenizer.json"
    assert not copied.is_symlink() and copied.read_bytes() == real.read_bytes()


def test_hugging_face_cache_snapshot_builds(ckpt, tmp_path):
    """The hub cache keeps files in blobs/ and links them from snapshots/REV/: that is not an escape."""
    repo = tmp_path / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in ckpt.iterdir():
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    report = onnxforge.build(snap, tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (ckpt / "tokenizer.json").read_bytes()
    assert report.input_sha256 == onnxforge.build(ckpt, tmp_path / "out2").input_sha256
    # ...but a snapshot link into another repo's blobs is still refused
    other = tmp_path / "hub" / "models--evil--x" / "blobs"
    other.mkdir(parents=True)
    (other / "tok").write_text("{}")
    (snap / "tokenizer.json").unlink()
    (snap / "tokenizer.json").symlink_to(other / "tok")
    with pytest.raises(CheckpointError, match="points out of the checkpoint folder"):
        onnxforge.build(snap, tmp_path / "out3")
    assert_clean(tmp_path / "out3")


@pytest.mark.parametrize("shard", ["../../etc/passwd", "/etc/passwd", "..", ".", "", "sub/model.safetensors",
                                   "model.safetensors/..", 3, None, ["model.safetensors"]])
def test_index_shard_names_must_be_plain_file_names(folder, tmp_path, shard):
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "np") as f:
        names = list(f.keys())
    weight_map = {n: "model.safetensors" for n in names}
    weight_map[names[-1]] = shard
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="not a plain file name") as e:
        onnxforge.build(folder, out)
    assert repr(shard) in str(e.value)
    assert_clean(out)


def test_tokenizer_config_naming_other_files_copies_only_the_fixed_list(folder, tmp_path):
    """File names inside the checkpoint's JSON are never used to pick what is read or copied."""
    secret = tmp_path / "secret.json"
    secret.write_text('{"SECRET-TOKEN-4242": 1}')
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.update(tokenizer_file=str(secret), vocab_file="../secret.json", merges_file="/etc/passwd",
               added_tokens_file="../../../etc/shadow", chat_template_file="../secret.json",
               auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]})
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    (folder / "evil.py").write_text("raise SystemExit('model code was run')\n")
    (folder / "special_tokens_map.json").write_text(json.dumps({"additional_special_tokens_file": str(secret)}))
    out = tmp_path / "out"
    onnxforge.build(folder, out)
    expected = {"model.onnx", "model.onnx.data", "genai_config.json", "build_report.json", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json"}
    assert {p.name for p in out.iterdir()} == expected
    assert not any(p.is_symlink() for p in out.iterdir())
    for p in out.iterdir():
        assert b"SECRET-TOKEN-4242" not in p.read_bytes(), p.name
    assert (out / "tokenizer_config.json").read_bytes() == (folder / "tokenizer_config.json").read_bytes()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("fname", ["config.json", "model.safetensors", "tokenizer.json"])
def test_special_files_do_not_hang(folder, tmp_path, fname):
    """A FIFO where a file is expected would block a plain open() forever."""
    (folder / fname).unlink()
    os.mkfifo(folder / fname)
    out = tmp_path / "out"
    if fname == "tokenizer.json":  # not a regular file: not a tokenizer file, skipped
        onnxforge.build(folder, out)
        assert not (out / "tokenizer.json").exists()
        return
    with pytest.raises(OnnxForgeError, match="not a regular file"):
        onnxforge.build(folder, out)
    assert_clean(out)


def test_directory_in_place_of_a_file(folder, tmp_path):
    (folder / "model.safetensors").rename(folder / "weights.bin")
    (folder / "model.safetensors").mkdir()
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="not a regular file"):
        onnxforge.build(folder, out)
    assert_clean(out)


def test_integer_weights_are_refused(folder, tmp_path):
    """A pre-quantized checkpoint (int8 weights + scales) must not be read as float values."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    w = tensors["model.layers.0.mlp.up_proj.weight"]
    tensors["model.layers.0.mlp.up_proj.weight"] = np.clip(w * 50, -127, 127).astype(np.int8)
    tensors["model.layers.0.mlp.up_proj.SCB"] = np.ones(w.shape[0], np.float32)
    save_file(tensors, str(folder / "model.safetensors"))
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=r"up_proj.weight.*stored as int8.*pre-quantized"):
        onnxforge.build(folder, out)
    assert_clean(out)


def test_generation_config_values_are_checked(folder, tmp_path):
    out = tmp_path / "out"
    for bad, match in (({"temperature": float("nan")}, "temperature must be a finite number"),
                       ({"eos_token_id": "</s>"}, "eos_token_id must be a non-negative integer"),
                       ({"bos_token_id": [0, 1]}, "bos_token_id lists 2 ids"),
                       ({"pad_token_id": -1}, "pad_token_id must be a non-negative integer"),
                       ({"eos_token_id": []}, "eos_token_id is an empty list")):
        (folder / "generation_config.json").write_text(json.dumps(bad))
        with pytest.raises(OnnxForgeError, match=match):
            onnxforge.build(folder, out)
        assert_clean(out)


def test_a_list_of_one_bos_or_pad_id_is_that_id(folder, tmp_path):
    """generation_config.json's {"bos_token_id": [1]} (a list of one) is read as 1 (it used to end in a TypeError)."""
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": [1], "pad_token_id": [0],
                                                               "eos_token_id": [0, 1]}))
    onnxforge.build(folder, tmp_path / "out")
    search = json.loads((tmp_path / "out" / "genai_config.json").read_text())["model"]
    assert search["bos_token_id"] == 1 and search["eos_token_id"] == [0, 1]
