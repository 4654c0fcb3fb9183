"""The one error type users see, with a few subclasses to tell causes apart.

Every message names the problem and, where there is one, the fix.
"""
from __future__ import annotations


class OnnxForgeError(Exception):
    """Base class of every error onnxforge raises on purpose."""


class ConfigError(OnnxForgeError):
    """config.json (or GGUF metadata) is unreadable, inconsistent or unsupported."""


class UnsupportedArchitectureError(ConfigError):
    """The checkpoint's architecture has no builder."""


class CheckpointError(OnnxForgeError):
    """A tensor is missing, truncated, of the wrong shape, or the file is malformed."""


class RecipeError(OnnxForgeError):
    """A recipe key, option name or option value is not accepted."""


class OutputError(OnnxForgeError):
    """The output folder cannot be written (exists, disk full, permissions)."""


class RunError(OnnxForgeError, ValueError):
    """A built model cannot be loaded or run here, or a measurement lacks an input it needs (a ValueError
    too, as these were before they got one-line messages)."""
