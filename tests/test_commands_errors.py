"""Issue 22 item 4: inspect, run, chat, perplexity and verify on damaged model folders and tokenizers end in one
`onnxforge: error:` line naming the file and the problem (no traceback); verify prints its results before it
writes them; the tokenizer is checked at build time; the generation and verify flags are ranged."""
from __future__ import annotations

import io
import json
import shutil
import sys

import pytest
from tiny import write_random_llama

import onnxforge
from onnxforge.cli import main


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(checkpoint folder, fp32 build of it): copied per test before they are damaged."""
    root = tmp_path_factory.mktemp("cmderr")
    ckpt = write_random_llama(root / "ckpt")
    onnxforge.build(ckpt, root / "model", "fp32")
    return ckpt, root / "model"


@pytest.fixture
def model(built, tmp_path):
    """A private copy of the built model folder."""
    out = tmp_path / "model"
    shutil.copytree(built[1], out)
    return out


def _cli(capsys, monkeypatch, argv) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))  # chat reads one line, then EOF
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _one_error(code, out, err, *says) -> str:
    """The single `onnxforge: error:` line; every string in `says` is in it."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in out + err, err
    assert code == 2 and len(lines) == 1 and lines[0].startswith("onnxforge: error: "), (code, err)
    assert all(s in lines[0] for s in says), (says, lines[0])
    return lines[0]


# -- damaged model folders ------------------------------------------------------------------------------------
def _truncate(path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


DAMAGE = {  # name -> (damage(model folder), the file named, the problem said)
    "corrupt onnx": (lambda d: _truncate(d / "model.onnx", 300), "model.onnx", "not a valid ONNX model"),
    "empty onnx": (lambda d: (d / "model.onnx").write_bytes(b""), "model.onnx", "empty"),
    "missing onnx": (lambda d: (d / "model.onnx").unlink(), "model.onnx", "does not exist"),
    "truncated data": (lambda d: _truncate(d / "model.onnx.data", 1000), "model.onnx.data", "truncated"),
    "missing data": (lambda d: (d / "model.onnx.data").unlink(), "model.onnx.data", "does not exist"),
    "corrupt genai_config": (lambda d: (d / "genai_config.json").write_text("{"), "genai_config.json",
                             "not valid JSON"),
    "corrupt tokenizer": (lambda d: (d / "tokenizer.json").write_text("not json{"), "tokenizer.json",
                          "not valid JSON"),
    "bad tokenizer": (lambda d: (d / "tokenizer.json").write_text('{"model": {"type": "Nope"}}'), "tokenizer.json",
                      "tokenizers library cannot read it"),
    "corrupt tokenizer_config": (lambda d: (d / "tokenizer_config.json").write_text("xx"), "tokenizer_config.json",
                                 "not valid JSON"),
    "missing tokenizer": (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json", "does not exist"),
}
MODEL_FILES = ("corrupt onnx", "empty onnx", "missing onnx", "truncated data", "missing data", "corrupt genai_config")


def _argv(command, model, ckpt, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 4)
    return {"inspect": ["inspect", model],
            "run": ["run", model, "hello", "--max-new-tokens", "3"],
            "chat": ["chat", model, "--max-new-tokens", "3"],
            "perplexity": ["perplexity", model, "--text", text],
            "verify": ["verify", model, "--reference", ckpt, "--no-plot", "--tokens", "2"]}[command]


@pytest.mark.parametrize("damage", MODEL_FILES)
@pytest.mark.parametrize("command", ["inspect", "run", "chat", "perplexity", "verify"])
def test_a_damaged_model_file_is_one_line_naming_it(built, model, tmp_path, capsys, monkeypatch, command, damage):
    hurt, name, problem = DAMAGE[damage]
    hurt(model)
    code, out, err = _cli(capsys, monkeypatch, _argv(command, model, built[0], tmp_path))
    _one_error(code, out, err, str(model / name), problem)


@pytest.mark.parametrize("damage", ["corrupt tokenizer", "bad tokenizer", "corrupt tokenizer_config",
                                    "missing tokenizer"])
@pytest.mark.parametrize("command", ["run", "chat", "perplexity", "verify"])
def test_a_damaged_tokenizer_is_one_line_naming_it(built, model, tmp_path, capsys, monkeypatch, command, damage):
    hurt, name, problem = DAMAGE[damage]
    hurt(model)
    code, out, err = _cli(capsys, monkeypatch, _argv(command, model, built[0], tmp_path))
    if command == "verify" and damage == "missing tokenizer":  # verify tokenizes with the reference's tokenizer
        assert code == 0 and "PASS" in out and "Traceback" not in err, (out, err)
        return
    _one_error(code, out, err, str(model / name), problem)


def test_inspect_checks_every_external_tensor_against_the_data_file(model, capsys, monkeypatch):
    """The last tensor cut by one byte is caught, and the message says which tensor and how many bytes."""
    data = model / "model.onnx.data"
    _truncate(data, data.stat().st_size - 1)
    code, out, err = _cli(capsys, monkeypatch, ["inspect", model])
    line = _one_error(code, out, err, str(data), "truncated")
    assert f"{data.stat().st_size} bytes" in line and "rebuild" in line, line


# -- verify writes its files after it printed its results --------------------------------------------------------
def test_verify_prints_its_results_before_failing_to_write_them(built, model, capsys, monkeypatch):
    (model / "verify.json").mkdir()  # tests run as root, so no permission bits: a folder in the way instead
    code, out, err = _cli(capsys, monkeypatch, ["verify", model, "--reference", built[0], "--tokens", "2"])
    lines = [ln for ln in err.splitlines() if ln.startswith("onnxforge")]
    assert "Traceback" not in err and code == 2, (code, err)
    assert out.rstrip().splitlines()[-1].startswith("PASS") and "max|dlogit|" in out, out
    assert len(lines) == 1 and lines[0].startswith("onnxforge: error: ") and str(model / "verify.json") in lines[0]
    assert "could not be written" in lines[0], lines[0]


def test_verify_plot_that_cannot_be_written_is_reported_after_the_results(built, model, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    import onnxforge.verify.plot as plot

    def refuse(result, path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(plot, "plot_verify", refuse)
    code, out, err = _cli(capsys, monkeypatch, ["verify", model, "--reference", built[0], "--tokens", "2"])
    assert "Traceback" not in err and code == 2 and out.rstrip().splitlines()[-1].startswith("PASS"), (out, err)
    lines = [ln for ln in err.splitlines() if ln.startswith("onnxforge")]  # verify logs its progress on stderr
    assert len(lines) == 1 and lines[0].startswith("onnxforge: error: ") and "could not be written" in lines[0]
    assert str(model / "verify.png") in lines[0] and "Permission denied" in lines[0], lines[0]
    assert json.loads((model / "verify.json").read_text())["passed"]  # what could be written was


# -- flags ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, says", [
    (["verify", "{model}", "--reference", "{ckpt}", "--tokens", "-2"], "--tokens"),
    (["run", "{model}", "hi", "--top-p", "2"], "--top-p"),
    (["run", "{model}", "hi", "--top-p", "0"], "--top-p"),
    (["run", "{model}", "hi", "--top-p", "nan"], "--top-p"),
    (["run", "{model}", "hi", "--temperature", "-1"], "--temperature"),
    (["run", "{model}", "hi", "--temperature", "inf"], "--temperature"),
    (["chat", "{model}", "--top-k", "0"], "--top-k"),
    (["run", "{model}", "hi", "--top-k", "-3"], "--top-k"),
    (["run", "{model}", "hi", "--seed", "-1"], "--seed"),
    (["run", "{model}", "hi", "--seed", str(2 ** 31)], "--seed"),
    (["perplexity", "{model}", "--text", "{text}", "--threads", "-1"], "--threads"),
    (["verify", "{model}", "--reference", "{ckpt}", "--max-kl", "-1"], "--max-kl"),
    (["verify", "{model}", "--reference", "{ckpt}", "--min-top1", "nan"], "--min-top1"),
])
def test_out_of_range_flags_are_refused_by_the_parser(built, tmp_path, capsys, argv, says):
    (tmp_path / "t.txt").write_text("some text")
    argv = [a.format(model=built[1], ckpt=built[0], text=tmp_path / "t.txt") for a in argv]
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {says}" in err and "Traceback" not in err, err


@pytest.mark.parametrize("kw", [{"tokens": -2}, {"tokens": 0}, {"tokens": "16"}, {"window": 0}, {"stride": True}])
def test_the_python_verify_takes_the_ranges_the_cli_takes(built, kw):
    from onnxforge.errors import RunError
    from onnxforge.verify.parity import verify

    name = next(iter(kw))
    with pytest.raises(RunError, match=f"{name} must be a positive integer"):
        verify(built[1], built[0], write=False, plot=False, **kw)


def test_top_k_above_the_vocabulary_names_the_flag_not_the_build(built, capsys, monkeypatch):
    code, out, err = _cli(capsys, monkeypatch, ["run", built[1], "hi", "--do-sample", "--top-k", "100000"])
    line = _one_error(code, out, err, "--top-k 100000", "vocabulary")
    assert "execution provider" not in line and "rebuild" not in line, line


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_an_empty_prompts_file_is_an_error_naming_it(built, tmp_path, capsys, monkeypatch, content):
    prompts = tmp_path / "empty.txt"
    prompts.write_text(content)
    code, out, err = _cli(capsys, monkeypatch, ["verify", built[1], "--reference", built[0], "--prompts", prompts])
    _one_error(code, out, err, str(prompts), "no prompt")


# -- the tokenizer at build time -----------------------------------------------------------------------------------
def _no_weight_reads(monkeypatch):
    from onnxforge.sources.safetensors_file import SafetensorsFile

    def refuse(*a, **k):
        raise AssertionError("a weight was read before the tokenizer was checked")

    for name in ("read", "read_rows", "read_slice"):
        monkeypatch.setattr(SafetensorsFile, name, refuse)


@pytest.mark.parametrize("file, text, problem", [
    ("tokenizer.json", "not json{", "not valid JSON"),
    ("tokenizer.json", '{"model": {"type": "Nope"}}', "tokenizers library cannot read it"),
    ("tokenizer_config.json", "[1, 2", "not valid JSON"),
])
def test_a_corrupt_tokenizer_fails_the_build_before_any_weight_is_read(built, tmp_path, capsys, monkeypatch, file,
                                                                       text, problem):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(built[0], ckpt)
    (ckpt / file).write_text(text)
    _no_weight_reads(monkeypatch)
    code, out, err = _cli(capsys, monkeypatch, ["build", "-m", ckpt, "-o", tmp_path / "out", "-p", "fp32"])
    _one_error(code, out, err, str(ckpt / file), problem)
    assert not (tmp_path / "out").exists()


def _wordlevel(folder) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "hello": 2, "world": 3}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))


@pytest.mark.parametrize("change, says", [
    (lambda d: [(d / f).unlink() for f in ("tokenizer.json", "tokenizer_config.json")], "no tokenizer"),
    (_wordlevel, "WordLevel"),
])
def test_a_tokenizer_run_cannot_use_is_a_build_warning(built, tmp_path, capsys, monkeypatch, change, says):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(built[0], ckpt)
    change(ckpt)
    out_dir = tmp_path / "out"
    code, out, err = _cli(capsys, monkeypatch, ["build", "-m", ckpt, "-o", out_dir, "-p", "fp32"])
    assert code == 0 and "Traceback" not in err, err
    warning = [ln for ln in out.splitlines() if "WARNING" in ln and says in ln]
    assert len(warning) == 1 and "`run`/`chat` will not work" in warning[0], out
    saved = json.loads((out_dir / "build_report.json").read_text())["warnings"]
    assert any(says in w and "`run`/`chat` will not work" in w for w in saved), saved
    code, out, err = _cli(capsys, monkeypatch, ["run", out_dir, "hello world", "--max-new-tokens", "2"])
    _one_error(code, out, err, str(out_dir / "tokenizer.json"))


def test_a_tokenizer_genai_reads_gives_no_warning(built):
    report = json.loads((built[1] / "build_report.json").read_text())
    assert not [w for w in report["warnings"] if "tokenizer" in w], report["warnings"]
