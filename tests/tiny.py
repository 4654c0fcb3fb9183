"""Tiny random Hugging Face checkpoints, made at test time with transformers and a fixed seed."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

VOCAB = 320
TEXT = (
    "The quick brown fox jumps over the lazy dog. onnxforge streams weights into ONNX models; "
    "numbers 0123456789 and punctuation !?,.;: keep the tokenizer honest. " * 8
)

FAMILIES = {
    # kv heads fewer than heads everywhere; llama uses head_dim 48 (not a power of two)
    "llama": dict(cls="LlamaConfig", hidden_size=96, num_attention_heads=2, num_key_value_heads=1, head_dim=48,
                  intermediate_size=160, num_hidden_layers=2),
    "llama_tied": dict(cls="LlamaConfig", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=128, num_hidden_layers=2, tie_word_embeddings=True),
    "mistral": dict(cls="MistralConfig", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=128, num_hidden_layers=2, sliding_window=8),
    "qwen2": dict(cls="Qwen2Config", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, num_hidden_layers=3, tie_word_embeddings=False),
    "qwen3": dict(cls="Qwen3Config", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  intermediate_size=128, num_hidden_layers=2, tie_word_embeddings=False),
}


def tokenizer_files(folder: Path) -> None:
    """A small byte-level BPE tokenizer trained on TEXT, saved like transformers does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>", "<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "<|endoftext|>",
        "model_max_length": 256, "add_bos_token": False,
    }))


def make_model(family: str, folder: Path, dtype: str = "float32", seed: int = 0, max_shard_size: str | None = None,
               **overrides):
    """Save a tiny random model of `family` into `folder`; returns the transformers model (fp32, eval)."""
    import torch
    import transformers

    params = dict(FAMILIES[family])
    cls = getattr(transformers, params.pop("cls"))
    params.update(vocab_size=VOCAB, max_position_embeddings=256, bos_token_id=1, eos_token_id=0, pad_token_id=0)
    params.update(overrides)
    config = cls(**params)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random init is small; spread weights so errors would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif p.ndim == 1:
                p.normal_(0, 0.1)
            else:
                p.normal_(0, 0.5 / p.shape[-1] ** 0.5 * 4)
    folder.mkdir(parents=True, exist_ok=True)
    save_dtype = getattr(torch, dtype)
    saved = model.to(save_dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    saved.save_pretrained(folder, safe_serialization=True, **kwargs)
    model = model.float()
    if dtype != "float32":  # the reference sees exactly the rounded weights
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer_files(folder)
    return model
