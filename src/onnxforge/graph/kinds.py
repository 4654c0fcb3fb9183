"""Layer kinds: a layer's token mixer is chosen by its kind (`LayerSpec.kind`) from the `MIXERS` table,
and its MLP by `LayerSpec.moe`.

A mixer is a part, `part(e, i, x, ctx, past) -> (y, present)`, and the states it carries, `states(spec, i)`
(graph/state.py). The graph's state inputs and outputs and genai_config.json's state names are generated
here from those declarations, so a new mixer (a short conv, a linear attention, ...) is one part and one
entry in the table: the blocks, the decoder and the config writer do not change.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import onnx_ir as ir

from ..errors import ConfigError
from .gated_delta import gated_delta, gated_delta_states
from .mamba2 import mamba2, mamba_states
from .mla import mla, mla_states
from .moe import moe
from .parts import AttnInputs, attention, attention_states, dense_mlp
from .short_conv import conv_states, short_conv
from .state import State

if TYPE_CHECKING:
    from ..spec import ModelSpec
    from .emitter import Emitter

Part = Callable[["Emitter", int, ir.Value, AttnInputs, tuple[ir.Value, ...]], tuple[ir.Value, tuple[ir.Value, ...]]]


@dataclass(frozen=True)
class Mixer:
    part: Part
    states: Callable[["ModelSpec", int], tuple[State, ...]]
    # genai_config.json of a model with other kinds than attention: the layer's entry in decoder.layer_types,
    # and decoder keys the kind adds (onnxruntime-genai 0.18's names)
    genai_type: Callable[["ModelSpec", int], str] = lambda spec, i: spec.layers[i].kind
    genai_keys: Callable[["ModelSpec"], dict] = lambda spec: {}


MIXERS: dict[str, Mixer] = {
    # full, sliding (LayerSpec.window), with or without rotary
    "attention": Mixer(attention, attention_states,
                       lambda spec, i: "sliding_attention" if spec.layers[i].window else "full_attention"),
    "conv": Mixer(short_conv, conv_states, genai_keys=lambda spec: {"conv_cache_size": spec.conv.kernel - 1}),
    # gated delta-net linear attention (Qwen3.5, Qwen3-Next): conv + recurrent state, graph/gated_delta.py
    "gated_delta": Mixer(gated_delta, gated_delta_states, lambda spec, i: "linear_attention"),
    # Mamba2 (Granite 4 hybrid): conv + recurrent state, graph/mamba2.py
    "mamba": Mixer(mamba2, mamba_states, lambda spec, i: "linear_attention"),
    # multi-head latent attention (DeepSeek-V3, Kimi-K2): a KV cache like attention's, graph/mla.py
    "mla": Mixer(mla, mla_states, lambda spec, i: "full_attention"),
}
ATTENTION_TYPES = ("full_attention", "sliding_attention")  # genai_config.json's layer types of a plain KV cache


def mixer_of(spec: "ModelSpec", i: int) -> Mixer:
    kind = spec.layers[i].kind
    if kind not in MIXERS:
        raise ConfigError(f"layer {i} is of kind {kind!r}, which has no token mixer; known: {', '.join(MIXERS)}")
    return MIXERS[kind]


def layer_states(spec: "ModelSpec") -> list[tuple[State, ...]]:
    """Per layer, the states its mixer carries."""
    return [mixer_of(spec, i).states(spec, i) for i in range(spec.num_layers)]


def state_inputs(e: "Emitter") -> list[tuple[ir.Value, ...]]:
    """The graph inputs of every layer's past states, layer by layer in declaration order."""
    io = e.io.ir_dtype
    return [tuple(e.b.input(s.past % i, s.dtype or io, s.shape(present=False)) for s in states)
            for i, states in enumerate(layer_states(e.spec))]


def genai_state_names(spec: "ModelSpec") -> tuple[dict[str, str], dict[str, str]]:
    """genai_config.json's decoder inputs and outputs for the carried states, from the declarations."""
    inputs: dict[str, str] = {}
    outputs: dict[str, str] = {}
    for states in layer_states(spec):
        for s in states:
            inputs.setdefault(f"past_{s.genai}_names", s.past)
            outputs.setdefault(f"present_{s.genai}_names", s.present)
    return inputs, outputs


def genai_layer_keys(spec: "ModelSpec") -> dict:
    """genai_config.json's decoder keys for a model with layers of another kind than attention: layer_types
    and what each kind adds; {} where every layer keeps a plain KV cache."""
    types = [mixer_of(spec, i).genai_type(spec, i) for i in range(spec.num_layers)]
    if all(t in ATTENTION_TYPES for t in types):  # attention (and latent attention) layers only
        return {}
    keys: dict = {"layer_types": types}
    for kind in dict.fromkeys(layer.kind for layer in spec.layers):
        keys.update(MIXERS[kind].genai_keys(spec))
    return keys


def mix(e: "Emitter", i: int, x: ir.Value, ctx: AttnInputs) -> ir.Value:
    """The layer's token mixer; its present states become the graph outputs its declarations name."""
    m = mixer_of(e.spec, i)
    y, present = m.part(e, i, x, ctx, e.past[i])
    states = m.states(e.spec, i)
    if len(present) != len(states):
        raise ValueError(f"layer {i}: the mixer returned {len(present)} states but declares {len(states)}")
    for s, value in zip(states, present):
        e.b.output(value, s.present % i, s.dtype or e.io.ir_dtype, s.shape(present=True))
    return y


def mlp(e: "Emitter", i: int, x: ir.Value) -> ir.Value:
    """The layer's MLP: the mixture of experts where the layer spec says so (graph/moe.py), else dense."""
    return moe(e, i, x) if e.spec.layers[i].moe else dense_mlp(e, i, x)
