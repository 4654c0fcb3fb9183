"""A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors), read without peft or torch.

`open_adapter` checks the config and the safetensors header and refuses what onnxforge cannot build as
`W x + scale * B (A x)` on a linear projection: DoRA, trained biases, saved whole modules, embedding LoRA,
LoRA on parameters, activated LoRA, ... Each refusal happens before any weight is read. The tensors are read
later, one module at a time (`lora_pair`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from .hf import read_json
from .safetensors_file import SafetensorsFile

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight")
# adapter_config.json keys that change what the adapter computes, refused when set (value: what it is)
REFUSED = {
    "use_dora": "DoRA (a learned magnitude per output; only plain LoRA is built)",
    "lora_bias": "a trained bias on lora_B",
    "fan_in_fan_out": "transposed (Conv1D-style) base weights",
    "modules_to_save": "whole modules saved beside the LoRA weights",
    "trainable_token_indices": "trained embedding rows",
    "target_parameters": "LoRA on parameters (e.g. stacked MoE experts) rather than on linear modules",
    "alora_invocation_tokens": "activated LoRA (on only after its invocation tokens)",
    "layer_replication": "replicated layers",
    "use_qalora": "QA-LoRA (pooled inputs)",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing between adapters",
    "kasa_config": "KaSA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
}


@dataclass
class Adapter:
    """One LoRA adapter: per target module, its rank, its scale and the names of its A and B tensors."""

    name: str  # the name genai loads it by (the folder's name), and its file's: NAME.onnx_adapter
    path: Path
    config: dict
    file: SafetensorsFile
    modules: dict[str, tuple[int, float]] = field(default_factory=dict)  # module -> (rank, scale)

    def shapes(self, module: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(A's shape (r, in), B's shape (out, r))."""
        return self.file.tensors[_key(module, "A")].shape, self.file.tensors[_key(module, "B")].shape

    def lora_pair(self, module: str, rows: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(A (r, in), scale * B (out, r)) in float32; `rows`: the rows of B (and of the output) a graph part takes."""
        a = self.file.read(_key(module, "A")).astype(np.float32)
        b = self.file.read(_key(module, "B")).astype(np.float32)
        if rows is not None:
            b = b[rows[0]:rows[1]]
        return a, b * np.float32(self.modules[module][1])

    def describe(self) -> str:
        ranks = sorted({r for r, _ in self.modules.values()})
        scales = sorted({s for _, s in self.modules.values()})
        return (f"{self.name} (r={'/'.join(map(str, ranks))}, scale {'/'.join(f'{s:g}' for s in scales)}, "
                f"{len(self.modules)} modules)")

    def close(self) -> None:
        self.file.close()


def _key(module: str, which: str) -> str:
    return f"base_model.model.{module}.lora_{which}.weight"


def open_adapter(path: str | Path) -> Adapter:
    """Read and check a PEFT LoRA folder (its config and tensor header, no weight)."""
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"adapter {folder} is not a folder; pass a PEFT adapter folder (adapter_config.json and "
                          f"{WEIGHTS}, as peft's save_pretrained writes it)")
    config = read_json(folder / CONFIG, "the adapter's adapter_config.json")
    _check_config(folder, config)
    weights = folder / WEIGHTS
    if not weights.is_file():
        pickled = " (adapter_model.bin is a pickle, which onnxforge never loads; save it with safe_serialization)" \
            if (folder / "adapter_model.bin").exists() else ""
        raise ConfigError(f"adapter {folder} has no {WEIGHTS}{pickled}")
    adapter = Adapter(folder.name, folder, config, SafetensorsFile(weights))
    try:
        _index(adapter)
    except BaseException:
        adapter.close()
        raise
    return adapter


def _check_config(folder: Path, config: dict) -> None:
    kind = config.get("peft_type")
    if kind != "LORA":
        raise ConfigError(f"adapter {folder} is a {kind!r} adapter; only LoRA (peft_type LORA) is supported")
    for key, what in REFUSED.items():
        if config.get(key):
            raise ConfigError(f"adapter {folder}: {key}={config[key]!r} ({what}) is not supported; "
                              "merge it with peft (merge_and_unload) and build the merged checkpoint instead")
    if config.get("bias", "none") != "none":
        raise ConfigError(f"adapter {folder}: bias={config['bias']!r} (trained biases of the base model) is not "
                          "supported; only adapters trained with bias='none' are")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"adapter {folder}: {key} must be a positive number, got {value!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise ConfigError(f"adapter {folder}: {key} must be an object, got {config[key]!r}")


def _index(adapter: Adapter) -> None:
    """module -> (rank, scale), every tensor accounted for and shaped as LoRA's A (r, in) and B (out, r)."""
    pairs: dict[str, set[str]] = {}
    other = []
    for name in adapter.file.tensors:
        m = KEY.fullmatch(name)
        if m is None:
            other.append(name)
        else:
            pairs.setdefault(m["module"], set()).add(m["which"])
    if other:
        embed = any("lora_embedding" in n for n in other)
        what = "LoRA on an embedding (lora_embedding_A/B)" if embed else "tensors that are not LoRA A or B weights"
        raise ConfigError(f"adapter {adapter.path} holds {what}, which onnxforge does not build: "
                          f"{', '.join(sorted(other)[:4])}{' ...' if len(other) > 4 else ''}")
    if not pairs:
        raise ConfigError(f"adapter {adapter.path}: {WEIGHTS} holds no LoRA weights")
    for module, found in sorted(pairs.items()):
        if found != {"A", "B"}:
            missing = ({"A", "B"} - found).pop()
            raise ConfigError(f"adapter {adapter.path}: {_key(module, missing)} is missing (its pair is there)")
        adapter.modules[module] = _rank_and_scale(adapter, module)


def _rank_and_scale(adapter: Adapter, module: str) -> tuple[int, float]:
    (a, b), cfg = adapter.shapes(module), adapter.config
    if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
        raise ConfigError(f"adapter {adapter.path}: {module} has lora_A {list(a)} and lora_B {list(b)}; LoRA on a "
                          "linear module needs A (r, in) and B (out, r) of one rank r (convolution LoRA is not supported)")
    for name in (_key(module, "A"), _key(module, "B")):
        if adapter.file.tensors[name].dtype.kind not in "fV":  # V: bfloat16
            raise ConfigError(f"adapter {adapter.path}: {name} is {adapter.file.tensors[name].dtype}, not a float")
    r = _pattern(cfg.get("rank_pattern") or {}, module, cfg["r"])
    alpha = _pattern(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"])
    if a[0] != r:
        raise ConfigError(f"adapter {adapter.path}: {module} has rank {a[0]} but adapter_config.json says r={r}; "
                          "the config does not match the weights")
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return int(r), float(scale)


def _pattern(patterns: dict, module: str, default):
    """peft's rank_pattern / alpha_pattern lookup: the first key that matches the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default
