"""The built-in families: what each changes relative to the Llama spec."""
from __future__ import annotations

from ..spec import ModelSpec, base_spec
from .registry import Architecture, register


def llama_spec(cfg: dict) -> ModelSpec:
    return base_spec(cfg)


def qwen2_spec(cfg: dict) -> ModelSpec:
    # Qwen2: bias on q/k/v only; the config has no attention_bias key.
    return base_spec(cfg, **{"attention.qkv_bias": True, "attention.o_bias": False})


def qwen3_spec(cfg: dict) -> ModelSpec:
    bias = bool(cfg.get("attention_bias", False))
    return base_spec(cfg, **{"attention.qk_norm": True, "attention.qkv_bias": bias, "attention.o_bias": bias})


register(Architecture("LlamaForCausalLM", "llama", llama_spec))
register(Architecture("MistralForCausalLM", "mistral", llama_spec))
register(Architecture("Qwen2ForCausalLM", "qwen2", qwen2_spec))
register(Architecture("Qwen3ForCausalLM", "qwen3", qwen3_spec))
