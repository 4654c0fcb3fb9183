"""genai_config.json: what onnxruntime-genai needs to run the model."""
from __future__ import annotations

import json
from pathlib import Path

from ..graph.kinds import genai_layer_keys, genai_state_names
from ..spec import ModelSpec

SEARCH_KEYS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "num_beams",
               "num_return_sequences", "length_penalty", "no_repeat_ngram_size", "diversity_penalty")


def tokenizer_ids(tokenizer_dir: Path) -> tuple[int | None, int | None]:
    """(id of tokenizer.json's unknown token or None, one past the largest id it can emit or None)."""
    try:
        tok = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, None
    model = tok.get("model") or {}
    vocab = model.get("vocab")
    ids = [i for i in (vocab.values() if isinstance(vocab, dict) else range(len(vocab or []))) if isinstance(i, int)]
    ids += [t["id"] for t in tok.get("added_tokens") or [] if isinstance(t, dict) and isinstance(t.get("id"), int)]
    unk = model.get("unk_id") if isinstance(model.get("unk_id"), int) else None  # Unigram
    name = model.get("unk_token")
    if unk is None and isinstance(name, str) and isinstance(vocab, dict) and isinstance(vocab.get(name), int):
        unk = vocab[name]
    return unk, (max(ids) + 1 if ids else None)


def choose_pad(pad, eos, bos, unk, vocab_size: int, emitted: int | None = None) -> tuple[int | None, str | None]:
    """The pad_token_id for genai_config.json, and a note when it is not the checkpoint's.

    onnxruntime-genai takes tokens equal to pad_token_id at the end of a prompt for right padding: it
    answers from the last token before them (measured with onnxruntime-genai 0.18: the prompt [5, 7, 9, 11, 0]
    with pad 0 continues exactly like [5, 7, 9, 11]). A pad id that is also the unknown token (any unknown
    word at the end of a prompt) or the bos token (an empty prompt) therefore changes what the model
    answers. Such a pad is replaced by an id the tokenizer never emits (`emitted`: one past its largest
    id), else by eos, else by the last id that is neither."""
    first_eos = eos[0] if isinstance(eos, list) and eos else eos
    if pad is None:
        pad = first_eos
    taken = {t for t in (bos, unk) if t is not None}
    if pad is None or pad not in taken:
        return pad, None
    unused = vocab_size - 1 if emitted is not None and emitted < vocab_size else None
    for candidate in (unused, first_eos, *range(vocab_size - 1, -1, -1)):
        if candidate is not None and candidate not in taken:
            why = "the unknown token" if pad == unk else "the bos token"
            what = "an id the tokenizer never emits" if candidate == unused else (
                "the eos token" if candidate == first_eos else "an id that is neither")
            return candidate, (f"pad_token_id {pad} is also {why}; onnxruntime-genai would take it at the end of a prompt "
                               f"for padding and answer from the token before it, so genai_config.json pads with "
                               f"{candidate} ({what})")
    return pad, None


def genai_config(spec: ModelSpec, model_type: str, generation: dict | None, *, filename: str = "model.onnx",
                 provider: str = "cpu", max_length: int | None = None, tokenizer_dir: Path | None = None,
                 notes: list[str] | None = None, embeds_input: bool = False, logits_output: bool = True,
                 graph_capture: dict[str, bool] | None = None, share_buffer: bool = True,
                 tf32: bool = True) -> dict:
    """`embeds_input`/`logits_output`: the decoder takes inputs_embeds instead of input_ids (exclude_embeds), and
    outputs logits (not with exclude_lm_head); as onnxruntime-genai 0.18's builder, a hidden_states output gets
    no entry. `graph_capture`: {"enable_cuda_graph": ..., "enable_dml_graph": ...} (the recipe's). `share_buffer`:
    search.past_present_share_buffer (the KV cache allocated at max_length once, present written into past).
    `tf32` False: the CUDA provider's use_tf32 "0" (fp32 MatMuls in fp32, not TF32's 10-bit mantissa)."""
    gen = generation or {}
    eos = gen.get("eos_token_id", spec.eos_token_id)
    bos = gen.get("bos_token_id", spec.bos_token_id)
    unk, emitted = tokenizer_ids(tokenizer_dir) if tokenizer_dir is not None else (None, None)
    pad, note = choose_pad(gen.get("pad_token_id", spec.pad_token_id), eos, bos, unk, spec.vocab_size, emitted)
    if note and notes is not None:
        notes.append(note)
    a = spec.attention
    states_in, states_out = genai_state_names(spec)  # from the layers' mixers' state declarations (graph/kinds.py)
    decoder = {
        # intra_op_num_threads 0: ONNX Runtime's own default, one thread per physical core. Without the key
        # onnxruntime-genai 0.18 runs the model on one thread (measured: SmolLM2 int4 decode 95 tok/s on one
        # thread, 217 with both of this machine's cores).
        "session_options": {"log_id": "onnxruntime-genai", "intra_op_num_threads": 0,
                            "provider_options": _providers(provider, graph_capture or {}, tf32)},
        "filename": filename,
        "head_size": a.head_dim,
        "hidden_size": spec.hidden_size,
        "inputs": {
            **({"inputs_embeds": "inputs_embeds"} if embeds_input else {"input_ids": "input_ids"}),
            "attention_mask": "attention_mask",
            **states_in,
        },
        "outputs": {
            **({"logits": "logits"} if logits_output else {}),
            **states_out,
        },
        "num_attention_heads": a.num_heads,
        "num_hidden_layers": spec.num_layers,
        "num_key_value_heads": a.num_kv_heads,
        **genai_layer_keys(spec),  # layer_types and the like, where a layer is not attention
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
        "past_present_share_buffer": share_buffer,
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


def _providers(provider: str, graph: dict[str, bool], tf32: bool = True) -> list[dict]:
    """The provider options onnxruntime-genai 0.18's builder writes for each -e (builders/base.py ep_attrs), and
    use_tf32 "0" where `tf32` is False (the builder never writes it: onnxruntime's CUDA default is TF32 on)."""
    on = lambda key, default: "1" if graph.get(key, default) else "0"  # noqa: E731
    options = {
        "cuda": {"enable_cuda_graph": on("enable_cuda_graph", False), **({} if tf32 else {"use_tf32": "0"})},
        "dml": {"enable_graph_capture": on("enable_dml_graph", True)},
        "webgpu": {"enableGraphCapture": "0", "validationMode": "basic"},  # enable_webgpu_graph is refused
    }
    return [] if provider == "cpu" else [{provider: options[provider]}]
