"""Hybrid families: layers of another kind than attention beside attention layers (graph/kinds.py).

LFM2: `layer_types` marks "conv" layers (a short gated convolution, graph/short_conv.py) and
"full_attention" ones (q/k norms per head); RMSNorm at `norm_eps`, the final norm named
`embedding_norm`, a SwiGLU MLP (`feed_forward.w1/w3/w2`) whose width transformers adjusts
(`block_auto_adjust_ff_dim`), tied embeddings by default.
"""
from __future__ import annotations

from ..errors import ConfigError
from ..spec import ConvSpec, _finite, _flag, _positive_int
from .registry import Architecture, register

LFM2_DEFAULTS = {"vocab_size": 65536, "hidden_size": 2560, "intermediate_size": 12288, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 128_000,
                 "norm_eps": 1e-5, "tie_word_embeddings": True, "rope_theta": 1_000_000.0, "conv_bias": False,
                 "conv_L_cache": 3, "block_multiple_of": 256, "block_ffn_dim_multiplier": 1.0,
                 "block_auto_adjust_ff_dim": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


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
                      config_defaults=LFM2_DEFAULTS, sliding="types", layer_kinds={"conv": "conv"},
                      doc="LFM2 (short gated convolution layers beside attention)"))
