"""ModelSpec: everything the graph needs to know about a model, derived once from config.json.

Config is data here: frozen dataclasses, built by `spec_from_config`, never mutated while the
graph is emitted. Both transformers 4.x (`rope_theta`, `rope_scaling`) and 5.x
(`rope_parameters`, `layer_types`) spellings map into the same spec.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import ConfigError

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")


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
    qk_norm: bool = False
    scale: float | None = None
    softcap: float = 0.0
    layer_windows: tuple[int, ...] = ()  # per layer: sliding window (0 = full attention)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


@dataclass(frozen=True)
class NormSpec:
    eps: float
    weight_offset: float = 0.0  # Gemma stores (weight - 1)


@dataclass(frozen=True)
class MLPSpec:
    intermediate_size: int
    activation: str = "silu"
    bias: bool = False


@dataclass(frozen=True)
class ModelSpec:
    architecture: str
    model_type: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    context_length: int
    attention: AttentionSpec
    rope: RopeSpec
    norm: NormSpec
    mlp: MLPSpec
    tie_embeddings: bool = False
    embedding_scale: float = 1.0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    extras: tuple[tuple[str, object], ...] = field(default=())

    @property
    def sliding_window(self) -> int:
        return max(self.attention.layer_windows, default=0)


def _get(cfg: dict, key: str, default=None, *, required: bool = False):
    value = cfg.get(key, default)
    if required and value is None:
        raise ConfigError(f"config.json has no {key!r}; the checkpoint's config is incomplete")
    return value


def _positive_int(cfg: dict, key: str, default=None) -> int:
    value = _get(cfg, key, default, required=True)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"config.json: {key} must be a positive integer, got {value!r}")
    return value


def _finite(cfg: dict, key: str, default: float, *, positive: bool = True) -> float:
    value = cfg.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"config.json: {key} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ConfigError(f"config.json: {key} must be positive, got {value!r}")
    return float(value)


def rope_from_config(cfg: dict, head_dim: int) -> RopeSpec:
    """Read rope settings from either the 4.x or the 5.x spelling."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"config.json: rope_scaling/rope_parameters must be an object, got {params!r}")
    if "full_attention" in params and isinstance(params["full_attention"], dict):
        params = params["full_attention"]  # per-layer-type rope; full attention is the reference
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind not in ROPE_TYPES:
        raise ConfigError(f"config.json: unknown rope type {kind!r}; supported: {', '.join(ROPE_TYPES)}")
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    theta = _finite({"rope_theta": theta}, "rope_theta", 10000.0)
    partial = _finite(cfg, "partial_rotary_factor", params.get("partial_rotary_factor", 1.0) or 1.0)
    rotary_dim = int(head_dim * partial)
    if rotary_dim % 2 or rotary_dim <= 0:
        raise ConfigError(f"config.json: rotary dimension {rotary_dim} must be a positive even number")
    factor = _finite(params, "factor", 1.0) if kind != "default" else 1.0
    numeric = tuple(
        sorted(
            (k, float(v))
            for k, v in params.items()
            if k not in ("rope_type", "type", "rope_theta", "factor", "partial_rotary_factor")
            and isinstance(v, (int, float))
            and not isinstance(v, bool)
        )
    )
    lists = {k: v for k, v in params.items() if isinstance(v, list)}
    extra = tuple((k, tuple(float(x) for x in v)) for k, v in sorted(lists.items()))
    return RopeSpec(theta=theta, rotary_dim=rotary_dim, kind=kind, factor=factor, params=numeric + extra)  # type: ignore[arg-type]


def layer_windows(cfg: dict, num_layers: int) -> tuple[int, ...]:
    """Sliding window per layer (0 = full), from `layer_types` or a global `sliding_window`."""
    window = cfg.get("sliding_window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 0):
        raise ConfigError(f"config.json: sliding_window must be a non-negative integer or null, got {window!r}")
    types = cfg.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) != num_layers:
            raise ConfigError(f"config.json: layer_types must list {num_layers} entries")
        return tuple((window or 0) if t == "sliding_attention" else 0 for t in types)
    if cfg.get("use_sliding_window") is False:
        return (0,) * num_layers
    return ((window or 0),) * num_layers


def base_spec(cfg: dict, **overrides) -> ModelSpec:
    """The spec of a Llama-like decoder; architectures override what differs."""
    hidden = _positive_int(cfg, "hidden_size")
    heads = _positive_int(cfg, "num_attention_heads")
    kv_heads = _positive_int(cfg, "num_key_value_heads", heads)
    layers = _positive_int(cfg, "num_hidden_layers")
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
    bias = bool(cfg.get("attention_bias", False))
    attention = AttentionSpec(
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        qkv_bias=bias,
        o_bias=bias,
        layer_windows=layer_windows(cfg, layers),
    )
    act = cfg.get("hidden_act", cfg.get("hidden_activation", "silu"))
    spec = ModelSpec(
        architecture=cfg["architectures"][0],
        model_type=str(cfg.get("model_type", "llama")),
        hidden_size=hidden,
        num_layers=layers,
        vocab_size=vocab,
        context_length=_positive_int(cfg, "max_position_embeddings", 4096),
        attention=attention,
        rope=rope_from_config(cfg, head_dim),
        norm=NormSpec(eps=_finite(cfg, "rms_norm_eps", 1e-6)),
        mlp=MLPSpec(intermediate_size=inter, activation=str(act), bias=bool(cfg.get("mlp_bias", False))),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=_token(cfg, "bos_token_id"),
        eos_token_id=_token(cfg, "eos_token_id"),
        pad_token_id=_token(cfg, "pad_token_id"),
    )
    return replace(spec, **overrides)


def _token(cfg: dict, key: str):
    v = cfg.get(key)
    if v is None or isinstance(v, int) or (isinstance(v, list) and all(isinstance(x, int) for x in v)):
        return v
    raise ConfigError(f"config.json: {key} must be an integer or a list of integers, got {v!r}")


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
