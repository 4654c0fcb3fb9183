"""Calibrated int4 for mixture-of-experts decoders (calibrate/moe.py): the numpy MoE layer against transformers
layer by layer, each expert's calibration inputs against the tokens transformers itself routes to it (forward hooks),
the calibrated expert blocks reaching the QMoE op exactly, the calibrated builds' error against transformers below
round to nearest's (onnxruntime and onnxruntime-genai), an expert no calibration token reaches (round to nearest,
in the notes and build_report.json), and the routing forms refused by name."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import tiny
from conftest import genai_greedy, onnx_step_logits
from moe_check import FAMILIES, experts_module, qmoe_nodes

import onnxforge
from onnxforge.calibrate.data import Calibration
from onnxforge.errors import RecipeError
from onnxforge.quant.recipe import Recipe

torch = pytest.importorskip("torch")

# softmax top-k renormalised / not, with a shared expert; Granite-MoE: top k of the logits then softmax (the same),
# its experts stacked (input_linear / output_linear), its multipliers
CALIBRATED = ("mixtral", "qwen3_moe", "qwen2_moe", "granitemoe")


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    cache = {}

    def get(name: str):
        if name not in cache:
            folder = tmp_path_factory.mktemp(f"calmoe_{name}")
            model = tiny.make_model(name, folder, **FAMILIES[name])
            text = folder.parent / f"calibration_{name}.txt"
            text.write_text(tiny.TEXT * 4)
            cache[name] = folder, model, text
        return cache[name]

    return get


def _layerwise(folder, recipe, text, samples=4, length=32):
    """test_calibration's Layerwise on `folder`: (spec, run, calibration ids)."""
    from test_calibration import _layerwise as layerwise

    _, spec, _, run, cal = layerwise(folder, recipe, text, samples, length)
    return spec, run, cal


def _ids(folder, n=96):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json")).encode(tiny.TEXT, add_special_tokens=False).ids[:n]


@pytest.mark.parametrize("name", CALIBRATED)
def test_moe_forward_matches_transformers_layer_by_layer(moe_models, name):
    """The numpy MoE layer (router, top k, experts, shared expert and its gate) = transformers' hidden states."""
    from onnxforge.calibrate import forward as F

    folder, model, text = moe_models(name)
    spec, run, cal = _layerwise(folder, Recipe(precision="fp32"), text)
    with torch.no_grad():
        hs = model(torch.tensor(cal.ids), output_hidden_states=True).hidden_states
    x = run.embed()
    assert any(layer.moe for layer in spec.layers)
    for i in range(spec.num_layers):
        x = run.layer(i, x)
        got = F.norm(x, *run.norm_params("final_norm", None)[1:], spec) if i == spec.num_layers - 1 else x
        np.testing.assert_allclose(got, hs[i + 1].reshape(-1, spec.hidden_size).numpy(), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_expert_inputs_are_the_tokens_transformers_routes(moe_models, name):
    """Independent reference: the rows transformers' own router sends to each expert of layer 0 (a forward pre-hook
    on its experts module: hidden states and top-k indices) are exactly the rows our gate/up GPTQ Hessian of that
    expert is made from (attention kept float, so layer 0's input is transformers')."""
    from onnxforge.calibrate.moe import MIN_EXPERT_TOKENS

    folder, model, text = moe_models(name)
    recipe = Recipe(precision="int4", method="gptq", keep_float=("/model/layers.*/attn/*",))
    spec, run, cal = _layerwise(folder, recipe, text, samples=8)
    seen = []
    hook = experts_module(model, 0).register_forward_pre_hook(
        lambda mod, args: seen.append([a.detach().numpy().copy() for a in args[:2]]))  # returns None: args kept
    with torch.no_grad():
        model(torch.tensor(cal.ids))
    hook.remove()
    h_ref, top = seen[0]
    got = {}
    group = run.group

    def recording(x, projs, fold=None):
        got[projs[0][0]] = x.copy()
        return group(x, projs, fold)

    run.group = recording
    run.layer(0, run.embed())
    from onnxforge.calibrate.moe import layer_experts

    _, gates, _, _ = layer_experts(run, 0)
    E = spec.moe.num_experts
    calibrated = 0
    for e in range(E):
        tokens = np.nonzero((top == e).any(axis=1))[0]
        gate = gates[e]
        if tokens.size < MIN_EXPERT_TOKENS:
            assert gate not in got  # rounded to nearest: no Hessian
            continue
        calibrated += 1
        want = h_ref[tokens]
        x = got[gate]
        assert x.shape == want.shape, (e, x.shape, want.shape)  # the same tokens, in token order
        np.testing.assert_allclose(x, want, atol=2e-5, rtol=1e-5)
        np.testing.assert_allclose(x.T @ x, want.T @ want, atol=1e-3, rtol=1e-4)  # the Hessian GPTQ gets
    assert calibrated >= E // 2


def _build(folder, out, method, text, cal=(8, 32), **kw):
    return onnxforge.build(folder, out, recipe=Recipe(precision="int4", method=method, accuracy_level=0, **kw),
                           calibration=Calibration(str(text), *cal) if method != "rtn" else None)


@pytest.mark.parametrize("name", CALIBRATED)
def test_calibrated_moe_build_beats_round_to_nearest(moe_models, tmp_path, name):
    """On the calibration distribution, the gptq and awq+gptq builds are closer to transformers fp32 than round to
    nearest (same size); the experts reach QMoE as calibrated; the builds run in onnxruntime-genai."""
    folder, model, text = moe_models(name)
    ids = _ids(folder)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    err, sizes = {}, {}
    for method in ("rtn", "gptq", "awq+gptq"):
        out = tmp_path / method.replace("+", "_")
        _build(folder, out, method, text)
        err[method] = float(np.square(onnx_step_logits(out, ids, []) - ref).mean())
        sizes[method] = (out / "model.onnx.data").stat().st_size
        if method == "rtn":
            continue
        saved = json.loads((out / "build_report.json").read_text())
        experts = [g["storage"] for g in saved["groups"] if "QMoE" in g["storage"]]
        assert experts and all(s.endswith("(calibrated, QMoE)") and f"int4 {method} sym" in s for s in experts), experts
        per_layer = saved["recipe"]["calibration"]["experts"]
        moe_layers = [i for i, layer in enumerate(model.model.layers)
                      if hasattr(getattr(layer, "mlp", None), "experts") or hasattr(layer, "block_sparse_moe")]
        assert [d["layer"] for d in per_layer] == moe_layers
        assert all(d["calibrated"] + len(d["fallback"]) == d["experts"] for d in per_layer)
        assert any("MoE experts calibrated on the tokens routed to them: layer" in n for n in saved["notes"])
        assert len(genai_greedy(out, ids[:12], 8)) == 8
    print(name, err)
    assert err["gptq"] < err["rtn"] and err["awq+gptq"] < err["rtn"], err
    assert len(set(sizes.values())) == 1


def test_calibrated_blocks_reach_qmoe_exactly(moe_models, tmp_path):
    """The QMoE op's fc1 (gate / up rows interleaved) and fc2 arrays are the blocks calibration made, code for code
    and scale for scale (carried over, not re-quantized)."""
    from onnxforge.calibrate.run import CalibratedSource, calibrate
    from onnxforge.graph.experts import interleave
    from onnxforge.sources.open import open_source

    folder, _, text = moe_models("qwen3_moe")
    recipe = Recipe(precision="int4", method="gptq", accuracy_level=0)
    spec, run, _ = _layerwise(folder, recipe, text)
    res = calibrate(run.source, spec, run.names, recipe.bind(spec), Calibration(str(text), 8, 32))
    try:
        onnxforge.build(CalibratedSource(open_source(folder), res), tmp_path / "o", recipe=recipe)
        nodes = qmoe_nodes(tmp_path / "o")
        assert [n["layer"] for n in nodes] == [d["layer"] for d in res.experts]
        E = spec.moe.num_experts
        for node in nodes:
            i = node["layer"]
            for e in range(E):
                blocks = {}
                for role in ("gate_proj", "up_proj", "down_proj"):
                    path, st = res.blocks[f"model.layers.{i}.mlp.experts.{e}.{role}.weight"]
                    with np.load(path) as z:
                        blocks[role] = (z["data"].reshape(z["data"].shape[0], -1), z["scales"])
                data, scales, _ = node["fc1"]
                np.testing.assert_array_equal(data[e], interleave(blocks["gate_proj"][0], blocks["up_proj"][0]))
                np.testing.assert_array_equal(scales[e], interleave(blocks["gate_proj"][1], blocks["up_proj"][1]))
                np.testing.assert_array_equal(node["fc2"][0][e], blocks["down_proj"][0])
                np.testing.assert_array_equal(node["fc2"][1][e], blocks["down_proj"][1])
    finally:
        import shutil

        shutil.rmtree(res.folder, ignore_errors=True)


def test_expert_no_calibration_token_reaches_is_rounded_to_nearest(tmp_path):
    """A router that never picks layer 0's expert 3 (every token's hidden state has a large channel 0, and the
    router's row 3 weighs it by -20): that expert is stored round to nearest, the others calibrated, and the notes and
    build_report.json say so; the build still runs."""
    from onnxforge.quant.qmoe import qmoe_arrays, quantize_expert

    folder = tmp_path / "m"
    model = tiny.make_model("mixtral", folder, **FAMILIES["mixtral"])
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] += 5.0
        router = model.model.layers[0].mlp.gate
        router.weight[3] = 0
        router.weight[3, 0] = -20.0
    model.save_pretrained(folder, safe_serialization=True)
    text = tmp_path / "cal.txt"
    text.write_text(tiny.TEXT * 4)
    ids = _ids(folder)
    seen = []
    hook = experts_module(model, 0).register_forward_pre_hook(lambda mod, args: seen.append(args[1].numpy().copy()))
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    hook.remove()
    assert not (seen[0] == 3).any()  # transformers never routes a token to it
    out = tmp_path / "o"
    _build(folder, out, "gptq", text)
    saved = json.loads((out / "build_report.json").read_text())
    layer0 = saved["recipe"]["calibration"]["experts"][0]
    assert layer0["layer"] == 0 and layer0["fallback"]["3"] == 0 and layer0["calibrated"] >= 2, layer0
    assert layer0["calibrated"] + len(layer0["fallback"]) == 4
    assert any(f"layer 0 {layer0['calibrated']}/4" in n and "rounded to nearest (rtn): layer 0: " in n
               and "expert 3 (0 tokens)" in n for n in saved["notes"]), saved["notes"]
    node = qmoe_nodes(out)[0]
    w = model.model.layers[0].mlp.experts.down_proj[3].detach().numpy()  # expert 3's down: rtn of its float weight
    codes, scales, _ = qmoe_arrays(quantize_expert(w, bits=4, block_size=node["block"], symmetric=True, method="rtn"),
                                   per_channel=False)
    np.testing.assert_array_equal(node["fc2"][0][3], codes)
    np.testing.assert_allclose(node["fc2"][1][3], scales)
    got = onnx_step_logits(out, ids, [])
    assert np.isfinite(got).all() and np.square(got - ref).mean() < np.square(ref).mean()


@pytest.mark.parametrize("change,words", [
    (dict(mixer="sparsemixer"), "PhiMoE's sparse-mixer"),
    (dict(selection_bias=True), "ERNIE 4.5's e_score_correction_bias"),
    (dict(scoring="sigmoid"), "sigmoid-scored or group-limited"),
    (dict(groups=(4, 2)), "sigmoid-scored or group-limited"),
    (dict(mixer="sigmoid_input", top_k=1), "Llama 4's expert routing"),
    (dict(swiglu_limit=7.0, expert_bias=True), "GPT-OSS"),
])
def test_unimplemented_routing_refused_by_name(moe_models, change, words):
    from onnxforge.archs.registry import architecture_for
    from onnxforge.calibrate.forward import check_supported
    from onnxforge.sources.open import open_source

    folder, _, _ = moe_models("mixtral")
    config = open_source(folder).config
    spec = architecture_for(config).make_spec(config)
    check_supported(spec, "gptq")  # Mixtral's softmax top-k is calibrated
    other = dataclasses.replace(spec, moe=dataclasses.replace(spec.moe, **change))
    with pytest.raises(RecipeError, match=f"{words}.*use method k_quant or hqq"):
        check_supported(other, "gptq")


def test_per_channel_expert_blocks_refused(moe_models, tmp_path):
    """Per-channel QMoE scales have no blocks to calibrate in: one error naming the option, before any output."""
    folder, _, text = moe_models("qwen3_moe")
    with pytest.raises(RecipeError, match="qmoe_block_size 0.*k_quant or hqq"):
        _build(folder, tmp_path / "b", "gptq", text, qmoe_block_size=0)
    assert not (tmp_path / "b").exists()


def _restacked(folder, out, form: str):
    """The tiny Qwen3-MoE checkpoint with its per-expert modules stacked: "fused" (transformers 5's
    mlp.experts.gate_up_proj (E, 2I, H), gate rows then up rows, and down_proj (E, H, I)) or "apart" (gate_proj,
    up_proj and down_proj stacked one each, llama.cpp's layout under Hugging Face names)."""
    import re
    import shutil

    from safetensors.numpy import load_file, save_file

    shutil.copytree(folder, out)
    tensors = load_file(str(folder / "model.safetensors"))
    per = {}
    for name in list(tensors):
        m = re.fullmatch(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(\w+)\.weight", name)
        if m:
            per.setdefault((m[1], m[3]), {})[int(m[2])] = tensors.pop(name)
    for (prefix, role), by_e in list(per.items()):
        per[(prefix, role)] = np.stack([by_e[e] for e in sorted(by_e)])
    for prefix in {p for p, _ in per}:
        gate, up, down = (per[(prefix, r)] for r in ("gate_proj", "up_proj", "down_proj"))
        if form == "fused":
            tensors[f"{prefix}.gate_up_proj"] = np.concatenate([gate, up], axis=1)
        else:
            tensors[f"{prefix}.gate_proj"], tensors[f"{prefix}.up_proj"] = gate, up
        tensors[f"{prefix}.down_proj"] = down
    (out / "model.safetensors").unlink()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("form", ["fused", "apart"])
def test_stacked_experts_calibrate_as_per_expert_modules(moe_models, tmp_path, form):
    """Experts stacked in one tensor per projection are calibrated by their per-expert slices: the QMoE arrays equal
    the per-expert-module checkpoint's, code for code (the same calibration, the same weights)."""
    folder, _, text = moe_models("qwen3_moe")
    stacked = _restacked(folder, tmp_path / "stacked", form)
    _build(folder, tmp_path / "modules", "gptq", text)
    report = _build(stacked, tmp_path / "o", "gptq", text)
    saved = json.loads((tmp_path / "o" / "build_report.json").read_text())
    assert not saved["unread_tensors"]
    assert all(g["storage"].endswith("(calibrated, QMoE)") for g in saved["groups"] if "QMoE" in g["storage"])
    assert "MoE experts calibrated" in report.summary()
    for a, b in zip(qmoe_nodes(tmp_path / "modules"), qmoe_nodes(tmp_path / "o")):
        for fc in ("fc1", "fc2"):
            for x, y in zip(a[fc], b[fc]):
                assert (x is None) == (y is None) and (x is None or np.array_equal(x, y))


def test_calibrated_experts_padded_as_for_cuda(moe_models, tmp_path, monkeypatch):
    """CUDA's QMoE pads the experts' intermediate size to a multiple of 64 (graph/moe.py PAD_EXPERTS_FOR, run here on
    the CPU): the calibrated blocks go in unchanged with zero padding (Qwen3-MoE's 32 -> 64, the same block 32, so the
    same calibration), and the logits equal the unpadded build's."""
    import onnxforge.graph.moe as moe_graph

    folder, _, text = moe_models("qwen3_moe")
    ids = _ids(folder, 48)
    _build(folder, tmp_path / "plain", "gptq", text)
    monkeypatch.setattr(moe_graph, "PAD_EXPERTS_FOR", ("cpu",))
    _build(folder, tmp_path / "padded", "gptq", text)
    for a, b in zip(qmoe_nodes(tmp_path / "plain"), qmoe_nodes(tmp_path / "padded")):
        (d1, s1, _), (d2, s2, _) = b["fc1"], b["fc2"]
        assert d1.shape[1] == 128 and d2.shape[2] == 32  # 2 x 64 rows; 64 int4 columns
        np.testing.assert_array_equal(d1[:, :64], a["fc1"][0])  # the 2I = 64 interleaved rows, then zero rows
        np.testing.assert_array_equal(s1[:, :64], a["fc1"][1])
        assert not d1[:, 64:].any() and not s1[:, 64:].any()
        np.testing.assert_array_equal(d2[:, :, :16], a["fc2"][0])  # I = 32 columns (16 bytes), then zero columns
        np.testing.assert_array_equal(s2[:, :, :1], a["fc2"][1])
        assert not d2[:, :, 16:].any() and not s2[:, :, 1:].any()
    np.testing.assert_allclose(onnx_step_logits(tmp_path / "padded", ids, []),
                               onnx_step_logits(tmp_path / "plain", ids, []), atol=1e-5)
