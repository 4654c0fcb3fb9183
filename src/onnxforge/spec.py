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


def rope_from_config(cfg: dict, head_dim: int, context_length: int | None = None) -> RopeSpec:
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
    if theta <= 1.0:
        raise ConfigError(f"config.json: rope_theta must be greater than 1, got {theta!r}")
    partial = _finite(cfg, "partial_rotary_factor", params.get("partial_rotary_factor", 1.0) or 1.0)
    if partial > 1.0:
        raise ConfigError(f"config.json: partial_rotary_factor must be at most 1, got {partial!r}")
    rotary_dim = int(head_dim * partial)
    if rotary_dim % 2 or rotary_dim <= 0:
        raise ConfigError(f"config.json: rotary dimension {rotary_dim} must be a positive even number")
    factor = _finite(params, "factor", 1.0) if kind != "default" else 1.0
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
    rope = RopeSpec(theta=theta, rotary_dim=rotary_dim, kind=kind, factor=factor, params=numeric + extra)  # type: ignore[arg-type]
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


def layer_windows(cfg: dict, num_layers: int) -> tuple[int, ...]:
    """Sliding window per layer (0 = full), from `layer_types` or a global `sliding_window`."""
    window = cfg.get("sliding_window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 0):
        raise ConfigError(f"config.json: sliding_window must be a non-negative integer or null, got {window!r}")
    if window is not None and window > MAX_SIZE:
        raise ConfigError(f"config.json: sliding_window {window} is implausibly large (at most {MAX_SIZE})")
    types = cfg.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) != num_layers:
            raise ConfigError(f"config.json: layer_types must list {num_layers} entries")
        unknown = sorted({repr(t) for t in types if t not in LAYER_TYPES})
        if unknown:
            raise ConfigError(f"config.json: layer_types has {', '.join(unknown)}; supported: {', '.join(LAYER_TYPES)}")
        return tuple((window or 0) if t == "sliding_attention" else 0 for t in types)
    if cfg.get("use_sliding_window") is False:
        return (0,) * num_layers
    return ((window or 0),) * num_layers


def base_spec(cfg: dict, **overrides) -> ModelSpec:
    """The spec of a Llama-like decoder; architectures override what differs."""
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
    attention = AttentionSpec(
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        qkv_bias=bias,
        o_bias=bias,
        layer_windows=layer_windows(cfg, layers),
    )
    act = cfg.get("hidden_act", cfg.get("hidden_activation", "silu"))
    context = _positive_int(cfg, "max_position_embeddings", 4096, limit=MAX_CONTEXT)
    spec = ModelSpec(
        architecture=cfg["architectures"][0],
        model_type=str(cfg.get("model_type", "llama")),
        hidden_size=hidden,
        num_layers=layers,
        vocab_size=vocab,
        context_length=context,
        attention=attention,
        rope=rope_from_config(cfg, head_dim, context),
        norm=NormSpec(eps=_finite(cfg, "rms_norm_eps", 1e-6)),
        mlp=MLPSpec(intermediate_size=inter, activation=str(act), bias=_flag(cfg, "mlp_bias")),
        tie_embeddings=_flag(cfg, "tie_word_embeddings"),
        bos_token_id=_token(cfg, "bos_token_id"),
        eos_token_id=_token(cfg, "eos_token_id"),
        pad_token_id=_token(cfg, "pad_token_id"),
    )
    return replace(spec, **overrides)


def _token(cfg: dict, key: str):
    v = cfg.get(key)

    def token(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if v is None or token(v) or (isinstance(v, list) and all(token(x) for x in v)):
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
