"""genai_config.json: what onnxruntime-genai needs to run the model."""
from __future__ import annotations

import json
from pathlib import Path

from ..spec import ModelSpec

SEARCH_KEYS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "num_beams",
               "num_return_sequences", "length_penalty", "no_repeat_ngram_size", "diversity_penalty")


def unk_token_id(tokenizer_dir: Path) -> int | None:
    """The id of tokenizer.json's unknown token, if its model has one."""
    try:
        tok = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    model = tok.get("model") or {}
    if isinstance(model.get("unk_id"), int):  # Unigram
        return model["unk_id"]
    unk, vocab = model.get("unk_token"), model.get("vocab")
    if isinstance(unk, str) and isinstance(vocab, dict) and isinstance(vocab.get(unk), int):
        return vocab[unk]
    return None


def choose_pad(pad, eos, bos, unk, vocab_size: int) -> tuple[int | None, str | None]:
    """onnxruntime-genai takes a prompt's leading tokens equal to pad_token_id for left padding and drops
    them, so the pad id it is given must not be one a prompt can start with (bos, the unknown token).
    Returns (pad id, a note when it differs from the checkpoint's)."""
    first_eos = eos[0] if isinstance(eos, list) and eos else eos
    if pad is None:
        pad = first_eos
    taken = {t for t in (bos, unk) if t is not None}
    if pad is None or pad not in taken:
        return pad, None
    for candidate in (first_eos, vocab_size - 1, *range(vocab_size - 2, -1, -1)):
        if candidate is not None and candidate not in taken:
            why = "the unknown token" if pad == unk else "the bos token"
            return candidate, (f"pad_token_id {pad} is also {why}; onnxruntime-genai would drop it from the start of "
                               f"a prompt as padding, so genai_config.json pads with {candidate}")
    return pad, None


def genai_config(spec: ModelSpec, model_type: str, generation: dict | None, *, filename: str = "model.onnx",
                 provider: str = "cpu", max_length: int | None = None, unk: int | None = None,
                 notes: list[str] | None = None) -> dict:
    gen = generation or {}
    eos = gen.get("eos_token_id", spec.eos_token_id)
    bos = gen.get("bos_token_id", spec.bos_token_id)
    pad, note = choose_pad(gen.get("pad_token_id", spec.pad_token_id), eos, bos, unk, spec.vocab_size)
    if note and notes is not None:
        notes.append(note)
    a = spec.attention
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": _providers(provider)},
        "filename": filename,
        "head_size": a.head_dim,
        "hidden_size": spec.hidden_size,
        "inputs": {
            "input_ids": "input_ids",
            "attention_mask": "attention_mask",
            "past_key_names": "past_key_values.%d.key",
            "past_value_names": "past_key_values.%d.value",
        },
        "outputs": {
            "logits": "logits",
            "present_key_names": "present.%d.key",
            "present_value_names": "present.%d.value",
        },
        "num_attention_heads": a.num_heads,
        "num_hidden_layers": spec.num_layers,
        "num_key_value_heads": a.num_kv_heads,
    }
    search = {
        "diversity_penalty": 0.0,
        "do_sample": False,
        "early_stopping": True,
        "length_penalty": 1.0,
        "max_length": max_length or spec.context_length,
        "min_length": 0,
        "no_repeat_ngram_size": 0,
        "num_beams": 1,
        "num_return_sequences": 1,
        "past_present_share_buffer": True,
        "repetition_penalty": 1.0,
        "temperature": 1.0,
        "top_k": 50,
        "top_p": 1.0,
    }
    for key in SEARCH_KEYS:
        if gen.get(key) is not None:
            search[key] = gen[key]
    return {
        "model": {
            "bos_token_id": bos,
            "context_length": spec.context_length,
            "decoder": decoder,
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": model_type,
            "vocab_size": spec.vocab_size,
        },
        "search": search,
    }


def _providers(provider: str) -> list[dict]:
    if provider == "cpu":
        return []
    name = {"cuda": "cuda", "dml": "dml", "webgpu": "webgpu"}.get(provider, provider)
    return [{name: {}}]
