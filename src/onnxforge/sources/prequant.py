"""Pre-quantized Hugging Face checkpoints (GPTQ, AWQ, compressed-tensors, AMD Quark) carried over exactly.

config.json's `quantization_config` says how the Linear weights are stored; every format here is
`w[n, k] = scale[n, group(k)] x (code[n, k] - zero[n, group(k)])` with integer codes and zero points,
which is exactly MatMulNBits' dequantization. `PrequantSource` wraps the folder's `HFSource` and
presents each quantized module as a virtual `{module}.weight`: `read()` dequantizes it (fp32),
`native_blocks()` hands over the codes, scales and zero points in MatMulNBits' layout.

- GPTQ (`qweight` int32 (K*bits/32, N) packed along K, `qzeros` (groups, N*bits/32) packed along N,
  `scales` (groups, N), `g_idx` (K,)); checkpoint_format "gptq" stores zero points minus one
  ("gptq_v2" does not). Bits 2, 4, 8. An act-order `g_idx` (groups not contiguous in K) has no
  MatMulNBits form: such weights are dequantized and re-quantized, and the report says so.
- AWQ, version "gemm" (`qweight` (K, N/8) packed along N in the order 0 2 4 6 1 3 5 7, `qzeros`,
  `scales` (groups, N)). 4 bits.
- AMD Quark's export, int4/uint4 per group: AWQ's layout (`weight` (K, N/8) int32, `weight_zero_point`,
  `weight_scale` (groups, N)); int4 nibbles are two's complement, pack_method "reorder" is AWQ's order.
- compressed-tensors "pack-quantized" (llm-compressor W4A16 / W8A16 ...): `weight_packed` int32
  (N, K*bits/32), codes stored as value + 2**(bits-1); `weight_scale` (N, groups) or (N, 1) per channel;
  `weight_zero_point` packed along N when asymmetric; `weight_g_idx` for act-order groups.
2-bit codes go into 4-bit storage (CPU MatMulNBits at 2 bits is fast only at block 32); a group larger
than 128 (per channel included) is cut into blocks of 128 that repeat its scale and zero point.
"""
from __future__ import annotations

import threading

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..errors import CheckpointError
from .base import NativeBlocks, NativeFormat
from .hf import refuse_scaled_tensors
from .qconfig_fields import CHECKS

SUPPORTED = ("gptq", "awq (version gemm)", "compressed-tensors (format pack-quantized)",
             "quark (int4/uint4 weights per group)")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's gemm packing: nibble i holds column AWQ_ORDER[i] of 8
MAX_BLOCK = 128


@dataclass(frozen=True)
class Scheme:
    method: str  # "gptq", "awq", "compressed-tensors"
    bits: int
    group_size: int  # -1: per output channel
    symmetric: bool
    zeros_minus_one: bool = False  # GPTQ v1
    signed: bool = False  # Quark int4: two's complement nibbles
    reorder: bool = True  # Quark pack_method "reorder" (AWQ's nibble order); "order": plain
    dropped: tuple[str, ...] = ()  # quantized activations left out (only with drop_activation_quant)

    @property
    def origin(self) -> str:
        group = "per channel" if self.group_size <= 0 else f"g{self.group_size}"
        name = {"compressed-tensors": "compressed-tensors", "quark": "Quark"}.get(self.method, self.method.upper())
        kind = ("int" if self.signed or self.method != "quark" else "uint") + str(self.bits)
        return f"{name} {kind} {group} {'sym' if self.symmetric else 'asym'}"


@dataclass
class Unpacked:
    """One weight in plain integers: codes (N, K) uint8, scales (N, G) float32, zeros (N, G) int16,
    group (K,) int64: the group of each input channel."""

    codes: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray
    group: np.ndarray

    def dequantize(self) -> np.ndarray:
        s, z = self.scales[:, self.group], self.zeros[:, self.group].astype(np.float32)
        return (self.codes.astype(np.float32) - z) * s


def quantization_scheme(config: dict, path, drop_activation_quant: bool = False) -> Scheme | None:
    """The scheme `quantization_config` describes, None if there is none; an unsupported one is an error.
    Quantized activations are an error too, unless `drop_activation_quant` (then Scheme.dropped lists them)."""
    q = config.get("quantization_config")
    if not q:
        return None
    if not isinstance(q, dict):
        raise CheckpointError(f"{path}/config.json: quantization_config must be an object")
    method = str(q.get("quant_method", "")).lower()

    def refuse(what: str) -> CheckpointError:
        return CheckpointError(
            f"{path} is a pre-quantized checkpoint in {what}, which onnxforge cannot carry over (supported: "
            f"{', '.join(SUPPORTED)}). Build from the original float checkpoint instead.")

    if method == "mxfp4":  # GPT-OSS's MXFP4 experts: graph/experts.py decodes (or, for CUDA, carries over) them
        return None
    parse = {"gptq": _gptq, "awq": _awq, "compressed-tensors": _compressed_tensors, "quark": _quark}.get(method)
    if parse is None:
        raise refuse(f"the {method or 'unnamed'!r} format")
    scheme = parse(q, refuse)
    dropped: list[str] | None = [] if drop_activation_quant else None
    CHECKS[method](q, path, dropped)  # every other field: read, known to be inert, or refused (qconfig_fields.py)
    return replace(scheme, dropped=tuple(dropped or ()))


def _gptq(q: dict, refuse) -> Scheme:
    bits = int(q.get("bits", 4))
    if bits not in (2, 4, 8):
        raise refuse(f"GPTQ with {bits} bits (supported: 2, 4, 8)")
    fmt = str(q.get("checkpoint_format", q.get("format", "gptq"))).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise refuse(f"GPTQ checkpoint_format {fmt!r}")
    return Scheme("gptq", bits, int(q.get("group_size", 128)), bool(q.get("sym", True)), fmt == "gptq")


def _awq(q: dict, refuse) -> Scheme:
    version = str(q.get("version", "gemm")).lower()
    bits = int(q.get("bits", q.get("w_bit", 4)))
    if version != "gemm" or bits != 4:
        raise refuse(f"AWQ version {version!r} at {bits} bits")
    return Scheme("awq", 4, int(q.get("group_size", q.get("q_group_size", 128))), not q.get("zero_point", True))


def _compressed_tensors(q: dict, refuse) -> Scheme:
    fmt = str(q.get("format", "")).lower()
    groups = q.get("config_groups") or {}
    weights = [g.get("weights") for g in groups.values() if isinstance(g, dict)]
    if fmt != "pack-quantized" or not weights or any(not isinstance(w, dict) for w in weights):
        raise refuse(f"compressed-tensors format {fmt!r}")
    if any(w != weights[0] for w in weights):
        raise refuse("compressed-tensors with different weight schemes per group of layers")
    w = weights[0]
    if w.get("type", "int") != "int" or int(w.get("num_bits", 0)) not in (2, 4, 8):
        raise refuse(f"compressed-tensors {w.get('type')} weights at {w.get('num_bits')} bits")
    strategy = str(w.get("strategy", "")).lower()
    if strategy not in ("group", "channel"):
        raise refuse(f"compressed-tensors strategy {strategy!r} (supported: group, channel)")
    group = int(w.get("group_size") or -1) if strategy == "group" else -1
    return Scheme("compressed-tensors", int(w["num_bits"]), group, bool(w.get("symmetric", True)))


def _quark(q: dict, refuse) -> Scheme:
    """AMD Quark's exported (safetensors) format: int4/uint4 weight-only, per group."""
    g = q.get("global_quant_config") or {}
    w = g.get("weight") or {}
    if isinstance(w, list) or q.get("layer_quant_config") or q.get("layer_type_quant_config"):
        raise refuse("Quark with per-layer or several weight schemes")
    if g.get("bias"):
        raise refuse("Quark with quantized biases")
    dtype = str(w.get("dtype", "")).lower()
    if dtype not in ("int4", "uint4") or str(w.get("qscheme", "")).lower() != "per_group":
        raise refuse(f"Quark {dtype or 'unknown'} weights, {w.get('qscheme')} (supported: int4/uint4 per_group)")
    pack = str((q.get("export") or {}).get("pack_method", "reorder")).lower()
    return Scheme("quark", 4, int(w.get("group_size") or 128), bool(w.get("symmetric", dtype == "int4")),
                  signed=dtype == "int4", reorder=pack == "reorder")


def _unpack_rows(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """int32 words (..., W) holding 32/bits codes each, low bits first -> (..., count) uint8."""
    words = packed.astype(np.int32, copy=False).view(np.uint32)
    shifts = np.arange(0, 32, bits, dtype=np.uint32)
    codes = (words[..., None] >> shifts) & np.uint32((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :count].astype(np.uint8)


class PrequantSource:
    """An HFSource whose Linear weights are stored quantized, presented as `{module}.weight`."""

    def __init__(self, inner, scheme: Scheme):
        self._inner = inner
        self.scheme = scheme
        self.path, self.config, self.generation_config = inner.path, inner.config, inner.generation_config
        marker = {"gptq": "qweight", "awq": "qweight", "compressed-tensors": "weight_packed",
                  "quark": "weight_scale"}[scheme.method]
        names = inner.tensor_names()
        self._modules = {n[:-len(marker) - 1] for n in names if n.endswith("." + marker)}
        if not self._modules:
            raise CheckpointError(f"{self.path}: config.json says {scheme.origin}, but no tensor ends in .{marker}")
        parts = {"gptq": ("qweight", "qzeros", "scales", "g_idx"), "awq": ("qweight", "qzeros", "scales"),
                 "compressed-tensors": ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point",
                                        "weight_g_idx"),
                 "quark": ("weight", "weight_scale", "weight_zero_point")}[scheme.method]
        self._hidden = {f"{m}.{p}" for m in self._modules for p in parts}
        refuse_scaled_tensors(inner, f"config.json's quantization_config describes {scheme.origin} weights, not "
                              "these", skip=self._hidden)
        self._shapes = {m: self._shape_of(m) for m in self._modules}
        self._formats: dict[str, NativeFormat] = {}
        self._last = threading.local()  # read_rows: the dequantized weight being read in slices

    # -- Source protocol ------------------------------------------------------------------
    def tensor_names(self) -> list[str]:
        names = [n for n in self._inner.tensor_names() if n not in self._hidden]
        return names + sorted(f"{m}.weight" for m in self._modules)

    def has(self, name: str) -> bool:
        return self._module(name) is not None or (name not in self._hidden and self._inner.has(name))

    def shape(self, name: str) -> tuple[int, ...]:
        m = self._module(name)
        return self._shapes[m] if m is not None else self._inner.shape(name)

    def read(self, name: str) -> np.ndarray:
        m = self._module(name)
        return self._inner.read(name) if m is None else self._unpack(m).dequantize()

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Float tensors: a slice read. Quantized ones are dequantized whole, once per reading thread
        (a job reads its slices in order from one thread), and sliced."""
        m = self._module(name)
        if m is None:
            return self._inner.read_rows(name, start, stop)
        last = getattr(self._last, "value", None)
        if last is None or last[0] != name:
            self._last.value = last = None  # drop the previous weight before making the next
            self._last.value = last = (name, self.read(name))
        if stop >= last[1].shape[0]:
            self._last.value = None  # the last slice: forget the weight
        return last[1][start:stop]

    def stored_format(self, name: str) -> str:
        return self.scheme.origin if self._module(name) is not None else "float"

    def native_format(self, name: str) -> NativeFormat | None:
        m = self._module(name)
        if m is None:
            return None
        if m not in self._formats:
            self._formats[m] = self._format(m)
        return self._formats[m]

    def native_blocks(self, name: str, bits: int, block_size: int) -> NativeBlocks | None:
        fmt = self.native_format(name)
        if fmt is None or fmt.bits == 0 or (fmt.bits, fmt.block_size) != (bits, block_size):
            return None
        u = self._unpack(self._module(name))
        N, K = u.codes.shape
        shift = (1 << (bits - 1)) - (1 << (self.scheme.bits - 1))  # 2-bit codes in 4-bit storage
        codes = (u.codes + shift).reshape(N, K // block_size, block_size)
        per_block = u.group[::block_size]  # groups are contiguous here and blocks never straddle two
        scales = u.scales[:, per_block]
        zeros = (u.zeros[:, per_block] + shift).astype(np.uint8)
        data = codes if bits == 8 else codes[..., 0::2] | (codes[..., 1::2] << 4)
        zero_points = None
        if fmt.zero_points:
            zero_points = zeros if bits == 8 else _pack_nibbles(zeros)
        elif (zeros != 1 << (bits - 1)).any():
            raise CheckpointError(f"{name}: the checkpoint says symmetric, but its zero points are not "
                                  f"{1 << (self.scheme.bits - 1)}; the file is inconsistent")
        return NativeBlocks(np.ascontiguousarray(data, np.uint8), np.ascontiguousarray(scales, np.float32),
                            zero_points, bits, block_size, fmt.origin)

    def __getattr__(self, attr: str) -> Any:  # write_tokenizer, fingerprint, close, read_slice, ...
        return getattr(self._inner, attr)

    # -- the formats -----------------------------------------------------------------------
    def _module(self, name: str) -> str | None:
        if name.endswith(".weight") and name[:-7] in self._modules:
            return name[:-7]
        return None

    def _raw(self, name: str) -> np.ndarray:
        f, _ = self._inner._info(name)
        return f.read(name)

    def _shape_of(self, m: str) -> tuple[int, int]:
        s, inner = self.scheme, self._inner
        if s.method == "gptq":
            rows, n = inner.shape(f"{m}.qweight")
            return n, rows * 32 // s.bits
        if s.method in ("awq", "quark"):
            k, cols = inner.shape(f"{m}.qweight" if s.method == "awq" else f"{m}.weight")
            return cols * 8, k
        n, k = (int(v) for v in self._raw(f"{m}.weight_shape"))
        return n, k

    def _format(self, m: str) -> NativeFormat:
        s = self.scheme
        N, K = self._shapes[m]
        group = K if s.group_size <= 0 else s.group_size
        block = next((b for b in (128, 64, 32, 16) if group % b == 0 and K % b == 0 and b <= MAX_BLOCK), 0)
        act_order = self._act_order(m, K, group)
        if not block or act_order:
            why = "act-order g_idx" if act_order else f"group size {s.group_size}"
            return NativeFormat(f"{s.origin} ({why}: no exact MatMulNBits form)", 0, 0, False, False)
        return NativeFormat(s.origin, 8 if s.bits == 8 else 4, block, not s.symmetric, False)

    def _act_order(self, m: str, K: int, group: int) -> bool:
        name = f"{m}.g_idx" if self.scheme.method == "gptq" else f"{m}.weight_g_idx"
        if not self._inner.has(name):
            return False
        return not np.array_equal(self._raw(name).astype(np.int64), np.arange(K) // group)

    def _unpack(self, m: str) -> Unpacked:
        s = self.scheme
        N, K = self._shapes[m]
        group = K if s.group_size <= 0 else s.group_size
        mask = (1 << s.bits) - 1
        if s.method == "gptq":
            codes = _unpack_rows(self._raw(f"{m}.qweight").T, s.bits, K)  # (N, K)
            zeros = _unpack_rows(self._raw(f"{m}.qzeros"), s.bits, N).T.astype(np.int16)  # (N, G)
            if s.zeros_minus_one:
                zeros = (zeros + 1) & mask
            scales = self._raw(f"{m}.scales").astype(np.float32).T
            g_idx = self._raw(f"{m}.g_idx").astype(np.int64) if self._inner.has(f"{m}.g_idx") else None
        elif s.method in ("awq", "quark"):  # (K, N/8) and (groups, N/8), packed along N
            order = np.argsort(AWQ_ORDER) if s.reorder else np.arange(8)  # column j sits in nibble order[j]
            flip = np.uint8(8 if s.signed else 0)  # Quark int4: two's complement -> unsigned, value + 8

            def columns(packed):
                nibbles = _unpack_rows(packed, 4, packed.shape[-1] * 8).reshape(*packed.shape, 8)
                return nibbles[..., order].reshape(packed.shape[0], -1) ^ flip

            names = ("qweight", "qzeros", "scales") if s.method == "awq" else ("weight", "weight_zero_point",
                                                                                 "weight_scale")
            codes = columns(self._raw(f"{m}.{names[0]}")).T  # (N, K)
            scales = self._raw(f"{m}.{names[2]}").astype(np.float32).T
            if self._inner.has(f"{m}.{names[1]}"):
                zeros = columns(self._raw(f"{m}.{names[1]}")).T.astype(np.int16)
            else:  # Quark symmetric int4 may leave the (zero) zero points out
                zeros = np.full(scales.shape, 8, np.int16)
            g_idx = None
        else:
            codes = _unpack_rows(self._raw(f"{m}.weight_packed"), s.bits, K)
            scales = self._raw(f"{m}.weight_scale").astype(np.float32)
            if s.symmetric:
                zeros = np.full(scales.shape, 1 << (s.bits - 1), np.int16)
            else:  # packed along N, stored as value + 2**(bits-1), like the codes
                zeros = _unpack_rows(self._raw(f"{m}.weight_zero_point").T, s.bits, N).T.astype(np.int16)
            g_idx = self._raw(f"{m}.weight_g_idx").astype(np.int64) if self._inner.has(f"{m}.weight_g_idx") else None
        if g_idx is None:
            g_idx = np.arange(K) // group if scales.shape[1] > 1 else np.zeros(K, np.int64)
        if scales.shape != zeros.shape or scales.shape[0] != N or g_idx.shape != (K,) or g_idx.max() >= scales.shape[1]:
            raise CheckpointError(f"{self.path}: the {s.origin} tensors of {m} have inconsistent shapes")
        return Unpacked(codes, scales, zeros, g_idx)


def _pack_nibbles(values: np.ndarray) -> np.ndarray:
    """(N, G) 4-bit values -> MatMulNBits packed zero points (N, ceil(G/2)), low nibble first."""
    if values.shape[1] % 2:
        values = np.concatenate([values, np.zeros((values.shape[0], 1), values.dtype)], axis=1)
    return (values[:, 0::2] | (values[:, 1::2] << 4)).astype(np.uint8)
