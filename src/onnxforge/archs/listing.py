"""`onnxforge archs`: every registered architecture and what it supports, generated from the registries."""
from __future__ import annotations

from ..spec import BLOCKS, ROPE_TYPES
from .registry import load_families


def gguf_architectures() -> dict[str, str]:
    """HF architecture -> llama.cpp `general.architecture` names that onnxforge reads for it."""
    from ..sources.gguf_maps import FAMILIES

    out: dict[str, list[str]] = {}
    for gguf_name, row in sorted(FAMILIES.items()):
        out.setdefault(row.architecture, []).append(gguf_name)
    return {k: ", ".join(v) for k, v in out.items()}


def architectures_table() -> str:
    families = load_families()
    gguf = gguf_architectures()
    rows = [("architecture", "model type", "GGUF", "block", "notes")]
    for name, arch in sorted(families.items()):
        block = arch.spec.get("block", "pre")
        rows.append((name, arch.model_type, gguf.get(name, "-"), block, arch.doc))
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
    lines += [
        "",
        f"{len(families)} architectures. Every one builds at fp32, fp16, int4 and int8 (bf16 for GPU providers),",
        f"with rope scaling {', '.join(ROPE_TYPES)}, and sliding-window / per-layer-type layers as config.json",
        f"declares them. Block shapes: {', '.join(BLOCKS)} (see docs/design.md).",
    ]
    return "\n".join(lines)
