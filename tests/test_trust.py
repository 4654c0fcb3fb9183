"""Trust and first run (issue 10): verify fails a wrong model and passes a right one with default thresholds;
nothing foreseeable ends in a traceback; precision x provider pairs that cannot run are refused; checkpoint
tensors the build never reads are named; onnxruntime-genai's padding rule never eats the end of a prompt."""
from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
from tiny import make_model, write_random_llama

import onnxforge
from onnxforge.cli import build_parser, main
from onnxforge.errors import CheckpointError, RecipeError
from onnxforge.quant.recipe import PRECISIONS, PROVIDERS, Recipe
from onnxforge.runs_on import RUNS_ON, check_runs_on


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    """Two tiny Llamas of the same shape (seeds 0 and 1) and builds of the first at fp32 and int4."""
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


def _last(out: str) -> str:
    return out.rstrip().splitlines()[-1]


# -- 1. verify judges by default -------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_verify_passes_the_right_reference_and_fails_a_wrong_one(llamas, capsys, precision):
    code, out, err = _verify(capsys, llamas / precision, "--reference", llamas / "a")
    assert code == 0 and _last(out).startswith("PASS"), out
    assert f"thresholds ({precision} defaults" in out  # the thresholds in force are printed
    code, out, err = _verify(capsys, llamas / precision, "--reference", llamas / "b")
    last = _last(out)
    assert code == 1 and last.startswith("FAIL: ") and "min_top1: top1 = " in last, out
    if precision == "fp32":  # every default threshold of fp32 is missed, and each is named
        assert "max_kl: mean_kl = " in last and "max_abs_diff: max_abs_diff = " in last, out
    assert "Traceback" not in err


def test_verify_thresholds_can_be_changed_and_dropped(llamas, capsys):
    code, out, _ = _verify(capsys, llamas / "fp32", "--reference", llamas / "b", "--min-top1", "off", "--max-kl", "100",
                           "--max-abs-diff", "off", "--max-weight-error", "off",  # b's weights are not the build's
                           "--min-conversion-top1", "off", "--max-conversion-kl", "off")
    assert code == 0 and "min_top1" not in out and "(want <= 100)" in out and _last(out).startswith("PASS"), out
    code, out, _ = _verify(capsys, llamas / "fp32", "--reference", llamas / "a", "--min-greedy", "101")
    assert code == 1 and "min_greedy: greedy_agreement = 100.0% < 101.0%" in _last(out), out
    code, out, _ = _verify(capsys, llamas / "fp32", "--reference", llamas / "b", "--no-thresholds")
    assert code == 0 and _last(out) == "PASS (no thresholds)"


def test_stored_precision_picks_the_defaults(llamas, tmp_path):
    from onnxforge.verify.thresholds import DEFAULTS, defaults_for

    onnxforge.build(llamas / "a", tmp_path / "fp16", "fp16")
    onnxforge.build(llamas / "a", tmp_path / "mixed", recipe=Recipe(precision="int4", int8_last_matmul=True))
    assert defaults_for(llamas / "fp32") == ("fp32", DEFAULTS["fp32"])
    assert defaults_for(tmp_path / "fp16")[0] == "fp16"
    assert defaults_for(tmp_path / "mixed")[0] == "int4"  # the narrowest storage decides


def test_verify_without_matplotlib_finishes_with_a_note(llamas, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    monkeypatch.delitem(sys.modules, "onnxforge.verify.plot", raising=False)
    code = main(["verify", str(llamas / "fp32"), "--reference", str(llamas / "a"), "--tokens", "4"])
    cap = capsys.readouterr()
    assert code == 0 and "no verify.png: matplotlib is not installed" in cap.out and "Traceback" not in cap.err
    assert _last(cap.out).startswith("PASS") and not (llamas / "fp32" / "verify.png").exists()


# -- 2. a pad id equal to the unknown token --------------------------------------------------------------
def test_pad_equal_to_the_unknown_token_keeps_greedy_exact(tmp_path, capsys):
    """A WordLevel vocabulary whose unk id 0 is also pad_token_id 0. onnxruntime-genai takes pad tokens at
    the end of a prompt for padding, so prompts ending in an unknown word were answered from the token
    before it: greedy 0/16 while the logits matched. The build now pads with an id the tokenizer never
    emits; a model that still has the old pad gets a note from verify instead of an unexplained 0/16."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from onnxforge.verify.parity import DEFAULT_PROMPTS

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
    ends_with_unk = [i for i, p in enumerate(DEFAULT_PROMPTS, 1) if tok.encode(p).ids[-1] == 0]
    assert ends_with_unk  # the case under test occurs among verify's prompts

    report = onnxforge.build(folder, tmp_path / "out", "fp32")
    pad = json.loads((tmp_path / "out" / "genai_config.json").read_text())["model"]["pad_token_id"]
    assert pad not in (0, 1) and pad >= len(tok.get_vocab()) and any("unknown token" in n for n in report.notes)
    code, out, _ = _verify(capsys, tmp_path / "out", "--reference", folder, "--tokens", "16")
    rows = [ln for ln in out.splitlines() if ln.strip()[:1].isdigit()]
    assert code == 0 and len(rows) == 4 and all(" 16/16 " in r for r in rows) and "note:" not in out, out

    old = tmp_path / "old"  # the same model with the checkpoint's pad id, as builds before the fix had
    shutil.copytree(tmp_path / "out", old)
    cfg = json.loads((old / "genai_config.json").read_text())
    cfg["model"]["pad_token_id"] = 0
    (old / "genai_config.json").write_text(json.dumps(cfg))
    code, out, _ = _verify(capsys, old, "--reference", folder, "--tokens", "16", "--min-greedy", "off")
    rows = [ln for ln in out.splitlines() if ln.strip()[:1].isdigit()]
    bad = [i for i, r in enumerate(rows, 1) if " 16/16 " not in r]
    assert bad and set(bad) <= set(ends_with_unk), out  # genai's rule: only prompts that end with the pad id
    assert all(f"note: prompt {i} ends with token 0, which genai_config.json has as pad_token_id" in out for i in bad)


# -- 3. one line instead of a traceback ------------------------------------------------------------------
@pytest.fixture(scope="module")
def bf16_cuda(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    folder = write_random_llama(root / "ckpt")
    onnxforge.build(folder, root / "out", "bf16", "cuda")
    return root


@pytest.mark.parametrize("command", ["run", "chat", "perplexity", "verify"])
def test_a_model_onnxruntime_cannot_load_is_one_line(bf16_cuda, capsys, monkeypatch, command):
    out = str(bf16_cuda / "out")
    argv = {"run": ["run", out, "hello", "--max-new-tokens", "2"], "chat": ["chat", out],
            "perplexity": ["perplexity", out, "--text", str(bf16_cuda / "ckpt" / "config.json")],
            "verify": ["verify", out, "--reference", str(bf16_cuda / "ckpt"), "--no-plot"]}[command]
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("hi\n"))
    code = main(argv)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("onnxforge") or "Traceback" in ln]
    assert code == 2 and len(err) == 1 and err[0].startswith("onnxforge: error: "), err
    assert "cannot load" in err[0] and "-p bf16 -e cuda" in err[0] and "rebuild it with -e cpu" in err[0], err


@pytest.mark.parametrize("argv, says", [
    (["run", "{tmp}/nothing", "hi"], "is not a built model folder"),
    (["inspect", "{tmp}/nothing"], "nothing"),
    (["verify", "{model}", "--reference", "{tmp}/nothing"], "does not exist"),
    (["verify", "{model}", "--reference", "{ckpt}", "--text", "{tmp}/nothing.txt"], "does not exist"),
    (["verify", "{model}", "--reference", "{ckpt}", "--max-ppl-ratio", "1.1"], "needs --text"),
    (["perplexity", "{model}", "--text", "{tmp}/nothing.txt"], "does not exist"),
    (["build", "-m", "{tmp}/nothing", "-o", "{tmp}/out"], "does not exist"),
    (["build", "-m", "{ckpt}", "-o", "{model}"], "--overwrite"),
    (["run", "{model}", ""], "the prompt is empty"),
    (["perplexity", "{model}", "--text", "{tmp}/short.txt", "--window", "8"], "at least 2 tokens"),
    (["perplexity", "{model}", "--text", "{ckpt}/config.json", "--window", "1"], "--window 2 or more"),
])
def test_foreseeable_mistakes_are_one_line(llamas, tmp_path, capsys, argv, says):
    (tmp_path / "short.txt").write_text("x")
    argv = [a.format(tmp=tmp_path, model=llamas / "fp32", ckpt=llamas / "a") for a in argv]
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("onnxforge: error: ") and says in err[0], err


def test_a_missing_optional_package_is_one_line(llamas, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)
    code = main(["run", str(llamas / "fp32"), "hello"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "needs onnxruntime-genai" in err[0] and "pip install" in err[0], err


# -- 4. precision x provider -----------------------------------------------------------------------------
def test_bf16_on_cpu_is_refused_before_anything_is_written(tmp_path, capsys):
    folder = write_random_llama(tmp_path / "ckpt")
    code = main(["build", "-m", str(folder), "-o", str(tmp_path / "out"), "-p", "bf16", "-e", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "-p bf16 -e cpu" in err[0] and "use -p fp32, fp16, int4, int8" in err[0]
    assert "bf16 runs on cuda" in err[0] and not (tmp_path / "out").exists()


def test_every_pair_is_checked_the_same_way_and_listed_in_help(tmp_path):
    folder = write_random_llama(tmp_path / "ckpt")
    assert set(PRECISIONS) <= set(RUNS_ON)  # a new precision must say where it runs
    for precision in PRECISIONS:
        for provider in PROVIDERS:
            recipe = Recipe(precision=precision, provider=provider)
            if provider in RUNS_ON[precision]:
                check_runs_on(recipe)
                continue
            with pytest.raises(RecipeError, match=f"-p {precision} -e {provider} would build a model that onnxruntime "
                                                  "cannot run"):
                check_runs_on(recipe)
            if precision != "source":  # "source" on a float checkpoint is fp32 (below)
                with pytest.raises(RecipeError, match="cannot run"):
                    onnxforge.build(folder, tmp_path / "x", recipe=recipe)
    assert not (tmp_path / "x").exists()
    onnxforge.build(folder, tmp_path / "dml", provider="dml")  # the default precision, checked after it resolves
    with pytest.raises(RecipeError, match="lm_head .* 8 bits.* dml"):
        onnxforge.build(folder, tmp_path / "x", recipe=Recipe(precision="int4", provider="dml", int8_last_matmul=True))
    help_text = build_parser()._subparsers._group_actions[0].choices["build"].format_help()
    for provider in PROVIDERS:
        listed = [p for p in PRECISIONS if provider in RUNS_ON[p]]
        assert f"  {provider}: {', '.join(listed)}\n" in help_text + "\n", help_text


def test_the_cpu_row_is_what_onnxruntime_loads(tmp_path):
    """Every precision the table allows on cpu loads and runs in onnxruntime's CPU provider; bf16 does not."""
    import onnxruntime as ort

    from onnxforge.verify.ort_runner import OrtDecoder

    folder = write_random_llama(tmp_path / "ckpt")
    for precision in ("fp32", "fp16", "int4", "int8", "bf16"):
        out = tmp_path / precision
        onnxforge.build(folder, out, precision, "cpu" if "cpu" in RUNS_ON[precision] else "cuda")
        if "cpu" in RUNS_ON[precision]:
            logits = OrtDecoder(out).logits_for([5, 6, 7], [8])
            assert np.isfinite(np.concatenate(logits, axis=0)).all()
        else:
            with pytest.raises(Exception):
                ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])


# -- 6. checkpoint tensors the build never reads ---------------------------------------------------------
def test_unused_tensors_are_named_and_strict_fails(tmp_path, capsys):
    folder = write_random_llama(tmp_path / "ckpt", layers=3)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 1}))
    report = onnxforge.build(folder, tmp_path / "out", "fp32")
    unread = report.unread_tensors
    assert len(unread) == 18 and all(".layers.1." in n or ".layers.2." in n for n in unread)  # 9 per layer
    assert "WARNING: 18 checkpoint tensors are not used" in report.summary()
    assert "model.layers.{1,2}.mlp.down_proj.weight" in report.summary()
    saved = json.loads((tmp_path / "out" / "build_report.json").read_text())
    assert saved["unread_tensors"] == unread and saved["warnings"] == report.warnings
    with pytest.raises(CheckpointError, match="not used"):
        onnxforge.build(folder, tmp_path / "api_strict", "fp32", strict=True)
    code = main(["build", "-m", str(folder), "-o", str(tmp_path / "strict"), "--strict", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not used" in err[0] and "layers.{1,2}" in err[0]
    assert not (tmp_path / "strict").exists() and not (tmp_path / "api_strict").exists()
    assert not list(tmp_path.glob(".*"))  # no staging folder left behind
    code = main(["build", "-m", str(folder), "-o", str(tmp_path / "quiet"), "--quiet"])
    assert code == 0 and "onnxforge: warning: 18 checkpoint tensors" in capsys.readouterr().err


def test_expected_leftovers_are_a_note_and_reads_are_what_counts(tmp_path):
    from safetensors.numpy import save_file

    from onnxforge.sources.hf import HFSource
    from onnxforge.sources.tracking import TrackingSource

    folder = write_random_llama(tmp_path / "ckpt")
    save_file({f"model.layers.{i}.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32) for i in range(2)},
              str(folder / "buffers.safetensors"))
    report = onnxforge.build(folder, tmp_path / "out", "int4", strict=True)
    assert report.unread_tensors == [] and report.warnings == []
    assert any(n.startswith("2 checkpoint tensors left unread on purpose: model.layers.{0,1}.self_attn.rotary_emb")
               for n in report.notes), report.notes
    src = TrackingSource(HFSource(folder))
    src.has("model.norm.weight"), src.shape("model.norm.weight")  # asking is not reading
    src.read("model.embed_tokens.weight")
    unread, expected = src.unused()
    assert "model.norm.weight" in unread and "model.embed_tokens.weight" not in unread and len(expected) == 2
