"""Architectures register here by their Hugging Face `architectures` name."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..errors import ConfigError, UnsupportedArchitectureError
from ..spec import ModelSpec


@dataclass(frozen=True)
class TensorNames:
    """Hugging Face tensor names of one family; `{i}` is the layer index."""

    embed: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"
    input_norm: str = "model.layers.{i}.input_layernorm.weight"
    post_attn_norm: str = "model.layers.{i}.post_attention_layernorm.weight"
    q: str = "model.layers.{i}.self_attn.q_proj"
    k: str = "model.layers.{i}.self_attn.k_proj"
    v: str = "model.layers.{i}.self_attn.v_proj"
    o: str = "model.layers.{i}.self_attn.o_proj"
    q_norm: str = "model.layers.{i}.self_attn.q_norm.weight"
    k_norm: str = "model.layers.{i}.self_attn.k_norm.weight"
    gate: str = "model.layers.{i}.mlp.gate_proj"
    up: str = "model.layers.{i}.mlp.up_proj"
    down: str = "model.layers.{i}.mlp.down_proj"


@dataclass(frozen=True)
class Architecture:
    name: str  # HF architectures[0]
    model_type: str  # genai_config model.type
    make_spec: Callable[[dict], ModelSpec]
    names: TensorNames = field(default_factory=TensorNames)


REGISTRY: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    if arch.name in REGISTRY:
        raise ValueError(f"architecture {arch.name} is already registered")
    REGISTRY[arch.name] = arch
    return arch


def supported() -> list[str]:
    return sorted(REGISTRY)


def architecture_for(config: dict) -> Architecture:
    from . import families  # noqa: F401  (registers the built-in families)

    archs = config.get("architectures")
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        raise ConfigError("config.json has no 'architectures' list; it does not describe a transformers model")
    arch = REGISTRY.get(archs[0])
    if arch is None:
        raise UnsupportedArchitectureError(
            f"architecture {archs[0]!r} is not supported. Supported: {', '.join(supported())}. "
            "Open an issue with the model's config.json to ask for it."
        )
    return arch
