"""MoE experts read back into the conversion's reference (verify/stored.py).

The MoE / QMoE op holds fc1 (experts, 2I, H) with SwiGLU fused (`swiglu_fusion` 1: row 2j gate j, row
2j+1 up j; 2: gate rows, then up rows) and fc2 (experts, H, I). QMoE's integer forms (quant_type "int":
4 or 8 bits, block-wise or per-channel scales, optional packed zero points, among them the closest form
of GGUF's types with a minimum) are dequantized one expert at a time by quant/qmoe.py's dequantize_qmoe,
which tests/test_moe_op.py checks against the op itself; the float MoE op's are read as they are. They
go into transformers' stacked expert parameters `gate_up_proj` / `down_proj` of the layer's `experts`
module, in that module's own layout (its `is_concatenated` / `is_transposed` flags, as transformers'
experts implementations read them); each expert's relative difference is its own entry (`down_proj[3]`),
so one lost expert shows as plainly as a lost projection. CUDA QMoE's "fp4" form (GPT-OSS's MXFP4 blocks
carried over: weight (E, K, N/2) with the codes of rows 2j and 2j+1 in one byte, E8M0 scales (E, N, K/32),
a global scale per expert at inputs 15 / 16) is decoded with quant/mxfp4.py's E2M1 values. The op's expert
biases (E, 2I) / (E, H) (GPT-OSS's `gate_up_proj_bias` / `down_proj_bias`) go into the module's bias parameters,
fc1's in its gate/up layout. An -e cuda QMoE build's intermediate size is zero-padded to a multiple of 64
(graph/experts.py pad_intermediate); the padded fc1 rows, fc2 columns and fc1 bias columns (its last ones:
fc1 is interleaved) are cut off, so the reference keeps the checkpoint's sizes. Expert modules
without stacked parameters are not read.
"""
from __future__ import annotations

import re

import numpy as np

_LAYER = re.compile(r"layers\.(\d+)\.")
# per op: weight input -> (fc, scales input, zero points input, global scales input, transformers parameter)
_ROLES = {"QMoE": {2: ("fc1", 3, 11, 15, "gate_up_proj"), 5: ("fc2", 6, 12, 16, "down_proj")},
          "MoE": {2: ("fc1", None, None, None, "gate_up_proj"), 4: ("fc2", None, None, None, "down_proj")}}
_READABLE = ("int", "fp4")  # QMoE quant_type values read back
# per op: expert bias input -> the projection it belongs to (fc1's in the op's fused SwiGLU layout, like its weight)
_BIAS_ROLES = {"QMoE": {4: "fc1", 7: "fc2"}, "MoE": {3: "fc1", 5: "fc2"}}


def expert_slots(graph) -> dict[str, dict]:
    """Per expert weight initializer of a MoE / QMoE node: how the op reads it."""
    import onnx

    slots = {}
    for n in graph.node:
        if n.op_type not in _ROLES:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        ins = list(n.input) + [""] * 17
        qt = attrs.get("quant_type", b"int")
        qt = "float" if n.op_type == "MoE" else qt.decode() if isinstance(qt, bytes) else qt
        for index, (fc, scales, zp, gs, param) in _ROLES[n.op_type].items():
            if ins[index]:
                slots[ins[index]] = {
                    "fc": fc, "param": param, "form": qt, "readable": qt == "float" or qt in _READABLE,
                    "bits": attrs.get(f"{fc}_expert_weight_bits", attrs.get("expert_weight_bits", 4)),
                    "block": attrs.get("block_size", 0), "fusion": attrs.get("swiglu_fusion", 0),
                    "scales": ins[scales] if scales else "", "zero_points": ins[zp] if zp else "",
                    "global_scales": ins[gs] if gs else ""}
    return slots


def expert_bias_slots(graph) -> dict[str, dict]:
    """Per expert bias initializer (E, N) of a MoE / QMoE node: its projection and fc1's SwiGLU fusion."""
    import onnx

    slots = {}
    for n in graph.node:
        if n.op_type not in _BIAS_ROLES:
            continue
        fusion = next((onnx.helper.get_attribute_value(a) for a in n.attribute if a.name == "swiglu_fusion"), 0)
        for index, fc in _BIAS_ROLES[n.op_type].items():
            if index < len(n.input) and n.input[index]:
                slots[n.input[index]] = {"fc": fc, "fusion": fusion}
    return slots


def _experts_module(model, layer: int):
    pattern = re.compile(rf"(^|\.)layers\.{layer}\.(.+\.)?experts$")
    for name, mod in model.named_modules():
        if pattern.search(name) and hasattr(mod, "gate_up_proj") and hasattr(mod, "down_proj"):
            return name, mod
    return None, None


def _expert(inits, name: str, slot: dict, e: int) -> np.ndarray:
    """float32 (N, K) of expert `e` as the op computes it."""
    from ..quant.qmoe import dequantize_qmoe

    data = inits.read(name)[e]
    if slot["form"] == "float":
        return np.asarray(data, dtype=np.float32)
    if slot["form"] == "fp4":
        return _fp4_expert(inits, data, slot, e)
    zp = inits.read(slot["zero_points"])[e] if slot["zero_points"] else None
    return dequantize_qmoe(np.asarray(data), np.asarray(inits.read(slot["scales"])[e]),
                           None if zp is None else np.asarray(zp), slot["bits"], slot["block"])


def _fp4_expert(inits, data, slot: dict, e: int) -> np.ndarray:
    """float32 (N, K) of one expert of CUDA QMoE's fp4 form: the byte at [k, j] holds rows 2j (low nibble) and
    2j + 1 (high nibble) of column k, as graph/experts.py's fp4_pack writes them."""
    from ..quant.mxfp4 import FP4_VALUES

    data = np.asarray(data, dtype=np.uint8)
    codes = np.empty((data.shape[1] * 2, data.shape[0]), np.uint8)
    codes[0::2], codes[1::2] = (data & 0x0F).T, (data >> 4).T
    exponents = np.asarray(inits.read(slot["scales"])[e]).view(np.uint8).astype(np.int32) - 127
    w = FP4_VALUES[codes] * np.repeat(np.ldexp(np.float32(1), exponents), 32, axis=1)[:, :codes.shape[1]]
    if slot["global_scales"]:
        w *= np.float32(np.asarray(inits.read(slot["global_scales"]))[e])
    return w.astype(np.float32)


def _as_param(w: np.ndarray, slot: dict, mod) -> np.ndarray | None:
    """One expert's (N, K) in the layout of the transformers parameter; None when fc1's fusion is unknown."""
    if slot["fc"] == "fc1":
        if slot["fusion"] not in (1, 2):
            return None
        gate, up = (w[0::2], w[1::2]) if slot["fusion"] == 1 else np.split(w, 2)
        if getattr(mod, "is_concatenated", True):
            w = np.concatenate([gate, up])
        else:
            w = np.empty_like(w)
            w[0::2], w[1::2] = gate, up
    return w.T if _transposed(mod) else w


def _unpadded(w: np.ndarray, slot: dict, mod) -> np.ndarray:
    """One expert's (N, K) without the zero padding of a CUDA build's intermediate size (graph/experts.py
    pad_intermediate: fc1's last rows, fc2's last columns), where the reference's experts are narrower."""
    d = mod.down_proj.shape
    inter = d[1] if _transposed(mod) else d[2]
    if slot["fc"] == "fc1" and w.shape[0] > 2 * inter and not w[2 * inter:].any():
        return w[:2 * inter]
    if slot["fc"] != "fc1" and w.shape[1] > inter and not w[:, inter:].any():
        return w[:, :inter]
    return w


def _transposed(mod) -> bool:
    """The module's `is_transposed` flag; without one (Llama 4's experts), read from the two shapes: transposed
    gate_up_proj (E, H, 2I) beside down_proj (E, I, H), else (E, 2I, H) beside (E, H, I) (never both)."""
    flag = getattr(mod, "is_transposed", None)
    if flag is not None:
        return bool(flag)
    (_, _, b), (_, c, _) = mod.gate_up_proj.shape, mod.down_proj.shape
    return b == 2 * c


def load_experts(model, inits, group: dict, report) -> bool:
    """Copy one expert group's stored weights into the reference's stacked parameter, one expert at a time
    (each one's relative difference in `report.errors`); False when not read."""
    import torch

    names = [n for n in group.get("initializers", []) if n in inits.experts]
    slot = inits.experts[names[0]] if len(names) == 1 else None
    layer = _LAYER.search(names[0]) if names else None
    if slot is None or not slot["readable"] or layer is None:
        return False
    where, mod = _experts_module(model, int(layer.group(1)))
    if mod is None:
        return False
    p = getattr(mod, slot["param"])
    E = inits.shape(names[0])[0]
    for e in range(E):
        w = _as_param(_unpadded(_expert(inits, names[0], slot, e), slot, mod), slot, mod)
        if w is None or p.shape[0] != E or tuple(p.shape[1:]) != w.shape:
            report.notes.append(f"{group['label']}: stored experts {(E, *np.shape(w))}, the reference's "
                                f"{where}.{slot['param']} {tuple(p.shape)}; kept original")
            return False
        with torch.no_grad():
            o = p[e].detach().double().numpy()
            diff2 = float(((w.astype(np.float64) - o) ** 2).sum())
            ref2 = float((o ** 2).sum())
            p[e].copy_(torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)))
        report.errors[f"{where}.{slot['param']}[{e}]"] = float(np.sqrt(diff2 / ref2)) if ref2 > 0 else float(diff2 > 0)
    return True


def load_expert_bias(model, params: dict, inits, group: dict, sources, report, done: set) -> bool:
    """Copy one expert bias group (E, N) into the reference's stacked bias parameter (GPT-OSS's
    `gate_up_proj_bias` / `down_proj_bias`): fc1's in the module's gate/up layout, without the zero columns
    a CUDA build pads the intermediate size with (graph/experts.py pad_intermediate: fc1 is interleaved, so the
    padded units' biases are its last columns); False when not read."""
    import torch

    names = [n for n in group.get("initializers", []) if n in inits.expert_biases]
    if len(names) != 1 or len(sources) != 1 or sources[0][1] is not None:
        return False
    (name,), (param, _, _) = names, sources[0]
    slot, layer, p = inits.expert_biases[name], _LAYER.search(name), params.get(param)
    if p is None or p.ndim != 2 or layer is None:
        return False
    b = np.array(inits.read(name), dtype=np.float32)  # a copy: the memory map is read-only
    if slot["fc"] == "fc1":
        _, mod = _experts_module(model, int(layer.group(1)))
        if mod is None or slot["fusion"] not in (1, 2):
            return False
        d = mod.down_proj.shape
        width = 2 * (d[1] if _transposed(mod) else d[2])
        if b.shape[1] > width and not b[:, width:].any():  # the zero padding of a CUDA build
            b = b[:, :width]
        gate, up = (b[:, 0::2], b[:, 1::2]) if slot["fusion"] == 1 else np.split(b, 2, axis=1)
        if getattr(mod, "is_concatenated", True):
            b = np.concatenate([gate, up], axis=1)
        else:
            b = np.empty_like(b)
            b[:, 0::2], b[:, 1::2] = gate, up
    if b.shape != tuple(p.shape):
        report.notes.append(f"{group['label']}: stored expert biases {b.shape}, the reference's {param} "
                            f"{tuple(p.shape)}; kept original")
        return False
    with torch.no_grad():
        o = p.detach().double().numpy()
        diff2, ref2 = float(((b.astype(np.float64) - o) ** 2).sum()), float((o ** 2).sum())
        p.copy_(torch.from_numpy(np.ascontiguousarray(b)))
    report.errors[param] = float(np.sqrt(diff2 / ref2)) if ref2 > 0 else float(diff2 > 0)
    done.add(param)
    return True
