"""Which stored quantized form a weight has, looked up by the names the recipe is asked about.

The recipe is asked about a weight by its ONNX node names and Hugging Face module names
(`/model/layers.0/attn/qkv_proj/MatMul`, `model.layers.0.self_attn.q_proj`); this finds the
checkpoint tensor behind them and asks the source for its exact MatMulNBits form. A tied lm_head is
the embedding table.
"""
from __future__ import annotations

from typing import Callable, Sequence

from ..archs.names import Names
from ..sources.base import NativeFormat, Source
from ..spec import ModelSpec


def has_native(source: Source) -> bool:
    """Whether any tensor of the source is stored quantized (GGUF blocks, GPTQ, AWQ, ...)."""
    fmt = getattr(source, "native_format", None)
    return fmt is not None and any(fmt(n) is not None for n in source.tensor_names())


def native_lookup(source: Source, spec: ModelSpec, names: Names) -> Callable[[Sequence[str]], NativeFormat | None]:
    fmt = getattr(source, "native_format", None)
    if fmt is None:
        return lambda _: None

    def tensor_of(module: str) -> str | None:
        if module == "lm_head":
            return names.lm_head(spec.tie_embeddings)
        return f"{module}.weight" if source.has(f"{module}.weight") else None

    def lookup(keys: Sequence[str]) -> NativeFormat | None:
        for key in keys:
            if key.startswith("/"):
                continue
            tensor = tensor_of(key)
            if tensor is not None:
                return fmt(tensor)
        return None

    return lookup
