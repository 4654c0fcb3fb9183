"""The build report: what was stored how, sizes, time, peak memory; printed and saved as JSON."""
from __future__ import annotations

import re
import resource
import sys
from collections import OrderedDict
from dataclasses import asdict, dataclass, field


def peak_rss_bytes() -> int:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb if sys.platform == "darwin" else kb * 1024


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


def fold_layers(names: list[str]) -> list[str]:
    """Tensor names with their layer numbers folded: `model.layers.{1,2}.mlp.up_proj.weight` (every name
    is still there, spelled once per pattern)."""
    groups: "OrderedDict[str, list[str]]" = OrderedDict()
    for n in names:
        m = re.search(r"(?<=\.)\d+(?=\.)", n)
        key = n if m is None else n[:m.start()] + "{}" + n[m.end():]
        groups.setdefault(key, []).append("" if m is None else m.group())
    return [k if k == ids[0] or "{}" not in k else k.replace("{}", "{" + ",".join(ids) + "}") if len(ids) > 1
            else k.replace("{}", ids[0]) for k, ids in groups.items()]


@dataclass
class BuildReport:
    output: str
    architecture: str
    model_type: str
    precision: str
    provider: str
    recipe: dict
    input_sha256: str
    recipe_sha256: str
    files: dict[str, int] = field(default_factory=dict)
    groups: list[dict] = field(default_factory=list)  # {label, storage, bytes}
    shared_embeddings: bool = False
    # how quantized weights are written: "MatMulNBits" (MatMulNBits / GatherBlockQuantized / QMoE), "QDQ" (use_qdq:
    # DequantizeLinear + MatMul / Gather), "float" (nothing quantized)
    weight_format: str = "float"
    seconds: float = 0.0
    peak_rss: int = 0
    notes: list[str] = field(default_factory=list)
    unread_tensors: list[str] = field(default_factory=list)  # checkpoint tensors the build did not use
    warnings: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())

    def by_storage(self) -> "OrderedDict[str, tuple[int, int]]":
        """storage description -> (number of weight groups, bytes)."""
        out: OrderedDict[str, tuple[int, int]] = OrderedDict()
        for g in self.groups:
            n, b = out.get(g["storage"], (0, 0))
            out[g["storage"]] = (n + 1, b + g["bytes"])
        return out

    def by_role(self) -> "OrderedDict[tuple[str, str], tuple[int, int]]":
        """(weight group with layer numbers folded, storage) -> (count, bytes)."""
        out: OrderedDict[tuple[str, str], tuple[int, int]] = OrderedDict()
        for g in self.groups:
            key = (re.sub(r"layers\.\d+", "layers.*", g["label"]), g["storage"])
            n, b = out.get(key, (0, 0))
            out[key] = (n + 1, b + g["bytes"])
        return out

    def summary(self) -> str:
        lines = [f"onnxforge: built {self.architecture} ({self.precision}, {self.provider}) into {self.output}"]
        if self.groups:  # a config_only build has none
            lines.append(f"  {'weight group':<42} {'storage':<32} {'count':>5} {'bytes':>10}")
        for (role, storage), (n, b) in self.by_role().items():
            lines.append(f"  {role:<42} {storage:<32} {n:>5} {human(b):>10}")
        if self.shared_embeddings:
            lines.append("  embedding table shared with the lm_head (stored once)")
        if self.weight_format == "QDQ":
            lines.append("  format: QDQ (quantized weights as DequantizeLinear + MatMul / Gather, opset 21)")
        elif self.weight_format == "MatMulNBits":
            lines.append("  format: MatMulNBits (quantized weights as com.microsoft MatMulNBits / "
                         "GatherBlockQuantized / QMoE)")
        for name, size in sorted(self.files.items()):
            lines.append(f"  {name:<30} {human(size):>10}")
        lines.append(f"  total {human(self.total_bytes)} in {self.seconds:.1f} s, peak memory {human(self.peak_rss)}")
        lines.extend(f"  note: {n}" for n in self.notes)
        lines.extend(f"  WARNING: {w}" for w in self.warnings)
        return "\n".join(lines)

    def to_json(self) -> dict:
        d = asdict(self)
        d["total_bytes"] = self.total_bytes
        return d
