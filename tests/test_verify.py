"""`onnxforge verify` and `onnxforge perplexity` on tiny random builds."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tiny

import onnxforge
from onnxforge.cli import main
from onnxforge.verify.perplexity import windows

WINDOW, STRIDE = 128, 64


@pytest.fixture(scope="module")
def llama(tiny_models, tmp_path_factory):
    """(checkpoint folder, transformers model, fp32 build, text file)."""
    folder, model = tiny_models("llama")
    base = tmp_path_factory.mktemp("verify")
    out = base / "fp32"
    onnxforge.build(folder, out, "fp32")
    text = base / "text.txt"
    text.write_text(tiny.TEXT, encoding="utf-8")
    return folder, model, out, text


@pytest.fixture(scope="module")
def fp32_result(llama):
    folder, _, out, text = llama
    from onnxforge.verify.parity import verify

    return verify(out, folder, text=text, tokens=12, window=WINDOW, stride=STRIDE)


def test_fp32_build_passes_with_thresholds(llama, capsys):
    folder, _, out, text = llama
    rc = main(["verify", str(out), "--reference", str(folder), "--text", str(text), "--tokens", "12",
               "--window", str(WINDOW), "--stride", str(STRIDE), "--max-abs-diff", "1e-4", "--min-top1", "1",
               "--max-kl", "1e-6", "--max-ppl-ratio", "1.001", "--min-greedy", "100"])
    captured = capsys.readouterr()
    assert rc == 0, captured.out + captured.err
    assert "max|dlogit|" in captured.out and "FAIL" not in captured.out
    result = json.loads((out / "verify.json").read_text())
    m = result["metrics"]
    assert m["max_abs_diff"] < 1e-4
    assert m["top1"] == 1.0
    assert m["greedy_agreement"] == 1.0 and m["greedy_tokens"] == 12 * len(result["prompts"])
    assert m["mean_kl"] < 1e-8
    assert abs(m["ppl_ratio"] - 1) < 1e-4
    assert result["passed"] and result["failures"] == []
    assert result["prompt_source"] == "reference tokenizer"
    png = (out / "verify.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_verify_api_reports_per_position_figures(fp32_result):
    r = fp32_result
    for p in r["prompts"]:
        pos = p["per_position"]
        assert len(pos["kl"]) == len(pos["max_abs_diff"]) == p["prompt_tokens"] + 12
        assert p["reference_tokens"] == p["onnx_tokens"]
    assert r["perplexity"]["onnx"]["window"] == WINDOW


def _perturb_one_matmul_weight(folder) -> str:
    """Add noise to the bytes of one MatMul initializer in model.onnx.data; returns its name."""
    import onnx

    g = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    inits = {i.name: i for i in g.initializer}
    name = next(n.input[1] for n in g.node if n.op_type == "MatMul" and n.input[1] in inits
                and "layers.0" in n.input[1])
    ext = {e.key: e.value for e in inits[name].external_data}
    offset, length = int(ext.get("offset", 0)), int(ext["length"])
    path = folder / ext["location"]
    raw = bytearray(path.read_bytes())
    w = np.frombuffer(bytes(raw[offset:offset + length]), dtype=np.float32)
    w = w + np.random.default_rng(0).normal(0, 0.5, w.shape).astype(np.float32)
    raw[offset:offset + length] = w.tobytes()
    path.write_bytes(bytes(raw))
    return name


def test_broken_model_is_caught(llama, tmp_path, capsys):
    folder, _, out, _ = llama
    broken = tmp_path / "broken"
    shutil.copytree(out, broken, ignore=shutil.ignore_patterns("verify.*"))
    _perturb_one_matmul_weight(broken)
    rc = main(["verify", str(broken), "--reference", str(folder), "--tokens", "8", "--max-abs-diff", "1e-4",
               "--min-top1", "0.99", "--no-plot"])
    captured = capsys.readouterr()
    assert rc == 1
    last = captured.out.rstrip().splitlines()[-1]
    assert last.startswith("FAIL: ") and "max_abs_diff" in last
    assert "FAIL  max_abs_diff" in captured.out
    result = json.loads((broken / "verify.json").read_text())
    assert result["metrics"]["max_abs_diff"] > 1e-2
    assert not result["passed"] and any(f.startswith("max_abs_diff") for f in result["failures"])
    assert not (broken / "verify.png").exists()


def test_int4_is_worse_than_fp32(llama, fp32_result, tmp_path):
    folder, _, _, _ = llama
    from onnxforge.verify.parity import verify

    out = tmp_path / "int4"
    onnxforge.build(folder, out, "int4")
    r = verify(out, folder, tokens=8, plot=False, thresholds={"max_abs_diff": 1e-4})
    assert r["metrics"]["max_abs_diff"] > 100 * fp32_result["metrics"]["max_abs_diff"]
    assert r["metrics"]["mean_kl"] > fp32_result["metrics"]["mean_kl"]
    assert r["failures"] and not r["passed"]


def test_random_ids_without_tokenizer(llama, tmp_path):
    """A reference folder with no tokenizer falls back to fixed random prompt ids."""
    folder, _, out, _ = llama
    ref = tmp_path / "ref"
    shutil.copytree(folder, ref)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (ref / f).unlink()
    from onnxforge.verify.parity import verify

    r = verify(out, ref, tokens=4, plot=False, write=False)
    assert r["prompt_source"].startswith("fixed random ids")
    assert r["metrics"]["max_abs_diff"] < 1e-4


@pytest.mark.parametrize("n,window,stride", [(10, 4, 2), (100, 16, 16), (100, 16, 5), (17, 32, 8), (2, 2, 1)])
def test_windows_score_every_token_once(n, window, stride):
    scored = []
    for begin, end, first in windows(n, window, stride):
        assert end - begin <= window and begin < first <= end
        scored += range(first, end)
    assert len(set(scored)) == len(scored)
    if stride < window:  # overlapping windows: every token but the first is scored exactly once
        assert scored == list(range(1, n))
    else:  # non-overlapping (the HF docs' loop too): a window's first token has no context to be scored with
        assert scored == [t for t in range(1, n) if t % stride]


def _transformers_perplexity(model, ids, window, stride) -> float:
    """The HF docs' loop ("perplexity of fixed-length models"), summing token losses."""
    import torch

    ids_t = torch.tensor([ids])
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        trg_len = end - prev_end
        input_ids = ids_t[:, begin:end]
        target = input_ids.clone()
        target[:, :-trg_len] = -100
        with torch.no_grad():
            logits = model(input_ids).logits
        loss = torch.nn.functional.cross_entropy(logits[0, :-1].double(), target[0, 1:], ignore_index=-100,
                                                 reduction="sum")
        nll_sum += float(loss)
        n_tokens += int((target[0, 1:] != -100).sum())
        prev_end = end
        if end == len(ids):
            break
    return float(np.exp(nll_sum / n_tokens))


def test_perplexity_cli_without_torch_matches_transformers(llama):
    folder, model, out, text = llama
    script = (
        "import json, sys\n"
        "from onnxforge.cli import main\n"
        f"rc = main(['perplexity', {str(out)!r}, '--text', {str(text)!r}, '--window', '{WINDOW}', "
        f"'--stride', '{STRIDE}', '--json'])\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))\n"
        "print(json.dumps({'rc': rc, 'heavy': heavy}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    result, status = lines[0], lines[-1]
    assert status == {"rc": 0, "heavy": []}
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(folder)(tiny.TEXT)["input_ids"]
    assert result["tokens"] == len(ids) - 1
    expected = _transformers_perplexity(model, ids, WINDOW, STRIDE)
    assert abs(result["ppl"] / expected - 1) < 0.005, (result["ppl"], expected)
    assert len(ids) > 2 * WINDOW  # several windows really were used


def test_help_does_not_import_torch():
    script = ("import sys\nfrom onnxforge.cli import build_parser\n"
              "build_parser().format_help()\n"
              "for c in ('verify', 'perplexity', 'run', 'chat'):\n"
              "    build_parser().parse_args([c, 'x'] + (['--reference', 'y'] if c == 'verify' else [])"
              " + (['--text', 'y'] if c == 'perplexity' else []) + (['p'] if c == 'run' else []))\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] in "
              "('torch', 'transformers', 'onnxruntime', 'onnxruntime_genai', 'matplotlib')))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_compare_logits_metrics():
    """KL is KL(reference || onnx), per position; top-1 compares argmaxes; max abs diff per position."""
    from onnxforge.verify.parity import compare_logits

    rng = np.random.default_rng(3)
    ref = rng.normal(0, 2, (5, 7)).astype(np.float32)
    got = ref + rng.normal(0, 0.5, ref.shape).astype(np.float32)
    got[2] = ref[2] + 10.0  # a constant shift changes no probability
    m = compare_logits(ref, got)
    p = np.exp(ref - ref.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    q = np.exp(got - got.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    expected_kl = (p * np.log(p / q)).sum(1)
    assert np.allclose(m["kl"], expected_kl, rtol=1e-4, atol=1e-7)
    assert not np.allclose(m["kl"], (q * np.log(q / p)).sum(1), rtol=1e-2)  # the direction matters
    assert m["kl"][2] < 1e-9
    assert np.allclose(m["max_abs_diff"], np.abs(ref - got).max(1), rtol=1e-6)
    assert list(m["top1"]) == list(ref.argmax(1) == got.argmax(1))
