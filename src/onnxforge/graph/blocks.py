"""Block shapes: how a layer wires its norms, token mixer and MLP around the residual stream.

  pre       h += attn(norm(h)); h += mlp(norm(h))                          Llama and most others
  sandwich  h += post_norm(attn(norm(h))); h += post_norm(mlp(norm(h)))    Gemma 2 / 3
  post      h += post_norm(attn(h)); h += post_norm(mlp(h))                OLMo 2 / 3
  parallel  n = norm(h); h += attn(n) + mlp(n)                             Phi-2
  sandwich_moe  sandwich, where an MoE layer's MLP is                     Gemma 4 (26B-A4B)
            post_norm(post_norm_1(mlp(norm(h))) + post_norm_2(experts(norm_2(h), router(h))))
            with the experts computed densely (graph/dense_experts.py)

`attn` is the layer's token mixer, chosen by its kind (graph/kinds.py); `mlp` its MoE or dense MLP.
A residual add is left pending in the `Stream` so that it fuses into the next Skip norm.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from .dense_experts import dense_experts
from .kinds import mix, mlp
from .parts import dense_mlp
from .parts import AttnInputs, Stream, norm, plain_norm

if TYPE_CHECKING:
    from .emitter import Emitter

Block = Callable[["Emitter", int, Stream, AttnInputs], Stream]


def _node(i: int, name: str) -> str:
    return f"/model/layers.{i}/{name}"


def pre(e: "Emitter", i: int, h: Stream, ctx: AttnInputs) -> Stream:
    x, total = norm(e, h, "attn_norm", i, _node(i, "input_layernorm"))
    h = Stream(mix(e, i, x, ctx), total).scaled(e, _node(i, "attn/residual"))
    x, total = norm(e, h, "ffn_norm", i, _node(i, "post_attention_layernorm"))
    return Stream(mlp(e, i, x), total).scaled(e, _node(i, "mlp/residual"))


def sandwich(e: "Emitter", i: int, h: Stream, ctx: AttnInputs) -> Stream:
    x, total = norm(e, h, "attn_norm", i, _node(i, "input_layernorm"))
    a = plain_norm(e, mix(e, i, x, ctx), "attn_post_norm", i, _node(i, "post_attention_layernorm"))
    x, total = norm(e, Stream(a, total).scaled(e, _node(i, "attn/residual")), "ffn_norm", i,
                    _node(i, "pre_feedforward_layernorm"))
    m = plain_norm(e, mlp(e, i, x), "ffn_post_norm", i, _node(i, "post_feedforward_layernorm"))
    return Stream(m, total).scaled(e, _node(i, "mlp/residual"))


def post(e: "Emitter", i: int, h: Stream, ctx: AttnInputs) -> Stream:
    x = h.total(e, _node(i, "residual_attn"))
    a = plain_norm(e, mix(e, i, x, ctx), "attn_post_norm", i, _node(i, "post_attention_layernorm"))
    x = Stream(a, x).scaled(e, _node(i, "attn/residual")).total(e, _node(i, "residual_mlp"))
    m = plain_norm(e, mlp(e, i, x), "ffn_post_norm", i, _node(i, "post_feedforward_layernorm"))
    return Stream(m, x).scaled(e, _node(i, "mlp/residual"))


def parallel(e: "Emitter", i: int, h: Stream, ctx: AttnInputs) -> Stream:
    x, total = norm(e, h, "attn_norm", i, _node(i, "input_layernorm"))
    both = e.b.op("Add", [mix(e, i, x, ctx), mlp(e, i, x)], _node(i, "parallel/Add"))
    return Stream(both, total).scaled(e, _node(i, "residual"))


def sandwich_moe(e: "Emitter", i: int, h: Stream, ctx: AttnInputs) -> Stream:
    if not e.spec.layers[i].moe:
        return sandwich(e, i, h, ctx)
    x, total = norm(e, h, "attn_norm", i, _node(i, "input_layernorm"))
    a = plain_norm(e, mix(e, i, x, ctx), "attn_post_norm", i, _node(i, "post_attention_layernorm"))
    x, total = norm(e, Stream(a, total).scaled(e, _node(i, "attn/residual")), "ffn_norm", i,
                    _node(i, "pre_feedforward_layernorm"))
    d = plain_norm(e, dense_mlp(e, i, x), "ffn_post_norm_1", i, _node(i, "post_feedforward_layernorm_1"))
    x2 = plain_norm(e, total, "ffn_pre_norm_2", i, _node(i, "pre_feedforward_layernorm_2"))
    m = plain_norm(e, dense_experts(e, i, x2, total), "ffn_post_norm_2", i, _node(i, "post_feedforward_layernorm_2"))
    m = plain_norm(e, e.b.op("Add", [d, m], _node(i, "ffn_combine/Add")), "ffn_post_norm", i,
                   _node(i, "post_feedforward_layernorm"))
    return Stream(m, total).scaled(e, _node(i, "mlp/residual"))


BLOCKS: dict[str, Block] = {"pre": pre, "sandwich": sandwich, "post": post, "parallel": parallel,
                            "sandwich_moe": sandwich_moe}
