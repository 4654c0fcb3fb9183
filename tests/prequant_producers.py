"""Pre-quantized HF checkpoints written the way their producers write them.

gptqmodel / AutoGPTQ and AutoAWQ do not install here (CUDA extensions compiled from source), so their
packers are transcribed from the producers' own code, loop for loop: AMD Quark's `Pack_4_bits.pack`
(amd-quark would replace this environment's onnx), AutoGPTQ's
`qlinear_cuda_old.QuantLinear.pack` (GPTQ "v1": zero points stored minus one, as gptqmodel still
writes for checkpoint_format "gptq") and AutoAWQ's `WQLinear_GEMM.from_linear` (nibble order 0 2 4 6
1 3 5 7). compressed-tensors installs cleanly and packs with its own `pack_to_int32`. Each writer gets
integer codes, scales and zero points and returns, besides the checkpoint tensors, the dequantized
weight computed from those integers before packing: the reference the reader is checked against.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def rtn(w: np.ndarray, bits: int, group: int, symmetric: bool, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round-to-nearest codes (N, K), fp16 scales and integer zero points (N, G) for w (N, K)."""
    N, K = w.shape
    g = w.reshape(N, K // group, group)
    top = (1 << bits) - 1
    if symmetric:
        scale = np.abs(g).max(-1) / ((top + 1) // 2 - 0.5)
        zero = np.full(scale.shape, (top + 1) // 2)
    else:
        lo, hi = g.min(-1), g.max(-1)
        scale = (hi - lo) / top
        zero = np.clip(np.round(-lo / scale), 1, top)  # >= 1: GPTQ v1 stores zero - 1 in unsigned words
    scale = scale.astype(np.float16).astype(np.float32)
    q = np.clip(np.round(g / scale[..., None] + zero[..., None]), 0, top).astype(np.int64)
    return q.reshape(N, K), scale.astype(np.float16), zero.astype(np.int64)


def dequantized(q, scale, zero, g_idx) -> np.ndarray:
    s = scale.astype(np.float32)[:, g_idx]
    return (q.astype(np.float32) - zero[:, g_idx].astype(np.float32)) * s


def gptq_pack(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int, g_idx: np.ndarray) -> dict:
    """AutoGPTQ qlinear_cuda_old.QuantLinear.pack (bits 2, 4, 8), numpy for torch."""
    intweight = q.T.astype(np.uint32)  # (K, N)
    qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), dtype=np.uint32)
    i = 0
    row = 0
    while row < qweight.shape[0]:
        for j in range(i, i + (32 // bits)):
            qweight[row] |= intweight[j] << (bits * (j - i))
        i += 32 // bits
        row += 1
    zeros = zero.T - 1  # (G, N)
    zeros = zeros.astype(np.uint32)
    qzeros = np.zeros((zeros.shape[0], zeros.shape[1] // 32 * bits), dtype=np.uint32)
    i = 0
    col = 0
    while col < qzeros.shape[1]:
        for j in range(i, i + (32 // bits)):
            qzeros[:, col] |= zeros[:, j] << (bits * (j - i))
        i += 32 // bits
        col += 1
    return {"qweight": qweight.astype(np.int32), "qzeros": qzeros.astype(np.int32),
            "scales": np.ascontiguousarray(scale.T), "g_idx": g_idx.astype(np.int32)}


def awq_pack(q: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> dict:
    """AutoAWQ WQLinear_GEMM.from_linear (4 bits), numpy for torch."""
    pack_num = 32 // 4
    intweight = q.T.astype(np.int32)  # (K, N)
    qweight = np.zeros((intweight.shape[0], intweight.shape[1] // 32 * 4), dtype=np.int32)
    for col in range(intweight.shape[1] // pack_num):
        for i in range(pack_num):
            qweight[:, col] |= intweight[:, col * pack_num + AWQ_ORDER[i]] << (i * 4)
    zeros = zero.T.astype(np.int32)  # (G, N)
    qzeros = np.zeros((zeros.shape[0], zeros.shape[1] // 32 * 4), dtype=np.int32)
    for col in range(zeros.shape[1] // pack_num):
        for i in range(pack_num):
            qzeros[:, col] |= zeros[:, col * pack_num + AWQ_ORDER[i]] << (i * 4)
    return {"qweight": qweight, "qzeros": qzeros, "scales": np.ascontiguousarray(scale.T)}


def quark_pack_4_bits(to_pack: np.ndarray, signed: bool) -> np.ndarray:
    """AMD Quark's Pack_4_bits.pack for per_group (transpose, then AWQ's order along the last axis)."""
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    pack_num = 8
    to_pack = np.ascontiguousarray(to_pack.T).astype(np.int32)
    packed = np.zeros((to_pack.shape[0], (to_pack.shape[1] + pack_num - 1) // pack_num), dtype=np.int32)
    for c in range(packed.shape[1]):
        for i in range(pack_num):
            idx = c * pack_num + order_map[i]
            if idx >= to_pack.shape[1]:
                continue
            col = to_pack[:, idx]
            if signed:
                col = col & 0x0F
            packed[:, c] = packed[:, c] | (col << (i * 4))
    return packed


def quark_pack(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, signed: bool) -> dict:
    """Quark's HF export of int4 / uint4 per-group weights: weight (K, N/8), weight_scale (K/g, N),
    weight_zero_point (K/g, N/8); int4 stores value - 8 (two's complement), zero points likewise."""
    shift = 8 if signed else 0
    return {"weight": quark_pack_4_bits(q - shift, signed), "weight_scale": np.ascontiguousarray(scale.T),
            "weight_zero_point": quark_pack_4_bits(zero - shift, signed)}


def compressed_tensors_pack(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int, symmetric: bool) -> dict:
    """compressed-tensors' PackedQuantizationCompressor layout, packed by the library's pack_to_int32."""
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    offset = 1 << (bits - 1)
    signed = torch.from_numpy((q - offset).astype(np.int8))
    out = {"weight_packed": pack_to_int32(signed, bits).numpy(), "weight_scale": scale.astype(np.float32),
           "weight_shape": np.array(q.shape, dtype=np.int64)}
    if not symmetric:
        out["weight_zero_point"] = pack_to_int32(torch.from_numpy((zero - offset).astype(np.int8)), bits,
                                                 packed_dim=0).numpy()
    return out


def quantization_config(method: str, bits: int, group: int, symmetric: bool, act_order: bool = False) -> dict:
    if method.startswith("quark"):
        weight = {"dtype": method.split("-")[1], "qscheme": "per_group", "ch_axis": 1, "group_size": group,
                  "symmetric": symmetric, "is_dynamic": False, "round_method": "half_even"}
        return {"quant_method": "quark", "global_quant_config": {"weight": weight, "input_tensors": None,
                                                                 "output_tensors": None, "bias": None},
                "layer_quant_config": {}, "exclude": ["lm_head"], "export": {"pack_method": "reorder"}}
    if method == "gptq":
        return {"quant_method": "gptq", "bits": bits, "group_size": group, "sym": symmetric, "desc_act": act_order,
                "checkpoint_format": "gptq"}
    if method == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": not symmetric, "version": "gemm"}
    weights = {"num_bits": bits, "type": "int", "symmetric": symmetric,
               "strategy": "group" if group > 0 else "channel", "group_size": group if group > 0 else None}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}, "ignore": ["lm_head"]}


def write_prequantized(float_dir: Path, out: Path, ref_out: Path, method: str, bits: int, group: int,
                       symmetric: bool, act_order: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    """Quantize every decoder Linear of the float checkpoint in `float_dir` as `method` does and write it
    to `out` (config.json with quantization_config); write the same model with the dequantized weights
    to `ref_out` (a float checkpoint). Returns module -> dequantized weight."""
    import shutil

    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(seed)
    state = load_file(str(float_dir / "model.safetensors"))
    config = json.loads((float_dir / "config.json").read_text())
    quantized, reference, deq = {}, {}, {}
    for name, w in state.items():
        module = name[:-len(".weight")]
        if not (name.endswith("_proj.weight") and ".layers." in name):
            quantized[name] = reference[name] = w
            continue
        w = w.astype(np.float32)
        N, K = w.shape
        g = K if group <= 0 else group
        q, scale, zero = rtn(w, bits, g, symmetric, rng)
        g_idx = np.arange(K) // g
        if act_order:  # desc_act: channels quantized in a permuted order, so each group is scattered over K
            perm = rng.permutation(K)
            g_idx = g_idx[np.argsort(perm)]
            q, _, _ = rtn_with_groups(w, scale, zero, g_idx, bits)
        deq[module] = reference[name] = dequantized(q, scale, zero, g_idx)
        packed = {"gptq": lambda: gptq_pack(q, scale, zero, bits, g_idx), "awq": lambda: awq_pack(q, scale, zero),
                  "compressed-tensors": lambda: compressed_tensors_pack(q, scale, zero, bits, symmetric),
                  "quark-int4": lambda: quark_pack(q, scale, zero, True),
                  "quark-uint4": lambda: quark_pack(q, scale, zero, False)}[method]()
        quantized.update({f"{module}.{k}": np.ascontiguousarray(v) for k, v in packed.items()})
    for folder, tensors, cfg in ((out, quantized, {**config, "quantization_config":
                                                   quantization_config(method, bits, group, symmetric, act_order)}),
                                 (ref_out, reference, config)):
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(cfg))
        for extra in float_dir.iterdir():
            if extra.name not in ("model.safetensors", "config.json") and extra.is_file():
                shutil.copy(extra, folder / extra.name)
    return deq


def rtn_with_groups(w, scale, zero, g_idx, bits):
    """Codes for given per-group scales/zeros where group membership is g_idx (act-order)."""
    top = (1 << bits) - 1
    s = scale.astype(np.float32)[:, g_idx]
    q = np.clip(np.round(w / s + zero[:, g_idx]), 0, top).astype(np.int64)
    return q, scale, zero
