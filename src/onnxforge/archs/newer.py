"""Newer Llama-shaped families that are data over the existing parts: GLM-4.5 / 4.6 MoE, Seed-OSS, InternLM3,
HunYuan dense, EXAONE 4, and the text decoders of the Qwen3-VL and Mistral 3 vision-language checkpoints.

GLM-4 MoE: partial rotary (0.5 by default), optional per-head q/k norms (use_qk_norm), q/k/v biases
(attention_bias, none on o_proj), dense MLPs on the first first_k_dense_replace layers, then experts routed on
sigmoid scores as graph/moe.py's "sigmoid" scoring builds them, with shared experts. Its multi-token-prediction
layer (model.layers.{num_hidden_layers}.*, for speculative decoding) is not built: its tensors are reported unread.

Seed-OSS: biases on q/k/v (attention_bias, true by default), on o_proj only with attention_out_bias.
InternLM3: Llama as transformers 5 loads it (model type internlm3 -> LlamaForCausalLM): `qkv_bias` is
attention_bias (q/k/v and o), `bias` is mlp_bias, and the two must agree. InternLM2 is remote code only in
transformers (fused grouped `wqkv`, `attention.wo`, `feed_forward.w1..w3`): it is refused by name.
HunYuan dense (HunYuanDenseV1): per-head q/k RMSNorm applied after the rotary (query_layernorm,
key_layernorm); a `dynamic` rope with `alpha` is NTK-alpha: a default rope at rope_theta * alpha **
(head_dim / (head_dim - 2)), as its rotary module computes it.
EXAONE 4: OLMo 2's post-norm block with per-head q/k norms; without layer_types, sliding layers except every
sliding_window_pattern-th; when sliding_window is set, only the sliding layers rotate (global NoPE).
Qwen3-VL / Mistral 3: the text decoder (Qwen3 / Mistral) of the wrapper; text-only positions are equal on
the three mrope axes, so Qwen3-VL's interleaved mrope is the plain rotary of its rope_theta. The vision tower
and projector are not built.
"""
from __future__ import annotations

import dataclasses

from ..errors import ConfigError
from ..spec import config_int, derived_layer_types
from .moe import expert_groups, experts
from .llama import NO_BIAS
from .registry import REFUSED, Architecture, register

LLAMA = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
         "num_attention_heads": 32, "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
         "tie_word_embeddings": False}
VL_IGNORED = ("model.visual.*", "visual.*", "vision_tower.*", "multi_modal_projector.*", "model.vision_tower.*",
              "model.multi_modal_projector.*")
VL_REWRITES = (("model.", "model.language_model."), ("model.", "language_model.model."),
               ("lm_head", "language_model.lm_head"))


def _flag(cfg: dict, key: str, default: bool = False) -> bool:
    value = cfg.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(f"config.json: {key} must be true or false, got {value!r}")
    return value


def _seed_oss(cfg: dict) -> dict:
    return {"attention.qkv_bias": _flag(cfg, "attention_bias", True), "attention.o_bias": _flag(cfg, "attention_out_bias"),
            "mlp.bias": _flag(cfg, "mlp_bias")}


def _internlm3_config(cfg: dict) -> dict:
    """As InternLM3Config reads its aliases: qkv_bias is attention_bias, bias is mlp_bias; they must agree."""
    cfg = dict(cfg)
    for alias, key in (("qkv_bias", "attention_bias"), ("bias", "mlp_bias")):
        if alias in cfg:
            cfg[key] = cfg.pop(alias)
    if _flag(cfg, "attention_bias") != _flag(cfg, "mlp_bias"):
        raise ConfigError("config.json: InternLM3's qkv_bias and bias differ; transformers' InternLM3 (Llama) uses one "
                          "bias setting for q/k/v/o and the MLP and refuses this config too")
    return cfg


def _hunyuan_config(cfg: dict) -> dict:
    """NTK-alpha (`dynamic` with an `alpha`): a default rope at the stretched base, as the rotary module computes it."""
    key = "rope_parameters" if isinstance(cfg.get("rope_parameters"), dict) else "rope_scaling"
    params = cfg.get(key)
    if not isinstance(params, dict) or (params.get("rope_type", params.get("type")) != "dynamic") \
            or not params.get("alpha"):
        return cfg
    alpha, dim, theta = params["alpha"], cfg.get("head_dim"), params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ConfigError(f"config.json: rope scaling alpha must be a positive number, got {alpha!r}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 2:
        raise ConfigError("config.json: a HunYuan NTK-alpha rope (alpha) needs head_dim (an integer above 2), as "
                          "transformers' rotary reads it")
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
        raise ConfigError(f"config.json: rope_theta must be a positive number, got {theta!r}")
    rest = {k: v for k, v in cfg.items() if k not in ("rope_parameters", "rope_scaling")}
    return {**rest, "rope_parameters": {"rope_type": "default", "rope_theta": theta * alpha ** (dim / (dim - 2))}}


def _exaone4_config(cfg: dict) -> dict:
    """As Exaone4Config loads: without layer_types, every sliding_window_pattern-th layer (default 4) is full,
    the others slide (no window: all full); with a window, only the sliding layers rotate."""
    if cfg.get("layer_types") is None:
        pattern = cfg.get("sliding_window_pattern", 4) if cfg.get("sliding_window") is not None else 0
        if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern <= 0:
            raise ConfigError(f"config.json: without layer_types, EXAONE 4 needs sliding_window and an integer "
                              f"sliding_window_pattern (got {pattern!r}); transformers cannot load it either")
        cfg = derived_layer_types(cfg, lambda i: (i + 1) % pattern)
    types = cfg.get("layer_types")
    if cfg.get("sliding_window") is None or not isinstance(types, list):
        return cfg  # every layer rotates (a bad layer_types is spec.layer_types' error)
    return {**cfg, "no_rope_layers": [int(t == "sliding_attention") for t in types]}


def _glm4_moe_config(cfg: dict) -> dict:
    """As Glm4MoeConfig loads: partial_rotary_factor 0.5 unless set; n_routed_experts is num_local_experts."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if "partial_rotary_factor" not in cfg and not (isinstance(params, dict) and "partial_rotary_factor" in params):
        cfg = {**cfg, "partial_rotary_factor": 0.5}
    if cfg.get("n_routed_experts") is not None:
        cfg = {**cfg, "num_local_experts": cfg["n_routed_experts"]}
    return cfg


def _glm4_moe(cfg: dict) -> dict:
    """Experts on the layers from first_k_dense_replace, routed on sigmoid scores with the selection bias
    (e_score_correction_bias), renormalised by norm_topk_prob, times routed_scaling_factor, beside
    n_shared_experts shared ones; group-limited selection (n_group / topk_group: the router of DeepSeek-V3, as
    transformers' Glm4MoeTopkRouter computes it; GLM-4.5 / 4.6 ship 1 and 1, a no-op)."""
    dense = config_int(cfg, "first_k_dense_replace", 1)
    shared = config_int(cfg, "n_shared_experts", 1)
    scale = cfg.get("routed_scaling_factor", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < float("inf"):
        raise ConfigError(f"config.json: routed_scaling_factor must be a positive number, got {scale!r}")
    bias = _flag(cfg, "attention_bias")
    moe = experts(cfg, lambda i: i >= dense, scoring="sigmoid", selection_bias=True,
                  normalize=_flag(cfg, "norm_topk_prob", True), routed_scale=float(scale), renorm_eps=1e-20,
                  shared_intermediate_size=shared * config_int(cfg, "moe_intermediate_size", 1408, minimum=1))
    spec = moe["moe"]
    moe["moe"] = dataclasses.replace(spec, groups=expert_groups(cfg, spec.num_experts, spec.top_k))
    return {**moe,
            "attention.qk_norm": "head" if _flag(cfg, "use_qk_norm") else "", "attention.qkv_bias": bias,
            "attention.o_bias": False, "mlp.bias": False}


register(Architecture("Glm4MoeForCausalLM", "llama", hook=_glm4_moe, config_fix=_glm4_moe_config, partial_rotary=True,
                      names={"selection_bias": "model.layers.{i}.mlp.gate.e_score_correction_bias"},
                      config_defaults={**LLAMA, "vocab_size": 151552, "intermediate_size": 10944,
                                       "num_hidden_layers": 46, "num_attention_heads": 96, "num_key_value_heads": 8,
                                       "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
                                       "moe_intermediate_size": 1408, "num_experts_per_tok": 8,
                                       "n_routed_experts": 128, "norm_topk_prob": True},
                      doc="GLM-4.5 / 4.6 MoE (partial rotary, sigmoid routing with a selection bias, shared experts)"))
register(Architecture("SeedOssForCausalLM", "llama", hook=_seed_oss,
                      config_defaults={**LLAMA, "vocab_size": 155136, "intermediate_size": 27648,
                                       "num_hidden_layers": 64, "num_attention_heads": 80, "num_key_value_heads": 8,
                                       "max_position_embeddings": 524288, "head_dim": 128},
                      gguf="seed_oss", doc="Seed-OSS (q/k/v biases, o_proj bias by attention_out_bias)"))
register(Architecture("InternLM3ForCausalLM", "llama", config_fix=_internlm3_config,
                      config_defaults={**LLAMA, "vocab_size": 128512, "intermediate_size": 10240,
                                       "num_hidden_layers": 48, "num_key_value_heads": 2,
                                       "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "head_dim": 128},
                      doc="InternLM3 (Llama with qkv_bias / bias; InternLM2 is remote code only: refused)"))
register(Architecture("HunYuanDenseV1ForCausalLM", "hunyuandensev1",
                      {"attention.qk_norm": "head", "attention.qk_norm_after_rope": True, "mlp.bias": False},
                      names={"q_norm": "model.layers.{i}.self_attn.query_layernorm",
                             "k_norm": "model.layers.{i}.self_attn.key_layernorm"},
                      config_fix=_hunyuan_config, gguf="hunyuan-dense",
                      config_defaults={**LLAMA, "vocab_size": 290943, "rms_norm_eps": 1e-5},
                      doc="HunYuan dense (q/k norms after the rotary, NTK-alpha rope)"))
register(Architecture("Exaone4ForCausalLM", "llama", {"block": "post", "attention.qk_norm": "head", **NO_BIAS},
                      config_fix=_exaone4_config, sliding="types", gguf="exaone4",
                      config_defaults={**LLAMA, "vocab_size": 102400, "intermediate_size": 16384,
                                       "rms_norm_eps": 1e-5, "sliding_window": 4096, "sliding_window_pattern": 4},
                      doc="EXAONE 4 (post-norms, q/k norms, sliding layers with rotary and global NoPE layers)"))
register(Architecture("Qwen3VLForConditionalGeneration", "qwen3_vl_text", {"attention.qk_norm": "head", "mlp.bias": False},
                      hook=lambda cfg: {"attention.o_bias": _flag(cfg, "attention_bias"),
                                        "attention.qkv_bias": _flag(cfg, "attention_bias")},
                      text_config=True, rewrites=VL_REWRITES, ignored=VL_IGNORED,
                      config_defaults={**LLAMA, "vocab_size": 151936, "intermediate_size": 22016, "head_dim": 128,
                                       "max_position_embeddings": 128000, "rope_theta": 500000.0},
                      doc="Qwen3-VL: the text decoder (Qwen3; text-only mrope is the plain rotary)"))


def _mistral3_config(cfg: dict) -> dict:
    kind = cfg.get("model_type")
    if kind not in (None, "mistral", "mistral3"):
        raise ConfigError(f"config.json: Mistral 3's text_config is of model type {kind!r}; onnxforge builds the "
                          "Mistral text decoder (model_type \"mistral\") of Mistral3ForConditionalGeneration only")
    return cfg


# tie_word_embeddings: Mistral3Config's default is true, but transformers 5 ties only where the checkpoint has no
# lm_head of its own (both present and unequal: not tied), and 4.x read the text config's (false): a missing
# top-level key is read as false here, so a checkpoint without lm_head.weight is one clear error, never a silent tie
register(Architecture("Mistral3ForConditionalGeneration", "mistral3_text", NO_BIAS, config_fix=_mistral3_config,
                      sliding="all", text_config=True, rewrites=VL_REWRITES, ignored=VL_IGNORED,
                      config_defaults={**LLAMA, "sliding_window": 4096, "vocab_size": 32000,
                                       "intermediate_size": 14336, "num_key_value_heads": 8,
                                       "max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-6,
                                       "rope_theta": 10000.0},
                      doc="Mistral 3 (Mistral Small 3.x): the text decoder (the vision tower and projector are not built)"))

REFUSED["InternLM2ForCausalLM"] = (
    "transformers has no InternLM2 model (its checkpoints run only as remote code, which onnxforge never runs), and "
    "its tensors (a grouped fused attention.wqkv, attention.wo, feed_forward.w1/w2/w3) are not mapped; InternLM3 "
    "(InternLM3ForCausalLM) builds, and so does an InternLM2 checkpoint converted to Llama's layout (LlamaForCausalLM)")
