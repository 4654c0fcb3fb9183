"""The conversion's reference: transformers' model holding the build's own stored weights.

`verify` compares the ONNX model twice. Against the original weights it measures what quantization
costs; against a transformers model whose weights are the ONNX model's own (dequantized exactly as
MatMulNBits / GatherBlockQuantized compute them), what is left is the conversion: the graph, the
config, the layouts, plus the kernels' arithmetic. A tight threshold then catches a lost or misplaced
projection at any precision.

Which checkpoint tensor each stored weight holds comes from the build: build_report.json lists, per
weight group, the initializers it wrote (`initializers`) and the checkpoint tensors it read in order
(`sources`, `name[start:stop]` for a row range); for a build made before `initializers` was recorded,
the initializers whose names start with the group's label (`/model/layers.0/attn/qkv_proj` ->
`model.layers.0.attn.qkv_proj.*`), which is how the graph names them. A MatMul weight packs its sources' rows along N (q/k/v,
gate/up), so the dequantized (N, K) array is cut back into them in that order. The stored values are
read with numpy memory maps from model.onnx.data, one group at a time, dequantized a slice of rows at a
time and copied into the model's parameters in place: the original weights are overwritten as the
stored ones arrive (each tensor's relative difference to the original is measured on the way), so the
model is never held twice.

MoE experts (QMoE's integer forms and CUDA's fp4 form of GPT-OSS's MXFP4 blocks, the float MoE op) and their
stacked biases (GPT-OSS's) are read back into transformers' stacked expert parameters by verify/stored_moe.py, without
the zero padding of an -e cuda build's intermediate size; stacked experts that graph/dense_experts.py
stores as two plain MatMuls (Gemma 4's GeGLU experts) by `_load_stacked`. Checkpoint names are renamed as
transformers renames them on loading (parameter_names: Mixtral's `block_sparse_moe.gate` is `mlp.gate`). What
the build stores in other forms (1-D tables: norms, biases) is not read back: those parameters keep the
original values, rounded to the stored float type; `notes` says which.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .stored_moe import expert_bias_slots, expert_slots, load_expert_bias, load_experts
from .stored_rope import compare_rotary

ROWS_PER_SLICE = 1 << 22  # values dequantized at a time (16 MB in float32)
_Q = re.compile(r"^(?P<prefix>.+)\.weight_Q(?P<bits>\d+)$")
_DQ = re.compile(r"^(?P<prefix>.+)\.weight_DQ_Q(?P<bits>\d+)$")  # use_qdq: DequantizeLinear's codes
_SOURCE = re.compile(r"^(?P<name>.+?)(\[(?P<start>\d+):(?P<stop>\d+)\])?$")


@dataclass
class StoredReport:
    """What loading the stored weights found: per checkpoint tensor, ||stored - original|| / ||original||."""

    errors: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # parameters left with the original values
    kept_quantized: bool = False  # some of them are stored quantized (their noise is in the logits)
    rotary: dict[str, float] = field(default_factory=dict)  # per rotary table, against the reference's (stored_rope)

    @property
    def max_error(self) -> tuple[str | None, float]:
        if not self.errors:
            return None, 0.0
        name = max(self.errors, key=lambda k: (np.nan_to_num(self.errors[k], nan=np.inf), k))
        return name, self.errors[name]


class _Initializers:
    """model.onnx's initializers without their data, read on demand from the external data file."""

    def __init__(self, out_dir: Path) -> None:
        import onnx

        self.dir = out_dir
        graph = onnx.load(str(out_dir / "model.onnx"), load_external_data=False).graph
        self.protos = {i.name: i for i in graph.initializer}
        self.transposed = {n.input[1] for n in graph.node if len(n.input) > 1 and (
            n.op_type == "MatMul" or (n.op_type in ("FusedMatMul", "Gemm")
                                      and not any(a.name == "transB" and a.i for a in n.attribute)))}
        self.experts = expert_slots(graph)
        self.expert_biases = expert_bias_slots(graph)
        # use_qdq: each DequantizeLinear's codes -> (axis, block_size); the last codes unpacked (one weight at a time)
        self.dq = {n.input[0]: ({a.name: a.i for a in n.attribute}.get("axis", 1),
                                {a.name: a.i for a in n.attribute}.get("block_size", 0))
                   for n in graph.node if n.op_type == "DequantizeLinear"}
        self._unpacked: dict[str, np.ndarray] = {}  # a weight's codes and zero points

    def integers(self, name: str) -> np.ndarray:
        """A DequantizeLinear input (int4/uint4/int8/uint8) as int16 of its shape; 4-bit types are stored packed
        flat, two to a byte, the first in the low nibble."""
        import onnx

        if name in self._unpacked:
            return self._unpacked[name]
        if len(self._unpacked) >= 2:
            self._unpacked.clear()
        T, proto, shape = onnx.TensorProto, self.protos[name], self.shape(name)
        if proto.data_type in (T.INT4, T.UINT4):
            count = int(np.prod(shape, dtype=np.int64))
            ext = {e.key: e.value for e in proto.external_data}
            raw = (np.memmap(self.dir / ext["location"], dtype=np.uint8, mode="r", offset=int(ext.get("offset", 0)),
                             shape=((count + 1) // 2,)) if ext else np.frombuffer(proto.raw_data, np.uint8))
            v = np.stack([raw & 0xF, raw >> 4], -1).reshape(-1)[:count].astype(np.int16)
            if proto.data_type == T.INT4:
                v = (v ^ 8) - 8
            out = v.reshape(shape)
        else:
            out = np.asarray(self.read(name)).astype(np.int16)
        self._unpacked[name] = out
        return out

    def dtype(self, name: str) -> np.dtype:
        import ml_dtypes  # noqa: F401 - registers bfloat16 for tensor_dtype_to_np_dtype
        from onnx.helper import tensor_dtype_to_np_dtype

        return np.dtype(tensor_dtype_to_np_dtype(self.protos[name].data_type))

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.protos[name].dims)

    def read(self, name: str) -> np.ndarray:
        """A read-only memory map of the initializer (or its inline data)."""
        from onnx import numpy_helper

        proto = self.protos[name]
        ext = {e.key: e.value for e in proto.external_data}
        if not ext:
            return numpy_helper.to_array(proto)
        return np.memmap(self.dir / ext["location"], dtype=self.dtype(name), mode="r",
                         offset=int(ext.get("offset", 0)), shape=self.shape(name))


def _dequantize_rows(inits: _Initializers, prefix: str, bits: int, rows: slice, K: int) -> np.ndarray:
    """float32 (rows, K) of a MatMulNBits weight: (code - zero point) x scale (+ offset), as the op computes."""
    from ..quant.pack import unpack_bits

    q = inits.read(f"{prefix}.weight_Q{bits}")[rows]
    block = q.shape[2] * 8 // bits
    kb = q.shape[1]
    codes = unpack_bits(q, bits, block).astype(np.float32)
    zp_name = f"{prefix}.weight_zp"
    if zp_name in inits.protos:
        zp = unpack_bits(inits.read(zp_name)[rows], bits, kb).astype(np.float32)
    else:
        zp = np.float32(1 << (bits - 1))
    codes -= zp[..., None] if np.ndim(zp) else zp
    codes *= inits.read(f"{prefix}.weight_scales")[rows].astype(np.float32)[..., None]
    off_name = f"{prefix}.weight_offsets"
    if off_name in inits.protos:
        codes += inits.read(off_name)[rows].astype(np.float32)[..., None]
    return codes.reshape(codes.shape[0], -1)[:, :K]


def _dequantize_qdq_rows(inits: _Initializers, prefix: str, bits: int, rows: slice, K: int) -> np.ndarray:
    """float32 (rows, K) of a use_qdq weight: DequantizeLinear's (code - zero point) x scale (+ offset), its codes
    [K, N] blocked along axis 0 (a MatMul's) or [N, K] along axis 1 (an embedding table's)."""
    name = f"{prefix}.weight_DQ_Q{bits}"
    axis, block = inits.dq[name]
    codes = inits.integers(name)
    scales = np.asarray(inits.read(f"{prefix}.weight_DQ_scales"), dtype=np.float32)
    zp_name = f"{prefix}.weight_DQ_zero_points"
    zp = inits.integers(zp_name) if zp_name in inits.protos else np.zeros(scales.shape, np.int16)
    if axis == 0:
        codes, scales, zp = codes.T, scales.T, zp.T
    codes, scales, zp = codes[rows], scales[rows], zp[rows]
    w = (codes.astype(np.float32) - np.repeat(zp.astype(np.float32), block, 1)[:, :K]) * \
        np.repeat(scales, block, 1)[:, :K]
    off_name = f"{prefix}.weight_offsets"
    if off_name in inits.protos:
        w += np.repeat(np.asarray(inits.read(off_name)[rows], dtype=np.float32), block, 1)[:, :K]
    return w


def _float_rows(inits: _Initializers, name: str, rows: slice) -> np.ndarray:
    w = inits.read(name)
    part = w[:, rows].T if name in inits.transposed else w[rows]
    return np.asarray(part, dtype=np.float32)


def parameter_names(model, params: dict):
    """checkpoint tensor name -> the reference's parameter name, renamed as transformers renames the checkpoint
    when it loads it (Mixtral's `block_sparse_moe.gate` is `mlp.gate`, GraniteMoE's `router.layer` is
    `router`, ERNIE's `mlp.moe_statics` is `mlp.gate.moe_statics`); a name the model has is kept as it is."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        mapping = get_model_conversion_mapping(model)
    except (ImportError, AttributeError, TypeError):  # a transformers without checkpoint renaming
        return lambda name: name
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]

    def rename(name: str) -> str:
        return name if name in params else rename_source_key(name, renamings, converters)[0]

    return rename


def _sources(group: dict) -> list[tuple[str, int | None, int | None]]:
    out = []
    for s in group.get("sources", []):
        m = _SOURCE.match(s)
        start, stop = m.group("start"), m.group("stop")
        out.append((m.group("name"), None if start is None else int(start), None if stop is None else int(stop)))
    return out


def _weight_kind(inits: _Initializers, group: dict) -> tuple[str, str, int] | None:
    """("q", prefix, bits) for MatMulNBits-form slots, ("dq", prefix, bits) for use_qdq's, ("f", name, 0) for one 2-D float weight, else None."""
    names = group.get("initializers") or []
    for n in names:
        m = _Q.match(n)
        if m:
            return "q", m.group("prefix"), int(m.group("bits"))
        m = _DQ.match(n)
        if m and n in inits.dq:
            return "dq", m.group("prefix"), int(m.group("bits"))
    if len(names) == 1 and names[0] in inits.protos and len(inits.shape(names[0])) == 2:
        dtype = inits.dtype(names[0])
        if dtype.kind == "f" or dtype.name == "bfloat16":
            return "f", names[0], 0
    return None


def load_stored_weights(model, out_dir: Path) -> StoredReport:
    """Overwrite `model`'s parameters (a transformers model holding the original weights) with the build's
    stored weights, group by group; returns each tensor's relative difference and what was kept."""
    out_dir = Path(out_dir)
    report = StoredReport()
    groups = json.loads((out_dir / "build_report.json").read_text()).get("groups", [])
    inits = _Initializers(out_dir)
    for group in groups:
        if not group.get("initializers"):  # a build before they were recorded: the names follow the label
            prefix = group["label"].strip("/").replace("/", ".") + "."
            group["initializers"] = [n for n in inits.protos if n.startswith(prefix)]
    params = dict(model.named_parameters(remove_duplicate=False))
    rename = parameter_names(model, params)
    done: set[str] = set()
    for group in groups:
        kind = _weight_kind(inits, group)
        sources = [(rename(name), start, stop) for name, start, stop in _sources(group)]
        if not sources:  # computed tables (rotary caches: compared by stored_rope): no checkpoint tensor behind them
            continue
        if any(n in inits.experts for n in group["initializers"]) and load_experts(model, inits, group, report):
            continue
        if any(n in inits.expert_biases for n in group["initializers"]):  # a MoE / QMoE op's (E, N) biases
            if not load_expert_bias(model, params, inits, group, sources, report, done):
                report.kept += [s[0] for s in sources]
            continue
        if kind is None:  # 1-D tables, parameters or buffers (Gemma 4's layer_scalar)
            tables = {**dict(model.named_buffers()), **params}
            _round_tables(tables, inits, group, sources, done)
            kept = [name for name, _, _ in sources if name not in tables or tables[name].ndim > 1]
            report.kept += kept
            report.kept_quantized |= bool(kept) and any(
                inits.dtype(n).kind not in "f" and inits.dtype(n).name != "bfloat16"
                for n in group.get("initializers", []) if n in inits.protos)
            continue
        if not _load_group(params, inits, group, kind, sources, report, done):
            report.kept += [s[0] for s in sources]
            report.kept_quantized |= kind[0] in ("q", "dq")
    compare_rotary(model, inits, report)
    if report.kept:
        report.notes.append(f"{len(report.kept)} tensors keep the original weights (no stored form the reference "
                            f"reads back): {', '.join(sorted(set(report.kept))[:6])}"
                            + (" ..." if len(set(report.kept)) > 6 else ""))
    return report


def _round_tables(params, inits: _Initializers, group: dict, sources, done: set) -> None:
    """1-D float tables (norms, biases): the original values rounded to the stored float type."""
    import torch

    names = group.get("initializers") or []
    if not names or names[0] not in inits.protos:
        return
    dtype = inits.dtype(names[0])
    if dtype.kind != "f" and dtype.name != "bfloat16" or dtype == np.float32:
        return
    tdtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(dtype.name)
    for name, _, _ in sources:
        p = params.get(name)
        if p is not None and p.ndim == 1 and name not in done and tdtype is not None:
            with torch.no_grad():
                p.copy_(p.to(tdtype).float())
            done.add(name)


def _load_group(params, inits: _Initializers, group: dict, kind, sources, report: StoredReport, done: set) -> bool:
    """Copy one MatMul/embedding group's stored rows into the parameters its sources name."""
    import torch

    form, key, bits = kind
    stacked = params.get(sources[0][0]) if len(sources) == 1 and sources[0][1] is None else None
    if stacked is not None and stacked.ndim == 3:  # stacked experts stored as one MatMul (graph/dense_experts.py)
        return _load_stacked(stacked, inits, group, kind, sources[0][0], report, done)
    targets = []
    for name, start, stop in sources:
        p = params.get(name)
        if p is None or p.ndim != 2:  # not a parameter of the reference by this name: counted in `kept`
            return False
        first, last = (0, p.shape[0]) if start is None else (start, stop)
        targets.append((name, p, first, last))
    N = sum(last - first for _, _, first, last in targets)
    K = targets[0][1].shape[1]
    stored_n = _stored_rows(inits, kind)
    if stored_n != N:
        report.notes.append(f"{group['label']}: stored {stored_n} rows, its sources {N}; kept original")
        return False
    for name, _, _, _ in targets:
        if name in done:
            report.notes.append(f"{group['label']}: {name} is stored twice; the reference holds this copy")
    row = 0
    for name, p, first, last in targets:
        step = max(1, ROWS_PER_SLICE // K)
        diff2 = ref2 = 0.0
        for i in range(0, last - first, step):
            n = min(step, last - first - i)
            rows = slice(row + i, row + i + n)
            w = (_dequantize_rows(inits, key, bits, rows, K) if form == "q" else
                 _dequantize_qdq_rows(inits, key, bits, rows, K) if form == "dq" else _float_rows(inits, key, rows))
            with torch.no_grad():
                orig = p[first + i:first + i + n]
                o = orig.detach().double().numpy()
                diff2 += float(((w.astype(np.float64) - o) ** 2).sum())
                ref2 += float((o ** 2).sum())
                orig.copy_(torch.from_numpy(np.array(w, dtype=np.float32)))
        row += last - first
        label = name if (first, last) == (0, p.shape[0]) else f"{name}[{first}:{last}]"
        report.errors[label] = float(np.sqrt(diff2 / ref2)) if ref2 > 0 else float(np.sqrt(diff2) > 0)
        done.add(name)
    return True


def _stored_rows(inits: _Initializers, kind) -> int:
    """N of the stored (N, K) weight of a MatMul / embedding group."""
    form, key, bits = kind
    if form == "dq":
        shape = inits.shape(f"{key}.weight_DQ_Q{bits}")
        return shape[1] if inits.dq[f"{key}.weight_DQ_Q{bits}"][0] == 0 else shape[0]
    return inits.shape(f"{key}.weight_Q{bits}")[0] if form == "q" else (
        inits.shape(key)[1] if key in inits.transposed else inits.shape(key)[0])


def _load_stacked(p, inits: _Initializers, group: dict, kind, name: str, report: StoredReport, done: set) -> bool:
    """Stacked experts (E, A, B) that graph/dense_experts.py stores as one MatMul weight: gate_up_proj as (E x A, B)
    rows, down_proj (E, H, I) as (H, E x I); dequantized whole and copied back in the parameter's layout."""
    import torch

    form, key, bits = kind
    E, A, B = p.shape
    n = _stored_rows(inits, kind)
    if n not in (E * A, A):
        report.notes.append(f"{group['label']}: stored {n} rows for {name} {tuple(p.shape)}; kept original")
        return False
    K = B if n == E * A else E * B
    rows = slice(0, n)
    w = (_dequantize_rows(inits, key, bits, rows, K) if form == "q" else
         _dequantize_qdq_rows(inits, key, bits, rows, K) if form == "dq" else _float_rows(inits, key, rows))
    w = w.reshape(E, A, B) if n == E * A else w.reshape(A, E, B).transpose(1, 0, 2)
    with torch.no_grad():
        o = p.detach().double().numpy()
        diff, ref = float(((w.astype(np.float64) - o) ** 2).sum()), float((o ** 2).sum())
        p.copy_(torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)))
    report.errors[name] = float(np.sqrt(diff / ref)) if ref > 0 else float(np.sqrt(diff) > 0)
    done.add(name)
    return True
