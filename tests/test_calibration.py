"""Calibrated int4 (onnxforge.calibrate, quant/gptq.py, quant/awq.py): GPTQ and AWQ against small independent
numpy references, the layer-by-layer forward against transformers, AWQ's folding against transformers, the
calibrated builds' error against transformers, the options and their refusals, and no torch in the build."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import tiny
from conftest import onnx_step_logits

import onnxforge
from onnxforge.calibrate.data import Calibration
from onnxforge.errors import OnnxForgeError, RecipeError
from onnxforge.quant.awq import awq_search
from onnxforge.quant.gptq import gptq_quantize
from onnxforge.quant.pack import dequantize, unpack_bits
from onnxforge.quant.recipe import Recipe


# -- independent references ---------------------------------------------------------------------------
def ref_gptq(w, x, bits, bs, sym, damp=0.01):
    """Textbook GPTQ, float64, one column at a time over the whole matrix (no lazy batches), K % bs == 0."""
    w = w.astype(np.float64).copy()
    h = x.T.astype(np.float64) @ x.astype(np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * np.mean(np.diag(h)) * np.eye(len(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: inv(H) = U^T U
    n, k = w.shape
    levels, scales, zps = np.zeros((n, k), int), np.zeros((n, k // bs)), np.zeros((n, k // bs))
    qmax = 2 ** bits - 1
    for j in range(k):
        g = j // bs
        if j % bs == 0:
            blk = w[:, j:j + bs]
            if sym:
                m = np.where(np.abs(blk.max(1)) > np.abs(blk.min(1)), blk.max(1), blk.min(1))
                scales[:, g], zps[:, g] = m / -(2 ** (bits - 1)), 2 ** (bits - 1)
            else:
                lo, hi = np.minimum(blk.min(1), 0), np.maximum(blk.max(1), 0)
                scales[:, g] = (hi - lo) / qmax
                zps[:, g] = np.clip(np.floor(-lo / scales[:, g] + 0.5), 0, qmax)
        q = np.clip(np.floor(w[:, j] / scales[:, g] + zps[:, g] + 0.5), 0, qmax)
        levels[:, j] = q
        err = (w[:, j] - (q - zps[:, g]) * scales[:, g]) / u[j, j]
        w[:, j:] -= np.outer(err, u[j, j:])
    return levels, scales, zps


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits,bs", [(4, 32), (4, 16), (8, 64)])
def test_gptq_equals_reference(sym, bits, bs):
    rng = np.random.default_rng(0)
    n, k, t = 24, 256, 600  # 256 columns: two lazy batches of 128
    x = rng.normal(size=(t, k)) * rng.uniform(0.1, 3, size=k)  # channels of different size
    x[:, 5] = 0  # a dead input channel
    w = rng.normal(size=(n, k))
    lev, sc, zp = ref_gptq(w, x, bits, bs, sym)
    q = gptq_quantize(w, x.T @ x, bits=bits, block_size=bs, symmetric=sym)
    got = unpack_bits(q.data, bits, bs).reshape(n, k)
    assert np.array_equal(got, lev)
    np.testing.assert_allclose(q.scales, sc.astype(np.float32), rtol=1e-6)
    if not sym:
        np.testing.assert_allclose(dequantize(q), (lev - np.repeat(zp, bs, 1)) * np.repeat(sc, bs, 1), rtol=1e-6,
                                   atol=1e-6)  # the same zero points
    # and it does what it is for: a lower output error than round to nearest on the inputs it saw
    from onnxforge.quant.rtn import quantize_rtn

    def out_err(wq):
        return np.square(x @ (w - wq).T).mean()

    assert out_err(dequantize(q)) < out_err(dequantize(quantize_rtn(w.astype(np.float32), bits=bits, block_size=bs,
                                                                      symmetric=sym)))


def test_gptq_padding_and_act_order_float32():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 80)).astype(np.float32) * rng.uniform(0.1, 3, size=80).astype(np.float32)
    w = rng.normal(size=(10, 80)).astype(np.float32)
    h = x.T @ x
    for act in (False, True):
        q = gptq_quantize(w, h, bits=4, block_size=32, symmetric=True, act_order=act)
        assert q.K == 80 and q.scales.shape == (10, 3)
        assert np.square(x @ (w - dequantize(q)).T).mean() < np.square(x @ w.T).mean() * 0.05


def ref_awq(x, ws, bits, bs, grid=20):
    """AWQ's grid search written out: s = mean|x|^a / sqrt(max * min), RTN (sym) of W * s, error of (x/s) Q^T."""
    mean = np.maximum(np.abs(x).mean(0).astype(np.float64), 1e-4)
    best = (np.inf, None, None)
    for g in range(grid):
        a = g / grid
        s = mean ** a
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
        err = 0.0
        for w in ws:
            wb = (w * s).reshape(w.shape[0], -1, bs)
            hi, lo = wb.max(-1, keepdims=True), wb.min(-1, keepdims=True)
            scale = np.where(np.abs(hi) > np.abs(lo), hi, lo) / -8
            lev = np.clip(np.floor(wb * (1 / scale) + 8.5), 0, 15)
            wq = ((lev - 8) * scale).reshape(w.shape)
            err += np.square((x / s) @ wq.T - x @ w.T).sum()
        err /= sum(len(x) * w.shape[0] for w in ws)
        if err < best[0]:
            best = (err, s, a)
    return best[1], best[2]


def test_awq_equals_reference():
    from onnxforge.quant.methods import quantize

    rng = np.random.default_rng(2)
    x = (rng.normal(size=(256, 64)) * rng.uniform(0.05, 4, size=64)).astype(np.float32)
    ws = [rng.normal(size=(32, 64)).astype(np.float32), rng.normal(size=(16, 64)).astype(np.float32)]

    def fake(w):
        return dequantize(quantize(w, bits=4, block_size=32, symmetric=True, method="rtn"))

    s, alpha, errors = awq_search(x, np.abs(x).mean(0), ws, fake)
    s_ref, alpha_ref = ref_awq(x, ws, 4, 32)
    assert alpha == alpha_ref
    np.testing.assert_array_equal(s, s_ref)
    assert min(errors) <= errors[0]  # alpha 0 is plain round to nearest


# -- the model-level pieces ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cal_llama")
    model = tiny.make_model("llama", folder)
    text = folder.parent / "calibration.txt"
    text.write_text(tiny.TEXT * 4)
    return folder, model, text


def _ids(folder, text, n):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text, add_special_tokens=False).ids[:n]


def _layerwise(folder, recipe, text, samples=4, length=32):
    from onnxforge.archs.registry import architecture_for
    from onnxforge.calibrate.data import calibration_ids
    from onnxforge.calibrate.run import Layerwise
    from onnxforge.sources.open import open_source

    source = open_source(folder)
    arch = architecture_for(source.config)
    spec = arch.make_spec(source.config)
    names = arch.resolver(source)
    cal = calibration_ids(source, Calibration(str(text), samples, length))
    return source, spec, names, Layerwise(source, spec, names, recipe.bind(spec), cal, tmp_dir()), cal


def tmp_dir():
    import tempfile
    from pathlib import Path

    return Path(tempfile.mkdtemp())


@pytest.fixture(scope="module")
def qk_norm_models(tmp_path_factory):
    """Qwen3 (q/k norms per head before the rotary) and HunYuan dense (after it), with a calibration text."""
    from test_family_newer import CONFIGS

    made = {}
    for name, kw in (("qwen3", {}), ("hunyuan", CONFIGS["hunyuan"])):
        folder = tmp_path_factory.mktemp(f"cal_{name}")
        model = tiny.make_model(name, folder, **kw)
        text = folder.parent / f"calibration_{name}.txt"
        text.write_text(tiny.TEXT * 4)
        made[name] = folder, model, text
    return made


@pytest.mark.parametrize("name", ["llama", "qwen3", "hunyuan"])
def test_forward_matches_transformers_layer_by_layer(llama, qk_norm_models, name):
    import torch

    folder, model, text = llama if name == "llama" else qk_norm_models[name]
    source, spec, names, run, cal = _layerwise(folder, Recipe(precision="fp32"), text)
    with torch.no_grad():
        hs = model(torch.tensor(cal.ids), output_hidden_states=True).hidden_states
    x = run.embed()
    np.testing.assert_allclose(x, hs[0].reshape(-1, spec.hidden_size).numpy(), atol=1e-6)
    for i in range(spec.num_layers):
        x = run.layer(i, x)
        want = hs[i + 1].reshape(-1, spec.hidden_size).numpy()
        if i == spec.num_layers - 1:  # transformers' last hidden state is after the final norm
            from onnxforge.calibrate import forward as F

            x = F.norm(x, *run.norm_params("final_norm", None)[1:], spec)
        np.testing.assert_allclose(x, want, atol=2e-4, rtol=1e-4)


def test_awq_folding_keeps_the_float_function(llama, tmp_path):
    """The scaled weights and norms AWQ leaves to the build, built at fp32, are the transformers model."""
    from conftest import prompt_and_decode, reference_logits

    from onnxforge.calibrate.run import CalibratedSource, calibrate
    from onnxforge.sources.open import open_source

    folder, model, text = llama
    source, spec, names, _, _ = _layerwise(folder, Recipe(precision="int4", method="awq"), text)
    res = calibrate(source, spec, names, Recipe(precision="int4", method="awq").bind(spec), Calibration(str(text), 4, 32))
    assert res.alphas and res.replaced and res.row_scale  # norms folded, up_proj rows scaled for down_proj
    assert any(not np.allclose(v, 1) for v in res.col_scale.values())
    # the untied lm_head is scaled too: its scales fold into the final norm
    assert "lm_head.weight" in res.blocks and "lm_head.weight" in res.col_scale and "model.norm.weight" in res.replaced
    res.blocks.clear()
    onnxforge.build(CalibratedSource(open_source(folder), res), tmp_path / "o", "fp32")
    prompt, decode = prompt_and_decode()
    ref = reference_logits(model, prompt + decode)
    np.testing.assert_allclose(onnx_step_logits(tmp_path / "o", prompt, decode), ref, atol=2e-4)


def test_calibrated_builds_beat_round_to_nearest(llama, tmp_path):
    """On the calibration distribution, each calibrated build is closer to transformers than rtn (same size)."""
    import torch

    folder, model, text = llama
    ids = _ids(folder, tiny.TEXT, 96)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    err, sizes = {}, {}
    for method in ("rtn", "gptq", "awq", "awq+gptq"):
        out = tmp_path / method.replace("+", "_")
        cal = Calibration(str(text), 8, 32) if method != "rtn" else None
        report = onnxforge.build(folder, out, recipe=Recipe(precision="int4", method=method, accuracy_level=0),
                                 calibration=cal)
        err[method] = float(np.square(onnx_step_logits(out, ids, []) - ref).mean())
        sizes[method] = (out / "model.onnx.data").stat().st_size
        if cal:
            saved = json.loads((out / "build_report.json").read_text())
            c = saved["recipe"]["calibration"]
            assert c["samples"] == 8 and c["length"] == 32 and len(c["sha256"]) == 64
            assert any("calibrated on 8 samples x 32 tokens" in n for n in saved["notes"])
            assert any("(calibrated)" in g["storage"] for g in saved["groups"])
            assert "calibrated on" in report.summary()
    assert err["gptq"] < err["rtn"] and err["awq+gptq"] < err["rtn"], err
    assert err["awq"] < err["rtn"] * 1.25, err  # awq alone searched per group: not worse by much on a random model
    assert len(set(sizes.values())) == 1


@pytest.mark.parametrize("method,words", [("awq", "(awq: tied to the embedding table, which takes no AWQ scales; rtn)"),
                                          ("awq+gptq", "(calibrated) (awq+gptq: tied to the embedding table, which "
                                                       "takes no AWQ scales; gptq only)")])
def test_tied_lm_head_says_what_awq_did(tiny_models, tmp_path, method, words):
    """A tied lm_head is the embedding table (read unscaled by the Gather): AWQ leaves it, and says so."""
    folder, _ = tiny_models("llama_tied")
    text = tmp_path / "cal.txt"
    text.write_text(tiny.TEXT * 4)
    onnxforge.build(folder, tmp_path / "o", recipe=Recipe(precision="int4", method=method),
                    calibration=Calibration(str(text), 4, 32))
    groups = json.loads((tmp_path / "o" / "build_report.json").read_text())["groups"]
    head = [g["storage"] for g in groups if "lm_head" in json.dumps(g)]
    assert head and all(words in h for h in head), head


def test_recipes_lists_the_calibrated_methods(capsys):
    from onnxforge.cli import main

    main(["recipes"])
    out = capsys.readouterr().out
    for m in ("gptq", "awq", "awq+gptq"):
        assert f"\n  {m} " in out


@pytest.mark.parametrize("kw,msg", [
    (dict(samples=0), "samples must be an integer from 1"),
    (dict(length=4), "length must be an integer from 8"),
    (dict(path="/nonexistent/cal.txt"), "does not exist"),
])
def test_bad_calibration_options(kw, msg):
    with pytest.raises(RecipeError, match=msg):
        Calibration(**kw)


def test_refusals(llama, tmp_path):
    folder, _, text = llama
    with pytest.raises(RecipeError, match="for the calibrated methods"):  # options that would be ignored
        onnxforge.build(folder, tmp_path / "a", recipe=Recipe(precision="int4", method="rtn"),
                        calibration=Calibration(str(text)))
    with pytest.raises(RecipeError, match="fewer than 64 samples"):  # too little text for the default counts
        onnxforge.build(folder, tmp_path / "b", recipe=Recipe(precision="int4", method="gptq"),
                        calibration=Calibration(str(text)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(OnnxForgeError, match="bad.jsonl:2: not a JSON object"):
        onnxforge.build(folder, tmp_path / "c", recipe=Recipe(precision="int4", method="gptq"),
                        calibration=Calibration(str(bad), 2, 8))
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(OnnxForgeError, match="has none"):  # the tiny tokenizer has no chat template
        onnxforge.build(folder, tmp_path / "d", recipe=Recipe(precision="int4", method="gptq"),
                        calibration=Calibration(str(chat), 1, 8))
    assert not any((tmp_path / d).exists() for d in "abcd")


def test_refused_for_layers_it_does_not_compute(tiny_models, tmp_path):
    import dataclasses

    from onnxforge.archs.registry import architecture_for
    from onnxforge.calibrate.forward import check_supported
    from onnxforge.sources.open import open_source

    folder, _ = tiny_models("qwen3")
    spec = architecture_for(open_source(folder).config).make_spec(open_source(folder).config)
    check_supported(spec, "gptq")  # per-head q/k norms are computed
    for change, words in (({"qk_norm": "l2"}, "q/k norms of kind 'l2'"), ({"qk_norm": "full"}, "q/k norms of kind 'full'"),
                          ({"softcap": 30.0}, "softcap")):
        other = dataclasses.replace(spec, attention=dataclasses.replace(spec.attention, **change))
        with pytest.raises(RecipeError, match=f"calibrates dense pre-norm attention decoders.*{words}"):
            check_supported(other, "gptq")


def test_qk_norm_calibrated_build_beats_round_to_nearest(qk_norm_models, tmp_path):
    """Qwen3 with its per-head q/k norms: gptq on the calibration distribution closer to transformers than rtn."""
    import torch

    folder, model, text = qk_norm_models["qwen3"]
    ids = _ids(folder, tiny.TEXT, 96)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    err = {}
    for method in ("rtn", "gptq"):
        out = tmp_path / method
        onnxforge.build(folder, out, recipe=Recipe(precision="int4", method=method, accuracy_level=0),
                        calibration=Calibration(str(text), 8, 32) if method == "gptq" else None)
        err[method] = float(np.square(onnx_step_logits(out, ids, []) - ref).mean())
    assert err["gptq"] < err["rtn"], err


def test_jsonl_records_and_chat_template(llama, tmp_path):
    from onnxforge.calibrate.data import load_texts

    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in [{"text": "plain"}, {"prompt": "q", "completion": "a"},
                                                    {"messages": [{"role": "user", "content": "hello"}]}]))
    template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    texts, where = load_texts(Calibration(str(jl)), template)
    assert texts == ["plain", "<|user|>q\n<|assistant|>a\n", "<|user|>hello\n"] and where == str(jl)


def test_chat_template_is_sandboxed(tmp_path):
    # a chat template comes from the model files: it renders in jinja2's sandbox, never reaching Python internals
    from onnxforge.calibrate.data import render_chat

    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(OnnxForgeError, match="chat template"):
        render_chat(evil, [{"role": "user", "content": "x"}])


def test_default_text_needs_no_download():
    from onnxforge.calibrate.data import default_text

    text = default_text()
    assert len(text) > 200_000 and text == default_text()


def test_build_never_imports_torch(llama, tmp_path):
    folder, _, text = llama
    code = ("import sys, onnxforge; from onnxforge.quant.recipe import Recipe; "
            "from onnxforge.calibrate.data import Calibration; "
            f"onnxforge.build({str(folder)!r}, {str(tmp_path / 'o')!r}, recipe=Recipe(precision='int4', "
            f"method='awq+gptq'), calibration=Calibration({str(text)!r}, 4, 32)); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_gptq_act_order_option(llama, tmp_path):
    folder, _, text = llama
    out = tmp_path / "o"
    onnxforge.build(folder, out, recipe=Recipe(precision="int4", method="gptq"),
                    calibration=Calibration(str(text), 4, 32, act_order=True))
    saved = json.loads((out / "build_report.json").read_text())
    assert saved["recipe"]["calibration"]["act_order"] is True
    assert any("act-order" in n for n in saved["notes"])
    with pytest.raises(RecipeError, match="runs no GPTQ"):  # awq alone has no columns to order
        onnxforge.build(folder, tmp_path / "a", recipe=Recipe(precision="int4", method="awq"),
                        calibration=Calibration(str(text), 4, 32, act_order=True))
    with pytest.raises(RecipeError, match="act_order takes true or false"):
        Calibration(act_order="yes")


@pytest.mark.parametrize("bits,bs,sym", [(4, 32, True), (4, 32, False), (8, 128, True), (2, 16, False), (4, 64, True)])
def test_fake_quantize_is_dequantize_of_quantize(bits, bs, sym):
    """AWQ's search quantizer: the values MatMulNBits computes with, bit for bit, including a K off the block
    and all-zero blocks."""
    from onnxforge.quant.pack import dequantize
    from onnxforge.quant.rtn import fake_quantize_rtn, quantize_rtn

    w = np.random.default_rng(bits * bs).standard_normal((37, 200), dtype=np.float32)
    w[0] = 0
    w[1, :bs] = 0.25
    got = fake_quantize_rtn(w, bits=bits, block_size=bs, symmetric=sym)
    assert got.dtype == np.float32 and got.shape == w.shape
    np.testing.assert_array_equal(got, dequantize(quantize_rtn(w, bits=bits, block_size=bs, symmetric=sym)))
    assert not np.array_equal(got, w)
