"""OLMo 1 (OlmoForCausalLM), OLMo 2 (Olmo2ForCausalLM) and OLMo 3 (Olmo3ForCausalLM).

OLMo 1: LayerNorm without weight or bias, its epsilon fixed at 1e-5 (transformers ignores the config),
q/k/v clamped to +-clip_qkv after their projections, no MLP bias.
OLMo 2 / 3: RMSNorm after attention and after the MLP only (no pre-norms: block "post"), q/k RMSNorm
over the whole projection (not per head). OLMo 3: sliding layers (by default three of every four) whose
rotary table is the default one at the full layers' rope_theta; a rope scaling in the 4.x spelling
(`rope_scaling`) applies to the full-attention layers only, as Olmo3Config reads it.
"""
from __future__ import annotations

from ..errors import ConfigError
from ..spec import derived_layer_types
from .registry import Architecture, register

DEFAULTS = {"vocab_size": 50304, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
            "num_attention_heads": 32, "hidden_act": "silu", "max_position_embeddings": 2048,
            "tie_word_embeddings": False, "attention_bias": False, "rms_norm_eps": 1e-5}
TYPES = ("full_attention", "sliding_attention")
POST = {"block": "post", "attention.qk_norm": "full", "mlp.bias": False}


def _olmo(cfg: dict) -> dict:
    clip = cfg.get("clip_qkv")
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0):
        raise ConfigError(f"config.json: clip_qkv must be a positive number or null, got {clip!r}")
    return {"attention.clip_qkv": float(clip or 0.0)}


def _olmo3_config(cfg: dict) -> dict:
    """As Olmo3Config loads: layer types default to three sliding layers then a full one; both layer
    types get a rotary table, the sliding one unscaled, each at rope_theta (default 500000)."""
    cfg = derived_layer_types(cfg, lambda i: (i + 1) % 4)
    given, scaling = cfg.get("rope_parameters"), cfg.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise ConfigError(f"config.json: rope_scaling must be an object, got {scaling!r}")
    params = {k: dict(v) for k, v in (given or {}).items() if k in TYPES and isinstance(v, dict)} \
        if isinstance(given, dict) else {}
    if scaling:
        params.setdefault("full_attention", {"rope_type": "default"}).update(scaling)
    for key in TYPES:
        params.setdefault(key, {"rope_type": "default"}).setdefault("rope_theta", cfg.get("rope_theta", 500_000.0))
    return {**{k: v for k, v in cfg.items() if k != "rope_scaling"}, "rope_parameters": params}


register(Architecture("OlmoForCausalLM", "olmo",
                      {"norm.kind": "layer", "norm.weight": False, "norm.eps": 1e-5, "mlp.bias": False},
                      hook=_olmo, config_defaults={k: v for k, v in DEFAULTS.items() if k != "rms_norm_eps"},
                      gguf="olmo", doc="OLMo 1 (non-parametric LayerNorm, clip_qkv)"))
# onnxruntime-genai knows the model type "olmo" only; the graph carries what differs
register(Architecture("Olmo2ForCausalLM", "olmo", POST, config_defaults=DEFAULTS, gguf="olmo2",
                      doc="OLMo 2 (post-norms, q/k norm over the projection)"))
register(Architecture("Olmo3ForCausalLM", "olmo", POST, config_fix=_olmo3_config, sliding="types",
                      config_defaults={**DEFAULTS, "sliding_window": 4096}, gguf="olmo2",
                      doc="OLMo 3 (OLMo 2 with sliding layers; llama.cpp writes its GGUF files as olmo2)"))
