"""`onnxforge inspect`: what a built model folder holds."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from .export.report import human

DTYPE_NAMES = {1: "fp32", 10: "fp16", 16: "bf16", 2: "uint8", 7: "int64", 6: "int32", 3: "int8", 22: "int4",
               21: "uint4"}


def model_facts(model_dir: Path) -> dict:
    """What the folder holds; a damaged, truncated or missing file is one RunError naming it
    (verify/folder.py), like `run` and `verify` would meet it."""
    from .verify.folder import load_onnx, read_genai_config

    g = load_onnx(model_dir, read_genai_config(model_dir, required=False)).graph
    inits = {t.name: t for t in g.initializer}

    def nbytes(t) -> int:
        for e in t.external_data:
            if e.key == "length":
                return int(e.value)
        return len(t.raw_data)

    storage: Counter = Counter()
    sizes: Counter = Counter()
    for n in g.node:
        if n.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            attrs = {a.name: a.i for a in n.attribute}
            key = f"{n.op_type} int{attrs.get('bits', 4)} block {attrs.get('block_size')}"
            sym = "asym" if len(n.input) > 3 and n.input[3] else "sym"
            key += f" {sym}"
        elif n.op_type == "DequantizeLinear" and n.input[0] in inits:  # use_qdq: the QDQ form of a weight
            attrs = {a.name: a.i for a in n.attribute}
            key = f"DequantizeLinear {DTYPE_NAMES.get(inits[n.input[0]].data_type, '?')} block {attrs.get('block_size')}"
            key += " asym" if len(n.input) > 2 and n.input[2] else " sym"
        elif n.op_type in ("MatMul", "FusedMatMul", "Gather") and _weight_of(n) in inits:
            key = f"{n.op_type} {DTYPE_NAMES.get(inits[_weight_of(n)].data_type, '?')}"
        else:
            continue
        storage[key] += 1
        sizes[key] += sum(nbytes(inits[i]) for i in n.input if i in inits and not i.startswith("/model/constants"))
    return {
        "ops": Counter(n.op_type for n in g.node),
        "inputs": [(i.name, _type_str(i)) for i in g.input],
        "outputs": [(o.name, _type_str(o)) for o in g.output],
        "storage": {k: (storage[k], sizes[k]) for k in storage},
        "files": {p.name: p.stat().st_size for p in sorted(model_dir.iterdir()) if p.is_file()},
    }


def _weight_of(node) -> str:
    return node.input[0] if node.op_type == "Gather" else node.input[1]


def _type_str(v) -> str:
    t = v.type.tensor_type
    dims = [d.dim_param or str(d.dim_value) for d in t.shape.dim]
    return f"{DTYPE_NAMES.get(t.elem_type, t.elem_type)}[{', '.join(dims)}]"


class Missing(dict):
    """A genai_config.json section that shows an absent key as "?"."""

    def __missing__(self, key):
        return "?"


def inspect_model(model_dir: Path) -> str:
    from .verify.folder import read_genai_config

    f = model_facts(model_dir)
    lines = [f"{model_dir}:"]
    cfg = read_genai_config(model_dir, required=False)  # checked by model_facts
    if cfg:
        m = Missing(cfg["model"])
        d = Missing(m["decoder"])
        lines.append(f"  type {m['type']}, {d['num_hidden_layers']} layers, hidden {d['hidden_size']}, "
                     f"heads {d['num_attention_heads']}/{d['num_key_value_heads']} kv, head {d['head_size']}, "
                     f"vocab {m['vocab_size']}, context {m['context_length']}")
    lines.append("  ops: " + ", ".join(f"{k} x{v}" for k, v in sorted(f["ops"].items())))
    lines.append("  inputs:  " + "; ".join(f"{n} {t}" for n, t in f["inputs"][:4]) +
                 (f"; ... ({len(f['inputs'])} in all)" if len(f["inputs"]) > 4 else ""))
    lines.append("  outputs: " + "; ".join(f"{n} {t}" for n, t in f["outputs"][:3]) +
                 (f"; ... ({len(f['outputs'])} in all)" if len(f["outputs"]) > 3 else ""))
    lines.append("  weights:")
    for k, (count, size) in sorted(f["storage"].items()):
        lines.append(f"    {k:<40} {count:>4} nodes {human(size):>10}")
    lines.append("  files: " + ", ".join(f"{n} {human(s)}" for n, s in f["files"].items()))
    lines.append(f"  total {human(sum(f['files'].values()))}")
    return "\n".join(lines)
