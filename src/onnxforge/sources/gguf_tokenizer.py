"""Rebuild a Hugging Face `tokenizer.json` from a GGUF file's tokenizer metadata.

A GGUF carries the vocabulary (`tokenizer.ggml.tokens`, `token_type`, `scores`, `merges`), the
special-token ids and the chat template, but no pipeline. Two vocabulary kinds are supported:

* `gpt2`  -- byte-level BPE with merges. The split regexes come from `tokenizer.ggml.pre` the way
  llama.cpp (the GGUF reference runtime) applies them; the structures mirror the tokenizer.json the
  original HF repos ship (SmolLM: Digits + ByteLevel, Llama 3 / Qwen2: Split + ByteLevel).
* `llama` -- SentencePiece BPE with scores and byte fallback. Merges are recovered from the scores
  exactly like transformers' `generate_merges`, and the pipeline is transformers' `LlamaTokenizer`.

Only the `tokenizers` library is used: building never imports torch or transformers.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from ..errors import CheckpointError

log = logging.getLogger(__name__)

# llama.cpp token types (gguf.TokenType)
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4

_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_RE = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_RE = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class PreTokenizerSpec:
    """How llama.cpp splits text before byte-level BPE for one `tokenizer.ggml.pre` value."""

    splits: tuple[str, ...] = ()  # Split(isolated) stages, in order
    individual_digits: bool = False  # a Digits(individual) stage first (llama.cpp's "\p{N}" stage)
    gpt2_regex: bool = True  # ByteLevel applies the GPT-2 regex itself (no explicit Split)
    ignore_merges: bool = False  # a pre-token found whole in the vocab is emitted as is
    add_bos: bool = False  # llama.cpp's default when the file has no add_bos_token


_GPT2 = PreTokenizerSpec()
_DIGITS_GPT2 = PreTokenizerSpec(individual_digits=True)
_LLAMA3 = PreTokenizerSpec((_LLAMA3_RE,), gpt2_regex=False, ignore_merges=True, add_bos=True)
_LLAMA3_MERGING = PreTokenizerSpec((_LLAMA3_RE,), gpt2_regex=False)
_QWEN2 = PreTokenizerSpec((_QWEN2_RE,), gpt2_regex=False)
_GPT4O = PreTokenizerSpec((_GPT4O_RE,), gpt2_regex=False)
_TEKKEN = PreTokenizerSpec((_TEKKEN_RE,), gpt2_regex=False, ignore_merges=True, add_bos=True)
_FALCON = PreTokenizerSpec((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2_RE, r"[0-9][0-9][0-9]"), gpt2_regex=False)
# llama.cpp's fallback for "default" and for any name it does not know.
_DEFAULT = PreTokenizerSpec(
    (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_RE, r"\p{N}+", r"[0-9][0-9][0-9]"), gpt2_regex=False
)

# `tokenizer.ggml.pre` -> split spec, grouped as in llama.cpp's llama-vocab.cpp.
PRE_TOKENIZERS: dict[str, PreTokenizerSpec] = {
    "default": _DEFAULT,
    "falcon": _FALCON,
    **dict.fromkeys(
        ("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0", "mellum",
         "jina-v1-en", "jina-v2-code", "roberta-bpe", "exaone4", "mpt", "olmo", "jais", "trillion",
         "granite-docling"),
        _GPT2,
    ),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"), _DIGITS_GPT2),
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"), _LLAMA3
    ),
    **dict.fromkeys(("dbrx", "smaug-bpe"), _LLAMA3_MERGING),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "megrez", "stablelm2", "hunyuan"), _QWEN2),
    **dict.fromkeys(("gpt-4o", "llama4", "minimax-m2"), _GPT4O),
    "tekken": _TEKKEN,
}

SUPPORTED_MODELS = ("gpt2", "llama", "gemma4")  # gemma4: SentencePiece BPE with its merges, as llama


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used to spell byte-level tokens."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def build_tokenizer(meta: Mapping[str, Any], model_max_length: int | None) -> tuple[Tokenizer, dict, dict]:
    """The tokenizer, tokenizer_config.json dict and special_tokens_map.json dict for this metadata.

    `meta` maps full GGUF keys (`tokenizer.ggml.tokens`, ...) to their values.
    """
    kind = meta.get("tokenizer.ggml.model")
    if kind not in SUPPORTED_MODELS:
        raise CheckpointError(
            f"GGUF tokenizer model {kind!r} is not supported (supported: {', '.join(SUPPORTED_MODELS)}); "
            "convert from the original Hugging Face folder instead, which ships tokenizer.json."
        )
    tokens = list(meta.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise CheckpointError("the GGUF file has no tokenizer.ggml.tokens; it cannot provide a tokenizer.")
    token_types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    if kind == "gpt2":
        tokenizer, add_bos = _byte_level(meta, tokens, token_types)
    else:
        tokenizer, add_bos = _sentencepiece(meta, tokens, token_types)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    special = _special_tokens(meta, tokens)
    add_bos, add_eos = add_bos and "bos_token" in special, add_eos and "eos_token" in special
    tokenizer.post_processor = _post_processor(special, meta, add_bos, add_eos)
    config = _tokenizer_config(meta, special, add_bos, add_eos, model_max_length, kind)
    return tokenizer, config, dict(special)


def _byte_level(meta: Mapping[str, Any], tokens: list[str], token_types: list[int]) -> tuple[Tokenizer, bool]:
    """Byte-level BPE (`tokenizer.ggml.model == "gpt2"`); returns it and llama.cpp's default add_bos."""
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8")): index
        for index, token in enumerate(tokens)
    }
    merges = [tuple(merge.split(" ", 1)) for merge in meta.get("tokenizer.ggml.merges") or []]
    pre = meta.get("tokenizer.ggml.pre") or "default"
    spec = PRE_TOKENIZERS.get(pre)
    if spec is None:
        log.warning("unknown tokenizer.ggml.pre %r: using llama.cpp's 'default' split", pre)
        spec = _DEFAULT
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=spec.ignore_merges))
    tokenizer.pre_tokenizer = _byte_level_pre_tokenizer(spec)
    tokenizer.decoder = decoders.ByteLevel()
    control = [
        AddedToken(token, normalized=False, special=True)
        for token, kind in zip(tokens, token_types)
        if kind == _CONTROL and set(token) <= alphabet
    ]
    user = [
        AddedToken(token, normalized=False, special=False)
        for token, kind in zip(tokens, token_types)
        if kind == _USER_DEFINED and token in vocab
    ]
    _add_tokens(tokenizer, control, user)
    return tokenizer, spec.add_bos


def _byte_level_pre_tokenizer(spec: PreTokenizerSpec) -> pre_tokenizers.PreTokenizer:
    """The pre-tokenizer sequence for one llama.cpp split spec."""
    steps: list[pre_tokenizers.PreTokenizer] = []
    if spec.individual_digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    steps += [pre_tokenizers.Split(Regex(pattern), behavior="isolated") for pattern in spec.splits]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=spec.gpt2_regex)
    return pre_tokenizers.Sequence([*steps, byte_level]) if steps else byte_level


def _sentencepiece(meta: Mapping[str, Any], tokens: list[str], token_types: list[int]) -> tuple[Tokenizer, bool]:
    """SentencePiece BPE (`tokenizer.ggml.model == "llama"`) with byte fallback."""
    vocab = {token: index for index, token in enumerate(tokens)}
    if meta.get("tokenizer.ggml.merges"):
        merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]
    else:
        scores = list(meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
        merges = generate_merges(vocab, dict(zip(tokens, scores)))
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    control = [
        AddedToken(token, normalized=False, special=True)
        for token, kind in zip(tokens, token_types)
        if kind in (_CONTROL, _UNKNOWN)
    ]
    user = [
        AddedToken(token, normalized=False, special=False)
        for token, kind in zip(tokens, token_types)
        if kind == _USER_DEFINED
    ]
    _add_tokens(tokenizer, control, user)
    return tokenizer, True


def generate_merges(vocab: Mapping[str, int], scores: Mapping[str, float]) -> list[tuple[str, str]]:
    """Merges implied by a scored vocabulary, ordered like transformers' `generate_merges`.

    Every split of a token into two vocabulary pieces is a merge ranked by the token's score
    (higher first), ties broken by longer left then longer right piece.
    """
    ranked = []
    for token, score in scores.items():
        local = [
            (token[:i], token[i:], score)
            for i in range(1, len(token))
            if token[:i] in vocab and token[i:] in vocab
        ]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        ranked.extend(local)
    ranked.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in ranked]


def _add_tokens(tokenizer: Tokenizer, special: list[AddedToken], plain: list[AddedToken]) -> None:
    """Register added tokens so they are matched whole (they keep their vocabulary ids)."""
    if special:
        tokenizer.add_special_tokens(special)
    if plain:
        tokenizer.add_tokens(plain)


def _special_tokens(meta: Mapping[str, Any], tokens: list[str]) -> dict[str, str]:
    """bos/eos/unk/pad token strings named by the GGUF ids (only those present and in range)."""
    keys = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
            "pad_token": "padding_token_id"}
    special = {}
    for name, key in keys.items():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if token_id is not None and 0 <= int(token_id) < len(tokens):
            special[name] = tokens[int(token_id)]
    return special


def _post_processor(special: Mapping[str, str], meta: Mapping[str, Any], add_bos: bool,
                    add_eos: bool) -> processors.TemplateProcessing:
    """TemplateProcessing adding BOS/EOS as the file asks (what transformers rebuilds on load)."""
    bos, eos = special.get("bos_token"), special.get("eos_token")

    def sequence(piece: str, type_id: int) -> list[str]:
        return [f"{bos}:{type_id}"] * add_bos + [f"{piece}:{type_id}"] + [f"{eos}:{type_id}"] * add_eos

    single, pair = sequence("$A", 0), sequence("$A", 0) + sequence("$B", 1)
    ids: dict[str, int] = {}
    if add_bos:
        ids[bos] = int(meta["tokenizer.ggml.bos_token_id"])
    if add_eos:
        ids[eos] = int(meta["tokenizer.ggml.eos_token_id"])
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(ids.items()))


def _tokenizer_config(meta: Mapping[str, Any], special: Mapping[str, str], add_bos: bool, add_eos: bool,
                      model_max_length: int | None, kind: str) -> dict:
    """tokenizer_config.json: loadable by transformers (PreTrainedTokenizerFast) and onnxruntime-genai."""
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        **special,
    }
    if kind in ("llama", "gemma4"):
        config["add_prefix_space"] = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        config["legacy"] = False
    if model_max_length:
        config["model_max_length"] = int(model_max_length)
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    return config
