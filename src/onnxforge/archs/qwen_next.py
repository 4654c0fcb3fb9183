"""Gated delta-net hybrids: "linear_attention" layers (graph/gated_delta.py) beside gated full attention.

Qwen3.5 (the text decoder, `Qwen3_5ForCausalLM`): three of every four layers (`full_attention_interval`) are
gated delta-net linear attention, with in_proj_qkv / in_proj_z / in_proj_b / in_proj_a; the others are
attention whose q_proj also gives a sigmoid output gate per head, with per-head q/k norms and a partial
rotary (partial_rotary_factor, default 0.25; its multimodal rotary reduces to the plain one on text, where
the three position axes are equal). Every RMSNorm but the linear attention's gated one scales by (1 + weight).

Qwen3-Next (`Qwen3NextForCausalLM`): the same layers, with the linear attention's projections fused and
interleaved per key head (in_proj_qkvz, in_proj_ba: graph/gated_delta.py reads their rows), and a mixture of
experts on the layers decoder_sparse_step and mlp_only_layers leave to it (Qwen2-MoE's: a shared expert
with a sigmoid gate; norm_topk_prob, default true).

Qwen3.5 MoE (`Qwen3_5MoeForCausalLM`, and its published `Qwen3_5MoeForConditionalGeneration`): Qwen3.5's layers
with that mixture of experts on every layer, always renormalised (no norm_topk_prob, decoder_sparse_step or
mlp_only_layers keys).
"""
from __future__ import annotations

from ..errors import ConfigError
from ..spec import LinearAttnSpec, MoESpec, _flag, _positive_int, base_spec, replace
from .registry import Architecture, register

KINDS = {"linear_attention": "gated_delta"}
LINEAR_DEFAULTS = {"linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
                   "linear_num_key_heads": 16, "linear_num_value_heads": 32}
QWEN35_DEFAULTS = {**LINEAR_DEFAULTS, "vocab_size": 248320, "hidden_size": 4096, "intermediate_size": 12288,
                   "num_hidden_layers": 32, "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 256,
                   "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "hidden_act": "silu",
                   "tie_word_embeddings": False, "attention_bias": False}
GATED_ATTENTION = {"attention.qk_norm": "head", "attention.output_gate": True, "norm.weight_offset": 1.0,
                   "mlp.bias": False}


def hybrid_config(cfg: dict) -> dict:
    """As the Qwen3.5 / Qwen3-Next config classes load: without layer_types, every `full_attention_interval`-th
    layer (default 4) is attention and the others linear attention; partial_rotary_factor from rope_parameters,
    else the top-level key, else 0.25. The attention never windows."""
    cfg = {k: v for k, v in cfg.items() if k != "sliding_window"}
    if cfg.get("layer_types") is None:
        n = _positive_int(cfg, "num_hidden_layers")
        every = cfg.get("full_attention_interval", 4)
        if isinstance(every, bool) or not isinstance(every, int) or every <= 0:
            raise ConfigError(f"config.json: full_attention_interval must be a positive integer, got {every!r}")
        cfg["layer_types"] = ["linear_attention" if (i + 1) % every else "full_attention" for i in range(n)]
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling")
    inner = params.get("partial_rotary_factor") if isinstance(params, dict) else None
    cfg["partial_rotary_factor"] = inner if inner is not None else cfg.get("partial_rotary_factor", 0.25)
    return cfg


def linear_attention(cfg: dict) -> dict:
    """The gated delta-net's sizes (LinearAttnSpec) from the linear_* keys."""
    la = LinearAttnSpec(key_heads=_positive_int(cfg, "linear_num_key_heads"),
                        value_heads=_positive_int(cfg, "linear_num_value_heads"),
                        key_dim=_positive_int(cfg, "linear_key_head_dim"),
                        value_dim=_positive_int(cfg, "linear_value_head_dim"),
                        kernel=_positive_int(cfg, "linear_conv_kernel_dim"))
    if la.value_heads % la.key_heads:
        raise ConfigError(f"config.json: linear_num_value_heads ({la.value_heads}) must be a multiple of "
                          f"linear_num_key_heads ({la.key_heads})")
    if la.kernel < 2:
        raise ConfigError(f"config.json: linear_conv_kernel_dim must be at least 2, got {la.kernel}")
    return {"linear": la}


register(Architecture("Qwen3_5ForCausalLM", "qwen3_5_text", GATED_ATTENTION, hook=linear_attention,
                      config_fix=hybrid_config, config_defaults=QWEN35_DEFAULTS, sliding="types",
                      partial_rotary=True, layer_kinds=KINDS,
                      doc="Qwen3.5 text decoder (gated delta-net linear attention beside gated attention)"))


QWEN_NEXT_DEFAULTS = {**QWEN35_DEFAULTS, "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5632,
                      "num_hidden_layers": 48, "num_attention_heads": 16, "num_key_value_heads": 2,
                      "decoder_sparse_step": 1, "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512,
                      "num_experts_per_tok": 10, "num_experts": 512, "norm_topk_prob": True}


def _next_experts(cfg: dict) -> dict:
    """The experts and the layers that have them, as Qwen3NextDecoderLayer chooses (none with num_experts 0)."""
    experts = cfg.get("num_experts")
    if experts == 0:
        return {}
    only, step = cfg.get("mlp_only_layers") or [], _positive_int(cfg, "decoder_sparse_step")
    moe = MoESpec(num_experts=_positive_int(cfg, "num_experts"), top_k=_positive_int(cfg, "num_experts_per_tok"),
                  intermediate_size=_positive_int(cfg, "moe_intermediate_size"),
                  normalize=_flag(cfg, "norm_topk_prob", True),
                  shared_intermediate_size=_positive_int(cfg, "shared_expert_intermediate_size"), shared_gate=True)
    layers = base_spec(cfg, KINDS).layers
    return {"moe": moe, "layers": tuple(replace(layer, moe=i not in only and (i + 1) % step == 0)
                                        for i, layer in enumerate(layers))}


def _qwen_next(cfg: dict) -> dict:
    return {**linear_attention(cfg), **_next_experts(cfg)}


register(Architecture("Qwen3NextForCausalLM", "qwen3_5_moe_text", GATED_ATTENTION, hook=_qwen_next,
                      config_fix=hybrid_config, config_defaults=QWEN_NEXT_DEFAULTS, sliding="types",
                      partial_rotary=True, layer_kinds=KINDS,
                      doc="Qwen3-Next (gated delta-net linear attention, gated attention, MoE with a shared expert)"))
register(Architecture("Qwen3_5ForConditionalGeneration", "qwen3_5_text", GATED_ATTENTION, hook=linear_attention,
                      config_fix=hybrid_config, config_defaults=QWEN35_DEFAULTS, sliding="types",
                      partial_rotary=True, layer_kinds=KINDS, text_config=True,
                      rewrites=(("model.", "model.language_model."),), ignored=("model.visual.*", "mtp.*"),
                      doc="Qwen3.5 as published: the text decoder (the vision tower and MTP layers are not built)"))


QWEN35_MOE_DEFAULTS = {**QWEN35_DEFAULTS, "hidden_size": 2048, "num_hidden_layers": 40, "num_key_value_heads": 2,
                       "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512,
                       "num_experts_per_tok": 8, "num_experts": 256}


def _qwen35_moe(cfg: dict) -> dict:
    every = {**cfg, "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True}
    return {**linear_attention(cfg), **_next_experts(every)}


QWEN35_MOE = dict(hook=_qwen35_moe, config_fix=hybrid_config, config_defaults=QWEN35_MOE_DEFAULTS, sliding="types",
                  partial_rotary=True, layer_kinds=KINDS)
register(Architecture("Qwen3_5MoeForCausalLM", "qwen3_5_moe_text", GATED_ATTENTION, **QWEN35_MOE,
                      doc="Qwen3.5 MoE text decoder (gated delta-net, gated attention, experts on every layer)"))
register(Architecture("Qwen3_5MoeForConditionalGeneration", "qwen3_5_moe_text", GATED_ATTENTION, **QWEN35_MOE,
                      text_config=True, rewrites=(("model.", "model.language_model."),),
                      ignored=("model.visual.*", "mtp.*"),
                      doc="Qwen3.5 MoE as published: the text decoder (the vision tower and MTP layers are not built)"))
