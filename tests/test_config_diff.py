"""Differential config test (issue 23): for every family in `onnxforge archs`, many config.json variants,
each loaded by transformers (the family's own config class, and the modules its model builds from
it) and by onnxforge's spec, compared field by field on what onnxforge derives.

What transformers derives is read from the reference itself wherever the model keeps it: the decoder
layers are instantiated on the meta device (no weights) and asked for their attention scaling, softcap,
head_dim, biases, q/k norms, norm epsilon, per-layer sliding window, NoPE flag and MoE router; the rotary
module is instantiated for real and its inverse frequencies and attention scaling compared with the
ones onnxforge's graph/rope.py computes from the spec. Two things transformers' modules do not store
are tabled below from its modeling code: how the mask reads the window (WINDOW_READ) and whether the
router renormalises when it has no norm_topk_prob (RENORMALISES).

No model is built: configs only. The tiny-model parity runs of the risky variants are in
tests/test_config_semantics.py and at the end of this file.
"""
from __future__ import annotations

import copy
import itertools
import math
import random
import sys
import warnings
import zlib

import numpy as np
import pytest

from onnxforge.archs.registry import load_families
from onnxforge.errors import ConfigError
from onnxforge.graph.rope import inv_freq_and_scale

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers.activations import ACT2FN  # noqa: E402

# How the model's mask reads sliding_window where its attention modules keep no per-layer window:
# "none": never (LlamaModel builds create_causal_mask only); "all": every layer (MistralModel, Phi3Model,
# MixtralModel, PhimoeModel: create_sliding_window_causal_mask unless config.sliding_window is None).
# OLMoE passes getattr(config, "sliding_window") to the attention kernel only (flash attention), never
# to its causal mask: eager and sdpa, the reference here, do not window.
WINDOW_READ = {
    "LlamaForCausalLM": "none", "GemmaForCausalLM": "none", "GraniteForCausalLM": "none",
    "NemotronForCausalLM": "none", "Ernie4_5ForCausalLM": "none", "PhiForCausalLM": "none",
    "OlmoForCausalLM": "none", "Olmo2ForCausalLM": "none", "GraniteMoeForCausalLM": "none",
    "Ernie4_5_MoeForCausalLM": "none", "OlmoeForCausalLM": "none",
    "MistralForCausalLM": "all", "Phi3ForCausalLM": "all", "MixtralForCausalLM": "all", "PhimoeForCausalLM": "all",
    "Qwen3MoeForCausalLM": "all", "Lfm2ForCausalLM": "none",
    "SeedOssForCausalLM": "none", "InternLM3ForCausalLM": "none", "HunYuanDenseV1ForCausalLM": "none",
    "Qwen3VLForConditionalGeneration": "none", "Mistral3ForConditionalGeneration": "all",
    # Exaone4Attention keeps config.sliding_window on every layer and windows the ones layer_types marks sliding
    "Exaone4ForCausalLM": "types",
}
# Attentions that decide their rotary from the layer type (Exaone4Attention: only the sliding layers rotate when
# the config has a window): attention module -> uses rotary
ROTATES = {"Exaone4ForCausalLM": lambda a: a.sliding_window is None or a.is_sliding}
# A wrapper's (or an alias's) text decoder: arch -> (config class, model_type of the text config or None, module
# of the decoder's classes, their prefix); the others are read from transformers.<arch> itself
TEXT_MODEL = {
    "Gemma3ForConditionalGeneration": ("Gemma3Config", "gemma3_text", None, "Gemma3"),
    "Qwen3VLForConditionalGeneration": ("Qwen3VLConfig", "qwen3_vl_text", None, "Qwen3VLText"),
    "Mistral3ForConditionalGeneration": ("Mistral3Config", "mistral", "transformers.models.mistral.modeling_mistral",
                                         "Mistral"),
    # transformers 5 loads model type internlm3 as LlamaForCausalLM, with InternLM3Config's aliases
    "InternLM3ForCausalLM": ("InternLM3Config", None, "transformers.models.llama.modeling_llama", "Llama"),
    "Llama4ForCausalLM": ("Llama4TextConfig", None, None, "Llama4Text"),
    "Llama4ForConditionalGeneration": ("Llama4Config", "llama4_text", None, "Llama4Text"),
}
# The layer types a model builds masks for, where it has a fixed set (Llama4TextModel: full and chunked; another
# type loads but fails in the first forward pass)
MASKS = {"Llama4ForCausalLM": ("full_attention", "chunked_attention"),
         "Llama4ForConditionalGeneration": ("full_attention", "chunked_attention")}
WINDOW_READ.update({"Llama4ForCausalLM": "none", "Llama4ForConditionalGeneration": "none"})  # chunks: no window
# Routers without a norm_topk_prob attribute: Mixtral softmax -> top-k -> renormalise; Granite-MoE and
# gpt-oss top-k of the logits -> softmax (the same); ERNIE 4.5 MoE renormalises (moe_norm_min).
RENORMALISES = {"MixtralForCausalLM": True, "GraniteMoeForCausalLM": True, "GptOssForCausalLM": True,
                "Ernie4_5_MoeForCausalLM": True}
# The attentions that rotate only rotary_dim = head_dim * partial_rotary_factor of each head (the others
# apply cos/sin to the whole head: a shorter table is a model that fails in its first forward pass).
PARTIAL_ROTARY = {"PhiForCausalLM": True, "Phi3ForCausalLM": True, "NemotronForCausalLM": True}
FINAL_SOFTCAP = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")  # the causal-LM heads that softcap their logits
# The hybrids with experts: LFM2-MoE's and Granite 4's attentions never window; Granite 4 hybrid's router is
# Granite MoE's (top-k of the logits -> softmax) and its model rotates only with position_embedding_type "rope"
WINDOW_READ.update({"Lfm2MoeForCausalLM": "none", "GraniteMoeHybridForCausalLM": "none"})
RENORMALISES["GraniteMoeHybridForCausalLM"] = True

ABSENT = object()  # a knob value: the key is not in config.json
N_LAYERS = 6
BASE = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=N_LAYERS, vocab_size=128,
            intermediate_size=96, max_position_embeddings=256, bos_token_id=1, eos_token_id=0)
MOE_BASE = {"num_experts": 4, "num_local_experts": 4, "moe_num_experts": 4, "num_experts_per_tok": 2, "moe_k": 2,
            "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48, "moe_num_shared_experts": 1}
MIX = ["sliding_attention", "full_attention", "full_attention", "sliding_attention", "sliding_attention",
       "full_attention"]

# Knobs: key (or a tuple of keys set together) -> the choices; ABSENT drops the key.
ROPES = [
    {}, {"rope_theta": 50000.0},
    {"rope_scaling": {"type": "linear", "factor": 2.0}},  # 4.x spelling, legacy "type"
    {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
    {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}},
    {"rope_parameters": {"rope_type": "default", "rope_theta": 20000.0}},  # 5.x spelling
    {"rope_parameters": {"rope_type": "yarn", "rope_theta": 20000.0, "factor": 2.0, "beta_fast": 16.0,
                         "beta_slow": 2.0, "original_max_position_embeddings": 128}},
    {"rope_theta": 999.0, "rope_parameters": {"rope_type": "linear", "rope_theta": 30000.0, "factor": 3.0}},
]
TYPED_ROPES = [  # families with a rotary table per layer type (Gemma 3, OLMo 3)
    {"rope_parameters": {"full_attention": {"rope_type": "linear", "rope_theta": 40000.0, "factor": 4.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 5000.0}}},
    {"rope_theta": 40000.0, "rope_local_base_freq": 3000.0},
    {"rope_theta": 40000.0, "rope_scaling": {"rope_type": "linear", "factor": 8.0}},
]
LONG = "long factors"  # filled in with rotary_dim / 2 numbers (config_dict)
LONGROPES = [  # Phi-3 / PhiMoE: LongRoPE in its spellings, 4.x "su" and "longrope", top-level original length
    {"rope_scaling": {"type": "su", "short_factor": LONG, "long_factor": LONG}, "original_max_position_embeddings": 64},
    {"rope_scaling": {"rope_type": "longrope", "short_factor": LONG, "long_factor": LONG,
                      "original_max_position_embeddings": 32}},
    {"rope_parameters": {"rope_type": "longrope", "rope_theta": 25000.0, "short_factor": LONG, "long_factor": LONG,
                         "original_max_position_embeddings": 128, "factor": 2.0}},
]
WINDOWS = [
    {}, {"sliding_window": 8}, {"sliding_window": 8, "use_sliding_window": True}, {"use_sliding_window": True},
    {"sliding_window": 8, "use_sliding_window": True, "max_window_layers": 3},
    {"use_sliding_window": True, "max_window_layers": 2},
    {"sliding_window": None}, {"sliding_window": 8, "layer_types": MIX},
    {"sliding_window": 8, "use_sliding_window": False, "layer_types": MIX},
    {"sliding_window": 8, "use_sliding_window": True, "max_window_layers": 3, "layer_types": MIX},
    {"sliding_window": 8, "sliding_window_pattern": 3}, {"sliding_window_pattern": 2},
]
ACTS = [{}, {"hidden_act": "gelu"}, {"hidden_act": "gelu_pytorch_tanh"}, {"hidden_activation": "gelu_pytorch_tanh"},
        {"hidden_act": "silu", "hidden_activation": "gelu"}]
COMMON = {
    "act": ACTS,
    "rope": ROPES,
    "head_dim": [ABSENT, 32],
    "partial_rotary_factor": [ABSENT, 0.5, 1.0],
    "tie_word_embeddings": [ABSENT, True, False],
    "eps": [{}, {"rms_norm_eps": 1e-5}, {"layer_norm_eps": 1e-4}, {"norm_eps": 3e-5}],
    "window": WINDOWS,
    "attention_bias": [ABSENT, True, False],
    "mlp_bias": [ABSENT, True, False],
}
FAMILY_KNOBS = {
    "Gemma2ForCausalLM": {"query_pre_attn_scalar": [ABSENT, 20], "attn_logit_softcapping": [ABSENT, None, 10.0],
                          "final_logit_softcapping": [ABSENT, None, 7.0]},
    "Gemma3ForCausalLM": {"query_pre_attn_scalar": [ABSENT, 20], "attn_logit_softcapping": [ABSENT, None, 10.0],
                          "final_logit_softcapping": [ABSENT, None, 7.0], "rope": ROPES + TYPED_ROPES},
    "Olmo3ForCausalLM": {"rope": ROPES + TYPED_ROPES},
    "GraniteForCausalLM": {"multipliers": [{}, {"embedding_multiplier": 12.0, "residual_multiplier": 0.22,
                                                "attention_multiplier": 0.0078125, "logits_scaling": 8.0}]},
    "SmolLM3ForCausalLM": {"no_rope_layer_interval": [ABSENT, 2, 3],
                           "no_rope_layers": [ABSENT, [1, 0, 0, 1, 1, 1]]},
    "PhiForCausalLM": {"qk_layernorm": [ABSENT, True, False]},
    "Phi3ForCausalLM": {"rope": ROPES + LONGROPES},
    "PhimoeForCausalLM": {"rope": ROPES + LONGROPES},
    "Qwen2MoeForCausalLM": {"norm_topk_prob": [ABSENT, True, False], "mlp_only_layers": [ABSENT, [1, 4]],
                            "decoder_sparse_step": [ABSENT, 2]},
    "Qwen3MoeForCausalLM": {"norm_topk_prob": [ABSENT, True, False], "mlp_only_layers": [ABSENT, [0]],
                            "decoder_sparse_step": [ABSENT, 3]},
    "OlmoeForCausalLM": {"norm_topk_prob": [ABSENT, True, False]},
    "Ernie4_5_MoeForCausalLM": {"moe_layer_start_index": [ABSENT, 0, 2], "moe_layer_end_index": [ABSENT, 3, -1],
                                "moe_layer_interval": [ABSENT, 2]},
    "GraniteMoeForCausalLM": {"multipliers": [{}, {"embedding_multiplier": 12.0, "residual_multiplier": 0.22,
                                                   "attention_multiplier": 0.0078125, "logits_scaling": 8.0}]},
    "Lfm2ForCausalLM": {"conv_L_cache": [ABSENT, 4], "conv_bias": [ABSENT, True, False],
                        "block_auto_adjust_ff_dim": [ABSENT, False], "block_ffn_dim_multiplier": [ABSENT, None, 1.5],
                        "block_multiple_of": [ABSENT, 32], "full_attn_idxs": [ABSENT, [1, 3]],
                        "kinds": [{}, {"layer_types": ["conv", "full_attention", "conv", "conv", "full_attention",
                                                       "conv"]}]},
}
FAMILY_KNOBS["Gemma3ForConditionalGeneration"] = FAMILY_KNOBS["Gemma3ForCausalLM"]
FAMILY_KNOBS["Llama4ForCausalLM"] = FAMILY_KNOBS["Llama4ForConditionalGeneration"] = {
    "no_rope_layer_interval": [ABSENT, 2, 3], "no_rope_layers": [ABSENT, [1, 0, 0, 1, 1, 1], [], [1] * 8],
    "interleave_moe_layer_step": [ABSENT, 2], "moe_layers": [ABSENT, [0, 4]], "use_qk_norm": [ABSENT, False],
    "attention_chunk_size": [ABSENT, 3], "intermediate_size_mlp": [ABSENT, 80],
    "kinds": [{}, {"layer_types": ["full_attention", "chunked_attention"] * 3}]}
FAMILY_KNOBS.update({
    "SeedOssForCausalLM": {"attention_out_bias": [ABSENT, True, False]},
    "InternLM3ForCausalLM": {"aliases": [{}, {"qkv_bias": True, "bias": True}, {"qkv_bias": False, "bias": False},
                                         {"qkv_bias": True, "bias": False}]},
    # its rotary reads config.head_dim; NTK-alpha as Hunyuan-7B spells it
    "HunYuanDenseV1ForCausalLM": {"head_dim": [32, 16], "rope": ROPES + [
        {"rope_scaling": {"type": "dynamic", "alpha": 1000.0, "factor": 1.0, "beta_fast": 32, "mscale": 1.0},
         "head_dim": 32, "rope_theta": 30000.0},
        {"rope_parameters": {"rope_type": "dynamic", "alpha": 50.0, "rope_theta": 20000.0}, "head_dim": 16}]},
    "Exaone4ForCausalLM": {"sliding_window_pattern": [ABSENT, 2, 3], "exaone_window": [ABSENT, None, 5]},
    "Glm4MoeForCausalLM": {"n_shared_experts": [ABSENT, 2], "first_k_dense_replace": [ABSENT, 0, 3],
                           "norm_topk_prob": [ABSENT, False], "routed_scaling_factor": [ABSENT, 2.5],
                           "use_qk_norm": [ABSENT, True], "groups": [{}, {"n_group": 2, "topk_group": 2}, {"n_group": 2, "topk_group": 1}]},
})
WINDOW_READ["Glm4MoeForCausalLM"] = "none"
PARTIAL_ROTARY["Glm4MoeForCausalLM"] = True
FAMILY_KNOBS["Qwen3_5ForCausalLM"] = {  # gated delta-net layers beside gated attention
    "full_attention_interval": [ABSENT, 2, 3],
    "kinds": [{}, {"layer_types": ["linear_attention", "full_attention", "full_attention", "linear_attention",
                                   "linear_attention", "full_attention"]}],
    "linear": [{}, {"linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
                    "linear_value_head_dim": 8, "linear_conv_kernel_dim": 3}]}
WINDOW_READ["Qwen3_5ForCausalLM"] = "none"  # Qwen3_5Attention never windows
PARTIAL_ROTARY["Qwen3_5ForCausalLM"] = True
FAMILY_KNOBS["Qwen3NextForCausalLM"] = {**FAMILY_KNOBS["Qwen3_5ForCausalLM"],
                                        "norm_topk_prob": [ABSENT, True, False], "mlp_only_layers": [ABSENT, [1, 4]],
                                        "decoder_sparse_step": [ABSENT, 2], "experts": [{}, MOE_BASE, {"num_experts": 0}]}
WINDOW_READ["Qwen3NextForCausalLM"] = "none"
PARTIAL_ROTARY["Qwen3NextForCausalLM"] = True
TEXT_MODEL["Qwen3_5ForConditionalGeneration"] = ("Qwen3_5Config", "qwen3_5_text", None, "Qwen3_5")
FAMILY_KNOBS["Qwen3_5ForConditionalGeneration"] = FAMILY_KNOBS["Qwen3_5ForCausalLM"]
WINDOW_READ["Qwen3_5ForConditionalGeneration"] = "none"
PARTIAL_ROTARY["Qwen3_5ForConditionalGeneration"] = True
TEXT_MODEL["Qwen3_5MoeForConditionalGeneration"] = ("Qwen3_5MoeConfig", "qwen3_5_moe_text", None, "Qwen3_5Moe")
for _arch in ("Qwen3_5MoeForCausalLM", "Qwen3_5MoeForConditionalGeneration"):  # experts on every layer, renormalised
    FAMILY_KNOBS[_arch] = FAMILY_KNOBS["Qwen3_5ForCausalLM"]
    WINDOW_READ[_arch], PARTIAL_ROTARY[_arch], RENORMALISES[_arch] = "none", True, True
# Gemma 4: per-layer head sizes / kv heads (global_head_dim, num_global_key_value_heads, attention_k_eq_v), compared
# layer by layer (PER_LAYER_GEOMETRY); its config is heterogeneous (per_layer_config), so the reference reads the
# global head_dim / num_key_value_heads with allow_global_per_layer_attribute_access. Per-layer input embeddings
# are off (onnxforge refuses them), and the rotary tables are Gemma 4's per-type ones.
G4_ROPES = [{}, {"rope_parameters": {"full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.5,
                                                          "rope_theta": 50000.0},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 3000.0}}},
            {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 40000.0},
                                 "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}}}]
PER_LAYER_GEOMETRY = ("Gemma4ForCausalLM", "Gemma4ForConditionalGeneration")
TEXT_MODEL["Gemma4ForCausalLM"] = ("Gemma4TextConfig", None, None, "Gemma4Text")
TEXT_MODEL["Gemma4ForConditionalGeneration"] = ("Gemma4Config", "gemma4_text", None, "Gemma4Text")
FINAL_SOFTCAP = (*FINAL_SOFTCAP, *PER_LAYER_GEOMETRY)
for _arch in PER_LAYER_GEOMETRY:
    PARTIAL_ROTARY[_arch] = True  # its tables are checked per layer type (head sizes differ), in reference()
    FAMILY_KNOBS[_arch] = {"ple": [{"hidden_size_per_layer_input": 0},  # per-layer inputs, KV sharing
                                   {"hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": 64,
                                    "num_kv_shared_layers": 2, "use_double_wide_mlp": True},
                                   {"hidden_size_per_layer_input": 0, "num_kv_shared_layers": 3}],
                           "rope": G4_ROPES, "head_dim": [ABSENT, 16],
                           "global_head_dim": [ABSENT, 32, 48], "attention_k_eq_v": [ABSENT, True, False],
                           "num_global_key_value_heads": [ABSENT, 1], "final_logit_softcapping": [ABSENT, None, 7.0],
                           "use_bidirectional_attention": [ABSENT, "vision"],
                           "moe": [{}, {"enable_moe_block": True, "num_experts": 4, "top_k_experts": 2,
                                        "moe_intermediate_size": 32}]}
# DeepSeek-V3 / Kimi-K2: latent attention, group-limited sigmoid routing (its attention runs only with
# num_key_value_heads equal to the heads: kv_b_proj gives every head its k and v)
FAMILY_KNOBS["DeepseekV3ForCausalLM"] = {
    "num_key_value_heads": [4, None], "q_lora_rank": [ABSENT, None, 16],
    "mla_dims": [{}, {"kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "v_head_dim": 24},
                 {"kv_lora_rank": 16, "qk_nope_head_dim": 32, "qk_rope_head_dim": 32, "v_head_dim": 80}],
    "experts": [{"n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "n_group": 4,
                 "topk_group": 2},
                {"n_routed_experts": 8, "num_experts_per_tok": 3, "moe_intermediate_size": 32, "n_group": 1,
                 "topk_group": 1},
                {"n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1}],
    "first_k_dense_replace": [ABSENT, 0, 2], "norm_topk_prob": [ABSENT, False], "routed_scaling_factor": [ABSENT, 1.0],
    "n_shared_experts": [ABSENT, 2], "rope_interleave": [ABSENT, False],
    "rope": ROPES + [{"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "mscale": 0.707,
                                          "mscale_all_dim": 0.707, "original_max_position_embeddings": 64}},
                     {"rope_scaling": {"type": "yarn", "factor": 8.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                                       "beta_fast": 32, "beta_slow": 1, "original_max_position_embeddings": 32}}]}
WINDOW_READ["DeepseekV3ForCausalLM"] = "none"
VARIANTS_PER_FAMILY = 30


def knobs(arch: str) -> dict:
    return {**COMMON, **FAMILY_KNOBS.get(arch, {})}


LFM2_MOE_KINDS = ["conv", "full_attention", "conv", "conv", "full_attention", "conv"]  # transformers needs the list
FAMILY_KNOBS["Lfm2MoeForCausalLM"] = {
    "kinds": [{"layer_types": LFM2_MOE_KINDS}, {"layer_types": ["full_attention"] * 3 + ["conv"] * 3}],
    "conv_L_cache": [ABSENT, 4], "conv_bias": [ABSENT, True, False], "num_dense_layers": [ABSENT, 0, 4],
    "norm_topk_prob": [ABSENT, True, False], "use_expert_bias": [ABSENT, True, False],
    "routed_scaling_factor": [ABSENT, 2.5]}
FAMILY_KNOBS["GraniteMoeHybridForCausalLM"] = {  # Mamba2 layers by layer_types or the legacy layers_block_type
    "kinds": [{"layer_types": ["mamba", "attention", "mamba", "mamba", "attention", "mamba"]},
              {"layer_types": ["linear_attention", "full_attention"] * 3},
              {"layers_block_type": ["attention", "mamba", "mamba", "mamba", "mamba", "attention"]}],
    "num_local_experts": [ABSENT, 0], "position_embedding_type": [ABSENT, None, "rope"],
    "mamba": [{}, {"mamba_n_heads": 8, "mamba_d_head": 16, "mamba_n_groups": 2, "mamba_d_state": 16},
              {"mamba_n_heads": 4, "mamba_d_head": "auto", "mamba_d_conv": 3, "mamba_conv_bias": False,
               "mamba_proj_bias": True, "time_step_limit": [0.001, 0.1]}],
    "multipliers": [{}, {"embedding_multiplier": 12.0, "residual_multiplier": 0.22, "attention_multiplier": 0.0078125,
                         "logits_scaling": 8.0}]}


def config_dict(arch: str, choice: dict) -> dict:
    """config.json for one choice of every knob."""
    choice = {k: v if v is ABSENT else copy.deepcopy(v) for k, v in choice.items()}
    text = {**BASE, **(MOE_BASE if "Moe" in arch or "Mixtral" in arch or "Phimoe" in arch or "GptOss" in arch else {})}
    for key, value in choice.items():
        if value is ABSENT:
            continue
        if isinstance(value, dict) and key not in ("no_rope_layers",):
            text.update(value)
        else:
            text[key] = value
    for key in ("rope_scaling", "rope_parameters"):
        params = text.get(key)
        if isinstance(params, dict) and params.get("short_factor") == LONG:
            head = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
            half = int(head * (params.get("partial_rotary_factor") or text.get("partial_rotary_factor") or 1.0)) // 2
            params["short_factor"] = [1.0 + 0.1 * i for i in range(half)]
            params["long_factor"] = [2.0 + 0.5 * i for i in range(half)]
            if arch == "PhimoeForCausalLM":  # PhimoeConfig requires both; Phi-3.5-MoE has them equal
                params.update(short_mscale=1.25, long_mscale=1.25)
    if "exaone_window" in text:
        text["sliding_window"] = text.pop("exaone_window")
    top_type = config_class(arch).model_type
    if arch in TEXT_MODEL and TEXT_MODEL[arch][1]:
        return {"architectures": [arch], "model_type": top_type, "text_config": {**text, "model_type": TEXT_MODEL[arch][1]}}
    return {"architectures": [arch], "model_type": top_type, **text}


def variants(arch: str) -> list[tuple[str, dict]]:
    """The all-absent config, each knob's choices one at a time, and seeded random combinations."""
    ks = knobs(arch)
    base = {k: (ABSENT if ABSENT in v else v[0]) for k, v in ks.items()}
    out = [("base", base)]
    for key, choices in ks.items():
        for j, value in enumerate(choices):
            out.append((f"{key}={j}", {**base, key: value}))
    rng = random.Random(zlib.crc32(arch.encode()))
    for n in range(VARIANTS_PER_FAMILY):
        choice = {k: rng.choice(v) for k, v in ks.items()}
        out.append((f"random{n}", choice))
    return out


def model_class(arch: str):
    return getattr(transformers, arch) if arch != "InternLM3ForCausalLM" else transformers.LlamaForCausalLM


def config_class(arch: str):
    return getattr(transformers, TEXT_MODEL[arch][0]) if arch in TEXT_MODEL else model_class(arch).config_class


def decoder_classes(arch: str):
    """The module holding the family's decoder layer / attention / rotary classes, and their name prefix."""
    import importlib

    if arch in TEXT_MODEL:
        module = TEXT_MODEL[arch][2]
        return (importlib.import_module(module) if module else sys.modules[model_class(arch).__module__]), \
            TEXT_MODEL[arch][3]
    cls = model_class(arch)
    return sys.modules[cls.__module__], cls.__name__.replace("ForCausalLM", "").replace("ForConditionalGeneration", "")


# ----------------------------------------------------------------------------- what transformers derives


class CannotRun(Exception):
    """transformers loads the config but its model cannot run it."""


def reference(arch: str, d: dict) -> dict:
    """Every compared field, as transformers' config class and modules derive it from config.json `d`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        top = config_class(arch).from_dict(copy.deepcopy(d))  # it rewrites nested rope dicts in place
    c = top.get_text_config()
    c._attn_implementation = "eager"
    if getattr(c, "is_heterogeneous", False):  # per-layer overrides (Gemma 4): compared layer by layer below
        c.allow_global_per_layer_attribute_access = True
    if arch in MASKS and any(t not in MASKS[arch] for t in c.layer_types):
        raise CannotRun(f"layer_types {c.layer_types}: the model has masks for {MASKS[arch]} only")
    mod, prefix = decoder_classes(arch)
    with torch.device("meta"):
        layers = [getattr(mod, f"{prefix}DecoderLayer")(c, i) for i in range(c.num_hidden_layers)]
    attn = [getattr(layer, "self_attn", None) for layer in layers]  # None: a layer of another kind (LFM2 conv)
    attn0 = next(a for a in attn if a is not None)
    out = {
        "num_layers": c.num_hidden_layers,
        "num_heads": c.num_attention_heads,
        "num_kv_heads": c.num_key_value_heads or c.num_attention_heads,
        "head_dim": getattr(attn0, "qk_head_dim", None) or attn0.head_dim,  # qk_head_dim: latent attention
        "scale": float(attn0.scaling),
        "softcap": float(getattr(attn0, "attn_logit_softcapping", None) or 0.0),
        "final_softcap": float(getattr(c, "final_logit_softcapping", None) or 0.0) if arch in FINAL_SOFTCAP else 0.0,
        "tie_embeddings": bool(getattr(top, "tie_word_embeddings", False)),
        "eps": norm_eps(layers[0]),
        "qkv_bias": has_bias(attn0, "kv_a_proj_with_mqa", "q_proj", "qkv_proj"),  # kv_a_proj...: latent attention
        "o_bias": has_bias(attn0, "o_proj", "dense", "out_proj"),
        "qk_norm": any(hasattr(attn0, n) and getattr(attn0, n) is not None
                       for n in ("q_norm", "q_layernorm", "query_layernorm", "qk_norm")),  # qk_norm: Llama 4
        "windows": windows(arch, c, attn),
        "no_rope": tuple(a is None or not getattr(a, "use_rope", True) or not ROTATES.get(arch, bool)(a) for a in attn),
        "kinds": tuple(kind_of(layer) for layer in layers),
        "rope": rope_tables(mod, prefix, c),
        "rope_long": long_table(mod, prefix, c),
        "layer_rope_type": tuple(c.layer_types) if hasattr(c, "layer_types") and c.layer_types else None,
        "moe_layers": tuple(is_moe(layer) for layer in layers),
        "activation": activation_of(layers[0]),
        "mlp_bias": mlp_bias(layers),
        "scales": (float(getattr(c, "embedding_multiplier", math.sqrt(c.hidden_size) if "Gemma" in arch else 1.0)),
                   float(getattr(c, "residual_multiplier", 1.0)), float(getattr(c, "logits_scaling", 1.0))),
    }
    for table, _ in out["rope"].values():
        if 2 * len(table) != (getattr(attn0, "qk_rope_head_dim", None) or out["head_dim"]) \
                and not PARTIAL_ROTARY.get(arch):
            raise CannotRun(f"a rotary table of {2 * len(table)} dims for a head of {out['head_dim']}")
    conv = next((layer.conv for layer in layers if hasattr(layer, "conv")), None)
    if arch in PER_LAYER_GEOMETRY:  # per layer: head size, kv heads, whether k is v (no v_proj); each rotary table
        # against the head size of the layers of its type (PARTIAL_ROTARY skips the one-head-size check above)
        for lt, (table, _) in out["rope"].items():
            for head in {a.head_dim for a, t in zip(attn, c.layer_types) if t == lt}:
                if 2 * len(table) != head:
                    raise CannotRun(f"a rotary table of {2 * len(table)} dims for a head of {head}")
        # a layer that reuses another's keys and values (KV sharing) has no k/v projection: its kv heads are its
        # config's; the layer it reads is the one transformers stores for its type (kv_sharing_modes)
        modes, types = c.kv_sharing_modes, c.layer_types
        store = {types[j]: j for j, mode in enumerate(modes) if mode == "store"}
        out["layer_geometry"] = tuple(
            (a.head_dim, c.per_layer_config[i].num_key_value_heads if a.is_kv_shared_layer else
             a.k_proj.out_features // a.head_dim, not a.is_kv_shared_layer and a.v_proj is None,
             store[types[i]] if a.is_kv_shared_layer else -1, layer.mlp.intermediate_size)
            for i, (a, layer) in enumerate(zip(attn, layers)))
        out["per_layer_input"] = layers[0].hidden_size_per_layer_input or 0
        # the MoE block beside the dense MLP (enable_moe_block): the layer holds the router and experts itself
        out["moe_layers"] = tuple(bool(getattr(layer, "enable_moe_block", False)) for layer in layers)
        moe_layer = next((layer for layer in layers if getattr(layer, "enable_moe_block", False)), None)
        if moe_layer is not None:
            out["experts"] = (moe_layer.experts.num_experts, c.top_k_experts, moe_layer.experts.intermediate_dim)
    out["kinds"] = tuple(kind_of(layer) for layer in layers)
    if getattr(c, "position_embedding_type", "rope") != "rope":  # GraniteMoeHybridModel: no rotary module
        out["no_rope"] = (True,) * len(layers)
    if conv is not None:  # LFM2's short conv and its MLP width (Lfm2MLP adjusts intermediate_size)
        out["conv"] = (conv.conv_kernel_size, conv.bias)
        dense = next((layer for layer in layers if not is_moe(layer)), None)
        out["mlp_width"] = mlp_of(dense).w1.out_features if dense is not None else None
    linear = next((layer.linear_attn for layer in layers if getattr(layer, "linear_attn", None) is not None), None)
    if linear is not None:  # the gated delta-net's sizes
        out["linear"] = (linear.num_k_heads, linear.num_v_heads, linear.head_k_dim, linear.head_v_dim,
                         linear.conv_kernel_size)
    mamba = next((layer.mamba for layer in layers if getattr(layer, "mamba", None) is not None), None)
    if mamba is not None:
        out["mamba"] = (mamba.num_heads, mamba.head_dim, mamba.n_groups, mamba.ssm_state_size, mamba.conv_kernel_size,
                        mamba.use_conv_bias, mamba.use_bias, tuple(float(x) for x in mamba.time_step_limit))
    if getattr(attn0, "kv_lora_rank", None) is not None:  # latent attention (DeepSeek-V3): its sizes, the latent
        # norms' epsilon, the rotary pairs; kv_b_proj gives every head its k and v; rms_norm_eps is the layer norms'
        out["mla"] = (attn0.q_lora_rank or 0, attn0.kv_lora_rank, attn0.qk_nope_head_dim, attn0.qk_rope_head_dim,
                      attn0.v_head_dim, float(attn0.kv_a_layernorm.variance_epsilon), bool(c.rope_interleave))
        out["num_kv_heads"] = attn0.num_heads
        out["eps"] = float(layers[0].input_layernorm.variance_epsilon)
    moe = next((layer for layer in layers if is_moe(layer)), None)
    if moe is not None and arch not in PER_LAYER_GEOMETRY:  # Gemma 4's experts: above
        groups = find_attr(mlp_of(moe), ("num_group",))
        if groups is not None:  # group-limited routing (n_group / topk_group); keeping every group is none
            keep = int(find_attr(mlp_of(moe), ("topk_group",)))
            out["groups"] = (int(groups), keep) if keep < groups else (1, 1)
        scale = find_attr(mlp_of(moe), ("routed_scaling_factor",))
        if scale is not None:  # sigmoid routing (LFM2-MoE): its scale and whether a bias steers the selection
            out["routed_scale"] = float(scale)
            flag = find_attr(mlp_of(moe), ("use_expert_bias",))  # GLM-4 MoE: always, its e_score_correction_bias
            out["selection_bias"] = bool(flag) if flag is not None else \
                find_attr(mlp_of(moe), ("e_score_correction_bias",)) is not None
        out["top_k"] = int(find_attr(mlp_of(moe), ("top_k", "num_experts_per_tok")))
        norm = find_attr(mlp_of(moe), ("norm_topk_prob",))
        out["normalize"] = bool(norm) if norm is not None else RENORMALISES.get(arch)
    return out


def norm_eps(layer) -> float:
    if type(layer).__name__ == "OlmoDecoderLayer":
        return 1e-5  # OlmoLayerNorm: F.layer_norm(..., eps=1e-5), no config key
    for module in layer.modules():
        if "norm" in type(module).__name__.lower():
            for attr in ("variance_epsilon", "eps"):
                if getattr(module, attr, None) is not None:
                    return float(getattr(module, attr))
    raise AssertionError(f"no norm with an epsilon in {type(layer).__name__}")


def has_bias(attn, *names: str) -> bool:
    for n in names:
        m = getattr(attn, n, None)
        if m is not None:
            return m.bias is not None
    raise AssertionError(f"{type(attn).__name__} has none of {names}")


def windows(arch: str, c, attn) -> tuple[int, ...]:
    read = WINDOW_READ.get(arch)
    if read == "none":
        return (0,) * c.num_hidden_layers
    if read == "all":
        return (getattr(c, "sliding_window", None) or 0,) * c.num_hidden_layers
    if read == "types":
        return tuple((c.sliding_window or 0) if t == "sliding_attention" else 0 for t in c.layer_types)
    return tuple(getattr(a, "sliding_window", None) or 0 for a in attn)


def rope_tables(mod, prefix: str, c) -> dict:
    """layer type (or None) -> (inv_freq, attention scaling) of the model's rotary module."""
    rotary = rotary_class(mod, prefix)(c)
    if hasattr(rotary, "inv_freq"):
        return {None: (rotary.inv_freq.numpy(), mscale(rotary, c, "short_mscale"))}
    return {lt: (getattr(rotary, f"{lt}_inv_freq").numpy(), float(getattr(rotary, f"{lt}_attention_scaling")))
            for lt in sorted(set(c.layer_types))}


def rotary_class(mod, prefix: str):
    """The rotary module's class (Qwen3.5 names its decoder's Qwen3_5TextRotaryEmbedding)."""
    return getattr(mod, f"{prefix}RotaryEmbedding", None) or getattr(mod, f"{prefix}TextRotaryEmbedding")


def activation_of(layer) -> str:
    """The class of the MLP's activation module (transformers.activations), e.g. PytorchGELUTanh."""
    import transformers.activations as acts

    for m in mlp_of(layer).modules():
        if type(m).__module__ == acts.__name__ or isinstance(m, (torch.nn.SiLU, torch.nn.GELU, torch.nn.ReLU)):
            return activation_name(m)
    return None  # gpt-oss: its clamped SwiGLU is inline code, no config key (MoESpec.swiglu_*)


def activation_name(m) -> str:
    return type(m).__name__ + (f"({m.approximate})" if isinstance(m, torch.nn.GELU) else "")


def mlp_bias(layers) -> bool | None:
    """Whether the dense MLP's projections have biases (None: every layer is MoE)."""
    dense = next((layer for layer in layers if not is_moe(layer)), None)
    if dense is None:
        return None
    linear = next(m for m in mlp_of(dense).modules() if isinstance(m, torch.nn.Linear))
    return linear.bias is not None


def kind_of(layer) -> str:
    """The layer's token mixer, as graph/kinds.py names it."""
    if getattr(layer, "linear_attn", None) is not None:  # Qwen3.5 / Qwen3-Next gated delta-net
        return "gated_delta"
    if hasattr(layer, "block_type") and not hasattr(layer, "self_attn"):  # a layer type Qwen3.5 builds no mixer for
        raise CannotRun(f"a {layer.block_type} layer has no token mixer in {type(layer).__name__}")
    if getattr(layer, "mamba", None) is not None:
        return "mamba"
    if getattr(getattr(layer, "self_attn", None), "kv_lora_rank", None) is not None:
        return "mla"  # latent attention (DeepSeek-V3)
    return "conv" if hasattr(layer, "conv") else "attention"


def mlp_of(layer):
    if hasattr(layer, "feed_forward"):  # LFM2
        return layer.feed_forward
    if getattr(layer, "block_sparse_moe", True) is None:  # Granite 4 hybrid without experts: its shared MLP
        return layer.shared_mlp
    return layer.mlp if hasattr(layer, "mlp") else layer.block_sparse_moe  # Granite-MoE


def mscale(rotary, c, key: str) -> float:
    """The factor the rotary module's forward multiplies cos/sin by: its attention scaling, except
    PhimoeRotaryEmbedding's, which multiplies by short_mscale (long_mscale past the original length)."""
    if type(rotary).__name__ == "PhimoeRotaryEmbedding" and c.rope_parameters["rope_type"] != "default":
        return float(c.rope_parameters[key])
    return float(rotary.attention_scaling)


def long_table(mod, prefix: str, c):
    """LongRoPE past original_max_position_embeddings: (inv_freq, scale) as the forward computes it then
    (dynamic_rope_update recomputes with seq_len; PhiMoE keeps its table and takes long_mscale)."""
    params = c.rope_parameters
    if params.get("rope_type") != "longrope":
        return None
    rotary = rotary_class(mod, prefix)(c)
    if type(rotary).__name__ == "PhimoeRotaryEmbedding":
        return rotary.inv_freq.numpy(), mscale(rotary, c, "long_mscale")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv, scale = ROPE_INIT_FUNCTIONS["longrope"](c, None, seq_len=params["original_max_position_embeddings"] + 1)
    return inv.numpy(), float(scale)


def is_moe(layer) -> bool:
    return hasattr(mlp_of(layer), "experts")


def find_attr(module, names):
    for m in module.modules():
        for n in names:
            v = getattr(m, n, None)
            if v is not None and not isinstance(v, torch.nn.Module):
                return v
    return None


# ----------------------------------------------------------------------------- what onnxforge derives


def ours(arch_obj, d: dict, ref: dict) -> dict:
    spec = arch_obj.make_spec(d)
    a = spec.attention
    out = {
        "num_layers": spec.num_layers, "num_heads": a.num_heads, "num_kv_heads": a.num_kv_heads,
        "head_dim": spec.mla.qk_dim if spec.mla else a.head_dim,
        "scale": a.scale if a.scale is not None else a.head_dim ** -0.5,
        "softcap": a.softcap, "final_softcap": spec.final_softcap, "tie_embeddings": spec.tie_embeddings,
        "eps": spec.norm.eps, "qkv_bias": a.qkv_bias, "o_bias": a.o_bias, "qk_norm": bool(a.qk_norm),
        "windows": spec.layer_windows, "no_rope": tuple(layer.rope is None for layer in spec.layers),
        "moe_layers": tuple(layer.moe for layer in spec.layers), "kinds": tuple(layer.kind for layer in spec.layers),
        "scales": (spec.embedding_scale, spec.residual_scale, spec.logit_scale),
        "activation": activation_name(ACT2FN[spec.mlp.activation]) if spec.mlp.activation in ACT2FN else "?",
        "mlp_bias": spec.mlp.bias if not all(layer.moe for layer in spec.layers) else None,
    }
    # the rotary table each layer uses, keyed as the reference keys its tables
    keyed = ref["layer_rope_type"] if len(ref["rope"]) > 1 or None not in ref["rope"] else None
    tables = {}
    for i, layer in enumerate(spec.layers):
        key = keyed[i] if keyed else None
        if layer.rope is not None:
            tables.setdefault(key, inv_freq_and_scale(spec.rope_for(layer.rope), spec.context_length))
    out["rope"] = tables
    out["rope_long"] = inv_freq_and_scale(spec.rope, spec.context_length, long=True) if ref["rope_long"] else None
    out["layer_rope_type"] = ref["layer_rope_type"]
    if "experts" in ref:
        out["experts"] = spec.moe and (spec.moe.num_experts, spec.moe.top_k, spec.moe.intermediate_size)
        out["mlp_bias"] = spec.mlp.bias  # the dense MLP beside the experts
    if "layer_geometry" in ref:
        out["layer_geometry"] = tuple((spec.attention_of(i).head_dim, spec.attention_of(i).num_kv_heads, layer.k_eq_v,
                                       layer.kv_source, layer.mlp_size or spec.mlp.intermediate_size)
                                      for i, layer in enumerate(spec.layers))
        out["per_layer_input"] = spec.per_layer_input
    if "conv" in ref:
        out["conv"] = (spec.conv.kernel, spec.conv.bias) if spec.conv else None
        out["mlp_width"] = spec.mlp.intermediate_size if not all(layer.moe for layer in spec.layers) else None
    if "linear" in ref:
        la = spec.linear
        out["linear"] = la and (la.key_heads, la.value_heads, la.key_dim, la.value_dim, la.kernel)
    if "mamba" in ref:
        m = spec.mamba
        out["mamba"] = m and (m.heads, m.head_dim, m.groups, m.state, m.kernel, m.conv_bias, m.proj_bias,
                              (m.dt_min, m.dt_max))
    if "routed_scale" in ref:
        out["routed_scale"], out["selection_bias"] = spec.moe.routed_scale, spec.moe.selection_bias
    if "mla" in ref:
        m = spec.mla
        out["mla"] = m and (m.q_lora_rank, m.kv_lora_rank, m.nope_dim, m.rope_dim, m.v_dim, m.latent_eps,
                            spec.rope.interleaved)
    if "groups" in ref:
        out["groups"] = spec.moe.groups
    if spec.moe is not None:  # the sparse mixer (PhiMoE) has no renormalisation to compare
        out["top_k"], out["normalize"] = spec.moe.top_k, spec.moe.normalize if spec.moe.mixer == "softmax" else None
    return out


def differences(ref: dict, got: dict) -> list[str]:
    diffs = []
    for key, want in ref.items():
        have = got.get(key)
        if key == "rope":
            for lt, (freq, scale) in want.items():
                if lt not in have:
                    if any(lt == t for t, nr in zip(ref["layer_rope_type"] or [], ref["no_rope"]) if not nr) \
                            or (lt is None and not all(ref["no_rope"])):
                        diffs.append((f"rope[{lt}]", "no table"))
                    continue
                f2, s2 = have[lt]
                if f2.shape != freq.shape or not np.allclose(f2, freq, rtol=1e-5, atol=0) or not math.isclose(
                        s2, scale, rel_tol=1e-6):
                    diffs.append((f"rope[{lt}]", f"inv_freq {f2[:3]}..(len {len(f2)}) x{s2} != transformers "
                                                 f"{freq[:3]}..(len {len(freq)}) x{scale}"))
        elif key == "activation" and want is None:
            continue
        elif key == "rope_long" and want is not None:
            if have[0].shape != want[0].shape or not np.allclose(have[0], want[0], rtol=1e-5, atol=0) \
                    or not math.isclose(have[1], want[1], rel_tol=1e-6):
                diffs.append((key, f"{have[0][:3]} x{have[1]} != transformers {want[0][:3]} x{want[1]}"))
        elif key in ("scale", "eps", "softcap", "final_softcap"):
            if not math.isclose(float(have), float(want), rel_tol=1e-6):
                diffs.append((key, f"{have} != transformers {want}"))
        elif key == "scales":
            if not all(math.isclose(x, y, rel_tol=1e-6) for x, y in zip(have, want)):
                diffs.append((key, f"{have} != transformers {want}"))
        elif have != want:
            diffs.append((key, f"{have} != transformers {want}"))
    return diffs


def quirk(arch: str, d: dict, field: str) -> str | None:
    """Why a difference is transformers 5's and not a difference in the model the checkpoint was made for."""
    if arch == "Olmo3ForCausalLM" and field == "rope[sliding_attention]" and d.get("rope_theta") is not None \
            and "sliding_attention" not in (d.get("rope_parameters") or {}):
        # Olmo3Config.convert_rope_params_to_dict pops rope_theta for the full layers, then pops it again for
        # the sliding ones and gets the default (500000). transformers 4.x, which wrote the OLMo 3 configs that
        # spell a top-level rope_theta, rotated the sliding layers at rope_theta (Olmo3RotaryEmbedding(config,
        # rope_type="default")); onnxforge keeps that. Every released OLMo 3 has rope_theta 500000 (equal).
        return "transformers 5 Olmo3Config drops rope_theta for the sliding layers"
    if arch == "Mistral3ForConditionalGeneration" and field == "tie_embeddings" and "tie_word_embeddings" not in d:
        # Mistral3Config defaults to true, but transformers 5 does not tie a checkpoint's own lm_head (both present
        # and unequal) and 4.x read the text config's false: onnxforge reads a missing key as false (archs/newer.py)
        return "Mistral3Config's default tie is not applied to a checkpoint with its own lm_head"
    return None


def check_family(arch: str) -> tuple[int, list[str], list[str], list[str]]:
    """(compared, differences, onnxforge refusals, transformers refusals) over the family's variants."""
    arch_obj = load_families()[arch]
    compared, diffs, refused, tf_refused = 0, [], [], []
    seen = set()
    for name, choice in variants(arch):
        d = config_dict(arch, choice)
        key = repr(sorted(d.items(), key=str))
        if key in seen:
            continue
        seen.add(key)
        try:
            ref = reference(arch, d)
        except Exception as e:  # transformers refuses the config (or cannot build its model)
            tf_refused.append(f"{name}: {type(e).__name__}: {str(e)[:100]}")
            continue
        try:
            got = ours(arch_obj, d, ref)
        except ConfigError as e:
            refused.append(f"{name}: {e}")
            continue
        compared += 1
        diffs += [f"{arch} {name} {short(d)}: {field}: {x}" for field, x in differences(ref, got)
                  if not quirk(arch, d, field)]
    return compared, diffs, refused, tf_refused


def short(d: dict) -> str:
    keys = set(BASE) | set(MOE_BASE) | {"architectures", "model_type"}
    text = d.get("text_config", d)
    return "{" + ", ".join(f"{k}: {v}" for k, v in text.items() if k not in keys) + "}"


ARCHS = sorted(load_families())


def test_every_family_has_a_window_rule():
    """A family whose attention keeps no per-layer window must say how its mask reads the window."""
    for arch in ARCHS:
        src, prefix = decoder_classes(arch)
        import inspect

        per_layer = "self.sliding_window" in inspect.getsource(getattr(src, f"{prefix}Attention"))
        assert per_layer or arch in WINDOW_READ, f"{arch}: add it to WINDOW_READ"


@pytest.mark.parametrize("arch", ARCHS)
def test_spec_equals_transformers(arch):
    compared, diffs, refused, tf_refused = check_family(arch)
    assert not diffs, f"{len(diffs)} differences, e.g.:\n" + "\n".join(diffs[:25])
    # most variants are valid configs both sides take
    assert compared >= 0.5 * (compared + len(refused) + len(tf_refused)) and compared >= 20, (
        compared, refused[:10], tf_refused[:10])
    assert not refused, "onnxforge refuses configs transformers loads:\n" + "\n".join(refused[:10])


def test_many_cases():
    """Hundreds of config.json variants over every family."""
    total = sum(len(variants(a)) for a in ARCHS)
    assert total >= 1000 and len(ARCHS) == len(set(itertools.chain(ARCHS)))


JUNK = [None, True, "x", -1, 0, 2**40, 1.5, [], [3], {"a": 1}, {"full_attention": 3}, {"sliding_attention": "x"},
        {"rope_type": "longrope", "short_mscale": "x"},
        {"type": "su", "short_mscale": 1.0, "long_mscale": 1.0, "short_factor": "x"}]
DERIVING_KEYS = ["sliding_window", "use_sliding_window", "max_window_layers", "layer_types", "sliding_window_pattern",
                 "rope_parameters", "rope_scaling", "partial_rotary_factor", "tie_word_embeddings", "rms_norm_eps",
                 "head_dim", "num_hidden_layers", "no_rope_layers", "no_rope_layer_interval", "rope_local_base_freq",
                 "rope_theta", "text_config"]


def test_junk_in_the_keys_the_rules_read_is_a_config_error():
    """Every value of every key these rules derive from either builds a spec or is one ConfigError."""
    crashes = []
    for arch in ARCHS:
        arch_obj, base = load_families()[arch], config_dict(arch, {})
        for key, junk in itertools.product(DERIVING_KEYS, JUNK):
            d = copy.deepcopy(base)
            (d["text_config"] if "text_config" in d and key != "text_config" else d)[key] = copy.deepcopy(junk)
            try:
                arch_obj.make_spec(d)
            except ConfigError:
                pass
            except Exception as e:  # noqa: BLE001 - the point is to list them
                crashes.append(f"{arch} {key}={junk!r}: {type(e).__name__}: {e}")
    assert not crashes, "\n".join(crashes[:20])
