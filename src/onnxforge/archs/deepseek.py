"""DeepSeek-V3, and Kimi-K2 (its config.json names the same DeepseekV3ForCausalLM and keys), as transformers'
modeling_deepseek_v3 computes them: latent attention on every layer (kind "mla", graph/mla.py, which says what
the KV cache holds); softmax scale qk_head_dim ** -0.5 x mscale(factor, mscale_all_dim) ** 2 for a scaled rope;
dense MLPs on the first first_k_dense_replace layers, then sigmoid routing with the selection bias, limited to the
topk_group best of n_group groups, renormalised (+ 1e-20) and times routed_scaling_factor, beside shared experts
(graph/moe.py). The multi-token-prediction layers (model.layers.{num_hidden_layers}.*) are not built."""
from __future__ import annotations

import dataclasses

from ..errors import ConfigError
from ..runs_on import rotary_in_gqa
from ..spec import _finite, _flag, _positive_int, config_int, mla_from_config
from .moe import expert_groups, experts
from .registry import Architecture, register

DEFAULTS = {"vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
            "num_hidden_layers": 61, "num_attention_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
            "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
            "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8,
            "first_k_dense_replace": 3, "norm_topk_prob": True, "hidden_act": "silu", "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6, "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False,
            "rope_interleave": True, "attention_bias": False}


def _config(cfg: dict) -> dict:
    """As DeepseekV3Config loads: n_routed_experts is num_local_experts, head_dim is qk_rope_head_dim (the
    rotary's width); the rotary pairs are interleaved unless rope_interleave is false. partial_rotary_factor is
    not read: the rotary spans qk_rope_head_dim whatever it says (DeepseekV3RotaryEmbedding's tables)."""
    cfg = {k: v for k, v in cfg.items() if k != "partial_rotary_factor"}
    for key in ("rope_parameters", "rope_scaling"):
        if isinstance(cfg.get(key), dict):
            cfg[key] = {k: v for k, v in cfg[key].items() if k != "partial_rotary_factor"}
    cfg = {**cfg, "head_dim": _positive_int(cfg, "qk_rope_head_dim"),
           "rope_interleaved": _flag(cfg, "rope_interleave", True)}
    if cfg.get("n_routed_experts") is not None:
        cfg["num_local_experts"] = cfg["n_routed_experts"]
    return cfg


def _deepseek_v3(cfg: dict) -> dict:
    mla, attn_scale = mla_from_config(cfg)
    if not rotary_in_gqa(max(mla.qk_dim, mla.v_dim), mla.rope_dim):
        raise ConfigError(f"config.json: qk_rope_head_dim {mla.rope_dim} of a head of {max(mla.qk_dim, mla.v_dim)}: "
                          "latent attention rotates the rope dims inside GroupQueryAttention, which needs both to be "
                          "multiples of 16 (every DeepSeek-V3 / Kimi-K2 checkpoint has 64 of 192)")
    dense = config_int(cfg, "first_k_dense_replace", 0)
    scale = _finite(cfg, "routed_scaling_factor", 1.0)
    shared = config_int(cfg, "n_shared_experts", 0)
    moe = experts(cfg, lambda i: i >= dense, scoring="sigmoid", selection_bias=True,
                  normalize=_flag(cfg, "norm_topk_prob", True), routed_scale=float(scale), renorm_eps=1e-20,
                  shared_intermediate_size=shared * _positive_int(cfg, "moe_intermediate_size"))
    spec = moe["moe"]
    moe["moe"] = dataclasses.replace(spec, groups=expert_groups(cfg, spec.num_experts, spec.top_k))
    heads = _positive_int(cfg, "num_attention_heads")
    bias = _flag(cfg, "attention_bias", False)
    return {**moe, "layers": tuple(dataclasses.replace(layer, kind="mla") for layer in moe["layers"]), "mla": mla,
            # one head size for q, k and v in GroupQueryAttention, every head its own k and v (graph/mla.py)
            "attention.head_dim": max(mla.qk_dim, mla.v_dim), "attention.num_kv_heads": heads,
            "attention.scale": attn_scale, "attention.qkv_bias": bias, "attention.o_bias": bias,
            "mlp.bias": False}


register(Architecture("DeepseekV3ForCausalLM", "llama", hook=_deepseek_v3, config_fix=_config,
                      config_defaults=DEFAULTS,
                      names={"selection_bias": "model.layers.{i}.mlp.gate.e_score_correction_bias"},
                      doc="DeepSeek-V3 / Kimi-K2 (multi-head latent attention with a full or latent cache: mla_cache; "
                          "group-limited sigmoid routing with a selection bias, shared experts)"))
