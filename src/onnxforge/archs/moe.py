"""Mixture-of-experts families: a Llama-like decoder whose MLP is, on some or all layers, the MoE
part (graph/moe.py). Each family says how many experts, how they route, and which layers have them.

Mixtral, OLMoE (softmax -> top-k, renormalised or not; OLMoE adds q/k norms over the projections and
clip_qkv after them), Qwen2-MoE (a shared expert with a sigmoid gate; layers by mlp_only_layers /
decoder_sparse_step), Qwen3-MoE (per-head q/k norm), Granite-MoE (top-k of the logits then softmax;
Granite's multipliers), ERNIE 4.5 MoE (selection on softmax + e_score_correction_bias, shared experts,
interleaved rotary, MoE from moe_layer_start_index), PhiMoE (the sparse mixer, LayerNorms with bias).
"""
from __future__ import annotations

import dataclasses

from ..errors import ConfigError
from ..spec import MoESpec, base_spec, config_int, derived_layer_types, gated_window
from .registry import Architecture, register


def _int(cfg: dict, *keys: str) -> int:
    for key in keys:
        v = cfg.get(key)
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"config.json: {key} must be a positive integer, got {v!r}")
            return v
    raise ConfigError(f"config.json has no {keys[0]!r}; the checkpoint's config is incomplete")


def experts(cfg: dict, is_moe=lambda i: True, layer_kinds=None, **fields) -> dict:
    """Spec changes: the MoESpec (counts from the usual keys, `fields` for the rest) and the MoE layers
    (`layer_kinds`: the family's, for a hybrid one)."""
    spec = MoESpec(num_experts=_int(cfg, "num_experts", "num_local_experts", "moe_num_experts"),
                   top_k=_int(cfg, "num_experts_per_tok", "moe_k"),
                   intermediate_size=_int(cfg, "moe_intermediate_size", "intermediate_size"), **fields)
    layers = base_spec(cfg, layer_kinds).layers
    return {"moe": spec, "layers": tuple(dataclasses.replace(layer, moe=bool(is_moe(i))) for i, layer in enumerate(layers))}


def expert_groups(cfg: dict, num_experts: int, top_k: int) -> tuple[int, int]:
    """(n_group, topk_group) of group-limited routing (MoESpec.groups), checked against the experts."""
    groups, keep = config_int(cfg, "n_group", 1, minimum=1), config_int(cfg, "topk_group", 1, minimum=1)
    if keep > groups or num_experts % groups:
        raise ConfigError(f"config.json: n_group {groups} / topk_group {keep} with {num_experts} experts: the experts "
                          "must split into n_group equal groups and topk_group be at most n_group (transformers' "
                          "router fails on this config too)")
    if keep < groups and (num_experts // groups < 2 or top_k > keep * (num_experts // groups)):
        raise ConfigError(f"config.json: group-limited routing over {groups} groups of {num_experts // groups} experts "
                          f"keeping {keep} cannot select {top_k} experts from groups of at least 2 (the router "
                          "scores a group by its two best experts)")
    return (1, 1) if keep == groups else (groups, keep)  # keeping every group selects as no grouping does




def _qwen_layers(cfg: dict):
    only, step = cfg.get("mlp_only_layers") or [], cfg.get("decoder_sparse_step", 1) or 1
    return lambda i: i not in only and (i + 1) % step == 0


def _mixtral(cfg: dict) -> dict:
    return {**experts(cfg), "attention.qkv_bias": False, "attention.o_bias": False}  # attention_bias is not read


def _qwen2_moe(cfg: dict) -> dict:
    return {**experts(cfg, _qwen_layers(cfg), normalize=bool(cfg.get("norm_topk_prob", False)),
                      shared_intermediate_size=_int(cfg, "shared_expert_intermediate_size"), shared_gate=True),
            "attention.qkv_bias": bool(cfg.get("qkv_bias", True)), "attention.o_bias": False, "mlp.bias": False}


def _qwen3_moe(cfg: dict) -> dict:
    bias = bool(cfg.get("attention_bias", False))
    return {**experts(cfg, _qwen_layers(cfg), normalize=bool(cfg.get("norm_topk_prob", False))),
            "attention.qkv_bias": bias, "attention.o_bias": bias, "mlp.bias": False}


def _olmoe(cfg: dict) -> dict:
    clip = cfg.get("clip_qkv")
    return {**experts(cfg, normalize=bool(cfg.get("norm_topk_prob", False))), "attention.clip_qkv": float(clip or 0.0)}


def _granitemoe(cfg: dict) -> dict:
    return {**experts(cfg), "embedding_scale": float(cfg.get("embedding_multiplier", 1.0)),
            "residual_scale": float(cfg.get("residual_multiplier", 1.0)),
            "logit_scale": float(cfg.get("logits_scaling", 1.0)),
            "attention.scale": float(cfg.get("attention_multiplier", 1.0))}


def _ernie_config(cfg: dict) -> dict:
    return {**cfg, "rope_interleaved": True}


def _ernie_moe(cfg: dict) -> dict:
    n = _int(cfg, "num_hidden_layers")
    start, end = cfg.get("moe_layer_start_index", 1), cfg.get("moe_layer_end_index", -1)
    end = n - 1 if end in (-1, None) else end
    interval = cfg.get("moe_layer_interval", 1) or 1
    shared = cfg.get("moe_num_shared_experts", 0) or 0
    bias = bool(cfg.get("use_bias", False))
    return {**experts(cfg, lambda i: (i + 1) % interval == 0 and start <= i <= end, selection_bias=True,
                      shared_intermediate_size=shared * _int(cfg, "moe_intermediate_size")),
            "attention.qkv_bias": bias, "attention.o_bias": bias, "mlp.bias": bias, "lm_head_bias": bias}


def _phimoe_config(cfg: dict) -> dict:
    """As PhimoeRotaryEmbedding runs a scaled rope: the table its rope type computes at load (LongRoPE:
    the short factors, at every length), times short_mscale up to original_max_position_embeddings and
    long_mscale past it, in place of the attention factor. Phi-3.5-MoE's LongRoPE (equal mscales) is
    built as a LongRoPE whose long factors are its short ones; other scalings are refused."""
    key = "rope_parameters" if isinstance(cfg.get("rope_parameters"), dict) else "rope_scaling"
    params = cfg.get(key)
    if not isinstance(params, dict):
        return cfg
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind == "default":
        return cfg
    short, long = params.get("short_mscale"), params.get("long_mscale")
    if kind not in ("longrope", "su") or not _real(short) or short != long:
        raise ConfigError(f"config.json: PhiMoE rope scaling {kind!r} with short_mscale {short!r} and long_mscale "
                          f"{long!r}: onnxforge builds LongRoPE with equal short_mscale and long_mscale (as "
                          "Phi-3.5-MoE has) only")
    return {**cfg, key: {**params, "rope_type": "longrope", "long_factor": params.get("short_factor"),
                         "attention_factor": float(short)}}


def _real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x < float("inf")


def _phimoe(cfg: dict) -> dict:
    bias = bool(cfg.get("attention_bias", False))
    return {**experts(cfg, mixer="sparsemixer", jitter_eps=float(cfg.get("router_jitter_noise", 0.01))),
            "attention.qkv_bias": bias, "attention.o_bias": bias, "lm_head_bias": bool(cfg.get("lm_head_bias", False))}


GPT_OSS_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                "original_max_position_embeddings": 4096}


def _gpt_oss_config(cfg: dict) -> dict:
    """As GptOssConfig loads: without layer_types, sliding and full attention alternate; without any
    rope settings, yarn (factor 32 over 4096 positions) at rope_theta (default 150000)."""
    if cfg.get("rope_parameters") is None and cfg.get("rope_scaling") is None:
        cfg = {**cfg, "rope_parameters": {**GPT_OSS_ROPE, "rope_theta": cfg.get("rope_theta", 150000.0)}}
    return derived_layer_types(cfg, lambda i: (i + 1) % 2)


def _qwen2_moe_config(cfg: dict) -> dict:
    """As Qwen2MoeConfig loads: the window only with use_sliding_window; without layer_types, the
    even layers (0, 2, ...) below max_window_layers slide."""
    cfg = gated_window(cfg)
    end = config_int(cfg, "max_window_layers", 28)
    return derived_layer_types(cfg, lambda i: cfg["sliding_window"] is not None and (i + 1) % 2 and i < end)


def _gpt_oss(cfg: dict) -> dict:
    return {**experts(cfg, router_bias=True, expert_bias=True, layout="interleaved_t", swiglu_beta=1.0,
                      swiglu_alpha=float(cfg.get("swiglu_alpha", 1.702)), swiglu_limit=float(cfg["swiglu_limit"])),
            "attention.sinks": True}


MIXTRAL = {"num_local_experts": 8, "num_experts_per_tok": 2, "rms_norm_eps": 1e-5, "rope_theta": 1e6}
register(Architecture("MixtralForCausalLM", "mistral", hook=_mixtral, config_defaults=MIXTRAL, gguf="llama",
                      sliding="all",
                      doc="Mixtral 8x7B / 8x22B (top-2 of 8 experts, renormalised)"))
register(Architecture("Qwen2MoeForCausalLM", "qwen2", hook=_qwen2_moe, config_fix=_qwen2_moe_config, sliding="types",
                      config_defaults={"num_experts": 60, "num_experts_per_tok": 4, "moe_intermediate_size": 1408,
                                       "shared_expert_intermediate_size": 5632, "use_sliding_window": False,
                                       "sliding_window": 4096, "max_window_layers": 28},
                      gguf="qwen2moe", doc="Qwen1.5-MoE, Qwen2-MoE (shared expert with a sigmoid gate)"))
register(Architecture("Qwen3MoeForCausalLM", "qwen3", {"attention.qk_norm": "head"}, hook=_qwen3_moe,
                      config_fix=gated_window, sliding="all",
                      config_defaults={"num_experts_per_tok": 8, "moe_intermediate_size": 768,
                                       "use_sliding_window": False, "sliding_window": 4096},
                      gguf="qwen3moe", doc="Qwen3-MoE (30B-A3B, 235B-A22B)"))
register(Architecture("OlmoeForCausalLM", "olmo", {"attention.qk_norm": "full"}, hook=_olmoe,
                      config_defaults={"num_experts": 64, "num_experts_per_tok": 8, "rms_norm_eps": 1e-5},
                      gguf="olmoe", doc="OLMoE (q/k norms over the projections, 64 experts)"))
register(Architecture("GraniteMoeForCausalLM", "granite", hook=_granitemoe,
                      config_defaults={"num_local_experts": 8, "num_experts_per_tok": 2},
                      gguf="granitemoe", doc="Granite 3 MoE (Granite's multipliers, stacked experts)"))
register(Architecture("Ernie4_5_MoeForCausalLM", "ernie4_5", hook=_ernie_moe, config_fix=_ernie_config,
                      config_defaults={"moe_num_experts": 64, "moe_k": 6, "moe_intermediate_size": 1536,
                                       "moe_num_shared_experts": 2, "tie_word_embeddings": True, "rms_norm_eps": 1e-5,
                                       "rope_theta": 500000.0},
                      gguf="ernie4_5-moe", doc="ERNIE 4.5 MoE (biased expert selection, shared experts)"))
register(Architecture("PhimoeForCausalLM", "phimoe", {"norm.kind": "layer", "norm.bias": True}, hook=_phimoe,
                      config_fix=_phimoe_config,
                      config_defaults={"num_local_experts": 16, "num_experts_per_tok": 2, "rms_norm_eps": 1e-5,
                                       "rope_theta": 1e6, "router_jitter_noise": 0.01}, sliding="all",
                      doc="Phi-3.5-MoE (sparse mixer, LayerNorm)"))
register(Architecture("GptOssForCausalLM", "gptoss", hook=_gpt_oss, config_fix=_gpt_oss_config, sliding="types",
                      config_defaults={"num_local_experts": 128, "num_experts_per_tok": 4, "swiglu_limit": 7.0,
                                       "attention_bias": True, "rms_norm_eps": 1e-5, "sliding_window": 128,
                                       "head_dim": 64, "rope_theta": 150000.0},
                      gguf="gpt-oss", doc="gpt-oss-20b / 120b (attention sinks, clamped SwiGLU, biases, MXFP4 experts)"))
