"""onnxforge: stream LLM checkpoints into fused, quantized ONNX models for onnxruntime-genai."""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    CheckpointError,
    ConfigError,
    OnnxForgeError,
    OutputError,
    RecipeError,
    UnsupportedArchitectureError,
)


def build(*args, **kwargs):
    """Build an ONNX model; see `onnxforge.api.build`."""
    from .api import build as _build

    return _build(*args, **kwargs)


__all__ = [
    "__version__", "build", "OnnxForgeError", "ConfigError", "CheckpointError", "RecipeError", "OutputError",
    "UnsupportedArchitectureError",
]
