"""Llama and the families that differ from it only in config: Mistral, Qwen2, Qwen3."""
from __future__ import annotations

from .registry import Architecture, register


def _qwen3(cfg: dict) -> dict:
    bias = bool(cfg.get("attention_bias", False))
    return {"attention.qkv_bias": bias, "attention.o_bias": bias}


register(Architecture("LlamaForCausalLM", "llama", gguf="llama", doc="Llama 1-3, SmolLM2, TinyLlama"))
register(Architecture("MistralForCausalLM", "mistral", gguf="llama", doc="Mistral (sliding window; llama.cpp writes its GGUF files as llama)"))
register(Architecture("Qwen2ForCausalLM", "qwen2", {"attention.qkv_bias": True, "attention.o_bias": False},
                      gguf="qwen2", doc="Qwen2, Qwen2.5 (bias on q/k/v)"))
register(Architecture("Qwen3ForCausalLM", "qwen3", {"attention.qk_norm": "head"}, hook=_qwen3, gguf="qwen3",
                      doc="Qwen3 (per-head q/k norm)"))
