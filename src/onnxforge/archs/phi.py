"""Phi-1, phi-1.5, phi-2 (PhiForCausalLM) and Phi-3, Phi-3.5-mini, Phi-4-mini (Phi3ForCausalLM).

phi-2: LayerNorm with bias, attention and MLP in parallel on one norm, partial rotary (0.4 in
phi-2; transformers assumes 0.5), gelu_new fc1/fc2 MLP, biases on every Linear and on the lm_head,
the final norm `model.final_layernorm`, optionally a LayerNorm per head on q and k (qk_layernorm).
Phi-3: a Llama with fused `qkv_proj` / `gate_up_proj` (the role table reads their rows); LongRoPE
(short factors up to original_max_position_embeddings, long past it: the decoder switches on the
total length as transformers does per forward pass); partial rotary (Phi-4-mini 0.75); the sliding
window config.json sets, on every layer (transformers 5 masks with it); tied embeddings (Phi-4-mini).
"""
from __future__ import annotations

from ..errors import ConfigError
from .registry import Architecture, register

PHI_DEFAULTS = {"layer_norm_eps": 1e-5, "hidden_act": "gelu_new", "max_position_embeddings": 2048,
                "vocab_size": 51200, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
                "num_attention_heads": 32, "tie_word_embeddings": False}
PHI3_DEFAULTS = {"rms_norm_eps": 1e-5, "original_max_position_embeddings": 4096, "max_position_embeddings": 4096,
                 "hidden_act": "silu", "vocab_size": 32064, "hidden_size": 3072, "intermediate_size": 8192,
                 "num_hidden_layers": 32, "num_attention_heads": 32, "tie_word_embeddings": False}


def _rope(cfg: dict) -> dict:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    return params if isinstance(params, dict) else {}


def _phi_config(cfg: dict) -> dict:
    """PhiConfig's partial_rotary_factor default (0.5) when neither spelling sets one."""
    if "partial_rotary_factor" in cfg or "partial_rotary_factor" in _rope(cfg):
        return cfg
    return {**cfg, "partial_rotary_factor": 0.5}


def _phi(cfg: dict) -> dict:
    eps, qk = cfg["layer_norm_eps"], cfg.get("qk_layernorm", False)  # PhiConfig reads layer_norm_eps only
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise ConfigError(f"config.json: layer_norm_eps must be a small positive number, got {eps!r}")
    if not isinstance(qk, bool):
        raise ConfigError(f"config.json: qk_layernorm must be true or false, got {qk!r}")
    return {"norm.eps": float(eps), "attention.qk_norm": "head" if qk else ""}


def _phi3_config(cfg: dict) -> dict:
    """As Phi3Config loads: rope types "su" and "yarn" mean LongRoPE, and the top-level
    original_max_position_embeddings is the one LongRoPE uses."""
    params = _rope(cfg)
    if params.get("rope_type", params.get("type")) not in ("su", "yarn", "longrope"):
        return cfg
    params = {**params, "rope_type": "longrope"}
    if cfg.get("original_max_position_embeddings") is not None:
        params["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
    return {**cfg, "rope_parameters": params}


register(Architecture("PhiForCausalLM", "phi",
                      {"block": "parallel", "norm.kind": "layer", "norm.bias": True, "mlp.gated": False,
                       "mlp.bias": True, "attention.qkv_bias": True, "attention.o_bias": True, "lm_head_bias": True},
                      hook=_phi, config_fix=_phi_config, partial_rotary=True, config_defaults=PHI_DEFAULTS, gguf="phi2",
                      doc="phi-1, phi-1.5, phi-2 (parallel block, LayerNorm, partial rotary, biases)"))
register(Architecture("Phi3ForCausalLM", "phi3",
                      {"attention.qkv_bias": False, "attention.o_bias": False, "mlp.bias": False},
                      config_fix=_phi3_config, config_defaults=PHI3_DEFAULTS, gguf="phi3", sliding="all",
                      partial_rotary=True,
                      doc="Phi-3, Phi-3.5-mini, Phi-4-mini (fused qkv/gate_up, LongRoPE, partial rotary)"))
