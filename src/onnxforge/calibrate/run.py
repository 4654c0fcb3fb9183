"""Calibrated quantization, layer by layer in bounded memory (the sequential form).

The calibration tokens go through the decoder one layer at a time: the layer's input hidden states for all
tokens are the only activations held (samples x length x hidden, float32). In each layer, for each group of
projections that read one input (q/k/v; o; gate/up; down):

1. AWQ (methods awq, awq+gptq): per-input-channel scales searched on the group's input (``quant/awq.py``),
   folded into the norm before it (q/k/v, gate/up) or into up_proj's rows (down_proj of a gated MLP); o_proj
   and a plain MLP's second projection get no AWQ scales (their input has no foldable producer here);
2. GPTQ (methods gptq, awq+gptq): the group's Hessian ``X^T X`` (K x K float32, K the group's input width)
   and ``quant/gptq.py``; awq alone rounds to nearest after the scaling;
3. the quantized projections compute the next group's input, so later layers see the earlier layers'
   quantization error.

Mixture-of-experts layers (calibrate/moe.py): the router as the build computes it (softmax, top k), each expert's
gate/up/down from exactly the tokens routed to it, an expert too few tokens reach rounded to nearest (FALLBACK);
the experts' blocks reach the QMoE op as made.

The quantized blocks go to a temporary folder (one .npz per weight, read back when the build writes that
weight); scaled float weights and norms are served by `CalibratedSource` to the build. Memory: the layer's
activations (a few copies of tokens x hidden, and one token-chunk of the MLP's intermediate), one layer's
weights, and one Hessian with its inverse factor: for a 70B shape (hidden 8192, intermediate 28672) the
largest is down_proj's 28672^2 float32 = 3.1 GiB, about three of them while it is inverted.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import RecipeError
from ..quant.awq import awq_search
from ..quant.gptq import gptq_quantize, input_factor
from ..quant.pack import dequantize
from ..quant.storage import Storage
from ..sources.base import NativeBlocks, NativeFormat
from . import forward as F
from .data import Calibration, CalibrationText, calibration_ids

CALIBRATED = ("gptq", "awq", "awq+gptq")
METHOD_DOCS = {
    "gptq": "inverse-Hessian error-compensating rounding over columns (damping 0.01, block = the int4 block)",
    "awq": "activation-aware input-channel scales (mean|x|^alpha, alpha by output error), folded into the "
           "norm / up_proj, then round to nearest",
    "awq+gptq": "AWQ's scales, then GPTQ on the scaled weights",
}
FALLBACK = "rtn"  # what a calibrated method stores where no calibration data reaches (see METHODS in quant/methods)
AWQ_TOKENS = 2048  # the AWQ grid search runs on this many of the calibration tokens
TOKEN_CHUNK = 2048  # the MLP's intermediate is computed this many tokens at a time


@dataclass
class Result:
    """What calibration decided: blocks per weight (saved), scaled weights and norms."""

    folder: Path
    blocks: dict[str, tuple[Path, Storage]] = field(default_factory=dict)
    col_scale: dict[str, np.ndarray] = field(default_factory=dict)  # weight -> its columns times this
    row_scale: dict[str, np.ndarray] = field(default_factory=dict)  # weight -> its rows divided by this
    replaced: dict[str, np.ndarray] = field(default_factory=dict)  # norm weight / bias -> new values
    alphas: list[float] = field(default_factory=list)
    text: CalibrationText | None = None
    seconds: float = 0.0
    act_order: bool = False
    experts: list[dict] = field(default_factory=list)  # per MoE layer: experts calibrated / fallen back (moe.py)
    fallback: set[str] = field(default_factory=set)  # weights saved as FALLBACK: no (or too few) tokens reach them
    reasons: dict[str, str] = field(default_factory=dict)  # weight -> why its calibration is partial or absent

    def notes(self) -> list[str]:
        t = self.text.describe() if self.text else {}
        order = ", GPTQ act-order (static groups)" if self.act_order else ""
        out = [f"calibrated on {t.get('samples')} samples x {t.get('length')} tokens of {t.get('source')} "
               f"(sha256 {str(t.get('sha256'))[:16]}...), layer by layer in {self.seconds:.0f} s: "
               f"{len(self.blocks) - len(self.fallback)} weights quantized from their inputs{order}"]
        if self.experts:
            out.append(experts_note(self.experts))
        if self.alphas:
            out.append(f"AWQ scales on {len(self.alphas)} projection groups, alpha "
                       f"{min(self.alphas):.2f} to {max(self.alphas):.2f} (mean {np.mean(self.alphas):.2f})")
        return out


def uses_gptq(recipe) -> bool:
    return recipe.method in ("gptq", "awq+gptq") or any(r.storage is not None and r.storage.method in ("gptq", "awq+gptq")
                                                        for r in recipe.rules)


def wants_calibration(recipe) -> bool:
    return recipe.method in CALIBRATED or any(r.storage is not None and r.storage.method in CALIBRATED
                                              for r in recipe.rules)


class Layerwise:
    def __init__(self, source, spec, names, recipe, text: CalibrationText, folder: Path):
        self.source, self.spec, self.names, self.recipe = source, spec, names, recipe
        self.res = Result(folder, text=text)
        self.rotary = F.Rotary(spec, text.ids.shape[1])
        self.shape = text.ids.shape
        self.act_order = False

    # -- weights ---------------------------------------------------------------------------------
    def read(self, name: str) -> np.ndarray:
        w = np.asarray(self.source.read(name), np.float32)
        if name in self.res.col_scale:
            w = w * self.res.col_scale[name]
        if name in self.res.row_scale:
            w = w / self.res.row_scale[name][:, None]
        return w

    def bias(self, module: str) -> np.ndarray | None:
        name = f"{module}.bias"
        return np.asarray(self.source.read(name), np.float32) if self.source.has(name) else None

    def norm_params(self, role: str, i: int | None):
        module = self.names.module(role, i)
        w = self.res.replaced.get(f"{module}.weight")
        if w is None:
            w = np.asarray(self.source.read(f"{module}.weight"), np.float32)
        b = self.res.replaced.get(f"{module}.bias")
        if b is None and self.source.has(f"{module}.bias"):
            b = np.asarray(self.source.read(f"{module}.bias"), np.float32)
        return module, w, b

    def fold_into_norm(self, module: str, w: np.ndarray, b: np.ndarray | None, s: np.ndarray) -> None:
        off = np.float32(self.spec.norm.weight_offset)
        self.res.replaced[f"{module}.weight"] = ((w + off) / s - off).astype(np.float32)
        if b is not None:
            self.res.replaced[f"{module}.bias"] = (b / s).astype(np.float32)

    def storage(self, names: list[str]) -> Storage:
        return self.recipe.storage(names, "MatMul")

    # -- one group of projections reading one input ------------------------------------------------
    def group(self, x: np.ndarray, projs: list[tuple[str, Storage]], fold=None) -> list[np.ndarray]:
        """Quantize the (tensor, storage) projections that read x (T, K); returns their stored forms
        dequantized (what the runtime computes with). `fold(s)` folds AWQ scales into x's producer."""
        if fold is not None and any(st.quantized and st.method in ("awq", "awq+gptq") for _, st in projs):
            self._awq(x, projs, fold)
            x = x / fold.scales
        # the Hessian's inverse factor per block size (one in practice), made before any weight is read: the
        # K x K Hessian lives only inside input_factor (gptq.py: the memory bound of the widest input)
        factors = {}
        for _, st in projs:
            if st.quantized and st.method in ("gptq", "awq+gptq") and st.block_size not in factors:
                factors[st.block_size] = input_factor(x, -(-x.shape[1] // st.block_size) * st.block_size)
        out = []
        for name, st in projs:
            w = self.read(name)
            if st.quantized and st.method in CALIBRATED:
                if st.method in ("gptq", "awq+gptq"):
                    chol, diag = factors[st.block_size]
                    q = gptq_quantize(w, None, bits=st.bits, block_size=st.block_size, symmetric=st.symmetric,
                                      chol=chol, diag=diag, act_order=self.act_order)
                else:
                    from ..quant.methods import quantize

                    q = quantize(w, bits=st.bits, block_size=st.block_size, symmetric=st.symmetric, method=FALLBACK)
                self._save(name, q, st)
                out.append(dequantize(q))
            elif st.quantized and st.method != "source":
                from ..quant.methods import quantize

                out.append(dequantize(quantize(w, bits=st.bits, block_size=st.block_size, symmetric=st.symmetric,
                                               method=st.method)))
            else:
                out.append(w)
        return out

    def _awq(self, x: np.ndarray, projs: list[tuple[str, Storage]], fold) -> None:
        sub = x[:: max(1, x.shape[0] // AWQ_TOKENS)][:AWQ_TOKENS]
        searched = [(name, st) for name, st in projs if st.quantized and st.method in ("awq", "awq+gptq")]
        st0 = searched[0][1]

        s, alpha, _ = awq_search(sub, np.abs(x).mean(axis=0), [self.read(n) for n, _ in searched], _fake_quant(st0))
        self.res.alphas.append(alpha)
        fold.scales = s
        fold(s)
        for name, _ in projs:
            self.res.col_scale[name] = self.res.col_scale.get(name, 1) * s

    def _save(self, name: str, q, st: Storage) -> None:
        path = self.res.folder / f"{len(self.res.blocks)}.npz"
        arrays = {"data": q.data, "scales": q.scales}
        if q.zero_points is not None:
            arrays["zero_points"] = q.zero_points
        np.savez(path, **arrays)
        self.res.blocks[name] = (path, st)

    # -- the layers --------------------------------------------------------------------------------
    def embed(self) -> np.ndarray:
        ids = self.res.text.ids.reshape(-1)
        name = self.names.weight("embed")
        table_rows = self.source.shape(name)[0]
        if int(ids.max()) >= table_rows:
            raise RecipeError(f"calibration token id {int(ids.max())} is past the embedding's {table_rows} rows")
        read_rows = getattr(self.source, "read_rows", None)
        if read_rows is None:
            h = np.asarray(self.source.read(name), np.float32)[ids]
        else:
            h = np.empty((ids.size, self.spec.hidden_size), np.float32)
            step = max(1, (1 << 22) // self.spec.hidden_size)
            for a in range(0, table_rows, step):
                sel = np.nonzero((ids >= a) & (ids < a + step))[0]
                if sel.size:
                    h[sel] = np.asarray(read_rows(name, a, min(a + step, table_rows)), np.float32)[ids[sel] - a]
        return h * np.float32(self.spec.embedding_scale)

    def layer(self, i: int, x: np.ndarray) -> np.ndarray:
        spec, names = self.spec, self.names
        a = spec.attention_of(i)
        base = f"/model/layers.{i}/attn"
        module, nw, nb = self.norm_params("attn_norm", i)
        h_in = F.norm(x, nw, nb, spec)
        parts = names.linear(["q", "k", "v"], [a.q_size, a.kv_size, a.kv_size], i)
        self._no_rows(parts)
        projs = [(p.name, self.storage([f"{base}/qkv_proj/MatMul", f"{base}/{r}_proj/MatMul", p.module]))
                 for r, p in zip("qkv", parts)]
        wq, wk, wv = self.group(h_in, projs, _Fold(lambda s: self.fold_into_norm(module, nw, nb, s)))
        if self.res.replaced.get(f"{module}.weight") is not None:
            h_in = F.norm(x, *self.norm_params("attn_norm", i)[1:], spec)
        ys = [h_in @ w.T for w in (wq, wk, wv)]
        if a.qkv_bias:
            ys = [y + self.bias(p.module) for y, p in zip(ys, parts)]
        del h_in
        head_norms = None
        if a.qk_norm == "head":  # per head, before the rotary or after it (check_supported refuses other kinds)
            head_norms = (self.norm_params("q_norm", i)[1:], self.norm_params("k_norm", i)[1:])
        S, L = self.shape
        ctx = np.empty((S * L, a.q_size), np.float32)  # filled a sample at a time (no list of pieces + copy)
        for s in range(S):
            ctx[s * L:(s + 1) * L] = F.attention(ys[0][s * L:(s + 1) * L], ys[1][s * L:(s + 1) * L],
                                                 ys[2][s * L:(s + 1) * L], spec, i, self.rotary, head_norms)
        del ys
        o = names.linear(["o"], [spec.hidden_size], i)[0]
        (wo,) = self.group(ctx, [(o.name, self.storage([f"{base}/o_proj/MatMul"] * 2 + [o.module]))])
        out = ctx @ wo.T
        del ctx
        if a.o_bias:
            out += self.bias(o.module)
        _residual(x, out, spec.residual_scale)  # in place: x is this run's own array (embed's, or the last layer's)
        del out
        return _residual(x, self.moe(i, x) if spec.layers[i].moe else self.mlp(i, x), spec.residual_scale)

    def moe(self, i: int, x: np.ndarray) -> np.ndarray:
        """A mixture of experts' output (calibrate/moe.py: experts calibrated on the tokens routed to them)."""
        from .moe import moe_layer

        return moe_layer(self, i, x)

    def mlp(self, i: int, x: np.ndarray) -> np.ndarray:
        spec, names, m = self.spec, self.names, self.spec.mlp
        base = f"/model/layers.{i}/mlp"
        module, nw, nb = self.norm_params("ffn_norm", i)
        h = F.norm(x, nw, nb, spec)
        roles = ["gate", "up"] if m.gated else ["up"]
        parts = names.linear(roles, [m.intermediate_size] * len(roles), i)
        self._no_rows(parts)
        projs = [(p.name, self.storage([f"{base}/gate_up_proj/MatMul", f"{base}/{r}_proj/MatMul", p.module]))
                 for r, p in zip(roles, parts)]
        down = names.linear(["down"], [spec.hidden_size], i)[0]
        down_st = self.storage([f"{base}/down_proj/MatMul"] * 2 + [down.module])
        fold = _Fold(lambda s: self.fold_into_norm(module, nw, nb, s))
        if m.gated and down_st.quantized and down_st.method in ("awq", "awq+gptq"):
            self._awq_down(h, parts, down, down_st, fold)
        ws = self.group(h, projs, fold)
        if self.res.replaced.get(f"{module}.weight") is not None:
            h = F.norm(x, *self.norm_params("ffn_norm", i)[1:], spec)
        biases = [self.bias(p.module) if m.bias else None for p in parts]
        inter = self._intermediate(h, ws, biases)
        del h, ws
        (wd,) = self.group(inter, [(down.name, down_st)])
        out = inter @ wd.T
        del inter
        return out + self.bias(down.module) if m.bias else out

    def _intermediate(self, h: np.ndarray, ws: list[np.ndarray], biases) -> np.ndarray:
        out = np.empty((h.shape[0], ws[-1].shape[0]), np.float32)
        for a in range(0, h.shape[0], TOKEN_CHUNK):
            hs = h[a:a + TOKEN_CHUNK]
            ys = [hs @ w.T + (b if b is not None else 0) for w, b in zip(ws, biases)]
            out[a:a + TOKEN_CHUNK] = F.activation(ys[0], self.spec.mlp.activation) * ys[1] if len(ys) == 2 \
                else F.activation(ys[0], self.spec.mlp.activation)
        return out

    def _awq_down(self, h, parts, down, down_st, fold) -> None:
        """down_proj's AWQ scales, searched on the float intermediate of a token subset, folded into up's rows
        (before gate/up are quantized: their own AWQ scales come after, on the norm)."""
        sub = h[:: max(1, h.shape[0] // AWQ_TOKENS)][:AWQ_TOKENS]
        inter = self._intermediate(sub, [self.read(p.name) for p in parts],
                                   [self.bias(p.module) if self.spec.mlp.bias else None for p in parts])

        s, alpha, _ = awq_search(inter, np.abs(inter).mean(axis=0), [self.read(down.name)], _fake_quant(down_st))
        self.res.alphas.append(alpha)
        self.res.row_scale[parts[1].name] = s
        self.res.col_scale[down.name] = s
        if self.spec.mlp.bias and self.source.has(parts[1].with_suffix("bias").name):
            raise RecipeError("AWQ on down_proj with an up_proj bias is not supported; use method gptq")

    @staticmethod
    def _no_rows(parts) -> None:
        if any(p.rows is not None for p in parts):
            raise RecipeError(f"calibrated methods need separate projection tensors; {parts[0].name} is fused in "
                              "the checkpoint: use method k_quant or hqq for this model")

    def lm_head(self, x: np.ndarray) -> None:
        """The lm_head reads the final norm's output. AWQ's scales fold into that norm when the lm_head is its
        own tensor; a tied lm_head is the embedding table, which the Gather reads unscaled, so AWQ leaves it
        alone (gptq still rounds it: awq+gptq) and the storage says why."""
        if self.recipe.exclude_lm_head:
            return
        module, nw, nb = self.norm_params("final_norm", None)
        h = F.norm(x, nw, nb, self.spec)
        name = self.names.lm_head(self.spec.tie_embeddings)
        st = self.storage(["/lm_head/MatMul", "lm_head"])
        if not (st.quantized and st.method in CALIBRATED):
            return
        fold = None
        if st.method in ("awq", "awq+gptq"):
            if not self.spec.tie_embeddings:
                fold = _Fold(lambda s: self.fold_into_norm(module, nw, nb, s))
            else:
                self.res.reasons[name] = (f"{st.method}: tied to the embedding table, which takes no AWQ scales"
                                          + ("; gptq only" if st.method == "awq+gptq" else f"; {FALLBACK}"))
                if st.method == "awq":
                    return  # rounded to nearest by the build, with the reason in its storage
        self.group(h, [(name, st)], fold)


def experts_note(experts: list[dict]) -> str:
    """The report's line on MoE experts: calibrated per layer, and those that fell back to FALLBACK."""
    from .moe import MIN_EXPERT_TOKENS

    per = ", ".join(f"layer {d['layer']} {d['calibrated']}/{d['experts']}" for d in experts)
    fell = "; ".join(f"layer {d['layer']}: " + ", ".join(f"expert {e} ({n} tokens)" for e, n in d["fallback"].items())
                     for d in experts if d["fallback"])
    out = f"MoE experts calibrated on the tokens routed to them: {per}"
    if fell:
        out += f"; reached by fewer than {MIN_EXPERT_TOKENS} calibration tokens, rounded to nearest ({FALLBACK}): {fell}"
    return out


def _residual(x: np.ndarray, y: np.ndarray, scale: float) -> np.ndarray:
    """x += scale * y, in place (the calibration tokens' hidden states are the largest array held)."""
    if scale == 1:
        x += y
    else:
        y *= np.float32(scale)
        x += y
    return x


def _fake_quant(st: Storage):
    """AWQ's stand-in quantizer for its search: FALLBACK (rtn) quantized and dequantized in one pass
    (quant/rtn.py fake_quantize_rtn: the same values as dequantize(quantize(...)) without packing)."""
    from ..quant.rtn import fake_quantize_rtn

    return lambda w: fake_quantize_rtn(w, bits=st.bits, block_size=st.block_size, symmetric=st.symmetric)


class _Fold:
    def __init__(self, fn):
        self.fn = fn
        self.scales = None

    def __call__(self, s):
        self.fn(s)


def calibrate(source, spec, names, recipe, cal: Calibration, progress=None) -> Result:
    """Run the calibration (see the module docstring); the caller removes ``result.folder``."""
    F.check_supported(spec, recipe.method)
    start = time.perf_counter()
    text = calibration_ids(source, cal)
    folder = Path(tempfile.mkdtemp(prefix="onnxforge-calib-"))
    try:
        run = Layerwise(source, spec, names, recipe, text, folder)
        run.act_order = cal.act_order
        if any(layer.moe for layer in spec.layers):
            from .moe import prepare_experts

            prepare_experts(run)
        x = run.embed()
        for i in range(spec.num_layers):
            x = run.layer(i, x)
            if progress:
                progress(i + 1, spec.num_layers)
        run.lm_head(x)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    run.res.seconds = time.perf_counter() - start
    run.res.act_order = cal.act_order
    return run.res


class CalibratedSource:
    """The build's source with calibration applied: scaled weights and norms, and the quantized blocks as
    exact native forms (graph/weights.py carries them over: "(calibrated)" in the storage)."""

    ORIGIN = "calibrated"

    def __init__(self, inner, result: Result):
        self._inner, self._res = inner, result

    def __getattr__(self, name):
        if name == "read_rows" and hasattr(self._inner, "read_rows"):
            return self._read_rows
        return getattr(self._inner, name)

    def read(self, name: str) -> np.ndarray:
        res = self._res
        if name in res.replaced:
            return res.replaced[name]
        if name in res.col_scale or name in res.row_scale:
            w = np.asarray(self._inner.read(name), np.float32)
            return self._scale(name, w, 0)
        return self._inner.read(name)

    def _read_rows(self, name: str, a: int, b: int) -> np.ndarray:
        w = self._inner.read_rows(name, a, b)
        if name in self._res.col_scale or name in self._res.row_scale:
            return self._scale(name, np.asarray(w, np.float32), a)
        return w

    def _scale(self, name: str, w: np.ndarray, first: int) -> np.ndarray:
        if name in self._res.col_scale:
            w = w * self._res.col_scale[name]
        if name in self._res.row_scale:
            w = w / self._res.row_scale[name][first:first + w.shape[0], None]
        return w

    def calibration_note(self, name: str) -> str | None:
        """Why `name`'s calibration is partial or absent, where the run decided so (Result.reasons)."""
        return self._res.reasons.get(name)

    def has_blocks(self, name: str) -> bool:
        """Whether calibration made blocks for `name` (a tensor, or graph/experts.py expert_slice of one)."""
        return name in self._res.blocks

    def native_format(self, name: str) -> NativeFormat | None:
        if name in self._res.blocks:
            st = self._res.blocks[name][1]
            return NativeFormat(self.ORIGIN, st.bits, st.block_size, not st.symmetric, False)
        fmt = getattr(self._inner, "native_format", None)
        return fmt(name) if fmt else None

    def native_blocks(self, name: str, bits: int, block_size: int) -> NativeBlocks | None:
        if name in self._res.blocks:
            path, st = self._res.blocks[name]
            if (bits, block_size) != (st.bits, st.block_size):
                return None
            with np.load(path) as z:
                return NativeBlocks(z["data"], z["scales"], z["zero_points"] if "zero_points" in z else None,
                                    st.bits, st.block_size, self.ORIGIN)
        return self._inner.native_blocks(name, bits, block_size)


def storage_with(st: Storage, **kw) -> Storage:
    return replace(st, **kw)
