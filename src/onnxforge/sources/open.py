"""Open a checkpoint: a Hugging Face folder or a .gguf file."""
from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError


def open_source(path, drop_activation_quant: bool = False):
    """A Source for `path`; an object that already implements the Source protocol (see sources/base.py:
    config, tensor_names, has, shape, read, write_tokenizer, fingerprint, close) is used as it is.
    `drop_activation_quant`: a pre-quantized checkpoint tuned with quantized activations opens (weights only)."""
    if not isinstance(path, (str, Path)) and all(hasattr(path, a) for a in ("config", "tensor_names", "read")):
        return path
    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".gguf":
        from .gguf import GGUFSource

        return GGUFSource(p)
    if p.is_dir():
        from .hf import HFSource
        from .prequant import PrequantSource, quantization_scheme

        source = HFSource(p)
        try:
            scheme = quantization_scheme(source.config, p, drop_activation_quant)  # GPTQ, AWQ, ...: carried over
        except BaseException:
            source.close()
            raise
        return source if scheme is None else PrequantSource(source, scheme)
    if not p.exists():
        raise CheckpointError(f"{p} does not exist; pass a Hugging Face checkpoint folder or a .gguf file")
    raise CheckpointError(f"{p} is neither a Hugging Face checkpoint folder nor a .gguf file")
