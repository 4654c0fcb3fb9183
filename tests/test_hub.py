"""Hub IDs (`-m org/name[@revision][:FILE.gguf]`) against a local HTTP server standing in for the Hub (HF_ENDPOINT,
tests/fake_hub.py), never the network. Each build runs `onnxforge` in a subprocess: huggingface_hub reads HF_ENDPOINT,
HF_HOME and HF_HUB_OFFLINE when it is imported."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import tiny
from fake_hub import FakeHub, Repo

from onnxforge.errors import CheckpointError, RecipeError
from onnxforge.quant.options import apply_extra_options, hub_token
from onnxforge.quant.recipe import Recipe
from onnxforge.sources.hub import HubRef, choose_files, parse_hub_id

PICKLE_AND_CODE = {"pytorch_model.bin": b"\x80\x04pickle", "modeling_evil.py": b"raise SystemExit(1)\n",
                   "original/consolidated.safetensors": b"not read", "README.md": b"# tiny\n"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hubckpt")
    tiny.make_model("llama", folder, max_shard_size="100KB")  # several shards and an index
    return folder


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    """One 19 MB shard: huggingface_hub reads a download in 10 MB chunks, so a cut after 11 MB resumes from 10 MB."""
    folder = tmp_path_factory.mktemp("hubbig")
    tiny.make_model("llama", folder, hidden_size=512, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                    intermediate_size=1024)
    return folder


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    from test_gguf_source import tiny_model, train_byte_level_vocab, write_gguf

    vocab = train_byte_level_vocab()
    folder = tmp_path_factory.mktemp("hubgguf")
    model = tiny_model("llama", len(vocab["tokens"]), hidden_size=64, intermediate_size=128)
    for name in ("tiny-F32.gguf", "tiny-copy.gguf"):
        write_gguf(folder / name, model, vocab)
    return folder


@pytest.fixture
def hub(checkpoint, big_checkpoint, ggufs):
    files = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
    g = {p.name: p.read_bytes() for p in ggufs.iterdir()}
    server = FakeHub({
        "org/tiny": Repo({**files, **PICKLE_AND_CODE}, branches=("main", "v1")),
        "org/gated": Repo(files, gated=True),
        "org/two-ggufs": Repo({**g, "README.md": b"#"}),
        "org/one-gguf": Repo({"tiny-F32.gguf": g["tiny-F32.gguf"]}),
        "org/big": Repo.from_folder(big_checkpoint),
        "org/pickles": Repo({"config.json": files["config.json"], "pytorch_model.bin": b"x"}),
    })
    server.url = server.start()
    yield server
    server.stop()


def run(hub, tmp_path, *args, env=None, cwd=None):
    """`onnxforge ARGS` with the fake Hub as HF_ENDPOINT and tmp_path/hf as HF_HOME; (rc, stderr)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    environ.update({"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), **(env or {})})
    done = subprocess.run([sys.executable, "-m", "onnxforge", *args], env=environ, capture_output=True, text=True,
                          cwd=cwd or tmp_path, timeout=300)
    return done.returncode, done.stderr


def files_got(hub) -> list[str]:
    return [r["path"].split("/resolve/")[1].split("/", 1)[1] for r in hub.requests
            if r["method"] == "GET" and "/resolve/" in r["path"]]


def error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("onnxforge: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_clean_download_builds_what_the_local_folder_builds(hub, checkpoint, tmp_path):
    rc, err = run(hub, tmp_path, "build", "-m", "org/tiny", "-o", "out", "-p", "int4", "--quiet")
    assert rc == 0, err
    got = files_got(hub)
    assert set(got) == {p.name for p in checkpoint.iterdir()}  # config, generation config, index, shards, tokenizer
    assert not {"pytorch_model.bin", "modeling_evil.py", "README.md", "original/consolidated.safetensors"} & set(got)
    snapshot = tmp_path / "hf" / "hub" / "models--org--tiny" / "snapshots" / hub.repos["org/tiny"].sha
    assert (snapshot / "config.json").is_file()  # the standard Hugging Face cache, under HF_HOME
    rc, err = run(hub, tmp_path, "build", "-m", str(checkpoint), "-o", "local", "-p", "int4", "--quiet")
    assert rc == 0, err
    report = [json.loads((tmp_path / o / "build_report.json").read_text()) for o in ("out", "local")]
    assert report[0]["input_sha256"] == report[1]["input_sha256"] != ""  # the very same input bytes
    for name in ("model.onnx", "genai_config.json", "tokenizer.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
    # again: everything is cached, no file is fetched twice
    before = len(files_got(hub))
    rc, err = run(hub, tmp_path, "build", "-m", "org/tiny@v1", "-o", "again", "-p", "int4", "--quiet")
    assert rc == 0 and len(files_got(hub)) == before, err


def test_offline_uses_the_cache_and_says_what_is_missing(hub, tmp_path):
    rc, err = run(hub, tmp_path, "build", "-m", "org/tiny", "-o", "out", "--quiet", env={"HF_HUB_OFFLINE": "1"})
    line = error_line(err)
    assert rc == 2 and "HF_HUB_OFFLINE is set" in line and "not in the Hugging Face cache" in line
    assert not hub.requests
    rc, err = run(hub, tmp_path, "build", "-m", "org/tiny", "-o", "out", "--quiet")
    assert rc == 0, err
    seen = len(hub.requests)
    rc, err = run(hub, tmp_path, "build", "-m", "org/tiny", "-o", "out2", "--quiet", env={"HF_HUB_OFFLINE": "1"})
    assert rc == 0 and len(hub.requests) == seen, err  # built from the cache without a request
    assert (tmp_path / "out2" / "model.onnx").read_bytes() == (tmp_path / "out" / "model.onnx").read_bytes()


def test_resumed_download(hub, big_checkpoint, tmp_path):
    """A connection that drops part-way through a file resumes where the received data ends (a Range request, in
    the same run); a download that fails leaves the finished files in the cache, and the next run fetches only
    what is missing (huggingface_hub 2.4 keeps no partial file across runs: each process writes its own)."""
    data = (big_checkpoint / "model.safetensors").read_bytes()
    assert len(data) > 11 << 20
    hub.cut["model.safetensors"] = 11 << 20
    hub.broken.add("tokenizer.json")
    rc, err = run(hub, tmp_path, "build", "-m", "org/big", "-o", "out", "--quiet")
    line = error_line(err)
    assert rc == 2 and "run again to resume" in line, line
    assert not (tmp_path / "out").exists()
    hub.broken.clear()
    rc, err = run(hub, tmp_path, "build", "-m", "org/big", "-o", "out", "--quiet")
    assert rc == 0, err
    ranges = [r["range"] for r in hub.requests if r["method"] == "GET" and r["path"].endswith("model.safetensors")]
    assert ranges[0] is None and ranges[1] == f"bytes={10 << 20}-" and len(ranges) == 2, ranges  # resumed, not restarted
    got = files_got(hub)
    assert got.count("tokenizer.json") == 2 and got.count("config.json") == 1, got  # the second run fetched the rest
    blob = tmp_path / "hf" / "hub" / "models--org--big" / "blobs" / hashlib.sha256(data).hexdigest()
    assert blob.read_bytes() == data


def test_gated_repository(hub, tmp_path):
    rc, err = run(hub, tmp_path, "build", "-m", "org/gated", "-o", "out")
    line = error_line(err)
    assert rc == 2 and "gated" in line and "HF_TOKEN" in line and "no Hugging Face token" in line
    assert not (tmp_path / "out").exists()
    rc, err = run(hub, tmp_path, "build", "-m", "org/gated", "-o", "out", env={"HF_TOKEN": "hf_wrong"})
    line = error_line(err)
    assert rc == 2 and "has no access" in line
    rc, err = run(hub, tmp_path, "build", "-m", "org/gated", "-o", "out", "--quiet", env={"HF_TOKEN": hub.token})
    assert rc == 0, err
    rc, err = run(hub, tmp_path, "build", "-m", "org/gated", "-o", "out2", "--quiet", "--extra_options",
                  f"hf_token={hub.token}", env={"HF_TOKEN": "hf_wrong"})  # the option wins over the environment
    assert rc == 0, err
    assert hub.token not in (tmp_path / "out2" / "build_report.json").read_text()  # a secret is not reported


def test_missing_revision_and_repository(hub, tmp_path):
    rc, err = run(hub, tmp_path, "build", "-m", "org/tiny@no-such-branch", "-o", "out")
    line = error_line(err)
    assert rc == 2 and "has no revision 'no-such-branch'" in line
    rc, err = run(hub, tmp_path, "build", "-m", "org/nothing", "-o", "out")
    line = error_line(err)
    assert rc == 2 and "neither a local file or folder nor a repository" in line
    rc, err = run(hub, tmp_path, "build", "-m", "org/pickles", "-o", "out")
    line = error_line(err)
    assert rc == 2 and "pickle" in line and not files_got(hub)
    assert not (tmp_path / "out").exists()


def test_no_network(hub, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    rc, err = run(hub, tmp_path, "build", "-m", "org/tiny", "-o", "out", env={"HF_ENDPOINT": f"http://127.0.0.1:{port}"})
    line = error_line(err)
    assert rc == 2 and "cannot be reached" in line and "not in the Hugging Face cache" in line


def test_gguf_file_choice(hub, ggufs, tmp_path):
    rc, err = run(hub, tmp_path, "build", "-m", "org/two-ggufs", "-o", "out")
    line = error_line(err)
    assert rc == 2 and "tiny-F32.gguf" in line and "tiny-copy.gguf" in line and "org/two-ggufs:FILE.gguf" in line
    rc, err = run(hub, tmp_path, "build", "-m", "org/two-ggufs:tiny-F32.gguf", "-o", "out", "--quiet")
    assert rc == 0, err
    assert files_got(hub) == ["tiny-F32.gguf"]
    rc, err = run(hub, tmp_path, "build", "-m", "org/two-ggufs:nope.gguf", "-o", "x")
    assert rc == 2 and "no file nope.gguf" in error_line(err) and "tiny-copy.gguf" in error_line(err)
    rc, err = run(hub, tmp_path, "build", "-m", "org/one-gguf", "-o", "one", "--quiet")
    assert rc == 0, err
    assert (tmp_path / "one" / "model.onnx").read_bytes() == (tmp_path / "out" / "model.onnx").read_bytes()


def test_a_local_folder_wins(hub, checkpoint, tmp_path):
    import shutil

    shutil.copytree(checkpoint, tmp_path / "org" / "tiny")
    rc, err = run(hub, tmp_path, "build", "-m", "org/tiny", "-o", "out", "--quiet")
    assert rc == 0 and not hub.requests, err


def test_python_api(hub, tmp_path):
    code = ("import onnxforge; r = onnxforge.build('org/tiny@v1', 'out', 'fp16', hf_token=False); "
            "print(r.precision)")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    environ.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"))
    done = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, cwd=tmp_path,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "fp16", done.stderr
    assert all(r["auth"] is None for r in hub.requests)  # hf_token=False: no token sent


def test_hub_ids_parsed():
    assert parse_hub_id("org/name") == HubRef("org/name")
    assert parse_hub_id("org/name@refs/pr/1") == HubRef("org/name", "refs/pr/1")
    assert parse_hub_id("org/name@v2:sub/file.gguf") == HubRef("org/name", "v2", "sub/file.gguf")
    for path in ("/abs/path", "./org/name", "org/name/more", "org/x.gguf", "org/name:weights.bin", "../a", "org/..",
                 "a", "org/name@"):
        assert parse_hub_id(path) is None, path


def test_choose_files():
    names = ["config.json", "model.safetensors", "tokenizer.json", "pytorch_model.bin", "x.py", "sub/config.json",
             "chat_template.jinja", "README.md"]
    assert choose_files(HubRef("o/n"), names) == ["config.json", "tokenizer.json", "chat_template.jinja"]
    with pytest.raises(CheckpointError, match="holds 2 .gguf files.*a.gguf, b.gguf"):
        choose_files(HubRef("o/n"), ["a.gguf", "b.gguf"])
    with pytest.raises(CheckpointError, match="pickle"):
        choose_files(HubRef("o/n"), ["config.json", "pytorch_model.bin"])


def test_hf_token_option():
    assert hub_token(["hf_token=false", "int4_block_size=64"]) == (False, ["int4_block_size=64"])
    assert hub_token(["hf_token=true"]) == (None, [])
    assert hub_token(["hf_token=hf_x"]) == ("hf_x", [])
    with pytest.raises(RecipeError, match="twice"):
        hub_token(["hf_token=a", "hf_token=b"])
    with pytest.raises(RecipeError, match="not in a recipe"):  # a TOML recipe or a mapping: refused, not ignored
        apply_extra_options(Recipe(), {"hf_token": "hf_x"})


def test_api_refuses_hub_options_for_a_local_model(checkpoint, tmp_path):
    import onnxforge

    with pytest.raises(RecipeError, match="not one"):
        onnxforge.build(str(checkpoint), tmp_path / "out", hf_token="hf_x")
    assert Path(checkpoint).is_dir() and not (tmp_path / "out").exists()


def test_a_token_for_a_local_model_is_refused(checkpoint, tmp_path, hub):
    rc, err = run(hub, tmp_path, "build", "-m", str(checkpoint), "-o", "out", "--extra_options", "hf_token=hf_x")
    assert rc == 2 and "hf_token is for a Hub ID" in error_line(err) and not (tmp_path / "out").exists()
    rc, err = run(hub, tmp_path, "build", "-m", str(checkpoint), "-o", "out", "--quiet", "--extra_options",
                  "hf_token=false")  # no token: nothing to ignore
    assert rc == 0 and not hub.requests, err
