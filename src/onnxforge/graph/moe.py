"""The mixture-of-experts MLP part: router MatMul, then com.microsoft `MoE` (float experts) or `QMoE`
(quantized experts), with the routing variants the spec names and a dense shared expert beside the op.

What onnxruntime's CPU kernels take (../shared/REFERENCE.md, and measured in tests/test_moe_op.py):
SwiGLU fused and interleaved (`swiglu_fusion=1`, no FC3); `activation_alpha/beta` and `swiglu_limit`
give SiLU-gated (1, 0, none) or GPT-OSS's clamped form. The op applies softmax to `router_probs`,
takes the top k and (with `normalize_routing_weights`) renormalises them:
  * softmax -> top-k (-> renormalise): Mixtral, Qwen, OLMoE; top-k of the logits -> softmax (GPT-OSS,
    Granite) is the same as softmax -> top-k -> renormalise. Without renormalising (Qwen2-MoE,
    norm_topk_prob false) the op still renormalises and its output is scaled by the top-k softmax mass:
    onnxruntime 1.31.1's CPU kernels get `normalize_routing_weights=0` wrong (QMoE always, MoE when its
    input comes from the arena; tests/test_moe_op.py shows both);
  * selection on softmax + a bias, mixing with the softmax (ERNIE 4.5's e_score_correction_bias): QMoE on the
    CPU takes the softmax as `router_weights`; MoE has no such input, and CUDA's QMoE ignores it (ROUTER_WEIGHTS_FOR),
    so there the unselected experts' logits are pushed to the dtype's minimum (TopK + ScatterElements) and the op
    renormalises over the selected ones;
  * PhiMoE's sparse mixer: the CPU kernel ignores `use_sparse_mixer` (it runs plain top-2; measured), so
    its two experts are two k=1 passes of the op over the same weights (the argmax, then the argmax with
    the first removed), each scaled by the mixer's masked-softmax weight computed beside it;
  * sigmoid scores (LFM2-MoE): the top k of sigmoid(logits) (+ a selection bias) are selected in the graph and
    the op is fed log(sigmoid) at them and the dtype's minimum elsewhere, so its softmax over the top k is
    s_i / sum of the selected s_j; the output is then scaled by sum / (sum + 1e-6) (transformers' epsilon),
    or by the sum itself where the weights are not renormalised, times routed_scaling_factor.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Sequence

import numpy as np
import onnx_ir as ir

from ..archs.names import Part
from ..errors import ConfigError, RecipeError
from ..quant.methods import CALIBRATED_FALLBACK
from ..quant.storage import Storage
from . import experts as X
from . import weights as W
from .builder import MS
from .parts import dense_mlp

if TYPE_CHECKING:
    from .emitter import Emitter


def expert_storage(plan, names: Sequence[str], block: int) -> Storage:
    """How an expert projection is stored: the recipe's MatMul decision for `names` (INT8 placement,
    templates, rules), from the MoE options' bits when set, in QMoE blocks of `block` (0: per channel);
    float in moe_experts' dtype when the recipe sets it (a rule that quantizes the experts contradicts it)."""
    floats = getattr(plan, "moe_experts", None)
    if floats:
        plan.storage(names, "MatMul")  # the names still count as seen (a --keep-float pattern on them matches)
        rule = next((r for r in plan.rules if r.storage and r.storage.quantized and r.matches(names)), None)
        if rule is not None:
            raise RecipeError(f"rule {rule.pattern!r} quantizes the experts, but moe_experts={floats} keeps them "
                              "float (the MoE op); drop one of them")
        return Storage(dtype=floats)
    kind = getattr(plan, "moe_quant_type", None)
    recipe = plan if kind is None else dataclasses.replace(plan, precision="int8" if kind == "int8" else "int4")
    st = recipe.storage(names, "MatMul")
    if st.quantized and st.method != "source":  # "source": the checkpoint's own blocks (see Experts)
        st = dataclasses.replace(st, dtype=plan.io.dtype, block_size=block)
    return st


def as_stored(e: "Emitter", t: X.ExpertTensors, sts: list[Storage], block: int) -> tuple[list[Storage], list[int]]:
    """The projections the recipe keeps as stored ("source") carried over from their own blocks where the source
    has them (t.blocks), sharing one QMoE block (the finer of the two formats' blocks: the coarser one's blocks are
    split, no value changes); a "source" projection without them, or with a minimum under -p int4 (its closest form
    is 8-bit), is re-quantized (rtn at `block`). Returns the
    storages and each projection's code bits (0: not carried over)."""
    code_bits = [0, 0]
    kind = getattr(e.plan, "moe_quant_type", None)
    limit = {"int4": 4, "int8": 8}.get(kind or getattr(e.plan, "precision", "source"), 8)  # -p int4: at most 4 bits
    for j, (st, srcs) in enumerate(zip(sts, (t.fc1_sources, t.fc2_sources))):
        if st.quantized and st.method in CALIBRATED_FALLBACK:  # gptq / awq: the blocks calibration made, as made
            if t.blocks is not None and _calibrated(e.source, t.block_names[j] if t.block_names else srcs, st):
                code_bits[j] = st.bits
                sts[j] = dataclasses.replace(st, origin="calibrated")
            else:  # no calibration reached them: the fallback, said so in the storage
                sts[j] = dataclasses.replace(st, method=CALIBRATED_FALLBACK[st.method], origin="uncalibrated")
            continue
        if st.method != "source":
            continue
        if t.blocks is None or (st.offsets and limit < 8):  # a minimum's closest form takes 8 bits
            sts[j] = dataclasses.replace(st, method="rtn", block_size=block, offsets=False)  # origin kept: the note
            continue
        code_bits[j] = e.source.native_format(srcs[0]).code_bits or st.bits
        sts[j] = X.stored_storage(st, code_bits[j])
    carried = [st.block_size for st, c in zip(sts, code_bits) if c]
    if carried and all(st.quantized for st in sts):
        sts = [dataclasses.replace(st, block_size=min(carried)) for st in sts]
    if all(st.quantized for st in sts) and sts[0].bits != sts[1].bits:
        # onnxruntime 1.31.1's CPU QMoE: "Mixed-width QMoE execution is not yet implemented": both at the wider
        # width (a carried-over 4-bit code c is 8-bit code c + 120 against zero point 128: no value changes)
        bits = max(st.bits for st in sts)
        sts = [dataclasses.replace(st, bits=bits) for st in sts]
    return sts, code_bits


def expert_storages(plan, spec, i: int, t: X.ExpertTensors) -> tuple[Storage, Storage, int, str, bool]:
    """(fc1's storage, fc2's, the QMoE block, the block's note, whether the intermediate size is padded) of layer
    i's experts, as the recipe decides them (onnxforge.calibrate quantizes the experts with the same)."""
    from ..quant.qmoe import qmoe_block

    H, I = spec.hidden_size, spec.moe.intermediate_size
    base = f"/model/layers.{i}/moe/experts"
    modules = lambda srcs: [s[: -len(".weight")] if s.endswith(".weight") else s for s in srcs]  # noqa: E731
    pad = getattr(plan, "provider", "cpu") in PAD_EXPERTS_FOR  # CUDA QMoE: I padded to a multiple of 64
    dims = {"hidden size": H, "intermediate size": _round_up(I, CUDA_K_TILE) if pad else I}
    block, block_note = qmoe_block(getattr(plan, "qmoe_block_size", None), dims)
    st1 = expert_storage(plan, [f"{base}/gate_up_proj/MatMul", f"{base}/gate_proj/MatMul",
                                f"{base}/up_proj/MatMul", f"model.layers.{i}.mlp.experts.gate_up_proj",
                                *modules(t.fc1_sources)], block)
    st2 = expert_storage(plan, [f"{base}/down_proj/MatMul", f"model.layers.{i}.mlp.experts.down_proj",
                                *modules(t.fc2_sources)], block)
    if st1.quantized != st2.quantized:  # the op stores both projections alike: keep both float
        st1 = st2 = plan.io
    return st1, st2, block, block_note, pad


def _calibrated(source, srcs: Sequence[str], st: Storage) -> bool:
    """Whether onnxforge.calibrate made every tensor of a projection in the storage `st` asks for."""
    fmt = getattr(source, "native_format", None)
    want = ("calibrated", st.bits, st.block_size, not st.symmetric, False)
    return fmt is not None and all((f.origin, f.bits, f.block_size, f.zero_points, f.offsets) == want
                                   for f in map(fmt, srcs) if f is not None) and all(fmt(n) is not None for n in srcs)


class Experts:
    """One layer's expert initializers, registered once; `op` emits a MoE / QMoE node over them."""

    def __init__(self, e: "Emitter", i: int):
        m, H = e.spec.moe, e.spec.hidden_size
        E, I = m.num_experts, m.intermediate_size
        Ip = I  # the intermediate size the op is given (padded for CUDA QMoE)
        self.e, self.i, self.m = e, i, m
        base = f"/model/layers.{i}/moe/experts"
        t = X.find_experts(e, i)
        st1, st2, block, block_note, pad = expert_storages(e.plan, e.spec, i, t)
        dims = {"hidden size": H, "intermediate size": _round_up(I, CUDA_K_TILE) if pad else I}
        (st1, st2), code_bits = as_stored(e, t, [st1, st2], block)
        self.quantized, self.st, self.st2 = st1.quantized, st1, st2
        prefix = f"model.layers.{i}.moe.experts"
        io = e.io
        self.fp4 = getattr(e.plan, "moe_quant_type", None) == "mxfp4"
        # a GGUF's quantized experts (e.g. GPT-OSS's MXFP4) have no exact QMoE form: the report says so
        parts1, parts2 = [Part(s) for s in t.fc1_sources], [Part(s) for s in t.fc2_sources]
        stored = lambda parts, st: W.stored_note(e.source, parts, st, "QMoE")  # noqa: E731
        if self.fp4:  # CUDA only (the recipe refuses it elsewhere): GPT-OSS's own blocks, carried over
            if t.mxfp4 is None:
                held = W.stored_formats(e.source, parts1)
                raise RecipeError("moe_quant_type=mxfp4 carries over the checkpoint's MXFP4 expert blocks; "
                                  + (f"this file's experts are {held}, which have no fp4 form (use "
                                     "moe_quant_type=int4 or int8)" if held else
                                     "this checkpoint has float experts (use int4 or int8 experts)"))
            self.quantized = True
            self.fc1 = e.b.weights(X.fp4_experts_job(t.mxfp4[0], f"{base}/gate_up_proj", f"{prefix}.gate_up_proj",
                                                     E, 2 * I, H, t.fc1_sources))
            self.fc2 = e.b.weights(X.fp4_experts_job(t.mxfp4[1], f"{base}/down_proj", f"{prefix}.down_proj",
                                                     E, H, I, t.fc2_sources))
        elif self.quantized:
            from ..quant.qmoe import check_qmoe

            if pad:
                _check_cuda_qmoe(e, i, H, (st1, st2))
                Ip = _round_up(I, max(CUDA_K_TILE, st1.block_size, st2.block_size))
                if Ip != I:
                    note = (f"experts' intermediate size {I} zero-padded to {Ip} (onnxruntime's CUDA QMoE needs a "
                            f"multiple of {CUDA_K_TILE}; the padded units add exactly 0)")
                    if note not in e.notes:
                        e.notes.append(note)
            for st in (st1, st2):
                check_qmoe(st.bits, st.block_size, {**dims, "intermediate size": Ip})
            if block_note and block_note not in e.notes:  # the default block adapted to these experts
                e.notes.append(block_note)
            unpadded, t = t, X.pad_intermediate(t, I, Ip, H)
            for j, (fc, label, name, N, K, st, srcs, parts) in enumerate((
                    (t.fc1, "gate_up_proj", "gate_up_proj", 2 * Ip, H, st1, t.fc1_sources, parts1),
                    (t.fc2, "down_proj", "down_proj", H, Ip, st2, t.fc2_sources, parts2))):
                if code_bits[j]:
                    fc0, (N0, K0) = (unpadded.fc1, (2 * I, H)) if j == 0 else (unpadded.fc2, (H, I))
                    job = X.stored_experts_job(t.blocks[j], fc0, f"{base}/{label}", f"{prefix}.{name}", E, N0, K0, st,
                                               code_bits[j], io.ir_dtype, io.np_dtype, srcs, pad_to=(N, K))
                else:  # a "source" projection without its own blocks (GPTQ/AWQ experts, gate and up unalike)
                    note = (f" ({st.method}: no calibration data reaches it)" if st.origin == "uncalibrated"
                            else f" (re-quantized {W.stored_formats(e.source, parts)}: no exact QMoE form)" if st.origin
                            else stored(parts, st))
                    job = X.quant_experts_job(fc, f"{base}/{label}", f"{prefix}.{name}", E, N, K, st, io.ir_dtype,
                                              io.np_dtype, srcs, note)
                setattr(self, f"fc{j + 1}", e.b.weights(job))
        else:  # the float MoE op: the activations' dtype, or moe_experts' (cast around the op in `op`)
            fl = st1 if getattr(e.plan, "moe_experts", None) else io
            self.st = self.st2 = fl
            self.fc1 = e.b.weights(X.float_experts_job(t.fc1, f"{base}/gate_up_proj", f"{prefix}.gate_up_proj.weight",
                                                       E, 2 * I, H, fl, t.fc1_sources, stored(parts1, fl)))
            self.fc2 = e.b.weights(X.float_experts_job(t.fc2, f"{base}/down_proj", f"{prefix}.down_proj.weight", E,
                                                       H, I, fl, t.fc2_sources, stored(parts2, fl)))
        bias_st = io if self.quantized else self.st  # the MoE op's biases are of its T; QMoE's of the activations'
        self.b1 = self.b2 = None
        if t.fc1_bias is not None:
            (self.b1,) = e.b.weights(X.float_experts_job(t.fc1_bias, f"{base}/gate_up_proj", f"{prefix}.gate_up_proj.bias",
                                                         E, 2 * Ip, 0, bias_st, t.bias_sources[:-1]))
            (self.b2,) = e.b.weights(X.float_experts_job(t.fc2_bias, f"{base}/down_proj", f"{prefix}.down_proj.bias",
                                                         E, H, 0, bias_st, t.bias_sources[-1:]))

    route32 = False  # the routing around the op is computed in float32 (bf16 activations; see moe())

    def op(self, x: ir.Value, router: ir.Value, k: int, normalize: bool, name: str,
           router_weights: ir.Value | None = None) -> ir.Value:
        if not self.route32:
            return self._op(x, router, k, normalize, name, router_weights)
        b, bf16 = self.e.b, self.e.io.ir_dtype  # float32 in, the op in bf16, float32 out
        down = lambda v, tag: None if v is None else b.op("Cast", [v], f"{name}/Cast_{tag}", to=bf16)  # noqa: E731
        y = self._op(down(x, "x"), down(router, "router"), k, normalize, name, down(router_weights, "weights"))
        return b.op("Cast", [y], f"{name}/Cast_y", to=ir.DataType.FLOAT)

    def _op(self, x: ir.Value, router: ir.Value, k: int, normalize: bool, name: str,
            router_weights: ir.Value | None = None) -> ir.Value:
        m, st = self.m, self.st
        attrs = dict(k=k, activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=int(normalize),
                     activation_alpha=m.swiglu_alpha, activation_beta=m.swiglu_beta)
        if m.swiglu_limit is not None:
            attrs["swiglu_limit"] = m.swiglu_limit
        if not self.quantized:
            return self._float_op(x, router, name, attrs)
        if self.fp4:  # MXFP4: E8M0 block scales of 32, per-expert global scales at inputs 15 and 16
            inputs = [x, router, self.fc1[0], self.fc1[1], self.b1, self.fc2[0], self.fc2[1], self.b2, None, None, None,
                      None, None, None, router_weights, self.fc1[2], self.fc2[2]]
            return self.e.b.op("QMoE", inputs, name, domain=MS, quant_type="fp4", expert_weight_bits=4, block_size=32,
                               **attrs)
        attrs["expert_weight_bits"] = st.bits
        if st.block_size:
            attrs["block_size"] = st.block_size
        if st.accuracy_level is not None:
            attrs["accuracy_level"] = st.accuracy_level
        if getattr(self.e.plan, "provider", "cpu") == "cuda":
            attrs["weights_prepacked"] = 0  # raw [E, N, K/pack]; CUDA's default would expect CUTLASS-prepacked
        zp1 = self.fc1[2] if len(self.fc1) > 2 else None
        zp2 = self.fc2[2] if len(self.fc2) > 2 else None
        inputs = [x, router, self.fc1[0], self.fc1[1], self.b1, self.fc2[0], self.fc2[1], self.b2, None, None, None,
                  zp1, zp2, None, router_weights]
        while inputs[-1] is None:
            inputs.pop()
        return self.e.b.op("QMoE", inputs, name, domain=MS, **attrs)


    def _float_op(self, x: ir.Value, router: ir.Value, name: str, attrs: dict) -> ir.Value:
        """The float MoE op; experts of another dtype than the activations (moe_experts) run with x and the router
        cast to theirs, the output cast back."""
        b, want, io = self.e.b, self.st.ir_dtype, self.e.io.ir_dtype
        if want != io:
            x = b.op("Cast", [x], f"{name}/Cast", to=want)
            router = b.op("Cast", [router], f"{name}/Cast_1", to=want)
        y = b.op("MoE", [x, router, self.fc1[0], self.b1, self.fc2[0], self.b2], name, domain=MS, **attrs)
        return y if want == io else b.op("Cast", [y], f"{name}/Cast_2", to=io)


# onnxruntime's CUDA QMoE (int weights) reads each GEMM's reduction dimension in tiles of 64 ("the interleaved-weight
# K tile"): fc1's (the hidden size) and fc2's (the experts' intermediate size) must be multiples of it. Providers
# whose QMoE builds pad the intermediate size (tests add "cpu" to check the padding against an unpadded build).
CUDA_K_TILE = 64
PAD_EXPERTS_FOR = ("cuda",)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _check_cuda_qmoe(e: "Emitter", i: int, H: int, sts: tuple[Storage, ...]) -> None:
    """What onnxruntime's CUDA QMoE refuses at run time, refused at build time with what would work."""
    if H % CUDA_K_TILE:
        raise RecipeError(f"onnxruntime's CUDA QMoE needs the hidden size to be a multiple of {CUDA_K_TILE} (this model's "
                          f"is {H}); keep the experts float (--extra_options moe_experts=fp16: the MoE op) or build "
                          "for -e cpu")
    for st in sts:
        if not st.symmetric and (not st.block_size or st.block_size < 32):
            where = "per-channel scales" if not st.block_size else f"block {st.block_size}"
            raise RecipeError(f"onnxruntime's CUDA QMoE takes zero points (asymmetric experts) only with blocks of 32 or "
                              f"more, but layer {i}'s experts have {where}; use qmoe_block_size=32 (or 64, 128) or "
                              "symmetric experts (int4_is_symmetric=true)")


def _check(e: "Emitter") -> None:
    m, act = e.spec.moe, e.spec.mlp.activation
    if m is None:
        raise ConfigError("a layer is marked as a mixture of experts but the spec has no experts")
    clamped = (m.swiglu_alpha, m.swiglu_beta, m.swiglu_limit) != (1.0, 0.0, None)
    if act not in ("silu", "swish") and not clamped:
        raise ConfigError(f"the experts' activation {act!r} is not supported: onnxruntime's MoE runs SwiGLU experts")
    if m.mixer == "sparsemixer" and m.top_k != 2:
        raise ConfigError(f"the sparse mixer selects 2 experts, but the config asks for {m.top_k}")
    if m.mixer == "sigmoid_input" and m.top_k != 1:
        raise ConfigError(f"num_experts_per_tok is {m.top_k}: onnxforge builds Llama 4's router (the expert's input "
                          "scaled by its sigmoid score) for one expert per token, as every Llama 4 checkpoint has")
    if not 0 < m.top_k <= m.num_experts:
        raise ConfigError(f"experts per token ({m.top_k}) must be between 1 and the number of experts ({m.num_experts})")


def moe(e: "Emitter", i: int, x: ir.Value) -> ir.Value:
    _check(e)
    m, H, b = e.spec.moe, e.spec.hidden_size, e.b
    E = m.num_experts
    base = f"/model/layers.{i}/moe"
    logits = _router(e, x, i, "router", f"{base}/router", E, m.router_bias)
    router = b.op("Reshape", [logits, b.const([-1, E], np.int64)], f"{base}/router/Reshape")
    experts = Experts(e, i)
    name = f"{base}/{'QMoE' if experts.quantized else 'MoE'}"
    plain = m.mixer not in ("sparsemixer", "sigmoid_input") and m.scoring != "sigmoid" and not m.selection_bias
    r, xr = e, x  # the routing's emitter and input
    if e.io.ir_dtype in FLOAT32_ROUTING_FOR and not (plain and m.normalize):
        r, xr, logits, router = _float32_routing(e, base, x, logits, router)
        experts.route32 = True
    if m.mixer == "sparsemixer":
        y = _sparsemixer(r, base, xr, router, experts)
    elif m.mixer == "sigmoid_input":
        y = _sigmoid_input(r, base, xr, logits, router, experts, name)
    elif m.scoring == "sigmoid":
        y = _sigmoid_routing(r, i, base, xr, router, experts, name)
    elif m.selection_bias:
        y = _biased_selection(r, i, base, xr, router, experts, name)
    elif m.normalize:
        y = experts.op(xr, router, m.top_k, True, name)
    else:
        y = _unnormalized(r, base, xr, router, experts, name)
    if experts.route32:
        y = b.op("Cast", [y], f"{base}/Cast_y", to=e.io.ir_dtype)
    if m.shared_intermediate_size:
        node = f"/model/layers.{i}/shared_expert"
        s = dense_mlp(e, i, x, ("shared_gate", "shared_up", "shared_down"), node, m.shared_intermediate_size)
        if m.shared_gate:
            g = _router(e, x, i, "shared_expert_gate", f"{node}_gate", 1, False)
            s = b.op("Mul", [b.op("Sigmoid", [g], f"{node}_gate/Sigmoid"), s], f"{node}_gate/Mul")
        y = b.op("Add", [y, s], f"{base}/shared_expert/Add")
    return y


# activation dtypes whose routing is computed in float32 (tests add FLOAT16 / FLOAT to run the path on CPU)
FLOAT32_ROUTING_FOR = (ir.DataType.BFLOAT16,)


class _Float32Plan:
    """The recipe's plan with float32 activations: the routing's scalars, constants and selection biases."""

    io = Storage(dtype="fp32")

    def __init__(self, plan):
        self._plan = plan

    def __getattr__(self, key: str):
        return getattr(self._plan, key)


def _float32_routing(e: "Emitter", base: str, x: ir.Value, logits: ir.Value, router: ir.Value):
    """bf16 activations: the routing (softmax, top k, masks, mixer weights) computed in float32 on the router's
    logits cast up, as transformers computes routing weights in float32; onnxruntime's CUDA provider has no bf16
    kernel for several of its ops (TopK, ReduceMax, Where, ...). The experts' op itself stays bf16 (Experts.op casts
    around it). Returns the routing's emitter and x, logits and router logits in float32."""
    import copy

    b, f32 = e.b, ir.DataType.FLOAT
    r = copy.copy(e)
    r.plan = _Float32Plan(e.plan)
    up = lambda v, tag: b.op("Cast", [v], f"{base}/router/Cast_{tag}", to=f32)  # noqa: E731
    return r, up(x, "x"), up(logits, "logits"), up(router, "router")


def _router(e: "Emitter", x: ir.Value, i: int, role: str, node: str, N: int, bias: bool) -> ir.Value:
    """A router (or shared-expert gate) MatMul: float unless a user rule stores it otherwise (op type
    "Router" is not one the recipe quantizes), as AMD Quark's MoE templates keep them."""
    (part,) = e.names.linear([role], [N], i)
    st = e.plan.storage([f"{node}/MatMul", part.module], "Router")
    y = e.matmul(x, node, [part], [N], e.spec.hidden_size, st)
    return e.add_bias(y, node, [part.with_suffix("bias")], N) if bias else y


def _unnormalized(e: "Emitter", base: str, x: ir.Value, router: ir.Value, experts: Experts, name: str) -> ir.Value:
    """sum over the top k of p_i * expert_i(x) = (renormalised mix) x (sum of the top k p_i)."""
    m, b, H = e.spec.moe, e.b, e.spec.hidden_size
    probs = b.op("Softmax", [router], f"{base}/router/Softmax", axis=-1)
    top, _ = e.float32_op("TopK", [probs, b.const([m.top_k], np.int64)], f"{base}/router/TopK", n_out=2, axis=-1)
    mass = b.op("ReduceSum", [top, b.const([-1], np.int64)], f"{base}/router/ReduceSum", keepdims=1)
    flat = b.op("Reshape", [x, b.const([-1, H], np.int64)], f"{base}/Reshape")
    y = b.op("Mul", [experts.op(flat, router, m.top_k, True, name), mass], f"{base}/Mul")
    return b.op("Reshape", [y, b.op("Shape", [x], f"{base}/Shape")], f"{base}/Reshape_1")


def _selection_bias(e: "Emitter", i: int, base: str) -> ir.Value:
    m, b = e.spec.moe, e.b
    bias_name = e.names.tensor("selection_bias", i)
    if bias_name is None:
        raise ConfigError(f"layer {i}: the router's selection bias (e_score_correction_bias) is missing")
    shape = tuple(e.source.shape(bias_name))
    if int(np.prod(shape)) != m.num_experts:
        raise ConfigError(f"{bias_name} has shape {shape}, expected {m.num_experts} values")
    return b.weights(W.float_table_job(e.source, f"{base}/router", f"model.layers.{i}.moe.router.selection_bias",
                                       bias_name, shape, e.io))[0]


def _sigmoid_routing(e: "Emitter", i: int, base: str, x: ir.Value, router: ir.Value, experts: Experts,
                     name: str) -> ir.Value:
    """Select the top k of sigmoid(logits) (+ bias), mix the selected sigmoids; see the module docstring."""
    m, b, H = e.spec.moe, e.b, e.spec.hidden_size
    node = f"{base}/router"
    scores = b.op("Sigmoid", [router], f"{node}/Sigmoid")
    select = b.op("Add", [scores, _selection_bias(e, i, base)], f"{node}/Add") if m.selection_bias else scores
    if m.groups[1] < m.groups[0]:  # group-limited (DeepSeek-V3): experts outside the best groups are not selectable
        select = _group_limit(e, node, select)
    _, idx = e.float32_op("TopK", [select, b.const([m.top_k], np.int64)], f"{node}/TopK", n_out=2, axis=-1)
    picked = b.op("GatherElements", [scores, idx], f"{node}/GatherElements", axis=-1)
    tiny = e.scalar(float(e.finfo().tiny))
    logs = b.op("Log", [b.op("Max", [picked, tiny], f"{node}/Max")], f"{node}/Log")
    low = b.op("Expand", [_lowest(e), b.op("Shape", [router], f"{node}/Shape")], f"{node}/Expand")
    masked = b.op("ScatterElements", [low, idx, logs], f"{node}/ScatterElements", axis=-1)
    mass = b.op("ReduceSum", [picked, b.const([-1], np.int64)], f"{node}/ReduceSum", keepdims=1)
    if m.normalize:
        mass = b.op("Div", [mass, b.op("Add", [mass, e.scalar(m.renorm_eps)], f"{node}/Add_1")], f"{node}/Div")
    if m.routed_scale != 1.0:
        mass = b.op("Mul", [mass, e.scalar(m.routed_scale)], f"{node}/Mul")
    flat = b.op("Reshape", [x, b.const([-1, H], np.int64)], f"{base}/Reshape")
    y = b.op("Mul", [experts.op(flat, masked, m.top_k, True, name), mass], f"{base}/Mul")
    return b.op("Reshape", [y, b.op("Shape", [x], f"{base}/Shape")], f"{base}/Reshape_1")


def _group_limit(e: "Emitter", node: str, select: ir.Value) -> ir.Value:
    """DeepSeek-V3's group-limited selection: each of n_group groups of experts scored by the sum of its two best
    selection scores, the topk_group best groups kept, the other experts' scores pushed to the dtype's lowest
    (transformers: -inf) so the top k is drawn from the kept groups only."""
    m, b = e.spec.moe, e.b
    groups, keep = m.groups
    per, base = m.num_experts // groups, f"{node}/group"
    view = b.op("Reshape", [select, b.const([-1, groups, per], np.int64)], f"{base}/Reshape")
    best2, _ = e.float32_op("TopK", [view, b.const([2], np.int64)], f"{base}/TopK", n_out=2, axis=-1)
    score = b.op("ReduceSum", [best2, b.const([-1], np.int64)], f"{base}/ReduceSum", keepdims=0)  # (T, n_group)
    _, kept = e.float32_op("TopK", [score, b.const([keep], np.int64)], f"{base}/TopK_1", n_out=2, axis=-1)
    zeros = b.op("Expand", [b.const(np.zeros(1, np.float32)), b.op("Shape", [score], f"{base}/Shape")],
                 f"{base}/Expand")
    ones = b.op("Expand", [b.const(np.ones(1, np.float32)), b.op("Shape", [kept], f"{base}/Shape_1")],
                f"{base}/Expand_1")
    chosen = b.op("ScatterElements", [zeros, kept, ones], f"{base}/ScatterElements", axis=-1)
    chosen = b.op("Expand", [b.op("Unsqueeze", [chosen, b.const([-1], np.int64)], f"{base}/Unsqueeze"),
                             b.const([1, 1, per], np.int64)], f"{base}/Expand_2")
    mask = b.op("Cast", [b.op("Reshape", [chosen, b.const([-1, m.num_experts], np.int64)], f"{base}/Reshape_1")],
                f"{base}/Cast", to=ir.DataType.BOOL)
    return b.op("Where", [mask, select, _lowest(e)], f"{base}/Where")


def _sigmoid_input(e: "Emitter", base: str, x: ir.Value, logits: ir.Value, router: ir.Value, experts: Experts,
                   name: str) -> ir.Value:
    """Llama 4: the top-1 expert (the op's softmax top-1 renormalised: weight 1) of x x sigmoid(its logit)."""
    b = e.b
    top = b.op("ReduceMax", [logits, b.const([-1], np.int64)], f"{base}/router/ReduceMax", keepdims=1)
    scaled = b.op("Mul", [x, b.op("Sigmoid", [top], f"{base}/router/Sigmoid")], f"{base}/router/Mul")
    return experts.op(scaled, router, 1, True, name)


def _lowest(e: "Emitter") -> ir.Value:
    return e.b.const(np.asarray(e.finfo().min, dtype=e.io.np_dtype).reshape(1))


# Providers whose QMoE honours `router_weights` (input 14: select on router_probs, mix with router_weights).
# onnxruntime's CUDA QMoE never reads it (contrib_ops/cuda/moe/moe_quantization.cc: softmax + top k of router_probs
# only, for selection and mixing alike; not known for dml / webgpu), so other builds route ERNIE's biased selection
# as the float MoE op does: the unselected logits pushed to the dtype's lowest. Tests empty it to run that on the CPU.
ROUTER_WEIGHTS_FOR = ("cpu",)


def _biased_selection(e: "Emitter", i: int, base: str, x: ir.Value, router: ir.Value, experts: Experts,
                      name: str) -> ir.Value:
    """Select the top k of softmax(logits) + bias, mix with softmax(logits) renormalised over them."""
    m, b = e.spec.moe, e.b
    bias = _selection_bias(e, i, base)
    probs = b.op("Softmax", [router], f"{base}/router/Softmax", axis=-1)
    select = b.op("Add", [probs, bias], f"{base}/router/Add")
    if experts.quantized and getattr(e.plan, "provider", "cpu") in ROUTER_WEIGHTS_FOR:
        return experts.op(x, select, m.top_k, True, name, router_weights=probs)
    _, idx = e.float32_op("TopK", [select, b.const([m.top_k], np.int64)], f"{base}/router/TopK", n_out=2, axis=-1)
    low = b.op("Expand", [_lowest(e), b.op("Shape", [router], f"{base}/router/Shape")], f"{base}/router/Expand")
    zeros = b.op("Expand", [e.b.const(np.zeros(1, e.io.np_dtype)), b.op("Shape", [idx], f"{base}/router/Shape_1")],
                 f"{base}/router/Expand_1")
    keep = b.op("ScatterElements", [low, idx, zeros], f"{base}/router/ScatterElements", axis=-1)
    masked = b.op("Add", [router, keep], f"{base}/router/Add_1")
    return experts.op(x, masked, m.top_k, True, name)


def _sparsemixer(e: "Emitter", base: str, x: ir.Value, s: ir.Value, experts: Experts) -> ir.Value:
    """PhiMoE's top-2 sparse mixer (eval mode) as two k=1 passes; see the module docstring."""
    m, b, H = e.spec.moe, e.b, e.spec.hidden_size
    node = f"{base}/sparsemixer"
    axes = b.const([-1], np.int64)
    eps2 = e.scalar(2 * m.jitter_eps)
    zero = e.scalar(0.0)
    abs_s = b.op("Abs", [s], f"{node}/Abs")

    def weight(scores: ir.Value, tag: str) -> ir.Value:
        """1 / sum of exp(score - max) over the experts within the jitter threshold of the max."""
        top = b.op("ReduceMax", [scores, axes], f"{node}/{tag}/ReduceMax", keepdims=1)
        factor = b.op("Max", [abs_s, top], f"{node}/{tag}/Max")
        gap = b.op("Div", [b.op("Sub", [top, s], f"{node}/{tag}/Sub"), factor], f"{node}/{tag}/Div")
        masked = b.op("Greater", [gap, eps2], f"{node}/{tag}/Greater")
        ex = b.op("Exp", [b.op("Sub", [scores, top], f"{node}/{tag}/Sub_1")], f"{node}/{tag}/Exp")
        total = b.op("ReduceSum", [b.op("Where", [masked, zero, ex], f"{node}/{tag}/Where"), axes],
                     f"{node}/{tag}/ReduceSum", keepdims=1)
        return b.op("Reciprocal", [total], f"{node}/{tag}/Reciprocal")

    first = b.op("ArgMax", [s], f"{node}/ArgMax", axis=-1, keepdims=1)
    low = b.op("Expand", [_lowest(e), b.op("Shape", [first], f"{node}/Shape")], f"{node}/Expand")
    s2 = b.op("ScatterElements", [s, first, low], f"{node}/ScatterElements", axis=-1)
    w1, w2 = weight(s, "top1"), weight(s2, "top2")
    flat = b.op("Reshape", [x, b.const([-1, H], np.int64)], f"{node}/Reshape")
    kind = "QMoE" if experts.quantized else "MoE"
    y1 = experts.op(flat, s, 1, True, f"{base}/{kind}")
    y2 = experts.op(flat, s2, 1, True, f"{base}/{kind}_1")
    y = b.op("Add", [b.op("Mul", [y1, w1], f"{node}/Mul"), b.op("Mul", [y2, w2], f"{node}/Mul_1")], f"{node}/Add")
    return b.op("Reshape", [y, b.op("Shape", [x], f"{node}/Shape_1")], f"{node}/Reshape_1")
