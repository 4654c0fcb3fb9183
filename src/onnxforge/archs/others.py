"""Llama-shaped families with a twist or two: Granite, SmolLM3, Nemotron (Minitron), ERNIE 4.5 (dense).

Granite: the embedding times embedding_multiplier, each branch output times residual_multiplier before
its residual add, attention_multiplier as the attention scale (1.0 by default, not 1/sqrt(head_dim)),
logits divided by logits_scaling.
SmolLM3: no rotary on the layers `no_rope_layers` marks 0 (by default every fourth layer); without
`layer_types`, a sliding window (use_sliding_window and sliding_window set) goes to those NoPE layers.
Nemotron: LayerNorm1p (scale 1 + weight, with bias) at `norm_eps`, squared-ReLU MLP without gate,
partial rotary (0.5 unless the config says otherwise).
ERNIE 4.5: head_dim independent of hidden / heads (128 by default), `use_bias` on q/k/v/o and the MLP,
rotary on interleaved pairs (x[2i], x[2i+1]); tied embeddings by default.
"""
from __future__ import annotations

from ..errors import ConfigError
from ..spec import MAX_LAYERS, derived_layer_types, gated_window
from .registry import Architecture, register

LLAMA_DEFAULTS = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "hidden_act": "silu", "max_position_embeddings": 2048,
                  "rms_norm_eps": 1e-6, "tie_word_embeddings": False}


def _positive(cfg: dict, key: str, default: float = 1.0) -> float:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ConfigError(f"config.json: {key} must be a positive number, got {value!r}")
    return float(value)


def _granite(cfg: dict) -> dict:
    return {"embedding_scale": _positive(cfg, "embedding_multiplier"),
            "residual_scale": _positive(cfg, "residual_multiplier"),
            "attention.scale": _positive(cfg, "attention_multiplier"),
            "logit_scale": _positive(cfg, "logits_scaling")}


def _smollm3_config(cfg: dict) -> dict:
    """As SmolLM3Config fills in no_rope_layers (1 = rotary) and layer_types when they are missing; the
    model windows a sliding layer only when use_sliding_window is true (false when missing)."""
    n = cfg.get("num_hidden_layers")
    if not isinstance(n, int) or not 0 < n <= MAX_LAYERS:
        return cfg
    if cfg.get("no_rope_layers") is None:
        step = cfg.get("no_rope_layer_interval", 4)
        if isinstance(step, bool) or not isinstance(step, int) or step <= 0:
            raise ConfigError(f"config.json: no_rope_layer_interval must be a positive integer, got {step!r}")
        cfg = {**cfg, "no_rope_layers": [int((i + 1) % step != 0) for i in range(n)]}
    cfg = gated_window(cfg)
    rope = cfg["no_rope_layers"]
    if not isinstance(rope, list) or len(rope) != n:
        return cfg  # spec.layer_specs refuses it
    return derived_layer_types(cfg, lambda i: cfg["sliding_window"] is not None and not rope[i])


def _nemotron_config(cfg: dict) -> dict:
    """NemotronConfig's partial_rotary_factor default (0.5) when neither spelling sets one."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if "partial_rotary_factor" in cfg or (isinstance(params, dict) and "partial_rotary_factor" in params):
        return cfg
    return {**cfg, "partial_rotary_factor": 0.5}


def _ernie(cfg: dict) -> dict:
    bias = cfg.get("use_bias", False)
    if not isinstance(bias, bool):
        raise ConfigError(f"config.json: use_bias must be true or false, got {bias!r}")
    return {"attention.qkv_bias": bias, "attention.o_bias": bias, "mlp.bias": bias}


register(Architecture("GraniteForCausalLM", "granite", hook=_granite, config_defaults=LLAMA_DEFAULTS, gguf="granite",
                      doc="Granite 3.x dense (embedding, residual, attention and logit multipliers)"))
register(Architecture("SmolLM3ForCausalLM", "smollm3", config_fix=_smollm3_config, gguf="smollm3", sliding="types",
                      config_defaults={**LLAMA_DEFAULTS, "vocab_size": 128256, "hidden_size": 2048,
                                       "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 4,
                                       "max_position_embeddings": 32768, "rope_theta": 2_000_000.0,
                                       "tie_word_embeddings": True},
                      doc="SmolLM3 (NoPE layers, optional sliding window)"))
register(Architecture("NemotronForCausalLM", "nemotron",
                      {"norm.kind": "layer", "norm.weight_offset": 1.0, "norm.bias": True, "mlp.gated": False},
                      hook=lambda cfg: {"norm.eps": _positive(cfg, "norm_eps")}, config_fix=_nemotron_config,
                      partial_rotary=True,
                      config_defaults={**LLAMA_DEFAULTS, "vocab_size": 256000, "hidden_size": 6144,
                                       "intermediate_size": 24576, "num_attention_heads": 48, "hidden_act": "relu2",
                                       "max_position_embeddings": 4096, "norm_eps": 1e-5},
                      gguf="nemotron", doc="Nemotron-3, Minitron (LayerNorm1p, squared-ReLU MLP, partial rotary)"))
register(Architecture("Ernie4_5ForCausalLM", "ernie4_5", hook=_ernie,
                      config_fix=lambda cfg: {**cfg, "rope_interleaved": True},
                      config_defaults={**LLAMA_DEFAULTS, "vocab_size": 103424, "hidden_size": 1024,
                                       "intermediate_size": 3072, "num_hidden_layers": 18, "num_attention_heads": 16,
                                       "num_key_value_heads": 2, "max_position_embeddings": 131072,
                                       "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "head_dim": 128,
                                       "rope_theta": 500_000.0},
                      gguf="ernie4_5", doc="ERNIE 4.5 dense (0.3B): interleaved rotary, use_bias"))
