"""The decoder layer's computation in numpy, float32, as the emitted graph computes it (SimplifiedLayerNormalization
/ LayerNormalization, GroupQueryAttention with rotate-half rotary and a causal (windowed) mask, the MLP's
activation), for the layers the calibrated methods support; `check_supported` refuses the others."""
from __future__ import annotations

import math

import numpy as np

from ..errors import RecipeError
from ..graph.rope import cos_sin_cache
from ..spec import ModelSpec

ACTS = ("silu", "swish", "gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu", "relu", "relu2")


def check_supported(spec: ModelSpec, method: str) -> None:
    """A RecipeError naming what the calibrated forward does not compute (before any weight is read)."""
    why = []
    if spec.block != "pre":
        why.append(f"its layers are wired '{spec.block}' (calibration runs pre-norm layers)")
    for i, layer in enumerate(spec.layers):
        a = spec.attention_of(i)
        if layer.kind != "attention":
            why.append(f"layer {i} is a {layer.kind} layer")
        if layer.moe:
            from .moe import unsupported

            if unsupported(spec):
                why.append(unsupported(spec))
        if layer.chunk or getattr(layer, "k_eq_v", False):
            why.append(f"layer {i} has chunked or k=v attention")
        if a.qk_norm not in ("", "head") or (a.qk_norm and not spec.norm.weight):
            why.append(f"q/k norms of kind {a.qk_norm!r}")
        if a.softcap or a.clip_qkv or a.sinks or a.output_gate or a.nope_temperature or a.v_norm:
            why.append("softcap, clipping, sinks, gates or temperatures in attention")
        rope = dict(spec.ropes).get(layer.rope) if layer.rope else None
        if rope is not None and rope.interleaved:
            why.append("interleaved rotary")
        if why:
            break
    if spec.norm.kind not in ("rms", "layer") or not spec.norm.weight:
        why.append("norms without a weight to fold scales into")
    if spec.mlp.activation not in ACTS:
        why.append(f"activation {spec.mlp.activation}")
    if why:
        raise RecipeError(f"method {method} calibrates dense pre-norm attention decoders and their softmax-routed "
                          f"mixtures of experts; this model has "
                          f"{why[0]}: use method k_quant or hqq (calibration-free) for it")


def norm(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, spec: ModelSpec) -> np.ndarray:
    n = spec.norm
    w = w.astype(np.float32) + np.float32(n.weight_offset)
    if n.kind == "rms":
        var = np.mean(np.square(x), axis=-1, keepdims=True)
        y = x / np.sqrt(var + np.float32(n.eps))
    else:
        mu = x.mean(axis=-1, keepdims=True)
        d = x - mu
        y = d / np.sqrt(np.mean(d * d, axis=-1, keepdims=True) + np.float32(n.eps))
    y = y * w
    return y + b.astype(np.float32) if b is not None else y


def _erf(x: np.ndarray) -> np.ndarray:
    """Abramowitz-Stegun 7.1.26 (|error| < 1.5e-7): numpy has no erf."""
    s = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t \
        * np.exp(-a * a)
    return (s * y).astype(np.float32)


def activation(x: np.ndarray, act: str) -> np.ndarray:
    if act in ("silu", "swish"):
        return x / (1 + np.exp(-x))
    if act in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        return 0.5 * x * (1 + np.tanh(np.float32(math.sqrt(2 / math.pi)) * (x + np.float32(0.044715) * x ** 3)))
    if act == "gelu":
        return 0.5 * x * (1 + _erf(x / np.float32(math.sqrt(2))))
    r = np.maximum(x, 0)
    return r * r if act == "relu2" else r


class Rotary:
    """cos/sin tables per layer type, cut to the calibration length."""

    def __init__(self, spec: ModelSpec, length: int):
        self.tables = {}
        for name, rope in spec.ropes:
            cos, sin = cos_sin_cache(rope, spec.context_length)
            self.tables[name] = (cos[:length], sin[:length], rope.rotary_dim)

    def apply(self, x: np.ndarray, kind: str | None) -> np.ndarray:
        """x (L, heads, head_dim) rotated (rotate-half over the first rotary_dim dims)."""
        if kind is None:
            return x
        cos, sin, rd = self.tables[kind]
        cos, sin = cos[: x.shape[0], None, :], sin[: x.shape[0], None, :]
        half = rd // 2
        x1, x2 = x[..., :half], x[..., half:rd]
        out = x.copy()
        out[..., :half] = x1 * cos - x2 * sin
        out[..., half:rd] = x2 * cos + x1 * sin
        return out


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, spec: ModelSpec, i: int, rotary: Rotary,
              head_norms: tuple | None = None) -> np.ndarray:
    """One sequence: q (L, q_size), k/v (L, kv_size) -> context (L, q_size). `head_norms`: the q and k norms per
    head ((w, b) each, qk_norm "head": Qwen3, Gemma 3), before the rotary or after it (qk_norm_after_rope)."""
    a, layer = spec.attention_of(i), spec.layers[i]
    L = q.shape[0]
    q, k = q.reshape(L, a.num_heads, a.head_dim), k.reshape(L, a.num_kv_heads, a.head_dim)
    after = a.qk_norm_after_rope and layer.rope is not None
    if head_norms and not after:
        q, k = norm(q, *head_norms[0], spec), norm(k, *head_norms[1], spec)
    q, k = rotary.apply(q, layer.rope), rotary.apply(k, layer.rope)
    if head_norms and after:
        q, k = norm(q, *head_norms[0], spec), norm(k, *head_norms[1], spec)
    v = v.reshape(L, a.num_kv_heads, a.head_dim)
    kv, group, d = a.num_kv_heads, a.num_heads // a.num_kv_heads, a.head_dim
    scale = np.float32(a.scale if a.scale is not None else 1 / math.sqrt(a.head_dim))
    # grouped: head h reads KV head h // group, so the q heads of one KV head are one (group * L, d) matrix
    q = q.transpose(1, 0, 2).reshape(kv, group * L, d)
    scores = np.matmul(q, k.transpose(1, 2, 0)).reshape(a.num_heads, L, L)  # BLAS (einsum would not be)
    scores *= scale
    pos = np.arange(L)
    blocked = pos[None, :] > pos[:, None]
    if layer.window:
        blocked |= pos[:, None] - pos[None, :] >= layer.window
    scores[:, blocked] = -np.inf
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    ctx = np.matmul(scores.reshape(kv, group * L, L), v.transpose(1, 0, 2))  # (kv, group * L, d)
    return ctx.reshape(a.num_heads, L, d).transpose(1, 0, 2).reshape(L, a.q_size).astype(np.float32, copy=False)
