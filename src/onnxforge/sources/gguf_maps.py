"""Data tables that turn a GGUF file into Hugging Face terms.

One row of `FAMILIES` per GGUF `general.architecture`: the transformers class and model_type it
becomes, the tensor-name map (GGUF template -> HF template, `{bid}` is the block index), whether
llama.cpp's converter permuted the Q/K rows for its rotary layout, and config keys fixed for the
family. Adding a family is adding a row.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

# Tensor names shared by every llama-like decoder (llama.cpp's `gguf.constants` names).
_DECODER_TENSORS: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{bid}.attn_norm.weight": "model.layers.{bid}.input_layernorm.weight",
    "blk.{bid}.attn_q.weight": "model.layers.{bid}.self_attn.q_proj.weight",
    "blk.{bid}.attn_q.bias": "model.layers.{bid}.self_attn.q_proj.bias",
    "blk.{bid}.attn_k.weight": "model.layers.{bid}.self_attn.k_proj.weight",
    "blk.{bid}.attn_k.bias": "model.layers.{bid}.self_attn.k_proj.bias",
    "blk.{bid}.attn_v.weight": "model.layers.{bid}.self_attn.v_proj.weight",
    "blk.{bid}.attn_v.bias": "model.layers.{bid}.self_attn.v_proj.bias",
    "blk.{bid}.attn_output.weight": "model.layers.{bid}.self_attn.o_proj.weight",
    "blk.{bid}.attn_output.bias": "model.layers.{bid}.self_attn.o_proj.bias",
    "blk.{bid}.ffn_norm.weight": "model.layers.{bid}.post_attention_layernorm.weight",
    "blk.{bid}.ffn_gate.weight": "model.layers.{bid}.mlp.gate_proj.weight",
    "blk.{bid}.ffn_up.weight": "model.layers.{bid}.mlp.up_proj.weight",
    "blk.{bid}.ffn_down.weight": "model.layers.{bid}.mlp.down_proj.weight",
}

_QK_NORM_TENSORS: dict[str, str] = {
    "blk.{bid}.attn_q_norm.weight": "model.layers.{bid}.self_attn.q_norm.weight",
    "blk.{bid}.attn_k_norm.weight": "model.layers.{bid}.self_attn.k_norm.weight",
}

# GGUF tensors that carry no HF weight; they are read for the config instead (rope_freqs: llama3
# rope scaling factors) and never listed by `tensor_names()`.
AUXILIARY_TENSORS: frozenset[str] = frozenset({"rope_freqs.weight"})


@dataclass(frozen=True)
class GGUFFamily:
    """How one GGUF architecture maps onto one transformers architecture."""

    architecture: str
    model_type: str
    tensors: Mapping[str, str]
    permute_qk: bool
    config_extra: Mapping[str, object] = field(default_factory=dict)


FAMILIES: dict[str, GGUFFamily] = {
    # llama.cpp writes Llama, Mistral (v0.1-v0.3), SmolLM, TinyLlama... as "llama" and permutes Q/K.
    "llama": GGUFFamily("LlamaForCausalLM", "llama", _DECODER_TENSORS, True, {"mlp_bias": False}),
    # Qwen2/Qwen3 converters do not permute (they use the neox rotary layout in llama.cpp).
    "qwen2": GGUFFamily("Qwen2ForCausalLM", "qwen2", _DECODER_TENSORS, False, {"use_sliding_window": False}),
    "qwen3": GGUFFamily(
        "Qwen3ForCausalLM", "qwen3", {**_DECODER_TENSORS, **_QK_NORM_TENSORS}, False, {"use_sliding_window": False}
    ),
}

# HF names whose rows llama.cpp permuted, and which head count the permutation used.
_PERMUTED = re.compile(r"\.self_attn\.(?P<proj>[qk])_proj\.(weight|bias)$")


def permuted_heads(hf_name: str, n_heads: int, n_kv_heads: int) -> int | None:
    """Head count of llama.cpp's Q/K row permutation for `hf_name`, or None if it is not permuted."""
    match = _PERMUTED.search(hf_name)
    if match is None:
        return None
    return n_heads if match["proj"] == "q" else n_kv_heads


def compile_tensor_map(family: GGUFFamily) -> list[tuple[re.Pattern[str], str]]:
    """Regexes matching GGUF names, each with its HF template (`{bid}` filled from the match)."""
    compiled = []
    for gguf_template, hf_template in family.tensors.items():
        pattern = re.escape(gguf_template).replace(r"\{bid\}", r"(?P<bid>\d+)")
        compiled.append((re.compile(f"^{pattern}$"), hf_template))
    return compiled


def hf_tensor_name(gguf_name: str, compiled: list[tuple[re.Pattern[str], str]]) -> str | None:
    """The HF name of a GGUF tensor, or None when the family table has no row for it."""
    for pattern, hf_template in compiled:
        match = pattern.match(gguf_name)
        if match is not None:
            return hf_template.format(**match.groupdict())
    return None
