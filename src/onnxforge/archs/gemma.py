"""Gemma 1, 2 and 3 (text, and the text decoder of the Gemma 3 vision-language wrapper).

Common quirks: RMSNorm scales by (1 + weight) (stored as weight - 1, also for Gemma 3's q/k norms),
the embedding is multiplied by sqrt(hidden_size) (rounded to the activation dtype, as transformers
does), GELU-tanh MLP, head_dim independent of hidden_size / heads, tied embeddings by default.
Gemma 2 / 3: sandwich norms, query_pre_attn_scalar, sliding and global layers (Gemma 3: with their
own rope base); Gemma 2: attention and final logit softcapping.
"""
from __future__ import annotations

from ..errors import ConfigError
from ..spec import config_int, derived_layer_types
from .registry import Architecture, register

SANDWICH = {"norm.weight_offset": 1.0, "block": "sandwich", "mlp.bias": False}  # mlp_bias is not read
PRE_FFN_NORM = {"ffn_norm": "model.layers.{i}.pre_feedforward_layernorm"}  # post_attention_layernorm is a post-norm
# transformers' config defaults for keys a config.json may omit (Gemma 3 4B-27B text_configs list only
# a few; head_dim is 256, not hidden / heads)
DEFAULTS = {"tie_word_embeddings": True, "head_dim": 256, "rms_norm_eps": 1e-6, "max_position_embeddings": 8192,
            "vocab_size": 256_000, "hidden_size": 3072, "intermediate_size": 24576, "num_hidden_layers": 28,
            "num_attention_heads": 16, "num_key_value_heads": 16}
DEFAULTS2 = {**DEFAULTS, "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256, "sliding_window": 4096,
             "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26, "num_attention_heads": 8,
             "num_key_value_heads": 4}


def _common(cfg: dict) -> dict:
    if cfg.get("use_bidirectional_attention"):
        raise ConfigError("config.json: use_bidirectional_attention is set (an embedding model); onnxforge builds "
                          "causal decoders only")
    hidden = cfg.get("hidden_size")
    return {"embedding_scale": float(hidden) ** 0.5} if isinstance(hidden, int) and hidden > 0 else {}


def _number(cfg: dict, key: str) -> float:
    """A positive number or null/0 (off) from config.json."""
    value = cfg.get(key)
    if value is None or value == 0:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"config.json: {key} must be a positive number or null, got {value!r}")
    return float(value)


def _gemma(cfg: dict) -> dict:
    act = cfg.get("hidden_act") or "gelu_pytorch_tanh"  # transformers 5 reads hidden_act; legacy "gelu" means tanh
    return {**_common(cfg), "mlp.activation": "gelu_pytorch_tanh" if act == "gelu" else act}


def _gemma2(cfg: dict) -> dict:
    scalar = _number(cfg, "query_pre_attn_scalar")
    if not scalar:
        raise ConfigError("config.json: query_pre_attn_scalar must be a positive number")
    act = cfg.get("hidden_activation") or "gelu_pytorch_tanh"  # Gemma2Config / Gemma3TextConfig: not hidden_act
    return {**_common(cfg), "mlp.activation": str(act), "attention.scale": scalar ** -0.5,
            "attention.softcap": _number(cfg, "attn_logit_softcapping"),
            "final_softcap": _number(cfg, "final_logit_softcapping")}


def _gemma2_config(cfg: dict) -> dict:
    """As Gemma2Config loads: without layer_types, sliding and full layers alternate (a
    sliding_window_pattern key is not read)."""
    return derived_layer_types(cfg, lambda i: (i + 1) % 2)


def _gemma3_config(cfg: dict) -> dict:
    """As Gemma3TextConfig loads: without layer_types, every sliding_window_pattern-th layer (default 6)
    is full, the others slide."""
    pattern = config_int(cfg, "sliding_window_pattern", 6, minimum=1)
    return _gemma3_rope(derived_layer_types(cfg, lambda i: (i + 1) % pattern))


def _gemma3_rope(cfg: dict) -> dict:
    """As Gemma3TextConfig reads rope settings: only per-layer-type rope_parameters count (a flat one is
    ignored); a 4.x rope_scaling updates the full-attention table (its legacy `type` key is not read);
    the full layers' base is rope_theta, the sliding layers' rope_local_base_freq."""
    given, scaling = cfg.get("rope_parameters"), cfg.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise ConfigError(f"config.json: rope_scaling must be an object, got {scaling!r}")
    given = given if isinstance(given, dict) else {}
    bad = [k for k in ("full_attention", "sliding_attention")
           if given.get(k) is not None and not isinstance(given[k], dict)]
    if bad:
        raise ConfigError(f"config.json: rope_parameters[{bad[0]!r}] must be an object")
    full = dict(given.get("full_attention") or {"rope_type": "default"})
    sliding = dict(given.get("sliding_attention") or {"rope_type": "default"})
    full.update(scaling or {})
    full.setdefault("rope_theta", cfg.get("rope_theta"))
    sliding.setdefault("rope_theta", cfg.get("rope_local_base_freq"))
    rest = {k: v for k, v in cfg.items() if k not in ("rope_scaling", "rope_local_base_freq")}
    return {**rest, "rope_parameters": {"full_attention": full, "sliding_attention": sliding}}


def _gemma3_wrapper(cfg: dict) -> dict:
    return {**_gemma2(cfg), "final_softcap": 0.0}  # Gemma3ForConditionalGeneration never softcaps its logits


register(Architecture("GemmaForCausalLM", "gemma", {"norm.weight_offset": 1.0, "mlp.bias": False}, hook=_gemma,
                      config_defaults=DEFAULTS, gguf="gemma", doc="Gemma (1), CodeGemma"))
register(Architecture("Gemma2ForCausalLM", "gemma2", SANDWICH, hook=_gemma2, names=PRE_FFN_NORM,
                      config_fix=_gemma2_config, sliding="types",
                      config_defaults={**DEFAULTS2, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
                      gguf="gemma2", doc="Gemma 2 (softcapping, alternating sliding window)"))
GEMMA3 = dict(spec={**SANDWICH, "attention.qk_norm": "head"}, names=PRE_FFN_NORM, config_fix=_gemma3_config,
              sliding="types", config_defaults={**DEFAULTS2, "rope_theta": 1_000_000.0,
                               "rope_local_base_freq": 10_000.0, "max_position_embeddings": 131_072,
                               "vocab_size": 262_208})
register(Architecture("Gemma3ForCausalLM", "gemma3_text", **GEMMA3, hook=_gemma2, gguf="gemma3",
                      doc="Gemma 3 text (1B, 270M): q/k norm, local and global rope bases"))
register(Architecture("Gemma3ForConditionalGeneration", "gemma3_text", **GEMMA3, hook=_gemma3_wrapper,
                      text_config=True,
                      rewrites=(("model.", "model.language_model."), ("model.", "language_model.model."),
                                ("lm_head", "language_model.lm_head")),
                      ignored=("vision_tower.*", "multi_modal_projector.*", "model.vision_tower.*",
                               "model.multi_modal_projector.*"),
                      doc="Gemma 3 4B-27B: the text decoder (the vision tower and projector are not built)"))
