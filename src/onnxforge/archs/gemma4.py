"""Gemma 4 text decoder: Gemma4ForCausalLM, and the text decoder of Gemma4ForConditionalGeneration (vision and audio
towers left unread). Over Gemma 3 (transformers' modeling_gemma4): norms by the weight itself (no 1 +), a weightless
v norm, scaling 1.0; per-layer head_dim / kv heads (per_layer_config, else global_head_dim and, with
attention_k_eq_v, num_global_key_value_heads on the full layers; each layer's KV cache of its own shape, which
onnxruntime-genai 0.18 reads from the model); attention_k_eq_v (no v_proj on the full layers: k is v); a
"proportional" rotary there (graph/rope.py); layer_scalar and per-layer inputs (hidden_size_per_layer_input,
graph/layer_extras.py); KV sharing (num_kv_shared_layers: the last layers attend to the keys and values of the last
earlier layer of their type, LayerSpec.kv_source; double-wide MLPs there with use_double_wide_mlp); the MoE block
(enable_moe_block: graph/blocks.py sandwich_moe, graph/dense_experts.py). Refused: bidirectional attention "all".
"""
from __future__ import annotations

import dataclasses

from ..errors import ConfigError
from ..spec import MoESpec, _flag, _positive_int, base_spec, rope_from_config
from .gemma import PRE_FFN_NORM, _common, _number
from .registry import Architecture, register

TYPES = ("sliding_attention", "full_attention")
NAMES = {"router": "model.layers.{i}.router.proj", "experts_gate_up": "model.layers.{i}.experts.gate_up_proj",
         "experts_down": "model.layers.{i}.experts.down_proj"}
TOWERS = ("vision_tower", "audio_tower", "embed_vision", "embed_audio")  # the wrapper's, left unread
DEFAULTS = {"vocab_size": 262_144, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 30,  # the class's
            "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
            "max_position_embeddings": 131_072, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "sliding_window": 512,
            "hidden_size_per_layer_input": 256, "num_kv_shared_layers": 0, "enable_moe_block": False, "global_head_dim": 512}
ROPE_DEFAULTS = {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                 "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0}}


def _config(cfg: dict) -> dict:
    """As Gemma4TextConfig loads: layer_types every 6th full (the last always full), the per-type rope tables."""
    n = cfg.get("num_hidden_layers")
    types = cfg.get("layer_types")
    if types is None and isinstance(n, int) and not isinstance(n, bool) and 0 < n <= 4096:
        types = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n)]
    if isinstance(types, list) and types:
        bad = [t for t in types if t not in TYPES]
        if bad:
            raise ConfigError(f"config.json: layer_types has {bad[0]!r}; Gemma 4 layers are {' or '.join(TYPES)}")
        types = [*types[:-1], "full_attention"]  # transformers forces the last layer to full attention
    params = ROPE_DEFAULTS if cfg.get("rope_parameters") is None else cfg["rope_parameters"]
    used = sorted(set(types) & set(TYPES)) if isinstance(types, list) and types else list(TYPES)
    if not isinstance(params, dict) or any(not isinstance(params.get(t), dict) for t in used):
        raise ConfigError("config.json: Gemma 4's rope_parameters must hold an object for each layer type of the "
                          f"model ({', '.join(used)}); got {params!r}")
    tables = {t: {**{k: v for k, v in x.items() if k != "partial_rotary_factor"}, "rope_proportion": x.get(
        "partial_rotary_factor", 1.0)} if isinstance(x, dict) and x.get("rope_type") == "proportional" else x
        for t, x in params.items()}  # a proportional table rotates whole heads, some pairs by 0
    rest = {k: v for k, v in cfg.items() if k not in ("rope_scaling", "rope_theta", "rope_local_base_freq")}
    return {**rest, "layer_types": types, "rope_parameters": tables}


def _geometry(cfg: dict, n: int, types: list[str]) -> list[tuple[int, int]]:
    """(head_dim, kv_heads) per layer, as Gemma4TextConfig's per_layer_config gives them."""
    kv = _positive_int(cfg, "num_key_value_heads", cfg.get("num_attention_heads"))
    overrides = cfg.get("per_layer_config")
    if overrides is None:
        full = {"head_dim": _positive_int(cfg, "global_head_dim", 512)}
        if _flag(cfg, "attention_k_eq_v") and cfg.get("num_global_key_value_heads") is not None:
            full["num_key_value_heads"] = cfg["num_global_key_value_heads"]
        overrides = {str(i): full for i, t in enumerate(types) if t == "full_attention"}
    ok = isinstance(overrides, dict) and all(str(k).isdigit() and int(k) < n and isinstance(v, dict)
                                             and set(v) <= {"head_dim", "num_key_value_heads"} for k, v in overrides.items())
    if not ok:
        raise ConfigError(f"config.json: per_layer_config must map layer indices below {n} to objects of head_dim and "
                          f"num_key_value_heads (what onnxforge reads per layer), got {overrides!r}")
    table = {int(k): v for k, v in overrides.items()}
    return [(_positive_int({**cfg, **table.get(i, {})}, "head_dim"),
             _positive_int({"num_key_value_heads": kv, **table.get(i, {})}, "num_key_value_heads")) for i in range(n)]


def _sharing(cfg: dict, n: int, types: list[str]) -> list[dict]:
    """Per layer, KV sharing's changes: the last num_kv_shared_layers layers attend to the keys and values of the
    last earlier layer of their type (and have a double-wide MLP with use_double_wide_mlp), as transformers."""
    shared = cfg.get("num_kv_shared_layers") or 0
    if isinstance(shared, bool) or not isinstance(shared, int) or not 0 <= shared < n:
        raise ConfigError(f"config.json: num_kv_shared_layers must be an integer from 0 to {n - 1}, got {shared!r}")
    first = n - shared
    wide = 2 * _positive_int(cfg, "intermediate_size") if _flag(cfg, "use_double_wide_mlp") else 0
    sources = [max((j for j in range(first) if types[j] == t), default=None) if i >= first else -1
               for i, t in enumerate(types)]
    if None in sources:
        raise ConfigError("config.json: a layer shares keys and values, but no earlier layer of its type has its own "
                          "(transformers refuses this config too)")
    return [{"kv_source": source, "mlp_size": wide if source >= 0 else 0} for source in sources]


def _gemma4(cfg: dict) -> dict:
    if cfg.get("use_bidirectional_attention") == "all":
        raise ConfigError("config.json: use_bidirectional_attention is \"all\" (an embedding model); onnxforge builds "
                          "causal decoders only")
    n = _positive_int(cfg, "num_hidden_layers")
    spec = base_spec({**cfg, "use_bidirectional_attention": None})
    types = list(cfg["layer_types"])
    geometry = _geometry(cfg, n, types)
    if any(spec.attention.num_heads % kv for _, kv in geometry):
        raise ConfigError("config.json: a layer's key/value heads do not divide num_attention_heads")
    # one rotary table per layer type, at that type's head size (transformers: per_layer_config[layer_type])
    ropes = []
    for t in sorted(set(types)):
        sizes = {geometry[i][0] for i, lt in enumerate(types) if lt == t}
        if len(sizes) > 1:
            raise ConfigError(f"config.json: the {t} layers have head sizes {sorted(sizes)}; transformers' Gemma 4 "
                              "rotary has one table per layer type, so they must agree")
        ropes.append((t, rope_from_config(cfg, sizes.pop(), spec.context_length, cfg["rope_parameters"][t])))
    ropes += [] if "full_attention" in dict(ropes) else [("full_attention", dict(ropes)["sliding_attention"])]
    k_eq_v, moe_all, a = _flag(cfg, "attention_k_eq_v"), _flag(cfg, "enable_moe_block"), spec.attention
    layers = tuple(dataclasses.replace(layer, head_dim=hd if hd != a.head_dim else 0, moe=moe_all, **shares,
                                       kv_heads=kv if kv != a.num_kv_heads else 0,
                                       k_eq_v=k_eq_v and types[i] == "full_attention" and shares["kv_source"] < 0)
                   for i, (layer, (hd, kv), shares) in enumerate(zip(spec.layers, geometry, _sharing(cfg, n, types))))
    moe = {"per_layer_input": _positive_int(cfg, "hidden_size_per_layer_input"), "per_layer_vocab": _positive_int(
        cfg, "vocab_size_per_layer_input", 262_144)} if cfg.get("hidden_size_per_layer_input") else {}
    if moe_all:  # every layer: the MoE block beside the dense MLP (graph/blocks.py)
        moe |= {"block": "sandwich_moe", "moe": MoESpec(num_experts=_positive_int(cfg, "num_experts"), top_k=_positive_int(
            cfg, "top_k_experts"), intermediate_size=_positive_int(cfg, "moe_intermediate_size"), mixer="norm_scaled")}
    return {**moe, **_common({k: v for k, v in cfg.items() if k != "use_bidirectional_attention"}),
            "mlp.activation": str(cfg.get("hidden_activation") or "gelu_pytorch_tanh"),
            "attention.scale": 1.0, "attention.v_norm": True, "attention.qk_norm": "head",
            "final_softcap": _number(cfg, "final_logit_softcapping"), "ropes": tuple(sorted(ropes)), "layers": layers}


GEMMA4 = dict(spec={"norm.weight_offset": 0.0, "block": "sandwich", "mlp.bias": False, "layer_scalar": True},
              names={**PRE_FFN_NORM, **NAMES}, hook=_gemma4, config_fix=_config, sliding="types", config_defaults=DEFAULTS)
register(Architecture("Gemma4ForCausalLM", "gemma4_text", **GEMMA4,
                      doc="Gemma 4 text: per-layer head sizes and kv heads, k = v layers, proportional rope, "
                          "v norm, layer scalars, per-layer inputs, KV sharing, MoE block"))
register(Architecture("Gemma4ForConditionalGeneration", "gemma4_text", **GEMMA4, text_config=True,
                      rewrites=(("model.", "model.language_model."), ("lm_head", "lm_head")),
                      ignored=tuple(f"{p}{m}.*" for p in ("model.", "") for m in TOWERS),
                      doc="Gemma 4 (the published form): the text decoder (vision and audio towers are not built)"))
