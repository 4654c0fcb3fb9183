"""Trust and first run (issue 10): verify fails a wrong model and passes a right one, with default
thresholds; nothing foreseeable ends in a traceback; precision x provider pairs that cannot run are
refused; unused checkpoint tensors are named; genai's padding never eats a prompt."""
from __future__ import annotations

import json
import sys

import pytest
from tiny import make_model, write_random_llama

import onnxforge
from onnxforge.cli import main
from onnxforge.quant.recipe import PRECISIONS, PROVIDERS, RUNS_ON


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    """Two tiny Llamas of the same shape (different seeds) and builds of the first at fp32 and int4."""
    root = tmp_path_factory.mktemp("trust")
    make_model("llama", root / "a", seed=0)
    make_model("llama", root / "b", seed=1)
    onnxforge.build(root / "a", root / "fp32", "fp32")
    onnxforge.build(root / "a", root / "int4", "int4")
    return root


def _verify(capsys, *argv):
    code = main(["verify", "--no-plot", "--tokens", "8", *map(str, argv)])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_verify_passes_the_right_reference_and_fails_a_wrong_one(llamas, capsys, precision):
    code, out, err = _verify(capsys, llamas / precision, "--reference", llamas / "a")
    assert code == 0 and out.rstrip().splitlines()[-1].startswith("PASS"), out
    assert f"{precision} defaults" in out
    code, out, err = _verify(capsys, llamas / precision, "--reference", llamas / "b")
    last = out.rstrip().splitlines()[-1]
    assert code == 1 and last.startswith("FAIL") and "min_top1" in last, out
    assert precision != "fp32" or ("max_kl" in last and "max_abs_diff" in last), out
    assert "Traceback" not in err


def test_verify_thresholds_can_be_changed_and_dropped(llamas, capsys):
    code, out, _ = _verify(capsys, llamas / "fp32", "--reference", llamas / "b", "--min-top1", "off", "--max-kl", "100",
                           "--max-abs-diff", "off")
    assert code == 0 and "min_top1" not in out and "want <= 100" in out
    code, out, _ = _verify(capsys, llamas / "fp32", "--reference", llamas / "b", "--no-thresholds")
    assert code == 0 and "PASS (no thresholds)" in out


def test_verify_without_matplotlib_finishes_with_a_note(llamas, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    monkeypatch.delitem(sys.modules, "onnxforge.verify.plot", raising=False)
    code = main(["verify", str(llamas / "fp32"), "--reference", str(llamas / "a"), "--tokens", "4"])
    cap = capsys.readouterr()
    assert code == 0 and "matplotlib is not installed" in cap.out and "Traceback" not in cap.err
    assert not (llamas / "fp32" / "verify.png").exists()


def test_pad_equal_to_the_unknown_token_does_not_eat_prompts(tmp_path, capsys):
    """A WordLevel vocabulary whose unk id 0 is also pad_token_id: prompts that start with unknown words
    used to lose them to genai's left-padding rule (greedy 0/16 on a model whose logits matched)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path / "ckpt"
    make_model("qwen3", folder)
    words = "the a of is to and in capital france time".split()
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, **{w: i + 2 for i, w in enumerate(words)}},
                                     unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "pad_token": "<unk>",
        "bos_token": "<s>", "eos_token": "<s>"}))
    report = onnxforge.build(folder, tmp_path / "out", "fp32")
    assert any("unknown token" in n for n in report.notes)
    code, out, _ = _verify(capsys, tmp_path / "out", "--reference", folder, "--tokens", "16")
    rows = [ln for ln in out.splitlines() if ln.strip()[:1].isdigit()]
    assert code == 0 and len(rows) == 4 and all(" 16/16 " in r for r in rows), out
    assert any(r.split()[1].startswith("19+") for r in rows)  # "Once upon ..." starts with unknown words


def test_precision_provider_pairs_that_cannot_run_are_refused(tmp_path, capsys):
    folder = write_random_llama(tmp_path / "ckpt")
    code = main(["build", "-m", str(folder), "-o", str(tmp_path / "out"), "-p", "bf16", "-e", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "bf16" in err and "fp32, fp16" in err and "cuda" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    for precision in PRECISIONS:
        for provider in PROVIDERS:
            if provider in RUNS_ON[precision]:
                continue
            with pytest.raises(onnxforge.errors.RecipeError, match="cannot run"):
                onnxforge.build(folder, tmp_path / "x", precision, provider)
    from onnxforge.cli import build_parser

    assert "cpu: fp32, fp16, int4, int8" in build_parser()._subparsers._group_actions[0].choices["build"].format_help()


def test_run_on_a_model_onnxruntime_cannot_load_is_one_line(tmp_path, capsys):
    folder = write_random_llama(tmp_path / "ckpt")
    onnxforge.build(folder, tmp_path / "out", "bf16", "cuda")
    for argv in (["run", str(tmp_path / "out"), "hello", "--max-new-tokens", "2"],
                 ["perplexity", str(tmp_path / "out"), "--text", str(folder / "config.json")]):
        code = main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and "cannot load" in err and "rebuild" in err, err


def test_unused_tensors_are_named_and_strict_fails(tmp_path, capsys):
    folder = write_random_llama(tmp_path / "ckpt", layers=3)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 1}))
    report = onnxforge.build(folder, tmp_path / "out", "fp32")
    unread = report.unread_tensors
    assert unread and all(".layers.1." in n or ".layers.2." in n for n in unread) and len(unread) == 18
    assert "model.layers.{1,2}.mlp.down_proj.weight" in report.summary()
    saved = json.loads((tmp_path / "out" / "build_report.json").read_text())
    assert saved["unread_tensors"] == unread and saved["warnings"]
    code = main(["build", "-m", str(folder), "-o", str(tmp_path / "strict"), "--strict", "--quiet"])
    assert code == 2 and "not used" in capsys.readouterr().err and not (tmp_path / "strict").exists()


def test_a_complete_checkpoint_has_nothing_unread(tmp_path):
    folder = write_random_llama(tmp_path / "ckpt")
    report = onnxforge.build(folder, tmp_path / "out", "int4", strict=True)
    assert report.unread_tensors == [] and report.warnings == []
