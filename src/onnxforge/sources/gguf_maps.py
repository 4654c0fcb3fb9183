"""Data tables that turn a GGUF file into Hugging Face terms.

One row of `FAMILIES` per GGUF `general.architecture`: the transformers class and model_type it
becomes, whether llama.cpp's converter permuted the Q/K rows for its rotary layout, config keys
fixed for the family, and where its GGUF tensor names differ from the role table's
(archs/names.py, which maps every role to its GGUF and HF spellings). Adding a family is adding a row.
"""
from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from ..errors import CheckpointError, ConfigError

# GGUF tensors that carry no HF weight; they are read for the config instead (rope_freqs: llama3
# rope scaling factors; rope_factors_long/short: LongRoPE's) and never listed by `tensor_names()`.
AUXILIARY_TENSORS: frozenset[str] = frozenset({"rope_freqs.weight", "rope_factors_long.weight",
                                               "rope_factors_short.weight"})


@dataclass(frozen=True)
class View:
    """How one HF tensor is read from a GGUF tensor that llama.cpp's converter transformed: `source` is the HF
    name the GGUF tensor maps to by the role table; the HF tensor is its rows `rows` (a gather; a subset where one
    GGUF tensor holds two HF ones), then its columns `cols`, reshaped to `shape`, with `value` applied (the
    inverse of an elementwise transform). Rows stay exact for block-quantized weights; a view with columns or a
    value is dequantized."""

    source: str
    rows: np.ndarray | None = None
    cols: np.ndarray | None = None
    shape: tuple[int, ...] | None = None
    value: Callable[[np.ndarray], np.ndarray] | None = None
    # several GGUF tensors joined into one HF tensor (DeepSeek's kv_b_proj, written as attn_k_b and attn_v_b): each
    # part read through its own view (its `value` giving 2-D rows), the parts stacked row-wise, then `rows`
    # gathered; `shape` is then the HF shape, and `source` the first part's. Always dequantized.
    parts: tuple["View", ...] = ()


# (HF config, HF name -> stored HF shape) -> {HF name: View}: the tensors a family reads through a view
ViewHook = Callable[[dict, Mapping[str, tuple[int, ...]]], Mapping[str, View]]


@dataclass(frozen=True)
class GGUFFamily:
    """How one GGUF architecture maps onto one transformers architecture."""

    architecture: str
    model_type: str
    permute_qk: bool
    config_extra: Mapping[str, object] = field(default_factory=dict)
    gguf_names: Mapping[str, str | None] = field(default_factory=dict)  # role -> GGUF base name (None: absent)
    config_keys: Mapping[str, str] = field(default_factory=dict)  # `{arch}.<suffix>` metadata -> HF config key
    # (config so far, metadata getter `key(suffix, default)`) -> more HF config keys
    config_hook: Callable[[dict, Callable[..., Any]], Mapping[str, Any]] | None = None
    offsets: Mapping[str, float] = field(default_factory=dict)  # HF tensor glob -> value llama.cpp's converter added
    views: ViewHook | None = None  # tensors the converter reordered, split, reshaped or transformed (View)
    tensor_flags: Mapping[str, str] = field(default_factory=dict)  # HF config key -> HF tensor glob it is present for
    kv_zero_layers: bool = False  # head_count_kv lists 0 for layers without attention (a hybrid's other kind)
    # GGUF base -> HF base name beside the role table's (a view's parts; a family's own HF spelling)
    extra_names: Mapping[str, str] = field(default_factory=dict)
    kv_per_layer: bool = False  # head_count_kv may vary per layer (the config hook reads the list)
    rope_freqs: str = "llama3"  # what a rope_freqs tensor says: llama3 scaling, or "proportional" (Gemma 4: 1e30s)
    # (config so far, HF tensor names) -> more HF config keys that the tensors present say
    tensor_hook: Callable[[dict, frozenset], Mapping[str, Any]] | None = None
    shape_keys: Mapping[str, tuple[str, int]] = field(default_factory=dict)  # HF config key -> (HF tensor, HF axis)

    def offset(self, hf_name: str) -> float:
        return next((v for pattern, v in self.offsets.items() if fnmatch.fnmatchcase(hf_name, pattern)), 0.0)


_GEMMA = {"hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh"}
_NORMS_PLUS_1 = {"*norm.weight": 1.0}


def _gemma_scale(cfg: dict, layers_27b: int) -> dict:
    """llama.cpp's attention scale for Gemma 2/3, which no GGUF key carries (it tells the 27B by its layer count)."""
    big = cfg["num_hidden_layers"] == layers_27b
    return {"query_pre_attn_scalar": cfg["hidden_size"] // cfg["num_attention_heads"] if big else cfg["head_dim"]}


def _granite(cfg: dict, key: Callable[..., Any]) -> dict:
    """llama.cpp scales attention by 1/sqrt(head_dim) where the converter wrote no attention.scale."""
    return {} if key("attention.scale", None) else {"attention_multiplier": cfg["head_dim"] ** -0.5}


def _olmo2(cfg: dict, key: Callable[..., Any]) -> dict:
    """OLMo 3 is written as olmo2 with sliding_window and a per-layer sliding_window_pattern (the
    converter's default: every fourth layer full); OLMo 2 has neither."""
    if not cfg.get("sliding_window"):
        return {}
    n = cfg["num_hidden_layers"]
    pattern = key("attention.sliding_window_pattern", None) or [(i + 1) % 4 != 0 for i in range(n)]
    if not isinstance(pattern, list) or len(pattern) != n:
        raise ConfigError(f"GGUF metadata olmo2.attention.sliding_window_pattern must list {n} layers")
    return {"architectures": ["Olmo3ForCausalLM"], "model_type": "olmo3",
            "layer_types": ["sliding_attention" if slide else "full_attention" for slide in pattern]}


_GRANITE_KEYS = {"attention.scale": "attention_multiplier", "embedding_scale": "embedding_multiplier",
                 "residual_scale": "residual_multiplier", "logit_scale": "logits_scaling"}

_EXPERT_KEYS = {"expert_count": "num_experts", "expert_used_count": "num_experts_per_tok",
                "expert_feed_forward_length": "moe_intermediate_size",
                "expert_shared_feed_forward_length": "shared_expert_intermediate_size"}


def _granitemoe(cfg: dict, key: Callable[..., Any]) -> dict:
    """Granite MoE as _granite; GraniteMoeShared (its shared expert, ffn_*_shexp) has no HF family here."""
    if key("expert_shared_feed_forward_length", None):
        raise ConfigError("this granitemoe GGUF is GraniteMoeShared (a shared expert beside the routed ones), "
                          "which onnxforge does not build; only Granite 3 MoE without shared experts is supported")
    return _granite(cfg, key)


def _llama_experts(cfg: dict, key: Callable[..., Any]) -> dict:
    """Mixtral is written as llama with expert_count (its experts stacked as ffn_*_exps)."""
    if not cfg.get("num_experts"):
        return {}
    return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_local_experts": cfg["num_experts"]}


def _exaone4(cfg: dict, key: Callable[..., Any]) -> dict:
    """EXAONE 4: the converter writes sliding_window and a per-layer pattern only where config.json has a window;
    none means every layer full and rotated (an explicit null: Exaone4Config's default window is 4096). Read as
    transformers computes it; llama.cpp's own graph windows only its 64-layer (32B) model."""
    if not cfg.get("sliding_window"):
        return {"sliding_window": None, "layer_types": ["full_attention"] * cfg["num_hidden_layers"]}
    n = cfg["num_hidden_layers"]
    pattern = key("attention.sliding_window_pattern", None)
    if pattern is None:
        return {}
    if not isinstance(pattern, list) or len(pattern) != n:
        raise ConfigError(f"GGUF metadata exaone4.attention.sliding_window_pattern must list {n} layers")
    return {"layer_types": ["sliding_attention" if slide else "full_attention" for slide in pattern]}


def _mistral3(cfg: dict, key: Callable[..., Any]) -> dict:
    """Mistral 3's text decoder (Mistral Small 3.x): a window only where the converter wrote one (MistralConfig's
    default of 4096 is not the model's); Ministral 3's attention temperature (llama_4_scaling_beta) is refused."""
    if key("attention.temperature_scale", None) is not None:
        raise ConfigError("this mistral3 GGUF is a Ministral 3 (attention temperature scaling, "
                          "llama_4_scaling_beta), which onnxforge does not build; Mistral Small 3.x builds")
    return {} if cfg.get("sliding_window") else {"sliding_window": None}


# Gated delta-net layers (Qwen3.5, Qwen3-Next): llama.cpp's names for the linear attention's tensors (attn_qkv
# there is the linear attention's in_proj_qkv, not a fused attention projection; attn_gate its in_proj_z).
_LINEAR_ATTN = {"qkv": None, "la_qkv": "blk.{i}.attn_qkv", "la_z": "blk.{i}.attn_gate", "la_b": "blk.{i}.ssm_beta",
                "la_a": "blk.{i}.ssm_alpha", "la_ba": "blk.{i}.ssm_ba", "la_conv": "blk.{i}.ssm_conv1d",
                "la_norm": "blk.{i}.ssm_norm", "la_out": "blk.{i}.ssm_out", "la_A_log": "blk.{i}.ssm_a",
                "la_dt_bias": "blk.{i}.ssm_dt", "ffn_norm": "blk.{i}.post_attention_norm", "attn_post_norm": None}
# The converter adds 1 to every norm but the gated one (HF scales by 1 + weight there)
_NORMS_PLUS_1_BUT_GATED = {"*.linear_attn.norm.weight": 0.0, "*norm.weight": 1.0}


def _linear_attention(cfg: dict, key: Callable[..., Any]) -> dict:
    """The gated delta-net's sizes from the ssm.* keys, and each layer's kind from attention.recurrent_layers
    (else every full_attention_interval-th layer is attention, as the config classes choose)."""
    n = cfg["num_hidden_layers"]
    value_heads = int(key("ssm.time_step_rank"))
    recurrent = key("attention.recurrent_layers", None)
    if recurrent is None:
        every = int(key("full_attention_interval", 4))
        recurrent = [(i + 1) % every != 0 for i in range(n)]
    if not isinstance(recurrent, list) or len(recurrent) < n:
        raise ConfigError(f"GGUF metadata attention.recurrent_layers must list {n} layers")
    return {"linear_conv_kernel_dim": int(key("ssm.conv_kernel")), "linear_key_head_dim": int(key("ssm.state_size")),
            "linear_num_key_heads": int(key("ssm.group_count")), "linear_num_value_heads": value_heads,
            "linear_value_head_dim": int(key("ssm.inner_size")) // value_heads,
            "layer_types": ["linear_attention" if r else "full_attention" for r in recurrent[:n]]}


def _tiled_to_grouped(key_heads: int, per_key: int, dim: int) -> np.ndarray | None:
    """Rows undoing the converter's V-head reorder (Qwen3.5: value heads grouped by key head, (g, j), written
    tiled, (j, g)): HF row (g, j, d) is GGUF row (j * key_heads + g) * dim + d. None when nothing moved."""
    if per_key == 1:
        return None
    return np.arange(per_key * key_heads * dim).reshape(per_key, key_heads, dim).transpose(1, 0, 2).reshape(-1)


def _linear_views(reordered: bool) -> ViewHook:
    """The linear attention's tensors as transformers stores them: -exp(A_log) -> A_log, the squeezed conv1d
    (C, K) -> (C, 1, K), Qwen3.5's tiled V heads put back in their groups (`reordered`), and Qwen3-Next's
    in_proj_ba (kept interleaved per key head, [b, a] for each) split into in_proj_b and in_proj_a rows."""

    def views(cfg: dict, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, View]:
        k, v = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
        r, kd, vd = v // k, cfg["linear_key_head_dim"], cfg["linear_value_head_dim"]
        heads = _tiled_to_grouped(k, r, 1) if reordered else None
        v_rows = _tiled_to_grouped(k, r, vd) if reordered else None
        qkv_rows = None if v_rows is None else np.concatenate([np.arange(2 * k * kd), 2 * k * kd + v_rows])
        out: dict[str, View] = {}
        for i, kind in enumerate(cfg["layer_types"]):
            p = f"model.layers.{i}.linear_attn."
            if kind != "linear_attention" or f"{p}conv1d.weight" not in shapes:
                continue
            conv = shapes[f"{p}conv1d.weight"]
            out[f"{p}conv1d.weight"] = View(f"{p}conv1d.weight", rows=qkv_rows, shape=(conv[0], 1, conv[-1]))
            out[f"{p}in_proj_qkv.weight"] = View(f"{p}in_proj_qkv.weight", rows=qkv_rows)
            out[f"{p}in_proj_z.weight"] = View(f"{p}in_proj_z.weight", rows=v_rows)
            out[f"{p}out_proj.weight"] = View(f"{p}out_proj.weight", cols=v_rows)
            out[f"{p}A_log"] = View(f"{p}A_log", rows=heads, value=lambda a: np.log(-a))
            out[f"{p}dt_bias"] = View(f"{p}dt_bias", rows=heads)
            if f"{p}in_proj_ba.weight" in shapes:
                group = np.arange(k)[:, None] * 2 * r
                out[f"{p}in_proj_b.weight"] = View(f"{p}in_proj_ba.weight", rows=(group + np.arange(r)).reshape(-1))
                out[f"{p}in_proj_a.weight"] = View(f"{p}in_proj_ba.weight",
                                                   rows=(group + r + np.arange(r)).reshape(-1))
            else:
                out[f"{p}in_proj_b.weight"] = View(f"{p}in_proj_b.weight", rows=heads)
                out[f"{p}in_proj_a.weight"] = View(f"{p}in_proj_a.weight", rows=heads)
        return out

    return views


def _qwen35(moe: bool) -> GGUFFamily:
    arch, model_type = ("Qwen3_5MoeForCausalLM", "qwen3_5_moe_text") if moe else ("Qwen3_5ForCausalLM", "qwen3_5_text")
    return GGUFFamily(arch, model_type, False, {"norm_topk_prob": True} if moe else {},
                      gguf_names=_LINEAR_ATTN, config_keys=_EXPERT_KEYS if moe else {},
                      config_hook=_linear_attention, offsets=_NORMS_PLUS_1_BUT_GATED, views=_linear_views(True))


def _lfm2(cfg: dict, key: Callable[..., Any]) -> dict:
    """LFM2 / LFM2-MoE: conv layers are the ones with no KV heads (head_count_kv 0); feed_forward_length is the MLP
    width transformers derives (block_auto_adjust_ff_dim already applied); the final norm is token_embd_norm."""
    kv = key("attention.head_count_kv")
    n = cfg["num_hidden_layers"]
    if not isinstance(kv, list) or len(kv) != n:
        raise ConfigError(f"GGUF metadata attention.head_count_kv must list {n} layers (0 for a conv layer)")
    kernel = int(key("shortconv.l_cache"))
    return {"layer_types": ["conv" if not h else "full_attention" for h in kv], "conv_L_cache": kernel,
            "norm_eps": cfg["rms_norm_eps"], "block_auto_adjust_ff_dim": False}


def _lfm2moe(cfg: dict, key: Callable[..., Any]) -> dict:
    """LFM2-MoE as llama.cpp's lfm2moe graph computes it: sigmoid routing (expert_gating_func 2), top k
    renormalised, no routed scale (the converter writes no routed_scaling_factor: the published 1.0)."""
    gating = key("expert_gating_func", 2)
    if gating != 2:
        raise ConfigError(f"this lfm2moe GGUF routes with expert_gating_func {gating}; LFM2-MoE routes on sigmoid "
                          "scores (2), which is the only form onnxforge builds for it")
    return {**_lfm2(cfg, key), "norm_topk_prob": True, "routed_scaling_factor": 1.0}


def _conv_views(cfg: dict, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, View]:
    """LFM2's depthwise conv kernels, squeezed by the converter to (C, K), back to transformers' (C, 1, K)."""
    out = {}
    for name, shape in shapes.items():
        if name.endswith(".conv.conv.weight") and len(shape) == 2:
            out[name] = View(name, shape=(shape[0], 1, shape[1]))
    return out


_LFM2_NAMES = {"final_norm": "token_embd_norm"}


def _granitehybrid(cfg: dict, key: Callable[..., Any]) -> dict:
    """Granite 4.0 hybrid: Mamba2 layers are the ones with no KV heads; the Mamba2 sizes from ssm.*; rotary only
    where rope.scaling.finetuned says so (the converter writes false for every hybrid: llama.cpp computes its
    attention without rotary, as published granite-4.0-h has position_embedding_type "nope"); the shared MLP's
    width is expert_shared_feed_forward_length, with or without experts."""
    n = cfg["num_hidden_layers"]
    kv = key("attention.head_count_kv")
    if not isinstance(kv, list) or len(kv) != n:
        raise ConfigError(f"GGUF metadata attention.head_count_kv must list {n} layers (0 for a Mamba2 layer)")
    if not any(kv):
        raise ConfigError("this granitehybrid GGUF has no attention layer (head_count_kv is 0 for every layer): its "
                          "converter did not recognise the checkpoint's layer_types; re-convert it from a config.json "
                          "whose layer_types name the layers \"mamba\" / \"attention\"")
    heads, inner = int(key("ssm.time_step_rank")), int(key("ssm.inner_size"))
    if inner % cfg["hidden_size"] or inner % heads:
        raise ConfigError(f"GGUF metadata ssm.inner_size {inner} must be a multiple of embedding_length and of "
                          f"ssm.time_step_rank {heads}")
    experts = int(cfg.pop("num_experts", 0) or 0)
    return {**_granite(cfg, key), "layer_types": ["full_attention" if h else "linear_attention" for h in kv],
            "position_embedding_type": "rope" if key("rope.scaling.finetuned", False) else "nope",
            "mamba_n_heads": heads, "mamba_n_groups": int(key("ssm.group_count")),
            "mamba_d_state": int(key("ssm.state_size")), "mamba_d_conv": int(key("ssm.conv_kernel")),
            "mamba_expand": inner // cfg["hidden_size"], "mamba_d_head": inner // heads,
            "num_local_experts": experts,
            "shared_intermediate_size": int(key("expert_shared_feed_forward_length", cfg["intermediate_size"]))}


def _mamba_views(cfg: dict, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, View]:
    """Mamba2's tensors as transformers stores them: A (-exp(A_log), written (heads, 1)) -> A_log (heads,),
    D (heads, 1) -> (heads,), the squeezed conv1d (C, K) -> (C, 1, K), the gated norm (groups, inner / groups)
    -> (inner,)."""
    out: dict[str, View] = {}
    for name, shape in shapes.items():
        if ".mamba." not in name:
            continue
        if name.endswith(".A_log"):
            out[name] = View(name, shape=(shape[0],), value=lambda a: np.log(-a))
        elif name.endswith(".D"):
            out[name] = View(name, shape=(shape[0],))
        elif name.endswith(".conv1d.weight") and len(shape) == 2:
            out[name] = View(name, shape=(shape[0], 1, shape[1]))
        elif name.endswith(".norm.weight") and len(shape) == 2:
            out[name] = View(name, shape=(shape[0] * shape[1],))
    return out


_MAMBA_NAMES = {"mamba_in": "blk.{i}.ssm_in", "mamba_conv": "blk.{i}.ssm_conv1d", "mamba_norm": "blk.{i}.ssm_norm",
                "mamba_out": "blk.{i}.ssm_out", "mamba_A_log": "blk.{i}.ssm_a", "mamba_D": "blk.{i}.ssm_d",
                "mamba_dt_bias": "blk.{i}.ssm_dt"}


def _llama4(cfg: dict, key: Callable[..., Any]) -> dict:
    """Llama 4 as llama.cpp's llama4 graph computes it, which fixes what no GGUF key says: chunked attention over
    8192 positions, every fourth layer without rotary, the NoPE layers' temperature (floor 8192, scale 0.1), the
    weightless q/k norm except with 128 experts (Maverick) -- Scout's and Maverick's published values. A file
    written with sliding_window 0 (every layer full attention, MobileLLM-style) is refused."""
    if cfg.get("sliding_window") == 0:
        raise ConfigError("this llama4 GGUF has sliding_window 0 (every layer full attention, as written for "
                          "MobileLLM-style checkpoints), which onnxforge does not read; build from the HF folder")
    cfg.pop("sliding_window", None)
    experts = int(cfg.pop("num_experts"))
    return {"num_local_experts": experts, "intermediate_size_mlp": cfg["intermediate_size"],
            "intermediate_size": int(key("expert_feed_forward_length")),
            "interleave_moe_layer_step": int(key("interleave_moe_layer_step", 1)),
            "attention_chunk_size": 8192, "no_rope_layer_interval": 4, "no_rope_layers": None, "layer_types": None,
            "attn_temperature_tuning": True, "floor_scale": 8192, "attn_scale": 0.1,
            "use_qk_norm": experts != 128}


def _glm4moe(cfg: dict, key: Callable[..., Any]) -> dict:
    """GLM-4.5 / 4.6 MoE: sigmoid routing only (expert_gating_func 2); its expert groups, if any, as
    Glm4MoeConfig's n_group / topk_group (group-limited selection, as from config.json)."""
    gating = key("expert_gating_func", 2)
    if gating != 2:
        raise ConfigError(f"this glm4moe GGUF routes with expert_gating_func {gating}; GLM-4 MoE routes on sigmoid "
                          "scores (2), which is the only form onnxforge builds for it")
    return {"n_routed_experts": cfg["num_experts"], "n_group": int(key("expert_group_count", 1)),
            "topk_group": int(key("expert_group_used_count", 1))}


def _deepseek2(cfg: dict, key: Callable[..., Any]) -> dict:
    """DeepSeek-V3 / Kimi-K2 as llama.cpp's deepseek2 graph computes them. The converter writes MLA as MQA over the
    latent (head_count_kv 1, key_length = kv_lora_rank + rope dims); a head's sizes are key_length_mla /
    value_length_mla (files from before the absorbed form: key_length / value_length with attn_kv_b). Routing on
    sigmoid scores only (expert_gating_func 2; a file without it is DeepSeek-V2's softmax routing, refused); what a
    key leaves out is llama.cpp's default (no renormalisation, no scale, one group), not DeepseekV3Config's. The
    rotary pairs are interleaved (llama.cpp's rope for it). Yarn: yarn_log_multiplier is 0.1 x mscale_all_dim, which
    llama.cpp's graph uses for the softmax scale as transformers does, while it leaves the cos/sin unscaled (as
    transformers does where mscale equals mscale_all_dim: read so, with attention_factor 1); see below for none."""
    gating = key("expert_gating_func", None)
    if gating != 2:
        raise ConfigError(f"this deepseek2 GGUF routes with expert_gating_func {gating} (absent: softmax, as "
                          "DeepSeek-V2 / V2.5 files do); onnxforge builds DeepSeek-V3 / Kimi-K2, which route on "
                          "sigmoid scores (2); DeepSeek-V2 is not supported")
    if not cfg.get("num_experts"):
        raise ConfigError("this deepseek2 GGUF has no expert_count (a dense model, not DeepSeek-V3 / Kimi-K2), which "
                          "onnxforge does not build")
    kv_rank, rope = int(key("attention.kv_lora_rank")), cfg["head_dim"]
    q_rank = key("attention.q_lora_rank", None)
    mla = key("attention.key_length_mla", None) is not None
    qk = int(key("attention.key_length_mla" if mla else "attention.key_length"))
    v = int(key("attention.value_length_mla" if mla else "attention.value_length"))
    if not 0 < rope < qk:
        raise ConfigError(f"GGUF metadata rope.dimension_count {rope} must be below the query/key head size {qk}")
    out = {"n_routed_experts": cfg["num_experts"], "num_key_value_heads": cfg["num_attention_heads"],
           "kv_lora_rank": kv_rank, "q_lora_rank": None if q_rank is None else int(q_rank),
           "qk_nope_head_dim": qk - rope, "qk_rope_head_dim": rope, "v_head_dim": v, "rope_interleave": True,
           "first_k_dense_replace": int(key("leading_dense_block_count", 0)),
           "n_shared_experts": int(key("expert_shared_count", 0)),
           "routed_scaling_factor": float(key("expert_weights_scale", 1.0)),
           "norm_topk_prob": bool(key("expert_weights_norm", False)),
           "n_group": int(key("expert_group_count", 1)), "topk_group": int(key("expert_group_used_count", 1)),
           "scoring_func": "sigmoid", "topk_method": "noaux_tc"}
    scaling = cfg.get("rope_scaling")
    if scaling and scaling.get("rope_type") == "yarn":
        if "attention_factor" in scaling:
            raise ConfigError("this deepseek2 GGUF has rope.scaling.yarn_attn_factor, which onnxforge does not read "
                              "for it (llama.cpp's deepseek2 graph sets the rotary's own factor); build from the HF "
                              "folder")
        # llama.cpp (llama-context.cpp, deepseek2.cpp): with a yarn_log_multiplier L, cos/sin unscaled and the softmax
        # scale times (1 + L ln factor)^2 (transformers' mscale = mscale_all_dim = L / 0.1); without one (0), both
        # the cos/sin and the softmax's square root times 1 + 0.1 ln factor
        m_all = round(float(key("rope.scaling.yarn_log_multiplier", 0.0)) / 0.1, 6)
        factor = float(scaling.get("factor", 1.0))
        scaling = {**scaling, "mscale": m_all or 1.0, "mscale_all_dim": m_all or 1.0,
                   "attention_factor": 1.0 if m_all or factor <= 1 else 1.0 + 0.1 * math.log(factor)}
        out["rope_scaling"] = scaling
        out["rope_parameters"] = {**cfg["rope_parameters"], **scaling}
    return out


def _deepseek2_views(cfg: dict, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, View]:
    """kv_b_proj as transformers stores it, (heads x (nope + v), kv_lora_rank), from the converter's absorbed form:
    attn_k_b (heads, kv_lora_rank, nope), each head's k rows transposed, and attn_v_b (heads, v, kv_lora_rank); the
    head-interleaved rows [k_nope(h), v(h)] gathered back. Files with attn_kv_b read it as it is."""
    h, nope, v, rank = (cfg[k] for k in ("num_attention_heads", "qk_nope_head_dim", "v_head_dim", "kv_lora_rank"))
    rows = np.concatenate([np.concatenate([g * nope + np.arange(nope), h * nope + g * v + np.arange(v)])
                           for g in range(h)])
    out = {}
    for i in range(cfg["num_hidden_layers"]):
        k_b, v_b = (f"model.layers.{i}.self_attn.{p}_b_proj.weight" for p in ("k", "v"))
        if k_b not in shapes and v_b not in shapes:
            continue
        for name, want in ((k_b, (h, rank, nope)), (v_b, (h, v, rank))):
            if shapes.get(name) != want:
                raise CheckpointError(f"GGUF tensor blk.{i}.attn_{name.split('.')[-2][0]}_b.weight is "
                                      f"{'missing' if name not in shapes else f'of HF shape {shapes[name]}'}, where "
                                      f"the metadata gives {want} (with its partner it makes layer {i}'s kv_b_proj); "
                                      "the file is incomplete or inconsistent: re-convert it")
        out[f"model.layers.{i}.self_attn.kv_b_proj.weight"] = View(
            k_b, rows=rows, shape=(h * (nope + v), rank),
            parts=(View(k_b, value=lambda a: a.transpose(0, 2, 1).reshape(-1, a.shape[1])),
                   View(v_b, value=lambda a: a.reshape(-1, a.shape[-1]))))
    return out


def _gemma4(cfg: dict, key: Callable[..., Any]) -> dict:
    """Gemma 4's text decoder as the converter writes it: each layer's kind from sliding_window_pattern, the sliding
    layers' head size and rotary from *_swa keys (key_length is the full layers'), head_count_kv per layer (the full
    layers' as num_global_key_value_heads), the full layers' proportional rotary from rope_freqs (read by
    sources/gguf.py as partial_rotary_factor). The MoE block (26B-A4B) from expert_count / expert_used_count /
    expert_feed_forward_length. E2B / E4B: per-layer inputs from embedding_length_per_layer_input (their vocabulary
    from per_layer_token_embd's shape, GGUFFamily.shape_keys), KV sharing from attention.shared_kv_layers, and
    use_double_wide_mlp from feed_forward_length per layer (twice the rest on the shared layers)."""
    n = cfg["num_hidden_layers"]
    shared, ffn = int(key("attention.shared_kv_layers", 0)), key("feed_forward_length")
    ffn = [int(f) for f in ffn] if isinstance(ffn, list) else [int(ffn)] * n
    size = cfg["intermediate_size"]
    if not 0 <= shared < n or len(ffn) != n:
        raise ConfigError(f"GGUF metadata gemma4.attention.shared_kv_layers {shared} must be below the {n} layers, "
                          f"and feed_forward_length must list {n} layers")
    wide = ffn == [size] * (n - shared) + [2 * size] * shared and shared > 0
    if not wide and ffn != [size] * n:
        raise ConfigError(f"GGUF metadata gemma4.feed_forward_length {ffn} is neither one size nor twice it on the "
                          f"{shared} KV-sharing layers (use_double_wide_mlp); Gemma4TextConfig cannot say it")
    pattern, kv = key("attention.sliding_window_pattern"), key("attention.head_count_kv")
    kv = kv if isinstance(kv, list) else [kv] * n
    if not isinstance(pattern, list) or len(pattern) != n or len(kv) != n:
        raise ConfigError("GGUF metadata gemma4.attention.sliding_window_pattern and head_count_kv must list "
                          f"{n} layers")
    types = ["sliding_attention" if slide else "full_attention" for slide in pattern]
    swa = {int(h) for h, t in zip(kv, types) if t == "sliding_attention"}
    full = {int(h) for h, t in zip(kv, types) if t == "full_attention"}
    if len(swa) > 1 or len(full) > 1:
        raise ConfigError(f"GGUF metadata gemma4.attention.head_count_kv {kv} varies within a layer kind; "
                          "not supported")
    rope_swa = int(key("rope.dimension_count_swa", key("attention.key_length_swa")))
    head_swa = int(key("attention.key_length_swa"))
    if rope_swa != head_swa:
        raise ConfigError(f"GGUF metadata gemma4.rope.dimension_count_swa {rope_swa} is not the sliding layers' head "
                          f"size {head_swa}: a partial rotary there is not supported")
    theta = cfg["rope_theta"]
    out = {"layer_types": types, "head_dim": head_swa, "global_head_dim": cfg["head_dim"],
           "num_key_value_heads": next(iter(swa or full)),
           "hidden_size_per_layer_input": int(key("embedding_length_per_layer_input", 0)),
           "num_kv_shared_layers": shared, "use_double_wide_mlp": wide, "enable_moe_block": False,
           "rope_scaling": None,
           "rope_parameters": {"sliding_attention": {"rope_type": "default",
                                                     "rope_theta": float(key("rope.freq_base_swa", 10_000.0))},
                               "full_attention": {"rope_type": "proportional", "rope_theta": theta,
                                                  "partial_rotary_factor": cfg.pop("partial_rotary_factor", 1.0)}}}
    if full:
        out["num_global_key_value_heads"] = next(iter(full))
    if key("expert_count", 0):  # the MoE block beside the dense MLP (26B-A4B): every layer has both
        out |= {"enable_moe_block": True, "num_experts": int(key("expert_count")),
                "top_k_experts": int(key("expert_used_count")),
                "moe_intermediate_size": int(key("expert_feed_forward_length"))}
    return out


def _gemma4_tensors(cfg: dict, names: frozenset) -> dict:
    """attention_k_eq_v where no full layer has a v_proj (its k is its v); a mix is inconsistent. KV-sharing layers
    (the last num_kv_shared_layers) have no k or v projection either way."""
    own = len(cfg["layer_types"]) - cfg.get("num_kv_shared_layers", 0)
    full = [i for i, t in enumerate(cfg["layer_types"][:own]) if t == "full_attention"]
    has_v = {f"model.layers.{i}.self_attn.v_proj.weight" in names for i in full}
    if len(has_v) > 1:
        raise ConfigError("this gemma4 GGUF has attn_v on some full-attention layers and not on others; re-convert it")
    k_eq_v = has_v == {False}
    if not k_eq_v and cfg.get("num_global_key_value_heads", cfg["num_key_value_heads"]) != cfg["num_key_value_heads"]:
        raise ConfigError("this gemma4 GGUF has full-attention layers with their own v projection and kv heads unlike "
                          "the sliding layers', which Gemma4TextConfig cannot say without per_layer_config; "
                          "build from the Hugging Face folder")
    return {"attention_k_eq_v": k_eq_v}


FAMILIES: dict[str, GGUFFamily] = {
    # llama.cpp writes Llama, Mistral (v0.1-v0.3), SmolLM, TinyLlama... as "llama" and permutes Q/K;
    # Mixtral too, with expert_count and its experts stacked.
    "llama": GGUFFamily("LlamaForCausalLM", "llama", True, {"mlp_bias": False}, config_keys=_EXPERT_KEYS,
                        config_hook=_llama_experts),
    # Qwen2/Qwen3 converters do not permute (they use the neox rotary layout in llama.cpp).
    "qwen2": GGUFFamily("Qwen2ForCausalLM", "qwen2", False, {"use_sliding_window": False}),
    "qwen3": GGUFFamily("Qwen3ForCausalLM", "qwen3", False, {"use_sliding_window": False}),
    # Qwen3-MoE: every layer MoE, top-k renormalised (llama.cpp's qwen3moe graph hard-codes both).
    "qwen3moe": GGUFFamily("Qwen3MoeForCausalLM", "qwen3_moe", False, {"use_sliding_window": False,
                                                                      "norm_topk_prob": True},
                           config_keys=_EXPERT_KEYS),
    # Qwen1.5/2-MoE: shared expert with its sigmoid gate, top-k not renormalised (llama.cpp's qwen2moe graph).
    "qwen2moe": GGUFFamily("Qwen2MoeForCausalLM", "qwen2_moe", False, {"use_sliding_window": False,
                                                                      "norm_topk_prob": False},
                           config_keys=_EXPERT_KEYS),
    # Gemma: the converter adds 1 to every norm weight; llama.cpp fixes GELU-tanh, the sliding pattern
    # (2, 6: the architectures' defaults), Gemma 3's local rope base (rope.freq_base_swa, else 10000)
    # and the attention scale (1/sqrt(head_dim), 1/sqrt(hidden/heads) for the 27B models).
    "gemma": GGUFFamily("GemmaForCausalLM", "gemma", False, _GEMMA, offsets=_NORMS_PLUS_1),
    "gemma2": GGUFFamily("Gemma2ForCausalLM", "gemma2", False, _GEMMA, offsets=_NORMS_PLUS_1,
                         config_keys={"attn_logit_softcapping": "attn_logit_softcapping",
                                      "final_logit_softcapping": "final_logit_softcapping"},
                         config_hook=lambda cfg, key: _gemma_scale(cfg, 46)),
    "gemma3": GGUFFamily("Gemma3ForCausalLM", "gemma3_text", False, _GEMMA, offsets=_NORMS_PLUS_1,
                         config_keys={"final_logit_softcapping": "final_logit_softcapping"},
                         config_hook=lambda cfg, key: {**_gemma_scale(cfg, 62), "rope_parameters": {
                             "full_attention": cfg["rope_parameters"],
                             "sliding_attention": {"rope_type": "default",
                                                   "rope_theta": float(key("rope.freq_base_swa", 10_000.0))}}}),
    # Phi-3, Phi-3.5-mini, Phi-4-mini: fused attn_qkv and gate_up (written as ffn_up), neox rotary (no
    # permutation); LongRoPE's factors are tensors (read by sources/gguf.py), its original length a key.
    "phi3": GGUFFamily("Phi3ForCausalLM", "phi3", False, gguf_names={"gate_up": "blk.{i}.ffn_up", "up": None},
                       config_keys={"rope.scaling.original_context_length": "original_max_position_embeddings"}),
    # phi-1, phi-1.5, phi-2: LayerNorm (its epsilon under layer_norm_epsilon), gelu_new, biases everywhere;
    # q/k/v as attn_q/k/v, or fused attn_qkv from the old `mixer.Wqkv` checkpoints. The converter writes
    # feed_forward_length = 4 x hidden and head_count_kv = head_count, as every phi model has.
    "phi2": GGUFFamily("PhiForCausalLM", "phi", False, {"hidden_act": "gelu_new"},
                       config_keys={"attention.layer_norm_epsilon": "layer_norm_eps"}),
    # Granite 3.x dense: llama-shaped (Q/K permuted, head_dim dropped), its multipliers as metadata.
    "granite": GGUFFamily("GraniteForCausalLM", "granite", True, config_hook=_granite, config_keys=_GRANITE_KEYS),
    # Granite 3 MoE: as granite, input_linear split into ffn_gate_exps / ffn_up_exps; llama.cpp's graph
    # renormalises the softmax over the top k, which is HF's softmax over the top-k logits.
    "granitemoe": GGUFFamily("GraniteMoeForCausalLM", "granitemoe", True, config_hook=_granitemoe,
                             config_keys={**_GRANITE_KEYS, **_EXPERT_KEYS}),
    # OLMo 1: Q/K permuted, no norm tensors (its LayerNorm has no weights), clip_qkv as clamp_kqv.
    "olmo": GGUFFamily("OlmoForCausalLM", "olmo", True, config_keys={"attention.clamp_kqv": "clip_qkv"}),
    # OLMo 2 and OLMo 3 (see _olmo2): neox rotary, not permuted.
    "olmo2": GGUFFamily("Olmo2ForCausalLM", "olmo2", False, config_hook=_olmo2),
    # OLMoE: neox rotary, q/k norms over the whole projection. llama.cpp's olmoe graph does not
    # renormalise the top k and has no clip_qkv (the converter writes no clamp_kqv).
    "olmoe": GGUFFamily("OlmoeForCausalLM", "olmoe", False, {"norm_topk_prob": False},
                        config_keys=_EXPERT_KEYS),
    # SmolLM3: permuted like llama; llama.cpp fixes the NoPE layers at every fourth, as SmolLM3Config's default.
    "smollm3": GGUFFamily("SmolLM3ForCausalLM", "smollm3", True),
    # Nemotron: LayerNorm1p stored as weight + 1, squared ReLU, partial rotary (rope.dimension_count).
    "nemotron": GGUFFamily("NemotronForCausalLM", "nemotron", False, {"hidden_act": "relu2"}, offsets=_NORMS_PLUS_1,
                           config_keys={"attention.layer_norm_epsilon": "norm_eps"}),
    # ERNIE 4.5 dense: llama.cpp's rotary for it is the interleaved one transformers uses, so no permutation.
    # use_bias (q/k/v/o and MLP) is read from the tensors present.
    "ernie4_5": GGUFFamily("Ernie4_5ForCausalLM", "ernie4_5", False,
                           config_hook=lambda cfg, key: {"use_bias": cfg["attention_bias"]}),
    # ERNIE 4.5 MoE: as ernie4_5; MoE on layers i >= leading_dense_block_count with (i + 1) % step == 0
    # (llama.cpp has no end index), selection bias exp_probs_b, top k renormalised, shared experts
    # (expert_shared_count of expert_feed_forward_length each).
    "ernie4_5-moe": GGUFFamily("Ernie4_5_MoeForCausalLM", "ernie4_5_moe", False, {"moe_layer_end_index": -1},
                               config_keys={**_EXPERT_KEYS, "expert_shared_count": "moe_num_shared_experts",
                                            "leading_dense_block_count": "moe_layer_start_index",
                                            "interleave_moe_layer_step": "moe_layer_interval"},
                               config_hook=lambda cfg, key: {"use_bias": cfg["attention_bias"]}),
    # gpt-oss: neox rotary, sinks (attn_sinks), biases, experts' gate/up split apart (MXFP4 or float);
    # llama.cpp's swiglu_oai hard-codes alpha 1.702 and limit 7, and its yarn always truncates the ramp
    # (no GGUF key says otherwise, so rope_scaling gets no `truncate: false`). The converter's opt-in
    # --fuse-gate-up-exps form (ffn_gate_up_exps: gate rows, then up rows) is not read.
    "gpt-oss": GGUFFamily("GptOssForCausalLM", "gpt_oss", False, {"swiglu_limit": 7.0},
                          gguf_names={"experts_gate_up": None}, config_keys=_EXPERT_KEYS),
    # Seed-OSS: neox rotary (not permuted), q/k/v biases; the norm before the MLP is written as
    # post_attention_norm; llama.cpp's graph has no o_proj bias (attention_out_bias is false, as published).
    "seed_oss": GGUFFamily("SeedOssForCausalLM", "seed_oss", False, {"attention_out_bias": False, "mlp_bias": False},
                           gguf_names={"ffn_norm": "blk.{i}.post_attention_norm", "attn_post_norm": None}),
    # EXAONE 4: neox rotary (not permuted), post-norms and per-head q/k norms under the role table's names.
    "exaone4": GGUFFamily("Exaone4ForCausalLM", "exaone4", False, config_hook=_exaone4),
    # HunYuan dense: neox rotary (not permuted), q/k norms (after the rotary, as the family's graph has them); the
    # converter bakes NTK-alpha into rope.freq_base (theta * alpha ** (d / (d - 2))), as archs/newer.py does.
    "hunyuan-dense": GGUFFamily("HunYuanDenseV1ForCausalLM", "hunyuan_v1_dense", False, {"mlp_bias": False}),
    # The text decoders of the vision-language checkpoints (the mmproj file holds the vision tower): Qwen3-VL as
    # qwen3vl (neox, not permuted; its mrope sections rotate a text-only sequence as the plain rotary, and the
    # deepstack layers add image features only), Mistral Small 3.x as mistral3 (Q/K permuted like llama).
    "qwen3vl": GGUFFamily("Qwen3ForCausalLM", "qwen3", False, {"use_sliding_window": False}),
    "mistral3": GGUFFamily("MistralForCausalLM", "mistral", True, {"mlp_bias": False}, config_hook=_mistral3),
    # Qwen3.5 dense and MoE, Qwen3-Next: gated delta-net layers (ssm.* sizes, attention.recurrent_layers) beside
    # gated attention (its q_proj also gives the output gate; neox rotary over rope.dimension_count, not
    # permuted; Qwen3.5's mrope sections rotate text as the plain rotary). What the converter did to the tensors
    # is undone by views (_linear_views) and offsets; MTP layers (nextn_predict_layers) are left unread.
    # llama.cpp's graphs renormalise the top k (HF's default, true in the published configs).
    "qwen35": _qwen35(moe=False),
    "qwen35moe": _qwen35(moe=True),
    # Qwen3-Next: in_proj_qkvz written apart as attn_qkv (q, k, v of every key head in turn: Qwen3.5's
    # in_proj_qkv) and attn_gate (its in_proj_z); in_proj_ba as it is; V heads not reordered. Every layer MoE
    # (the converter cannot write mlp_only_layers).
    # LFM2 and LFM2-MoE (shortconv.* tensors, the final norm written as token_embd_norm, conv kernels squeezed;
    # LFM2-MoE's leading dense layers, sigmoid routing with exp_probs_b as its selection bias).
    "lfm2": GGUFFamily("Lfm2ForCausalLM", "lfm2", False, gguf_names=_LFM2_NAMES, config_hook=_lfm2,
                       views=_conv_views, tensor_flags={"conv_bias": "model.layers.*.conv.conv.bias"},
                       kv_zero_layers=True),
    "lfm2moe": GGUFFamily("Lfm2MoeForCausalLM", "lfm2_moe", False, gguf_names=_LFM2_NAMES,
                          config_keys={**_EXPERT_KEYS, "leading_dense_block_count": "num_dense_layers"},
                          config_hook=_lfm2moe, views=_conv_views,
                          tensor_flags={"conv_bias": "model.layers.*.conv.conv.bias",
                                        "use_expert_bias": "model.layers.*.e_score_correction_bias"},
                          kv_zero_layers=True),
    # GLM-4.5 / 4.6 MoE: neox partial rotary (rope.dimension_count; not permuted), q/k/v biases, per-head q/k norms,
    # the norm before the MLP written as post_attention_norm, leading dense layers, sigmoid routing with the
    # selection bias (exp_probs_b), expert_weights_norm / _scale, shared experts; its MTP layer is left unread.
    "glm4moe": GGUFFamily("Glm4MoeForCausalLM", "glm4_moe", False,
                          gguf_names={"ffn_norm": "blk.{i}.post_attention_norm", "attn_post_norm": None},
                          config_keys={**_EXPERT_KEYS, "expert_shared_count": "n_shared_experts",
                                       "leading_dense_block_count": "first_k_dense_replace",
                                       "expert_weights_scale": "routed_scaling_factor",
                                       "expert_weights_norm": "norm_topk_prob"},
                          config_hook=_glm4moe, tensor_flags={"use_qk_norm": "model.layers.*.self_attn.q_norm.weight"}),
    # Granite 4.0 hybrid (granite-4.0-h): Mamba2 layers (ssm_*, see _mamba_views) beside attention (Q/K permuted
    # like granite's), Granite's multipliers, the shared MLP (ffn_*_shexp beside experts, ffn_* without), no rotary
    # unless rope.scaling.finetuned. The converter pads the vocabulary to a multiple of 8 for it (8 padding rows).
    "granitehybrid": GGUFFamily("GraniteMoeHybridForCausalLM", "granitemoehybrid", True,
                                gguf_names=_MAMBA_NAMES, config_keys={**_GRANITE_KEYS, **_EXPERT_KEYS},
                                config_hook=_granitehybrid, views=_mamba_views,
                                tensor_flags={"mamba_conv_bias": "model.layers.*.mamba.conv1d.bias",
                                              "mamba_proj_bias": "model.layers.*.mamba.in_proj.bias"},
                                kv_zero_layers=True),
    # Llama 4 (Scout, Maverick; the text decoder, from Llama4ForCausalLM or ...ForConditionalGeneration): not
    # permuted (its rotary pairs are interleaved in both), experts stacked apart (down_proj transposed back by the
    # converter), the rest as llama.cpp fixes it (_llama4); llama3 rope scaling from rope_freqs.
    "llama4": GGUFFamily("Llama4ForCausalLM", "llama4_text", False, config_keys=_EXPERT_KEYS, config_hook=_llama4),
    # DeepSeek-V3 / Kimi-K2 (deepseek2; _deepseek2): latent attention under llama.cpp's names (attn_q_a, attn_q_a_norm,
    # attn_q_b or attn_q, attn_kv_a_mqa, attn_kv_a_norm, attn_kv_b or its absorbed split attn_k_b / attn_v_b, put back
    # together by _deepseek2_views), not permuted; leading dense layers, experts stacked apart, shared experts, the
    # selection bias as exp_probs_b. Its MTP layers are not written by the converter (nor read here).
    "deepseek2": GGUFFamily("DeepseekV3ForCausalLM", "deepseek_v3", False,
                            gguf_names={"q_a": "blk.{i}.attn_q_a", "q_a_norm": "blk.{i}.attn_q_a_norm",
                                        "q_b": "blk.{i}.attn_q_b", "kv_a": "blk.{i}.attn_kv_a_mqa",
                                        "kv_a_norm": "blk.{i}.attn_kv_a_norm", "kv_b": "blk.{i}.attn_kv_b",
                                        "shared_gate": None, "shared_up": None, "shared_down": None},
                            extra_names={"blk.{i}.attn_k_b": "model.layers.{i}.self_attn.k_b_proj",
                                         "blk.{i}.attn_v_b": "model.layers.{i}.self_attn.v_b_proj",
                                         **{f"blk.{{i}}.ffn_{p}_shexp":
                                            f"model.layers.{{i}}.mlp.shared_experts.{p}_proj"
                                            for p in ("gate", "up", "down")}},
                            config_keys=_EXPERT_KEYS, config_hook=_deepseek2, views=_deepseek2_views),
    # Gemma 4's text decoder (gemma4; _gemma4): norms as they are (no + 1), layer_output_scale as layer_scalar, no v
    # projection on the full layers where k is v, the proportional rotary's unrotated pairs as 1e30 in rope_freqs.
    "gemma4": GGUFFamily("Gemma4ForCausalLM", "gemma4_text", False, _GEMMA,
                         gguf_names={"layer_scalar": "blk.{i}.layer_output_scale",
                                     "ffn_post_norm_1": "blk.{i}.post_ffw_norm_1",
                                     "ffn_pre_norm_2": "blk.{i}.pre_ffw_norm_2",
                                     "ffn_post_norm_2": "blk.{i}.post_ffw_norm_2",
                                     "router_scale": "blk.{i}.ffn_gate_inp.scale",
                                     "expert_scale": "blk.{i}.ffn_down_exps.scale",
                                     "ple_embed": "per_layer_token_embd", "ple_model_proj": "per_layer_model_proj",
                                     "ple_model_norm": "per_layer_proj_norm", "ple_gate": "blk.{i}.inp_gate",
                                     "ple_proj": "blk.{i}.proj", "ple_norm": "blk.{i}.post_norm"},
                         config_keys={"final_logit_softcapping": "final_logit_softcapping"},
                         config_hook=_gemma4, kv_per_layer=True, rope_freqs="proportional",
                         tensor_hook=_gemma4_tensors,
                         shape_keys={"vocab_size_per_layer_input": ("model.embed_tokens_per_layer.weight", 0)}),
    "qwen3next": GGUFFamily("Qwen3NextForCausalLM", "qwen3_next", False,
                            {"norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []},
                            gguf_names=_LINEAR_ATTN, config_keys=_EXPERT_KEYS, config_hook=_linear_attention,
                            offsets=_NORMS_PLUS_1_BUT_GATED, views=_linear_views(False)),
}

# GGUF architectures that llama.cpp converts but computes otherwise than the HF model, so that no build
# can be faithful to both: architecture -> what differs.
UNFAITHFUL: dict[str, str] = {
    "phimoe": "llama.cpp's graph for it routes with a softmax over the top 2 experts renormalised, not "
              "Phi-3.5-MoE's sparse mixer, and normalises with RMSNorm (plus the LayerNorm's bias), not LayerNorm",
}

# HF names whose rows llama.cpp permuted, and which head count the permutation used.
_PERMUTED = re.compile(r"\.self_attn\.(?P<proj>[qk])_proj\.(weight|bias)$")


def permuted_heads(hf_name: str, n_heads: int, n_kv_heads: int) -> int | None:
    """Head count of llama.cpp's Q/K row permutation for `hf_name`, or None if it is not permuted."""
    match = _PERMUTED.search(hf_name)
    if match is None:
        return None
    return n_heads if match["proj"] == "q" else n_kv_heads


# HF parameters (not modules) that llama.cpp writes without a `.weight` suffix
_BARE = frozenset({"A_log", "D", "layer_scalar"})  # layer_scalar: Gemma 4's buffer, layer_output_scale.weight
# ... and HF names ending so: Gemma 4's router scale vectors (ffn_gate_inp.scale, ffn_down_exps.scale) and its
# stacked experts, parameters of `model.layers.{i}.experts` (other families' stacked experts sit under mlp.)
_BARE_TAILS = (".router.scale", ".router.per_expert_scale", "}.experts.gate_up_proj", "}.experts.down_proj")


def compile_tensor_map(family: GGUFFamily) -> list[tuple[re.Pattern[str], str]]:
    """Regexes matching GGUF names, each with its HF template (`{i}` filled from the match).

    The HF spelling of a role is the family's pinned one, else the role table's first."""
    from ..archs.names import ROLES, gguf_names
    from ..archs.registry import load_families

    pinned = load_families()[family.architecture].names
    compiled = []
    bases = [(gguf_base, pinned.get(role) or ROLES[role].hf[0])
             for gguf_base, role in gguf_names(family.gguf_names).items()]
    for gguf_base, hf_base in [*bases, *family.extra_names.items()]:
        if hf_base.rsplit(".", 1)[-1] in _BARE or hf_base.endswith(_BARE_TAILS):  # a parameter the converter kept bare (`ssm_a`)
            pattern = re.escape(gguf_base).replace(r"\{i\}", r"(?P<i>\d+)")
            compiled.append((re.compile(f"^{pattern}(\\.weight)?$"), hf_base))
            continue
        if hf_base.endswith("_bias"):  # a bare parameter the converter renamed `x_bias` -> `x.bias`
            pattern = re.escape(f"{gguf_base}.bias").replace(r"\{i\}", r"(?P<i>\d+)")
            compiled.append((re.compile(f"^{pattern}$"), hf_base))
            continue
        for suffix in ("weight", "bias"):
            pattern = re.escape(f"{gguf_base}.{suffix}").replace(r"\{i\}", r"(?P<i>\d+)")
            compiled.append((re.compile(f"^{pattern}$"), f"{hf_base}.{suffix}"))
    return compiled


def hf_tensor_name(gguf_name: str, compiled: list[tuple[re.Pattern[str], str]]) -> str | None:
    """The HF name of a GGUF tensor, or None when the family table has no row for it."""
    for pattern, hf_template in compiled:
        match = pattern.match(gguf_name)
        if match is not None:
            return hf_template.format(**match.groupdict())
    return None
