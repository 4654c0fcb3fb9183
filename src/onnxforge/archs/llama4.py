"""Llama 4 (Scout, Maverick): the text decoder, from Llama4ForCausalLM or the Llama4ForConditionalGeneration wrapper.

What it adds over Llama, as transformers' modeling_llama4 computes it:
  * layer types "chunked_attention" (a token attends within its chunk of attention_chunk_size positions:
    LayerSpec.chunk, graph/attention_extras.py) and "full_attention"; without layer_types, the layers with
    rotary are chunked and the others (NoPE) full;
  * NoPE layers: no_rope_layers (1: rotary) or, where it is absent or empty, every no_rope_layer_interval-th
    layer without rotary; on them, with attn_temperature_tuning, q is scaled by
    1 + attn_scale x log1p(floor((position + 1) / floor_scale));
  * use_qk_norm: a weightless L2 (RMS) norm of q and k per head on the rotary layers, after the rotary
    (the norm commutes with it); the rotary rotates adjacent pairs (interleaved);
  * the MoE layers (moe_layers, else every interleave_moe_layer_step-th): a top-1 router whose
    sigmoid(logit) scales the expert's input, experts stacked (E, H, 2I) gate then up and (E, I, H), and a
    shared expert of intermediate_size beside them; the dense layers' MLP is intermediate_size_mlp wide.
"""
from __future__ import annotations

import dataclasses

from ..errors import ConfigError
from ..spec import MoESpec, _finite, _flag, _positive_int, base_spec, config_int
from .registry import Architecture, register

FF = "model.layers.{i}.feed_forward."
NAMES = {"gate": FF + "gate_proj", "up": FF + "up_proj", "down": FF + "down_proj", "router": FF + "router",
         "experts_gate_up": FF + "experts.gate_up_proj", "experts_down": FF + "experts.down_proj",
         "shared_gate": FF + "shared_expert.gate_proj", "shared_up": FF + "shared_expert.up_proj",
         "shared_down": FF + "shared_expert.down_proj"}
# Llama4TextConfig's defaults for keys a config.json may omit
DEFAULTS = {"vocab_size": 202048, "hidden_size": 5120, "intermediate_size": 8192, "intermediate_size_mlp": 16384,
            "num_hidden_layers": 48, "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128,
            "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "num_experts_per_tok": 1,
            "num_local_experts": 16, "interleave_moe_layer_step": 1, "use_qk_norm": True, "no_rope_layer_interval": 4,
            "attention_chunk_size": 8192, "attn_temperature_tuning": True, "floor_scale": 8192, "attn_scale": 0.1,
            "rope_theta": 500000.0, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}
MASKED = ("full_attention", "chunked_attention")  # the layer types Llama4TextModel builds a mask for
KINDS = {"chunked_attention": "attention"}  # an attention layer (chunked: LayerSpec.chunk)


def _config(cfg: dict) -> dict:
    """As Llama4TextConfig loads: no_rope_layers (longer lists are cut to the layers) or one NoPE layer every
    no_rope_layer_interval; layer_types from them; rope pairs interleaved; the window keys are not read."""
    n = _positive_int(cfg, "num_hidden_layers")
    use_rope = cfg.get("no_rope_layers")
    if isinstance(use_rope, list) and len(use_rope) >= n:
        use_rope = use_rope[:n]
    if not use_rope:  # None or [] (Scout's config.json): transformers derives it
        interval = config_int(cfg, "no_rope_layer_interval", 4, minimum=1)
        use_rope = [int((i + 1) % interval != 0) for i in range(n)]
    cfg = {k: v for k, v in cfg.items() if k not in ("sliding_window", "use_sliding_window", "max_window_layers")}
    types = cfg.get("layer_types")
    if types is None and isinstance(use_rope, list):
        types = ["chunked_attention" if r else "full_attention" for r in use_rope]
    if isinstance(types, list) and any(t not in MASKED for t in types):
        bad = next(t for t in types if t not in MASKED)
        raise ConfigError(f"config.json: layer_types has {bad!r}; Llama 4 layers are {' or '.join(MASKED)}")
    return {**cfg, "no_rope_layers": use_rope, "layer_types": types, "rope_interleaved": True}


def _moe_layers(cfg: dict, n: int):
    listed = cfg.get("moe_layers")
    if listed is not None:
        if not isinstance(listed, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in listed):
            raise ConfigError(f"config.json: moe_layers must list layer indices, got {listed!r}")
        return lambda i: i in listed
    step = config_int(cfg, "interleave_moe_layer_step", 1, minimum=1)
    return lambda i: i in range(step - 1, n, step)


def _llama4(cfg: dict) -> dict:
    n, inter = _positive_int(cfg, "num_hidden_layers"), _positive_int(cfg, "intermediate_size")
    spec = MoESpec(num_experts=_positive_int(cfg, "num_local_experts"), top_k=_positive_int(cfg, "num_experts_per_tok"),
                   intermediate_size=inter, mixer="sigmoid_input", layout="halves_t", shared_intermediate_size=inter)
    is_moe = _moe_layers(cfg, n)
    layers = tuple(dataclasses.replace(layer, moe=is_moe(i)) for i, layer in enumerate(base_spec(cfg, KINDS).layers))
    moe = {"moe": spec, "layers": layers}
    temperature = ()
    if _flag(cfg, "attn_temperature_tuning", True):
        temperature = (_finite(cfg, "floor_scale", 8192.0), _finite(cfg, "attn_scale", 0.1, positive=False))
    return {**moe, "mlp.intermediate_size": _positive_int(cfg, "intermediate_size_mlp"),
            "attention.qk_norm": "l2" if _flag(cfg, "use_qk_norm", True) else "",
            "attention.nope_temperature": temperature}


LLAMA4 = dict(hook=_llama4, config_fix=_config, config_defaults=DEFAULTS, names=NAMES, sliding="types",
              layer_kinds=KINDS, spec={"mlp.bias": False})
register(Architecture("Llama4ForCausalLM", "llama", **LLAMA4,
                      doc="Llama 4 text (chunked attention, NoPE layers, interleaved MoE with a shared expert)"))
register(Architecture("Llama4ForConditionalGeneration", "llama", **LLAMA4, text_config=True,
                      rewrites=(("model.", "language_model.model."), ("lm_head", "language_model.lm_head")),
                      ignored=("vision_model.*", "multi_modal_projector.*"),
                      doc="Llama 4 Scout / Maverick: the text decoder (the vision model and projector are not built)"))
