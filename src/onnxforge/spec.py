"""ModelSpec: everything the graph needs to know about a model, derived once from config.json.

Config is data here: frozen dataclasses, built by `spec_from_config`, never mutated while the
graph is emitted. Both transformers 4.x (`rope_theta`, `rope_scaling`) and 5.x
(`rope_parameters`, `layer_types`) spellings map into the same spec.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

from .errors import ConfigError

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope", "proportional")
LAYER_TYPES = ("full_attention", "sliding_attention")

# Upper bounds that no real checkpoint reaches. They turn a lying config value into a ConfigError
# before it can size an allocation (the rotary caches are context_length x rotary_dim/2) or a loop
# over layers that runs before any tensor is looked at.
MAX_SIZE = 2**31 - 1  # sizes, heads, windows: ONNX Runtime keeps them in 32-bit ints
MAX_LAYERS = 4096
MAX_CONTEXT = 2**24  # 16M positions (Llama 4 Scout has 10M)


@dataclass(frozen=True)
class RopeSpec:
    theta: float
    rotary_dim: int
    kind: str = "default"
    factor: float = 1.0
    params: tuple[tuple[str, float], ...] = ()
    interleaved: bool = False

    def param(self, key: str, default: float | None = None) -> float | None:
        return dict(self.params).get(key, default)


@dataclass(frozen=True)
class AttentionSpec:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str = ""  # "" none, "head": RMS norm per head (Qwen3, Gemma 3), "full": over the projection (OLMo 2),
    # "l2": RMS norm per head without a weight, on the layers with rotary only (Llama 4's L2 norm)
    scale: float | None = None
    softcap: float = 0.0
    clip_qkv: float = 0.0  # OLMo: q, k, v clamped to +-clip_qkv
    sinks: bool = False  # a learned logit per head in the softmax's denominator (GPT-OSS; GQA's head_sink)
    output_gate: bool = False  # q_proj gives [q, gate] per head; the output is times sigmoid(gate) (Qwen3-Next)
    qk_norm_after_rope: bool = False  # the q/k norms follow the rotary (HunYuan), not precede it
    # Llama 4's attention temperature on the layers without rotary: q x (1 + scale x log1p(floor((pos + 1) / floor)))
    # as (floor_scale, attn_scale); () off
    nope_temperature: tuple[float, float] = ()
    v_norm: bool = False  # a weightless RMS norm of v per head (Gemma 4)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


NORM_KINDS = ("rms", "layer")


@dataclass(frozen=True)
class NormSpec:
    eps: float
    kind: str = "rms"  # "rms" (SimplifiedLayerNormalization) or "layer" (LayerNormalization)
    weight_offset: float = 0.0  # Gemma stores (weight - 1), Nemotron's LayerNorm1p too
    bias: bool = False  # LayerNorm with a bias (Phi-2, Nemotron)
    weight: bool = True  # False: non-parametric (OLMo)


@dataclass(frozen=True)
class MLPSpec:
    intermediate_size: int
    activation: str = "silu"
    bias: bool = False
    gated: bool = True  # act(gate) * up -> down; False: act(up) -> down (Phi-2 fc1/fc2, Nemotron)


BLOCKS = ("pre", "sandwich", "post", "parallel", "sandwich_moe")
MIXERS = ("softmax", "sparsemixer", "sigmoid_input", "norm_scaled")


@dataclass(frozen=True)
class MoESpec:
    """A mixture-of-experts MLP (graph/moe.py): a router, `num_experts` SwiGLU experts of which `top_k`
    run per token, optionally a shared expert beside them."""

    num_experts: int
    top_k: int
    intermediate_size: int  # per expert
    normalize: bool = True  # softmax -> top-k -> renormalise (top-k of the logits then softmax is the same)
    router_bias: bool = False
    selection_bias: bool = False  # select on softmax + a bias tensor, mix with the softmax (ERNIE 4.5)
    mixer: str = "softmax"  # "sparsemixer": PhiMoE's top-2 sparse mixer; "sigmoid_input": Llama 4's top-1, its
    # sigmoid(logit) scaling the expert's input, not its output; "norm_scaled": Gemma 4's router (its input RMS-normed
    # and scaled, per-expert output scales), the experts computed densely (graph/dense_experts.py)
    jitter_eps: float = 0.0  # sparsemixer's threshold
    expert_bias: bool = False  # biases on the experts' projections (GPT-OSS)
    swiglu_alpha: float = 1.0  # act = g * sigmoid(alpha * g) * (u + beta), g <= limit, |u| <= limit
    swiglu_beta: float = 0.0
    swiglu_limit: float | None = None
    shared_intermediate_size: int = 0  # a dense shared expert beside the routed ones (0: none)
    shared_gate: bool = False  # sigmoid gate on the shared expert's output (Qwen2-MoE)
    layout: str = "rows"  # fused checkpoint tensors: "rows" (E, 2I, H) gate then up; "interleaved_t" (E, H, 2I)
    # gate/up alternating (GPT-OSS); "halves_t" (E, H, 2I) gate then up (Llama 4); down (E, I, H) for both "_t"
    scoring: str = "softmax"  # "sigmoid": select on sigmoid(logits) (+ selection bias), mix the selected sigmoids
    routed_scale: float = 1.0  # the routed experts' output times this (LFM2-MoE routed_scaling_factor)
    # group-limited selection (DeepSeek-V3): experts in n_group groups, a group scored by the sum of its top 2
    # selection scores, the top k drawn from the best topk_group groups only; (1, 1): no grouping
    groups: tuple[int, int] = (1, 1)
    renorm_eps: float = 1e-6  # sigmoid scoring's renormalisation: w / (sum + eps) (DeepSeek-V3: 1e-20)


@dataclass(frozen=True)
class MLASpec:
    """Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2; graph/mla.py): q through a low-rank q_a_proj ->
    norm -> q_b_proj (or q_proj where q_lora_rank is 0), k and v up-projected per head from a normed latent
    of kv_lora_rank by kv_b_proj, beside one rotary key of rope_dim shared by the heads."""

    q_lora_rank: int  # 0: a plain q_proj
    kv_lora_rank: int
    nope_dim: int  # qk_nope_head_dim
    rope_dim: int  # qk_rope_head_dim
    v_dim: int  # v_head_dim
    latent_eps: float = 1e-6  # q_a_layernorm / kv_a_layernorm (DeepseekV3RMSNorm's default, not rms_norm_eps)
    # the KV cache holds the latent and the rotary key (one shared head of kv_lora_rank + rope_dim, with kv_b_proj
    # absorbed into q and the output) instead of every head's k and v: the recipe's mla_cache=latent (with_latent_cache)
    latent_cache: bool = False

    @property
    def qk_dim(self) -> int:
        return self.nope_dim + self.rope_dim


def mla_from_config(cfg: dict) -> tuple[MLASpec, float]:
    """Latent attention's sizes (q_lora_rank null: a plain q_proj) and its softmax scale: qk_head_dim ** -0.5,
    times mscale(factor, mscale_all_dim) ** 2 for a scaled rope (transformers' yarn_apply_mscale)."""
    q_rank = cfg.get("q_lora_rank")
    mla = MLASpec(q_lora_rank=0 if q_rank is None else _positive_int(cfg, "q_lora_rank"),
                  kv_lora_rank=_positive_int(cfg, "kv_lora_rank"), nope_dim=_positive_int(cfg, "qk_nope_head_dim"),
                  rope_dim=_positive_int(cfg, "qk_rope_head_dim"), v_dim=_positive_int(cfg, "v_head_dim"))
    scale, rope = mla.qk_dim ** -0.5, rope_from_config(cfg, mla.rope_dim)
    m_all = rope.param("mscale_all_dim")
    if rope.kind != "default" and m_all:
        m = 1.0 if rope.factor <= 1 else 0.1 * m_all * math.log(rope.factor) + 1.0
        scale = scale * m * m
    return mla, scale


@dataclass(frozen=True)
class ConvSpec:
    """A short causal depthwise convolution's settings (LFM2's gated conv layers)."""

    kernel: int  # taps (conv_L_cache); the carried state holds kernel - 1 inputs
    bias: bool = False  # in_proj, conv and out_proj biases


@dataclass(frozen=True)
class MambaSpec:
    """A Mamba2 mixer's settings (Granite 4 hybrid's "mamba" layers, graph/mamba2.py)."""

    heads: int
    head_dim: int
    groups: int  # B and C are per group; heads // groups heads share one
    state: int  # d_state: the SSM state per head is (head_dim, state)
    kernel: int  # conv taps; the carried conv state holds kernel - 1 inputs
    conv_bias: bool = True
    proj_bias: bool = False  # in_proj and out_proj biases
    dt_min: float = 0.0  # time_step_limit: softplus(dt + dt_bias) clipped to [dt_min, dt_max]
    dt_max: float = float("inf")

    @property
    def inner(self) -> int:
        return self.heads * self.head_dim

    @property
    def conv_dim(self) -> int:  # x, B and C go through the convolution
        return self.inner + 2 * self.groups * self.state


@dataclass(frozen=True)
class LinearAttnSpec:
    """Gated delta-net linear attention (Qwen3.5, Qwen3-Next; graph/gated_delta.py): a causal depthwise conv
    over [q, k, v], then the gated delta rule over a (value heads, key_dim, value_dim) state per layer."""

    key_heads: int
    value_heads: int  # a multiple of key_heads: each q/k head serves value_heads / key_heads value heads
    key_dim: int  # per head
    value_dim: int  # per head
    kernel: int  # conv taps; the carried conv state holds kernel - 1 inputs

    @property
    def conv_channels(self) -> int:
        return 2 * self.key_heads * self.key_dim + self.value_heads * self.value_dim


@dataclass(frozen=True)
class LayerSpec:
    """What differs between layers: its kind (which token mixer), the attention window, which rotary table
    (None: no rotary), and whether the MLP is the model's mixture of experts."""

    window: int = 0  # sliding window, 0 = full attention
    rope: str | None = "full_attention"
    moe: bool = False
    kind: str = "attention"  # the token mixer: a key of graph/kinds.py MIXERS
    chunk: int = 0  # chunked attention (Llama 4): a token attends within its chunk of `chunk` positions only
    head_dim: int = 0  # this layer's attention head size where it differs from the model's (0: the model's)
    kv_heads: int = 0  # this layer's key/value heads where they differ from the model's (0: the model's)
    k_eq_v: bool = False  # no v_proj: the key projection is the value too (Gemma 4's attention_k_eq_v layers)
    kv_source: int = -1  # attends to the keys and values of this earlier layer, no k/v of its own (Gemma 4's KV
    # sharing); -1: its own
    mlp_size: int = 0  # this layer's dense MLP width where it differs from the model's (0: the model's)


@dataclass(frozen=True)
class ModelSpec:
    architecture: str
    model_type: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    context_length: int
    attention: AttentionSpec
    ropes: tuple[tuple[str, RopeSpec], ...]  # layer type -> rotary settings; "full_attention" always present
    norm: NormSpec
    mlp: MLPSpec
    layers: tuple[LayerSpec, ...]
    moe: MoESpec | None = None  # the experts of the layers with LayerSpec.moe
    conv: ConvSpec | None = None  # the short convolution of layers of kind "conv"
    linear: LinearAttnSpec | None = None  # the gated delta-net of layers of kind "gated_delta"
    mamba: MambaSpec | None = None  # the Mamba2 mixer of layers of kind "mamba"
    mla: MLASpec | None = None  # the latent attention of layers of kind "mla"
    block: str = "pre"  # how a layer wires its parts; see graph/blocks.py
    tie_embeddings: bool = False
    embedding_scale: float = 1.0  # Gemma sqrt(hidden), Granite embedding_multiplier
    residual_scale: float = 1.0  # Granite residual_multiplier: branch outputs are scaled before the residual add
    logit_scale: float = 1.0  # Granite logits_scaling: logits are divided by it
    final_softcap: float = 0.0  # Gemma 2: logits = tanh(logits / cap) * cap
    layer_scalar: bool = False  # each layer's output times its checkpoint scalar (Gemma 4's layer_scalar)
    per_layer_input: int = 0  # width of each layer's own input embedding (Gemma 4's per-layer inputs; 0: none)
    per_layer_vocab: int = 0  # rows of the per-layer input embedding table
    lm_head_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    @property
    def rope(self) -> RopeSpec:
        return dict(self.ropes)["full_attention"]

    def rope_for(self, key: str) -> RopeSpec:
        return dict(self.ropes)[key]

    def attention_of(self, i: int) -> AttentionSpec:
        """Layer i's attention geometry: the model's, with the layer's own head size / kv heads where it has them."""
        layer, a = self.layers[i], self.attention
        if not layer.head_dim and not layer.kv_heads:
            return a
        import dataclasses

        return dataclasses.replace(a, head_dim=layer.head_dim or a.head_dim, num_kv_heads=layer.kv_heads or a.num_kv_heads)

    @property
    def sliding_window(self) -> int:
        return max((layer.window for layer in self.layers), default=0)

    @property
    def layer_windows(self) -> tuple[int, ...]:
        return tuple(layer.window for layer in self.layers)


def _get(cfg: dict, key: str, default=None, *, required: bool = False):
    value = cfg.get(key)
    if value is None:  # transformers treats an explicit null like a missing key
        value = default
    if required and value is None:
        raise ConfigError(f"config.json has no {key!r}; the checkpoint's config is incomplete")
    return value


def _positive_int(cfg: dict, key: str, default=None, limit: int = MAX_SIZE) -> int:
    value = _get(cfg, key, default, required=True)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"config.json: {key} must be a positive integer, got {value!r}")
    if value > limit:
        raise ConfigError(f"config.json: {key} = {value} is implausibly large (at most {limit}); the config is damaged")
    return value


def _flag(cfg: dict, key: str, default: bool = False) -> bool:
    """A JSON boolean (0/1 accepted); a string such as "false" is an error, not True."""
    value = cfg.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise ConfigError(f"config.json: {key} must be true or false, got {value!r}")


def _finite(cfg: dict, key: str, default: float, *, positive: bool = True) -> float:
    value = cfg.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"config.json: {key} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ConfigError(f"config.json: {key} must be positive, got {value!r}")
    return float(value)


def ropes_from_config(cfg: dict, head_dim: int, context_length: int | None = None) -> tuple[tuple[str, RopeSpec], ...]:
    """Rotary settings per layer type, from the 5.x per-type `rope_parameters` or the 4.x keys.

    4.x Gemma 3 spells the local layers' base as `rope_local_base_freq` (default rope there).
    """
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"config.json: rope_scaling/rope_parameters must be an object, got {params!r}")
    per_type = {k: v for k, v in params.items() if k in LAYER_TYPES}
    if per_type:
        bad = [k for k, v in per_type.items() if not isinstance(v, dict)]
        if bad:
            raise ConfigError(f"config.json: rope_parameters[{bad[0]!r}] must be an object")
        if "full_attention" not in per_type:
            per_type["full_attention"] = next(iter(per_type.values()))
        return tuple((k, rope_from_config(cfg, head_dim, context_length, v)) for k, v in sorted(per_type.items()))
    ropes = [("full_attention", rope_from_config(cfg, head_dim, context_length))]
    local = cfg.get("rope_local_base_freq")
    if local is not None:
        ropes.append(("sliding_attention", rope_from_config(cfg, head_dim, context_length,
                                                            {"rope_type": "default", "rope_theta": local})))
    return tuple(ropes)


def rope_from_config(cfg: dict, head_dim: int, context_length: int | None = None, params: dict | None = None) -> RopeSpec:
    """Read rope settings from either the 4.x or the 5.x spelling (or from `params`, one layer type's)."""
    if params is None:
        params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"config.json: rope_scaling/rope_parameters must be an object, got {params!r}")
    if "full_attention" in params and isinstance(params["full_attention"], dict):
        params = params["full_attention"]
    if "original_max_position_embeddings" not in params and cfg.get("original_max_position_embeddings") is not None:
        params = {**params, "original_max_position_embeddings": cfg["original_max_position_embeddings"]}  # Phi-3 4.x
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind not in ROPE_TYPES:
        raise ConfigError(f"config.json: unknown rope type {kind!r}; supported: {', '.join(ROPE_TYPES)}")
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    theta = _finite({"rope_theta": theta}, "rope_theta", 10000.0)
    if theta <= 1.0:
        raise ConfigError(f"config.json: rope_theta must be greater than 1, got {theta!r}")
    partial = _finite(cfg, "partial_rotary_factor", params.get("partial_rotary_factor", 1.0) or 1.0)
    if partial > 1.0:
        raise ConfigError(f"config.json: partial_rotary_factor must be at most 1, got {partial!r}")
    rotary_dim = int(head_dim * partial)
    if rotary_dim % 2 or rotary_dim <= 0:
        raise ConfigError(f"config.json: rotary dimension {rotary_dim} must be a positive even number")
    factor = _finite(params, "factor", 1.0) if kind != "default" else 1.0
    if kind == "longrope" and params.get("factor") is None:  # Phi-3: the ratio of the two lengths, as transformers
        original = params.get("original_max_position_embeddings")
        if _number(original) and original > 0 and context_length:
            factor = context_length / original
    for k in ROPE_SCALAR_KEYS:
        v = params.get(k)
        if v is not None and not (isinstance(v, (int, float)) and (k == "truncate" or not isinstance(v, bool))):
            raise ConfigError(f"config.json: rope scaling {k} must be a number, got {v!r}")
    for k in ROPE_LIST_KEYS:
        v = params.get(k)
        if v is not None and not (isinstance(v, list) and all(_number(x) for x in v)):
            raise ConfigError(f"config.json: rope scaling {k} must be a list of finite numbers, got {v!r}")
    numeric = tuple(
        sorted(
            # bools count too: yarn's `truncate: false` must not read as the default (true)
            (k, float(v) if isinstance(v, bool) else _finite(params, k, 0.0, positive=False))
            for k, v in params.items()
            if k not in ("rope_type", "type", "rope_theta", "factor", "partial_rotary_factor")
            and isinstance(v, (int, float))
        )
    )
    # lists of numbers are kept (short/long factors, mrope sections); other values of unknown keys are unused
    lists = {k: v for k, v in params.items() if isinstance(v, list) and all(_number(x) for x in v)}
    extra = tuple((k, tuple(float(x) for x in v)) for k, v in sorted(lists.items()))
    if kind == "dynamic" and "original_max_position_embeddings" not in params and context_length:
        params = {**params, "original_max_position_embeddings": context_length}  # transformers' reference length
        numeric = tuple(sorted(numeric + (("original_max_position_embeddings", float(context_length)),)))
    interleaved = bool(cfg.get("rope_interleaved", False))
    rope = RopeSpec(theta=theta, rotary_dim=rotary_dim, kind=kind, factor=factor, params=numeric + extra,  # type: ignore[arg-type]
                    interleaved=interleaved)
    _check_rope_params(rope, context_length)
    return rope


ROPE_SCALAR_KEYS = ("original_max_position_embeddings", "low_freq_factor", "high_freq_factor", "beta_fast",
                    "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate")
ROPE_LIST_KEYS = ("short_factor", "long_factor")


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_rope_params(rope: RopeSpec, context_length: int | None) -> None:
    """The values graph/rope.py divides by or takes logarithms of must make sense for `rope.kind`."""

    def bad(what: str) -> ConfigError:
        return ConfigError(f"config.json: rope scaling ({rope.kind}): {what}")

    original = rope.param("original_max_position_embeddings")
    if original is not None and (original != int(original) or not 0 < original <= MAX_CONTEXT):
        raise bad(f"original_max_position_embeddings must be a positive integer up to {MAX_CONTEXT}, got {original}")
    if rope.kind == "llama3":
        low, high = rope.param("low_freq_factor", 1.0), rope.param("high_freq_factor", 4.0)
        if not 0 < low < high:  # type: ignore[operator]
            raise bad(f"need 0 < low_freq_factor < high_freq_factor, got {low} and {high}")
    if rope.kind == "yarn":
        for key in ("beta_fast", "beta_slow"):
            value = rope.param(key)
            if value is not None and value < 0:
                raise bad(f"{key} must not be negative, got {value}")
        for key in ("mscale", "mscale_all_dim"):
            value = rope.param(key)
            if value is not None and value < 0:
                raise bad(f"{key} must not be negative, got {value}")
        if rope.param("attention_factor") is not None and rope.param("attention_factor") <= 0:  # type: ignore[operator]
            raise bad(f"attention_factor must be positive, got {rope.param('attention_factor')}")
    if rope.kind == "longrope":
        if (original or context_length or 2) < 2:  # its attention factor divides by log(original)
            raise bad("original_max_position_embeddings (or max_position_embeddings) must be at least 2")
        half = rope.rotary_dim // 2
        for key in ("short_factor", "long_factor"):
            value = dict(rope.params).get(key)
            if not isinstance(value, tuple) or len(value) != half or not all(x > 0 for x in value):
                raise bad(f"{key} must list {half} positive numbers (rotary_dim / 2), got {value!r}")


def layer_types(cfg: dict, num_layers: int, kinds: Mapping[str, str] | None = None) -> tuple[tuple[str, ...], int]:
    """Each layer's type and the sliding window, from `layer_types` or a global `sliding_window`
    (every layer slides). A family whose transformers config derives the types another way (from
    use_sliding_window, max_window_layers, a pattern) writes them into `layer_types` first
    (Architecture.config_fix, with `derived_layer_types` and `gated_window` below)."""
    window = cfg.get("sliding_window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 0):
        raise ConfigError(f"config.json: sliding_window must be a non-negative integer or null, got {window!r}")
    if window is not None and window > MAX_SIZE:
        raise ConfigError(f"config.json: sliding_window {window} is implausibly large (at most {MAX_SIZE})")
    types = cfg.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) != num_layers:
            raise ConfigError(f"config.json: layer_types must list {num_layers} entries")
        known = (*LAYER_TYPES, *(kinds or {}))
        unknown = sorted({repr(t) for t in types if t not in known})
        if unknown:
            raise ConfigError(f"config.json: layer_types has {', '.join(unknown)}; supported: {', '.join(known)}")
        return tuple(types), window or 0
    if not window:
        return ("full_attention",) * num_layers, 0
    return ("sliding_attention",) * num_layers, window


def whole_head_rotary(cfg: dict) -> dict:
    """`cfg` for a family whose attention rotates the whole head: its default rotary table ignores
    partial_rotary_factor (transformers computes it from head_dim alone), so the key is dropped; a scaled
    one (yarn, llama3...) would shorten the table below what the attention applies it to, a model
    transformers cannot run either, so that is refused."""
    top = cfg.get("partial_rotary_factor")
    out = {k: v for k, v in cfg.items() if k != "partial_rotary_factor"}
    for key in ("rope_parameters", "rope_scaling"):
        params = cfg.get(key)
        if not isinstance(params, dict):
            continue
        per_type = {k: v for k, v in params.items() if k in LAYER_TYPES and isinstance(v, dict)}
        tables = per_type or {None: params}
        for name, table in tables.items():
            partial = table.get("partial_rotary_factor", None if per_type else top)  # 5.x moves the top one in
            kind = table.get("rope_type", table.get("type", "default")) or "default"
            if partial not in (None, 1, 1.0) and kind != "default":
                raise ConfigError(f"config.json: partial_rotary_factor {partial!r} with rope type {kind!r}: this "
                                  "family's attention rotates the whole head, and transformers' model cannot run "
                                  "a shorter table; remove partial_rotary_factor")
            tables[name] = {k: v for k, v in table.items() if k != "partial_rotary_factor"}
        out[key] = {**params, **tables} if per_type else tables[None]
    return out


# config.json keys that say which layers slide; a family whose model never windows drops them all
WINDOW_KEYS = ("sliding_window", "layer_types", "use_sliding_window", "sliding_window_pattern", "max_window_layers")


def gated_window(cfg: dict) -> dict:
    """`sliding_window` as a config class that sets it to null unless `use_sliding_window` is true
    (Qwen2/3, their MoE, SmolLM3: a missing use_sliding_window means false)."""
    return {**cfg, "sliding_window": cfg.get("sliding_window") if _flag(cfg, "use_sliding_window") else None}


def config_int(cfg: dict, key: str, default: int, minimum: int = 0) -> int:
    """An integer config key that only derives others (max_window_layers, a layer pattern)."""
    value = _get(cfg, key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"config.json: {key} must be an integer of at least {minimum}, got {value!r}")
    return value


def derived_layer_types(cfg: dict, slides) -> dict:
    """`cfg` with `layer_types` filled in as its config class derives them when config.json has none:
    layer i slides where `slides(i)` (an older config; transformers 5 writes the list it derived)."""
    n = cfg.get("num_hidden_layers")
    if cfg.get("layer_types") is not None or isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= MAX_LAYERS:
        return cfg  # base_spec refuses a bad layer count
    return {**cfg, "layer_types": ["sliding_attention" if slides(i) else "full_attention" for i in range(n)]}


def window_semantics(cfg: dict, kind: str) -> dict:
    """How a family's model reads the window keys: "none" never windows, "all" windows every layer
    with `sliding_window` (layer_types unread), "types" windows the layers `layer_types` marks."""
    if kind == "none":
        return {k: v for k, v in cfg.items() if k not in WINDOW_KEYS}
    if kind == "all":
        return {k: v for k, v in cfg.items() if k != "layer_types"}
    return cfg


def layer_specs(cfg: dict, num_layers: int, ropes: tuple[tuple[str, RopeSpec], ...],
                kinds: Mapping[str, str] | None = None) -> tuple[LayerSpec, ...]:
    """Per layer: the window of sliding layers and the rotary table of its type (None where
    SmolLM3's `no_rope_layers` says 0); `kinds`: the family's layer types that are not attention, and
    the kind of token mixer each is (graph/kinds.py); a type the family maps to "attention" is attention
    ("chunked_attention": Llama 4's chunks of `attention_chunk_size`)."""
    kinds = kinds or {}
    types, window = layer_types(cfg, num_layers, kinds)
    keys = {k for k, _ in ropes}
    use_rope = cfg.get("no_rope_layers")
    if use_rope is not None and (not isinstance(use_rope, list) or len(use_rope) != num_layers
                                 or any(v not in (0, 1) or isinstance(v, float) for v in use_rope)):
        raise ConfigError(f"config.json: no_rope_layers must list {num_layers} values of 0 or 1")
    chunk = _positive_int(cfg, "attention_chunk_size") if "chunked_attention" in types else 0
    return tuple(
        LayerSpec(kind=kinds[t], rope=None) if kinds.get(t, "attention") != "attention" else
        LayerSpec(window=window if t == "sliding_attention" else 0, chunk=chunk if t == "chunked_attention" else 0,
                  rope=(t if t in keys else "full_attention") if use_rope is None or use_rope[i] else None)
        for i, t in enumerate(types)
    )


def base_spec(cfg: dict, layer_kinds: Mapping[str, str] | None = None, **overrides) -> ModelSpec:
    """The spec of a Llama-like decoder; architectures override what differs (`layer_kinds`: see layer_specs)."""
    hidden = _positive_int(cfg, "hidden_size")
    heads = _positive_int(cfg, "num_attention_heads")
    kv_heads = _positive_int(cfg, "num_key_value_heads", heads)
    layers = _positive_int(cfg, "num_hidden_layers", limit=MAX_LAYERS)
    vocab = _positive_int(cfg, "vocab_size")
    inter = _positive_int(cfg, "intermediate_size")
    if heads % kv_heads:
        raise ConfigError(f"config.json: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})")
    head_dim = cfg.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise ConfigError(f"config.json: hidden_size ({hidden}) is not divisible by num_attention_heads ({heads}); set head_dim")
        head_dim = hidden // heads
    head_dim = _positive_int({"head_dim": head_dim}, "head_dim")
    bias = _flag(cfg, "attention_bias")
    attention = AttentionSpec(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, qkv_bias=bias, o_bias=bias)
    act = cfg.get("hidden_act") or "silu"  # Gemma 2 / 3 read hidden_activation instead (their hooks)
    context = _positive_int(cfg, "max_position_embeddings", 4096, limit=MAX_CONTEXT)
    ropes = ropes_from_config(cfg, head_dim, context)
    spec = ModelSpec(
        architecture=cfg["architectures"][0],
        model_type=str(cfg.get("model_type") or ""),
        hidden_size=hidden,
        num_layers=layers,
        vocab_size=vocab,
        context_length=context,
        attention=attention,
        ropes=ropes,
        layers=layer_specs(cfg, layers, ropes, layer_kinds),
        norm=NormSpec(eps=_finite(cfg, "rms_norm_eps", 1e-6)),  # families with another key set it in a hook
        mlp=MLPSpec(intermediate_size=inter, activation=str(act), bias=_flag(cfg, "mlp_bias")),
        tie_embeddings=_flag(cfg, "tie_word_embeddings"),
        bos_token_id=_token(cfg, "bos_token_id"),
        eos_token_id=_token(cfg, "eos_token_id"),
        pad_token_id=_token(cfg, "pad_token_id"),
    )
    return replace(spec, **overrides)


def _token(cfg: dict, key: str):
    return token_ids(cfg.get(key), key, "config.json")


def token_ids(v, key: str, where: str):
    """A bos/eos/pad id as onnxruntime-genai reads it: bos and pad one integer (a list of one is taken as that
    id), eos one integer or a non-empty list of integers; None when absent. Anything else is one ConfigError."""

    def token(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    if v is None or token(v):
        return v
    if isinstance(v, list) and v and all(token(x) for x in v):
        if key == "eos_token_id":
            return v
        if len(v) == 1:
            return v[0]
        raise ConfigError(f"{where}: {key} lists {len(v)} ids {v!r}; onnxruntime-genai takes one: keep the one "
                          "the tokenizer uses")
    if isinstance(v, list) and not v:
        raise ConfigError(f"{where}: {key} is an empty list; give the token's id, or remove the key")
    raise ConfigError(f"{where}: {key} must be a non-negative integer{' or a list of them' if key == 'eos_token_id' else ''}, "
                      f"got {v!r}")


def replace(obj, **changes):
    """dataclasses.replace that also accepts dotted paths: replace(spec, **{'attention.qk_norm': True})."""
    import dataclasses

    direct = {k: v for k, v in changes.items() if "." not in k}
    nested: dict[str, dict] = {}
    for k, v in changes.items():
        if "." in k:
            head, rest = k.split(".", 1)
            nested.setdefault(head, {})[rest] = v
    for head, sub in nested.items():
        direct[head] = replace(getattr(obj, head), **sub)
    return dataclasses.replace(obj, **direct) if direct else obj
