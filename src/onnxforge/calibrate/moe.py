"""Mixture-of-experts layers in the calibrated forward (calibrate/run.py `Layerwise.moe`), in the routing forms
graph/moe.py builds with the plain softmax router: softmax over the router's logits, the top k, renormalised or
not (``MoESpec.normalize``: Mixtral, Qwen3-MoE, Qwen2-MoE, Granite-MoE; OLMoE's too, though forward.py refuses its
whole-projection q/k norms), with or without a dense shared expert and its sigmoid gate (Qwen2-MoE); experts one
module each or stacked (`layer_experts`). Other routing forms are refused by
name (`unsupported`): use a calibration-free method for those.

Per MoE layer, on the normed hidden states ``h`` (T, H) of all calibration tokens:

1. the router computes as the build stores it (float, or whatever a user rule makes it: `Layerwise.group`), then
   softmax, the top k (ties to the lower expert index) and the mixing weights, as transformers and the QMoE op do;
2. each expert is calibrated on exactly the tokens routed to it: gate and up get their GPTQ Hessian from those
   tokens' rows of ``h``, down from their intermediate computed with the quantized gate and up (the sequential
   form); the layer's output mixes the quantized experts' outputs with the routing weights, so the next layer
   sees the experts' quantization error;
3. an expert that fewer than `MIN_EXPERT_TOKENS` calibration tokens reach (none, often, with many experts and a
   small calibration set) is rounded to nearest (run.py's FALLBACK) as a whole, and the build's notes and
   build_report.json (recipe.calibration.experts) say how many experts per layer were calibrated and which fell
   back with how many tokens;
4. the shared expert is a dense MLP over all tokens, calibrated as one (its gate on the sigmoid gate's input).

AWQ: the norm before the experts is read by the router, every expert and the shared expert alike, so per-expert
scales for gate / up cannot be folded into it; no scales are folded into that norm. Each expert's down_proj (and
the shared expert's) gets its own AWQ scales, searched on that expert's tokens and folded into that expert's up
rows (as the dense MLP's); gate and up are rounded by GPTQ (awq+gptq) or to nearest (awq).

The experts are quantized in the QMoE blocks the build will store them in (graph/moe.py `expert_storages`: the
block adapts to the experts' sizes), saved as calibrated blocks, and the QMoE packer carries them over as made
(graph/moe.py `as_stored`, "(calibrated, QMoE)" in the report). Memory: ``h`` and one expert's tokens (at most T
rows) and intermediate, one expert's weights and one Hessian at a time.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from ..archs.names import Part
from ..errors import RecipeError
from ..quant.pack import dequantize

MIN_EXPERT_TOKENS = 16  # an expert that fewer calibration tokens reach is rounded to nearest (FALLBACK)
CALIBRATED = ("gptq", "awq", "awq+gptq")
FIX = "use method k_quant or hqq (calibration-free) for it"


def unsupported(spec) -> str | None:
    """Why the calibrated forward cannot route this model's experts (None: it can)."""
    m = spec.moe
    if m is None:
        return None
    if m.mixer == "sparsemixer":
        return "PhiMoE's sparse-mixer expert routing"
    if m.mixer == "sigmoid_input":
        return "Llama 4's expert routing (sigmoid-scaled expert input)"
    if m.mixer != "softmax":
        return f"expert routing of kind {m.mixer!r} (Gemma 4's scaled router)"
    if m.scoring != "softmax" or m.groups != (1, 1):
        return "sigmoid-scored or group-limited expert routing (DeepSeek-V3, GLM-4 MoE, LFM2-MoE)"
    if m.selection_bias:
        return "expert selection on softmax plus a bias (ERNIE 4.5's e_score_correction_bias)"
    if m.expert_bias or (m.swiglu_alpha, m.swiglu_beta, m.swiglu_limit) != (1.0, 0.0, None) or m.layout != "rows":
        return "GPT-OSS / Llama 4 style experts (biases, clamped SwiGLU or transposed stacked tensors)"
    if spec.mlp.activation not in ("silu", "swish"):
        return f"experts with activation {spec.mlp.activation}"
    return None


def _emitter_like(run):
    return SimpleNamespace(spec=run.spec, source=run.source, names=run.names)


def layer_experts(run, i: int):
    """(ExpertTensors as the build finds them (graph/experts.py), then expert e's gate, up and down weight names:
    a module per expert's tensors, or expert_slice names of stacked tensors (transformers 5's gate_up_proj /
    down_proj, Granite-MoE's input_linear / output_linear: gate rows then up rows; llama.cpp's ffn_*_exps stacked
    apart), which `SlicedSource` reads and the build's experts carry over by)."""
    from ..graph.experts import expert_slice, find_experts

    t = find_experts(_emitter_like(run), i)
    E = run.spec.moe.num_experts
    first = run.names.module("expert_gate", i, e=0, required=False)
    if first is not None and t.fc1_sources[0] == f"{first}.weight" and len(t.fc1_sources) == 2 * E:
        return t, t.fc1_sources[:E], t.fc1_sources[E:], t.fc2_sources
    if t.mxfp4 is None and len(t.fc2_sources) == 1 and len(t.fc1_sources) in (1, 2):
        down = [expert_slice(t.fc2_sources[0], e) for e in range(E)]
        if len(t.fc1_sources) == 1:  # gate rows, then up rows
            return (t, [expert_slice(t.fc1_sources[0], e, "gate") for e in range(E)],
                    [expert_slice(t.fc1_sources[0], e, "up") for e in range(E)], down)
        return t, *([expert_slice(n, e) for e in range(E)] for n in t.fc1_sources), down
    raise RecipeError(f"calibrated methods cannot read layer {i}'s experts ({', '.join(t.fc1_sources[:2])}): {FIX}")


class SlicedSource:
    """The source, with graph/experts.py expert_slice names read as one expert's slice of a stacked tensor."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def read(self, name: str):
        from ..graph.experts import read_expert_slice

        return read_expert_slice(self._inner, name) if "#" in name else self._inner.read(name)


def prepare_experts(run) -> None:
    """Every MoE layer's experts in a form calibration reads, and blocks QMoE takes (before any weight is read);
    stacked experts read by their slices."""
    from ..graph.moe import expert_storages

    for i, layer in enumerate(run.spec.layers):
        if layer.moe:
            t, *_ = layer_experts(run, i)
            st1, st2, *_ = expert_storages(run.recipe, run.spec, i, t)
            if any(st.quantized and st.method in CALIBRATED and not st.block_size for st in (st1, st2)):
                raise RecipeError("calibrated experts are quantized in QMoE blocks; qmoe_block_size 0 (per-channel "
                                  "scales, or the default where no block divides the experts' sizes) has none: set "
                                  f"qmoe_block_size=16 or 32 where it divides them, or {FIX}")
    sliced(run)


def sliced(run) -> None:
    if not isinstance(run.source, SlicedSource):
        run.source = SlicedSource(run.source)


def route(logits: np.ndarray, top_k: int, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """(experts (T, k), mixing weights (T, k)): softmax, the top k (ties to the lower index), renormalised or not."""
    z = logits - logits.max(axis=-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=-1, keepdims=True)
    idx = np.argsort(-p, axis=-1, kind="stable")[:, :top_k]
    w = np.take_along_axis(p, idx, axis=-1)
    if normalize:
        w = w / w.sum(axis=-1, keepdims=True)
    return idx, w.astype(np.float32)


def moe_layer(run, i: int, x: np.ndarray) -> np.ndarray:
    """The MoE MLP's output for the layer input x (T, H), its experts (and shared expert) quantized on the way."""
    spec, names, m = run.spec, run.names, run.spec.moe
    from ..graph.moe import expert_storages

    sliced(run)
    _, nw, nb = run.norm_params("ffn_norm", i)
    h = F.norm(x, nw, nb, spec)
    del x
    base = f"/model/layers.{i}/moe"
    (router,) = names.linear(["router"], [m.num_experts], i)
    (wr,) = run.group(h, [(router.name, run.recipe.storage([f"{base}/router/MatMul", router.module], "Router"))])
    logits = h @ wr.T
    if m.router_bias:
        logits += run.bias(router.module)
    idx, weights = route(logits, m.top_k, m.normalize)
    del logits
    t, gates, ups, downs = layer_experts(run, i)
    st1, st2, *_ = expert_storages(run.recipe, spec, i, t)
    E = m.num_experts
    calibrates = any(st.quantized and st.method in CALIBRATED for st in (st1, st2))
    out = np.zeros_like(h)
    counts = np.bincount(idx.reshape(-1), minlength=E)
    fallback = {}
    for e in range(E):
        tok, slot = np.nonzero(idx == e)
        gate, up, down = Part(gates[e]), Part(ups[e]), Part(downs[e])
        if calibrates and tok.size >= MIN_EXPERT_TOKENS:
            hs = h[tok]
            if st2.quantized and st2.method in ("awq", "awq+gptq"):
                run._awq_down(hs, [gate, up], down, st2, None)
            wg, wu = run.group(hs, [(gate.name, st1), (up.name, st1)])
            inter = run._intermediate(hs, [wg, wu], [None, None])
            (wd,) = run.group(inter, [(down.name, st2)])
        else:
            if calibrates:
                fallback[e] = int(tok.size)
            wg, wu, wd = (_uncalibrated(run, p.name, st) for p, st in ((gate, st1), (up, st1), (down, st2)))
            if not tok.size:
                continue
            inter = run._intermediate(h[tok], [wg, wu], [None, None])
        out[tok] += weights[tok, slot][:, None] * (inter @ wd.T)
        del inter
    if calibrates:
        run.res.experts.append({"layer": i, "experts": E, "calibrated": E - len(fallback),
                                "fallback": {str(e): n for e, n in fallback.items()},
                                "tokens": {"min": int(counts.min()), "max": int(counts.max())}})
    if m.shared_intermediate_size:
        out += shared_expert(run, i, h)
    return out


def _uncalibrated(run, name: str, st) -> np.ndarray:
    """An expert projection no calibration reaches: the calibrated methods' FALLBACK (saved as its blocks, so the
    layer's experts reach the QMoE op alike), another method as the packer quantizes it, or float."""
    from ..quant.methods import quantize
    from .run import FALLBACK

    w = run.read(name)
    if not st.quantized or st.method == "source":
        return w
    method = FALLBACK if st.method in CALIBRATED else st.method
    q = quantize(w, bits=st.bits, block_size=st.block_size, symmetric=st.symmetric, method=method)
    if st.method in CALIBRATED:
        run._save(name, q, st)
        run.res.fallback.add(name)
    return dequantize(q)


def shared_expert(run, i: int, h: np.ndarray) -> np.ndarray:
    """The dense shared expert on all tokens (graph/parts.py dense_mlp with the shared roles), calibrated like the
    dense MLP except that no AWQ scales go into the norm (the router and experts read it too); its sigmoid gate."""
    spec, names, m = run.spec, run.names, run.spec.moe
    node = f"/model/layers.{i}/shared_expert"
    size = m.shared_intermediate_size
    gated = spec.mlp.gated
    roles = ["shared_gate", "shared_up"] if gated else ["shared_up"]
    parts = names.linear(roles, [size] * len(roles), i)
    run._no_rows(parts)
    projs = [(p.name, run.storage([f"{node}/gate_up_proj/MatMul", f"{node}/{r.split('_')[1]}_proj/MatMul", p.module]))
             for r, p in zip(roles, parts)]
    down = names.linear(["shared_down"], [spec.hidden_size], i)[0]
    down_st = run.storage([f"{node}/down_proj/MatMul"] * 2 + [down.module])
    if gated and down_st.quantized and down_st.method in ("awq", "awq+gptq"):
        run._awq_down(h, parts, down, down_st, None)
    ws = run.group(h, projs)
    biases = [run.bias(p.module) if spec.mlp.bias else None for p in parts]
    inter = run._intermediate(h, ws, biases)
    (wd,) = run.group(inter, [(down.name, down_st)])
    s = inter @ wd.T
    del inter
    if spec.mlp.bias:
        s += run.bias(down.module)
    if m.shared_gate:
        (g,) = names.linear(["shared_expert_gate"], [1], i)
        (wg,) = run.group(h, [(g.name, run.recipe.storage([f"{node}_gate/MatMul", g.module], "Router"))])
        s *= 1 / (1 + np.exp(-(h @ wg.T)))
    return s


from . import forward as F  # noqa: E402  (forward.py's check_supported imports this module)
