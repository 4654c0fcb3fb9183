"""--merge-adapter: a source whose LoRA-targeted weights read as W + scale * B @ A (peft's merge), so the rest
of the build (quantization included) sees the merged model. Only the targeted weights change; a stored
quantized form of one (GGUF blocks, GPTQ) no longer holds it, so those are offered as floats only."""
from __future__ import annotations

import hashlib
import json

import numpy as np

from ..errors import ConfigError
from .peft import Adapter


class MergedSource:
    def __init__(self, inner, adapter: Adapter):
        self._inner, self.adapter = inner, adapter
        self.merged = {f"{m}.weight": m for m in adapter.modules}  # weight name -> its module
        for name, module in self.merged.items():
            if not inner.has(name):
                raise ConfigError(f"adapter {adapter.path} targets {module}, but the base model has no {name}; the "
                                  "adapter was trained on another base model")
            (r, k), (n, _) = adapter.shapes(module)
            if tuple(inner.shape(name)) != (n, k):
                raise ConfigError(f"adapter {adapter.path}: {module} maps {k} -> {n} features, but the base model's "
                                  f"{name} is {list(inner.shape(name))}; the adapter was trained on another base model")

    def read(self, name: str) -> np.ndarray:
        w = self._inner.read(name)
        if name not in self.merged:
            return w
        a, b = self.adapter.lora_pair(self.merged[name])
        return w.astype(np.float32) + b @ a

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        read_rows = getattr(self._inner, "read_rows", None)
        w = read_rows(name, start, stop) if read_rows is not None else self._inner.read(name)[start:stop]
        if name not in self.merged:
            return w
        a, b = self.adapter.lora_pair(self.merged[name], (start, stop))
        return w.astype(np.float32) + b @ a

    def native_blocks(self, name: str, *args, **kwargs):
        return None if name in self.merged else self._inner.native_blocks(name, *args, **kwargs)

    def __getattr__(self, attr: str):
        value = getattr(self._inner, attr)
        if attr == "native_format":  # a merged weight has no stored quantized form
            return lambda name: None if name in self.merged else value(name)
        return value

    def fingerprint(self) -> str:
        h = hashlib.sha256(b"onnxforge-merged-lora-v1")
        h.update(self._inner.fingerprint().encode())
        h.update(json.dumps(self.adapter.config, sort_keys=True).encode())
        self.adapter.file.hash_into(h)
        return h.hexdigest()

    def close(self) -> None:
        self.adapter.close()
        self._inner.close()


def check_merged_read(source: MergedSource, jobs) -> None:
    """Every merged weight is one the build reads (an lm_head tied away, a module the family does not build would
    otherwise be merged into nothing); called once the graph is planned, before any weight is read."""
    read = {s.split("[", 1)[0] for job in jobs for s in job.sources}
    unread = sorted(m for name, m in source.merged.items() if name not in read)
    if unread:
        raise ConfigError(f"adapter {source.adapter.path} targets {', '.join(unread[:4])}"
                          f"{' ...' if len(unread) > 4 else ''}, which this build does not read; it cannot be merged")
