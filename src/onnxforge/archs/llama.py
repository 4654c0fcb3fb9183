"""Llama and the families that differ from it only in config: Mistral, Qwen2, Qwen3.

Windows as transformers reads them: Llama never windows; Mistral windows every layer with
sliding_window (4096 when config.json has no such key, as MistralConfig assumes); Qwen2 / Qwen3
window only when use_sliding_window is true (false when missing), and then, without layer_types, the
layers from max_window_layers (default 28) on.
"""
from __future__ import annotations

from ..spec import config_int, derived_layer_types, gated_window
from .registry import Architecture, register


def _qwen3(cfg: dict) -> dict:
    bias = bool(cfg.get("attention_bias", False))
    return {"attention.qkv_bias": bias, "attention.o_bias": bias}


def qwen_windows(cfg: dict) -> dict:
    """As Qwen2Config / Qwen3Config load: the window only with use_sliding_window; without
    layer_types, layers i >= max_window_layers slide."""
    cfg = gated_window(cfg)
    start = config_int(cfg, "max_window_layers", 28)
    return derived_layer_types(cfg, lambda i: cfg["sliding_window"] is not None and i >= start)


QWEN_DEFAULTS = {"use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28,
                 "tie_word_embeddings": False}

register(Architecture("LlamaForCausalLM", "llama", gguf="llama", doc="Llama 1-3, SmolLM2, TinyLlama"))
NO_BIAS = {"attention.qkv_bias": False, "attention.o_bias": False, "mlp.bias": False}  # reads no *_bias key

register(Architecture("MistralForCausalLM", "mistral", NO_BIAS, sliding="all", config_defaults={"sliding_window": 4096},
                      gguf="llama", doc="Mistral (sliding window; llama.cpp writes its GGUF files as llama)"))
register(Architecture("Qwen2ForCausalLM", "qwen2",
                      {"attention.qkv_bias": True, "attention.o_bias": False, "mlp.bias": False},
                      config_fix=qwen_windows, config_defaults=QWEN_DEFAULTS, sliding="types",
                      gguf="qwen2", doc="Qwen2, Qwen2.5 (bias on q/k/v)"))
register(Architecture("Qwen3ForCausalLM", "qwen3", {"attention.qk_norm": "head", "mlp.bias": False}, hook=_qwen3,
                      config_fix=qwen_windows, config_defaults={**QWEN_DEFAULTS, "head_dim": 128}, sliding="types",
                      gguf="qwen3", doc="Qwen3 (per-head q/k norm)"))
