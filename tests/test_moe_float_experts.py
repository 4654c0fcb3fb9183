"""`moe_experts=fp32|fp16` (issue 24 item 2): the experts through the float MoE op on their dequantized values,
whatever their stored format, instead of QMoE (whose CPU kernel quantizes the activations to int8 for block-wise
experts: ~1% of an expert's output, bench/qmoe_error.py, enough to flip a near-tied router).

The GGUF files are llama.cpp's own (convert_hf_to_gguf.py, then llama_model_quantize; tests/test_moe_as_stored.py
makes them) for Mixtral, Qwen3-MoE and Qwen2-MoE at Q4_0, Q8_0 and Q4_K_M with expert widths of 256. The reference
is transformers holding every weight as gguf-py dequantizes it. Checked: the MoE initializers equal gguf-py's
dequantization bit for bit, the other weights stay as stored, the logits match at every position (near router ties
included) to 1e-4, and each MoE layer's router picks the same experts as transformers' at every position, where the
QMoE build (as stored) does not.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from conftest import onnx_step_logits, prompt_and_decode, reference_logits
from test_moe_as_stored import gguf_experts, load_dequantized, near_ties, quantized_file

import onnxforge
from onnxforge.errors import RecipeError
from onnxforge.quant.options import apply_extra_options, recipe_from_mapping
from onnxforge.quant.recipe import Recipe

torch = pytest.importorskip("torch")


def float_experts(out, i: int) -> tuple[np.ndarray, np.ndarray, onnx.NodeProto]:
    """Layer i's MoE-op initializers (fc1 (E, 2I, H) interleaved, fc2 (E, H, I)) and its node."""
    model = onnx.load(out / "model.onnx", load_external_data=True)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.op_type == "MoE" and f"layers.{i}/" in n.name)
    p = f"model.layers.{i}.moe.experts"
    return inits[f"{p}.gate_up_proj.weight"], inits[f"{p}.down_proj.weight"], node


def onnx_routers(out, ids: list[int]) -> list[np.ndarray]:
    """Each MoE layer's router logits (len(ids), E) in the built graph, from one prefill of `ids`: the graph is
    saved again beside its data with the routers as extra outputs (the build's own model.onnx is not touched)."""
    import onnxruntime as ort

    from onnxforge.verify.ort_runner import OrtDecoder

    model = onnx.load(out / "model.onnx", load_external_data=False)
    names = [n.output[0] for n in model.graph.node if n.name.endswith("/moe/router/Reshape")]
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    onnx.save(model, out / "routers.onnx")
    dec = OrtDecoder(out)
    session = ort.InferenceSession(str(out / "routers.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64), **dec.past}
    return [r.astype(np.float32) for r in session.run(names, feeds)]


def reference_routers(model, ids: list[int]) -> list[np.ndarray]:
    with torch.no_grad():
        routers = model(torch.tensor([ids]), output_router_logits=True).router_logits
    return [r.reshape(len(ids), -1).float().numpy() for r in routers]


def selected(router: np.ndarray, k: int) -> list[frozenset]:
    return [frozenset(np.argsort(-row, kind="stable")[:k].tolist()) for row in router]


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "qwen2_moe"])
@pytest.mark.parametrize("ftype", ["Q4_0", "Q8_0", "Q4_K_M"])
def test_float_experts_match_transformers(tmp_path_factory, family, ftype):
    """moe_experts=fp32: MoE nodes (no QMoE) holding gguf-py's dequantization of the experts exactly, the other
    weights carried over as stored, logits within 1e-4 of transformers at every position and the same experts
    routed at every position."""
    model, _, path = quantized_file(tmp_path_factory, family, ftype)
    out = tmp_path_factory.mktemp("float") / "m"
    report = onnxforge.build(path, out, recipe=Recipe(precision="source", accuracy_level=0, moe_experts="fp32"))
    groups = report.to_json()["groups"]
    experts = {g["label"]: g["storage"] for g in groups if "/moe/experts/" in g["label"]}
    assert len(experts) == 4 and all(s.startswith("fp32 (dequantized Q") for s in experts.values()), experts
    assert any("(exact " in g["storage"] for g in groups)  # the rest stays as stored
    for i in range(2):
        ref = gguf_experts(path, i)
        fc1, fc2, node = float_experts(out, i)
        assert fc1.dtype == np.float32
        assert np.array_equal(fc1[:, 0::2], ref["gate"][1]) and np.array_equal(fc1[:, 1::2], ref["up"][1])
        assert np.array_equal(fc2, ref["down"][1])
    assert not any(n.op_type == "QMoE" for n in onnx.load(out / "model.onnx", load_external_data=False).graph.node)
    load_dequantized(model, path)
    prompt, decode = prompt_and_decode()
    ids = prompt + decode
    diff = np.abs(onnx_step_logits(out, prompt, decode) - reference_logits(model, ids)).max()
    assert diff < 1e-4, diff
    k = model.config.num_experts_per_tok
    for got, want in zip(onnx_routers(out, ids), reference_routers(model, ids)):
        assert np.abs(got - want).max() < 1e-4
        assert selected(got, k) == selected(want, k)


def test_near_ties_do_not_flip(tmp_path_factory):
    """Qwen3-MoE Q8_0 has router near ties (k-th and k+1-th logits within 0.01, tests/test_moe_as_stored.py). Both
    builds at accuracy_level 0 (the Q8_0 attention MatMulNBits in fp32 too, else their int8 activations also move
    the routers): as stored (8-bit QMoE, int8 activations at every level) a later router moves by ~2e-3, more than a
    tie, and picks other experts, and the logits at the ties are off by far more than elsewhere; with
    moe_experts=fp32 every router is within 1e-5 of transformers' and picks its experts at every position, near
    ties included, and the logits there match to 1e-4."""
    model, _, path = quantized_file(tmp_path_factory, "qwen3_moe", "Q8_0")
    out = tmp_path_factory.mktemp("ties")
    onnxforge.build(path, out / "q", recipe=Recipe(precision="source", accuracy_level=0))
    onnxforge.build(path, out / "f", recipe=Recipe(precision="source", accuracy_level=0, moe_experts="fp32"))
    load_dequantized(model, path)
    prompt, decode = prompt_and_decode()
    ids = prompt + decode
    tied = near_ties(model, ids)
    assert tied.any(), "no near tie: the test would not show anything"
    ref = reference_logits(model, ids)
    k = model.config.num_experts_per_tok
    want = reference_routers(model, ids)
    flips = 0
    for got, w, q in zip(onnx_routers(out / "f", ids), want, onnx_routers(out / "q", ids)):
        assert np.abs(got - w).max() < 1e-5 and selected(got, k) == selected(w, k)
        flips += sum(a != b for a, b in zip(selected(q, k), selected(w, k)))
    assert flips > 0  # as stored, QMoE's int8 activations move a later router by more than a tie: it routes otherwise
    floats = np.abs(onnx_step_logits(out / "f", prompt, decode) - ref)
    assert floats[tied].max() < 1e-4, floats[tied].max()
    qmoe = np.abs(onnx_step_logits(out / "q", prompt, decode) - ref).max(axis=-1)
    # the QMoE build's error where a router is nearly tied is far above its error elsewhere (the tie flipped)
    assert qmoe[tied].max() > 5 * qmoe[~tied].max(), (qmoe[tied], qmoe[~tied].max())


def test_fp16_experts(tmp_path_factory):
    """moe_experts=fp16 on a CPU (fp32) build: fp16 MoE initializers (gguf-py's values rounded to fp16: Q8_0's
    d x q need not be an fp16 value), the activations cast to fp16 around the op and back; logits close to
    transformers (fp16 rounding, not int8 activations; accuracy_level 0 for the attention's Q8_0 MatMulNBits),
    half the fp32 experts' bytes."""
    model, _, path = quantized_file(tmp_path_factory, "mixtral", "Q8_0")
    out = tmp_path_factory.mktemp("fp16")
    r16 = onnxforge.build(path, out / "h", recipe=Recipe(precision="source", accuracy_level=0, moe_experts="fp16"))
    r32 = onnxforge.build(path, out / "f", recipe=Recipe(precision="source", moe_experts="fp32"))
    size = lambda r: sum(g["bytes"] for g in r.to_json()["groups"] if "/moe/experts/" in g["label"])  # noqa: E731
    assert size(r16) * 2 == size(r32)
    fc1, fc2, node = float_experts(out / "h", 0)
    ref = gguf_experts(path, 0)
    assert fc1.dtype == np.float16 and np.array_equal(fc2, ref["down"][1].astype(np.float16))
    graph = onnx.load(out / "h" / "model.onnx", load_external_data=False).graph
    assert sum(n.op_type == "Cast" and "/moe/MoE/" in n.name for n in graph.node) == 3 * 2  # x, router, y per layer
    load_dequantized(model, path)
    prompt, decode = prompt_and_decode()
    ref_logits = reference_logits(model, prompt + decode)
    diff = np.abs(onnx_step_logits(out / "h", prompt, decode) - ref_logits).max()
    assert diff < 2e-3 * np.abs(ref_logits).max(), diff  # measured 3.3e-4 of 2.0 (int8 activations: ~1e-2)


def test_option_spellings_and_refusals(tmp_path_factory, tmp_path):
    """The CLI spelling (--extra_options moe_experts=fp32) and the TOML key give the same build; a value QMoE or
    the MoE op cannot take, moe_quant_type beside it, a rule quantizing the experts and a model without experts are
    one error each, before any weight is read (an option is never accepted and ignored)."""
    _, _, path = quantized_file(tmp_path_factory, "mixtral", "Q4_0")
    run = subprocess.run([sys.executable, "-m", "onnxforge", "build", "-m", str(path), "-o", str(tmp_path / "cli"),
                          "--quiet", "--extra_options", "moe_experts=fp32"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    graph = onnx.load(tmp_path / "cli" / "model.onnx", load_external_data=False).graph
    assert {n.op_type for n in graph.node} >= {"MoE"} and not any(n.op_type == "QMoE" for n in graph.node)
    base = Recipe(precision="source")
    assert recipe_from_mapping({"moe_experts": "fp16"}, base).moe_experts == "fp16"
    assert apply_extra_options(base, {"moe_experts": "fp32"}).moe_experts == "fp32"
    with pytest.raises(RecipeError, match="moe_experts takes a string"):
        recipe_from_mapping({"moe_experts": 32}, base, 'moe_experts = 32\n', "r.toml")
    for bad, message in (({"moe_experts": "bf16"}, "choose fp32"), ({"moe_experts": "float"}, "choose fp32"),
                         ({"moe_experts": "fp32", "moe_quant_type": "int4"}, "drop one of them")):
        with pytest.raises(RecipeError, match=message):
            apply_extra_options(base, bad)
    run = subprocess.run([sys.executable, "-m", "onnxforge", "build", "-m", str(path), "-o", str(tmp_path / "bad"),
                          "--extra_options", "moe_experts=bf16"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and run.stderr.startswith("onnxforge: error: moe_experts='bf16'"), run.stderr
    assert "Traceback" not in run.stderr and not (tmp_path / "bad").exists()
    rule = recipe_from_mapping({"moe_experts": "fp32", "rules": [{"match": "/model/layers.*/moe/experts/*",
                                                                  "bits": 8}]}, base)
    with pytest.raises(RecipeError, match="quantizes the experts, but moe_experts=fp32"):
        onnxforge.build(path, tmp_path / "rule", recipe=rule)
    assert not (tmp_path / "rule").exists()


def test_refused_without_experts(tiny_models, tmp_path):
    folder, _ = tiny_models("llama")
    with pytest.raises(RecipeError, match="this model has no experts"):
        onnxforge.build(folder, tmp_path / "m", recipe=Recipe(precision="fp32", moe_experts="fp32"))
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "ernie4_5_moe", "phimoe"])
def test_fp16_experts_every_routing(tiny_models, tmp_path, name):
    """fp16 experts in an fp32 build through each routing variant of graph/moe.py (softmax top-k, not renormalised
    (Qwen2-MoE), a selection bias (ERNIE: the masked router cast to fp16), PhiMoE's sparse mixer (two passes)): the
    casts put every MoE op in fp16, and the logits stay near transformers' (fp16 experts and activations); -p int4
    with moe_experts=fp32 keeps the experts float and stores everything else as -p int4 alone does."""
    from moe_check import FAMILIES

    folder, model = tiny_models(name, **FAMILIES[name])
    onnxforge.build(folder, tmp_path / "h", recipe=Recipe(precision="fp32", moe_experts="fp16"))
    graph = onnx.load(tmp_path / "h" / "model.onnx", load_external_data=False).graph
    inits = {t.name: t.data_type for t in graph.initializer}
    moes = [n for n in graph.node if n.op_type == "MoE"]
    assert moes and all(inits[n.input[2]] == onnx.TensorProto.FLOAT16 for n in moes)
    prompt, decode = prompt_and_decode()
    ref = reference_logits(model, prompt + decode)
    diff = np.abs(onnx_step_logits(tmp_path / "h", prompt, decode) - ref).max()
    assert diff < 5e-3 * np.abs(ref).max(), diff
    storage = lambda r: {g["label"]: g["storage"] for g in r.to_json()["groups"]}  # noqa: E731
    floats = storage(onnxforge.build(folder, tmp_path / "f", recipe=Recipe(precision="int4", moe_experts="fp32")))
    qmoe = storage(onnxforge.build(folder, tmp_path / "q", recipe=Recipe(precision="int4")))
    experts = {k for k in qmoe if "/moe/experts/" in k}
    assert all(qmoe[k].endswith("(QMoE)") and floats[k] == "fp32" for k in experts), floats
    assert {k: v for k, v in floats.items() if k not in experts} == {k: v for k, v in qmoe.items() if k not in experts}


def test_verify_reads_cast_experts_back(tmp_path, capsys):
    """`verify --reference` on a moe_experts=fp16 build of an fp32 model (fp16 MoE op between Casts): the experts
    are read back from the MoE initializers (fp16 rounding only) and the conversion verdict passes."""
    import json

    from moe_check import FAMILIES
    from test_verify_two_refs import _last, _run
    from tiny import make_model

    make_model("mixtral", tmp_path / "hf", seed=0, **FAMILIES["mixtral"])
    onnxforge.build(tmp_path / "hf", tmp_path / "m", recipe=Recipe(precision="fp32", moe_experts="fp16"))
    code, out, _ = _run(capsys, tmp_path / "m", "--reference", tmp_path / "hf")
    assert code == 0 and _last(out).startswith("PASS"), out
    report = json.loads((tmp_path / "m" / "verify.json").read_text())
    errors = {k: v for k, v in report["conversion"]["weight_errors"].items() if ".experts." in k}
    assert len(errors) == 2 * 2 * 4 and 0 < max(errors.values()) < 1e-3, errors
