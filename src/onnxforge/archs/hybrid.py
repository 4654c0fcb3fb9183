"""Hybrid families: layers of another kind than attention beside attention layers (graph/kinds.py).

LFM2: `layer_types` marks "conv" layers (a short gated convolution, graph/short_conv.py) and
"full_attention" ones (q/k norms per head); RMSNorm at `norm_eps`, the final norm named
`embedding_norm`, a SwiGLU MLP (`feed_forward.w1/w3/w2`) whose width transformers adjusts
(`block_auto_adjust_ff_dim`), tied embeddings by default.

LFM2-MoE: LFM2's layers; the first `num_dense_layers` keep a dense MLP of `intermediate_size` (not adjusted),
the others are a mixture of experts routed on sigmoid scores (selection on sigmoid + `expert_bias`,
renormalised with `norm_topk_prob`, times `routed_scaling_factor`; graph/moe.py).

Granite 4 hybrid (granitemoehybrid): `layer_types` (legacy `layers_block_type`: "mamba" / "attention") marks
Mamba2 layers (graph/mamba2.py) and attention layers (rotary only with position_embedding_type "rope");
Granite's multipliers; the MLP is `shared_mlp` (fused gate/up `input_linear`, `output_linear`) and, with
num_local_experts > 0, a mixture of experts beside it (top-k of the logits then softmax: Granite MoE's).
"""
from __future__ import annotations

from ..errors import ConfigError
import dataclasses
import math

from ..spec import ConvSpec, MambaSpec, _finite, _flag, _positive_int, base_spec
from .moe import experts
from .registry import Architecture, register

LFM2_DEFAULTS = {"vocab_size": 65536, "hidden_size": 2560, "intermediate_size": 12288, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 128_000,
                 "norm_eps": 1e-5, "tie_word_embeddings": True, "rope_theta": 1_000_000.0, "conv_bias": False,
                 "conv_L_cache": 3, "block_multiple_of": 256, "block_ffn_dim_multiplier": 1.0,
                 "block_auto_adjust_ff_dim": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


LFM2_KINDS = {"conv": "conv"}


def _lfm2_config(cfg: dict) -> dict:
    """As Lfm2Config loads it: `tie_embedding` is tie_word_embeddings; without layer_types, the layers in
    `full_attn_idxs` (default: all) are attention and the others conv. Lfm2Attention never windows: a
    "sliding_attention" layer is full attention and sliding_window is not read."""
    cfg = {k: v for k, v in cfg.items() if k != "sliding_window"}
    if "tie_embedding" in cfg:
        cfg["tie_word_embeddings"] = cfg.pop("tie_embedding")
    if cfg.get("layer_types") is None:
        n = _positive_int(cfg, "num_hidden_layers")
        full = cfg.get("full_attn_idxs")
        full = range(n) if full is None else full
        if not isinstance(full, (list, range)) or any(isinstance(i, bool) or not isinstance(i, int) for i in full):
            raise ConfigError(f"config.json: full_attn_idxs must list layer indices, got {full!r}")
        cfg["layer_types"] = ["full_attention" if i in full else "conv" for i in range(n)]
    elif isinstance(cfg["layer_types"], list):
        cfg["layer_types"] = ["full_attention" if t == "sliding_attention" else t for t in cfg["layer_types"]]
    return cfg


def _lfm2(cfg: dict) -> dict:
    inter = _positive_int(cfg, "intermediate_size")
    if _flag(cfg, "block_auto_adjust_ff_dim", True):  # as Lfm2MLP sizes its projections
        inter = int(2 * inter / 3)
        multiplier = cfg.get("block_ffn_dim_multiplier")
        if multiplier is not None:
            multiple = _positive_int(cfg, "block_multiple_of")
            inter = int(_finite(cfg, "block_ffn_dim_multiplier", 1.0) * inter)
            inter = multiple * ((inter + multiple - 1) // multiple)
    kernel = _positive_int(cfg, "conv_L_cache")
    if kernel < 2:
        raise ConfigError(f"config.json: conv_L_cache must be at least 2, got {kernel}")
    return {"norm.eps": _finite(cfg, "norm_eps", 1e-5), "mlp.intermediate_size": inter, "mlp.activation": "silu",
            "mlp.bias": False, "attention.qkv_bias": False, "attention.o_bias": False,
            "conv": ConvSpec(kernel=kernel, bias=_flag(cfg, "conv_bias"))}


register(Architecture("Lfm2ForCausalLM", "lfm2", {"attention.qk_norm": "head"}, hook=_lfm2, config_fix=_lfm2_config,
                      config_defaults=LFM2_DEFAULTS, sliding="types", layer_kinds=LFM2_KINDS,
                      doc="LFM2 (short gated convolution layers beside attention)"))


LFM2_MOE_DEFAULTS = {**{k: v for k, v in LFM2_DEFAULTS.items() if not k.startswith("block_")},
                     "hidden_size": 2048, "intermediate_size": 7168, "moe_intermediate_size": 1792, "num_dense_layers": 2,
                     "num_experts_per_tok": 4, "num_experts": 32, "use_expert_bias": True, "routed_scaling_factor": 1.0,
                     "norm_topk_prob": True}


def _lfm2_moe_config(cfg: dict) -> dict:
    """Lfm2MoeConfig derives no layer_types (its model cannot run without them): required, not guessed."""
    if not isinstance(cfg.get("layer_types"), list):
        raise ConfigError("config.json of an LFM2-MoE model has no layer_types list (which layers are conv and which "
                          "attention); transformers cannot build the model without it either")
    return _lfm2_config(cfg)


def _lfm2_moe(cfg: dict) -> dict:
    dense = cfg.get("num_dense_layers")
    if isinstance(dense, bool) or not isinstance(dense, int) or dense < 0:
        raise ConfigError(f"config.json: num_dense_layers must be a whole number, got {dense!r}")
    spec = {**_lfm2({**cfg, "block_auto_adjust_ff_dim": False}),
            **experts(cfg, lambda i: i >= dense, LFM2_KINDS, scoring="sigmoid",
                      selection_bias=_flag(cfg, "use_expert_bias", True), normalize=_flag(cfg, "norm_topk_prob", True),
                      routed_scale=_finite(cfg, "routed_scaling_factor", 1.0))}
    return spec


register(Architecture("Lfm2MoeForCausalLM", "lfm2_moe", {"attention.qk_norm": "head"}, hook=_lfm2_moe,
                      config_fix=_lfm2_moe_config, config_defaults=LFM2_MOE_DEFAULTS, sliding="types",
                      layer_kinds=LFM2_KINDS,
                      doc="LFM2-MoE (LFM2's conv layers; sigmoid-routed experts with a selection bias)"))


GRANITE_HYBRID_DEFAULTS = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "bos_token_id": 1,
    "eos_token_id": 2, "rope_theta": 10000.0, "num_local_experts": 8, "num_experts_per_tok": 2,
    "shared_intermediate_size": 1024, "mamba_n_heads": 128, "mamba_n_groups": 1, "mamba_d_state": 256,
    "mamba_d_head": "auto", "mamba_d_conv": 4, "mamba_expand": 2, "mamba_conv_bias": True, "mamba_proj_bias": False}
LEGACY_TYPES = {"mamba": "linear_attention", "attention": "full_attention"}  # transformers' remap_legacy_layer_types
GRANITE_HYBRID_KINDS = {"linear_attention": "mamba"}


def _granite_hybrid_config(cfg: dict) -> dict:
    """As GraniteMoeHybridConfig loads: layer_types, or its alias layers_block_type (which wins where both are
    given, as the config class maps the alias onto it), with the legacy names remapped; all Mamba2 layers where
    neither is given; no sliding window."""
    alias = cfg.get("layers_block_type")
    cfg = {k: v for k, v in cfg.items() if k not in ("sliding_window", "layers_block_type")} | (
        {"layer_types": cfg.get("layer_types") if alias is None else alias})
    types = cfg["layer_types"]
    if types is None:
        n = _positive_int(cfg, "num_hidden_layers")
        cfg["layer_types"] = ["linear_attention"] * n
    elif isinstance(types, list):  # GraniteMoeHybridAttention never windows: "sliding_attention" is full attention
        cfg["layer_types"] = [{**LEGACY_TYPES, "sliding_attention": "full_attention"}.get(t, t) if isinstance(t, str)
                              else t for t in types]
    return cfg


def _limit(value, key: str) -> float:
    if isinstance(value, dict) and set(value) == {"__float__"}:  # transformers 5 writes inf as {"__float__": ...}
        value = float(value["__float__"]) if value["__float__"] in ("Infinity", "-Infinity", "NaN") else value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ConfigError(f"config.json: {key} must list two numbers, got {value!r}")
    return float(value)


def _mamba(cfg: dict) -> MambaSpec:
    hidden, heads = _positive_int(cfg, "hidden_size"), _positive_int(cfg, "mamba_n_heads")
    inner = _positive_int(cfg, "mamba_expand") * hidden
    head_dim = cfg.get("mamba_d_head")
    head_dim = inner // heads if head_dim == "auto" else _positive_int(cfg, "mamba_d_head")
    if head_dim * heads != inner:
        raise ConfigError(f"config.json: mamba_n_heads ({heads}) x mamba_d_head ({head_dim}) must equal mamba_expand x "
                          f"hidden_size ({inner})")
    groups = _positive_int(cfg, "mamba_n_groups")
    if heads % groups:
        raise ConfigError(f"config.json: mamba_n_heads ({heads}) must be a multiple of mamba_n_groups ({groups})")
    limit = cfg.get("time_step_limit")
    limit = (0.0, float("inf")) if limit is None else limit
    if not isinstance(limit, (list, tuple)) or len(limit) != 2:
        raise ConfigError(f"config.json: time_step_limit must list two numbers, got {limit!r}")
    kernel = _positive_int(cfg, "mamba_d_conv")
    if kernel < 2:
        raise ConfigError(f"config.json: mamba_d_conv must be at least 2, got {kernel}")
    return MambaSpec(heads=heads, head_dim=head_dim, groups=groups, state=_positive_int(cfg, "mamba_d_state"),
                     kernel=kernel, conv_bias=_flag(cfg, "mamba_conv_bias", True),
                     proj_bias=_flag(cfg, "mamba_proj_bias"), dt_min=_limit(limit[0], "time_step_limit"),
                     dt_max=_limit(limit[1], "time_step_limit"))


def _granite_hybrid(cfg: dict) -> dict:
    shared = _positive_int(cfg, "shared_intermediate_size")
    local = cfg.get("num_local_experts")
    if isinstance(local, bool) or not isinstance(local, int) or local < 0:
        raise ConfigError(f"config.json: num_local_experts must be a whole number, got {local!r}")
    spec = {"mamba": _mamba(cfg), "mlp.intermediate_size": shared, "mlp.bias": False,  # shared_mlp has no biases
            "embedding_scale": _finite(cfg, "embedding_multiplier", 1.0),
            "residual_scale": _finite(cfg, "residual_multiplier", 1.0),
            "logit_scale": _finite(cfg, "logits_scaling", 1.0),
            "attention.scale": _finite(cfg, "attention_multiplier", 1.0)}
    if local:
        spec.update(experts({k: v for k, v in cfg.items() if k not in ("num_experts", "moe_intermediate_size")},
                            layer_kinds=GRANITE_HYBRID_KINDS, shared_intermediate_size=shared))
    layers = spec.get("layers") or base_spec(cfg, GRANITE_HYBRID_KINDS).layers
    if cfg.get("position_embedding_type") != "rope":  # GraniteMoeHybridModel has a rotary module only then
        layers = tuple(dataclasses.replace(layer, rope=None) for layer in layers)
    return {**spec, "layers": layers}


register(Architecture("GraniteMoeHybridForCausalLM", "granitemoehybrid", hook=_granite_hybrid,
                      config_fix=_granite_hybrid_config, config_defaults=GRANITE_HYBRID_DEFAULTS,
                      sliding="types", layer_kinds=GRANITE_HYBRID_KINDS,
                      names={"gate_up": "model.layers.{i}.shared_mlp.input_linear",
                             "down": "model.layers.{i}.shared_mlp.output_linear"},
                      doc="Granite 4.0 hybrid (Mamba2 layers beside attention; with or without MoE + shared MLP)"))
