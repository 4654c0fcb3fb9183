"""Tiny random Hugging Face checkpoints, made at test time with transformers and a fixed seed."""
from __future__ import annotations

import json
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


def spread_weights(model) -> None:
    """Random init is small; spread the weights so that errors would show."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif p.ndim == 1:
                p.normal_(0, 0.1)
            else:
                p.normal_(0, 0.5 / p.shape[-1] ** 0.5 * 4)


def make_model(family: str, folder: Path, dtype: str = "float32", seed: int = 0, max_shard_size: str | None = None,
               **overrides):
    """Save a tiny random model of `family` into `folder`; returns the transformers model (fp32, eval)."""
    import torch
    import transformers

    params = dict(FAMILIES.get(family, {}))  # a family not listed passes cls= and its config in overrides
    params.update({k: overrides.pop(k) for k in ("cls",) if k in overrides})
    cls = getattr(transformers, params.pop("cls"))
    params.update(vocab_size=VOCAB, max_position_embeddings=256, bos_token_id=1, eos_token_id=0, pad_token_id=0)
    params.update(overrides)
    config = cls(**params)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    spread_weights(model)
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


def llama_shapes(*, hidden: int, heads: int, kv_heads: int, layers: int, vocab: int, inter: int) -> dict:
    """Hugging Face tensor names and shapes of an untied Llama."""
    hd = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (heads * hd, hidden), p + "self_attn.k_proj.weight": (kv_heads * hd, hidden),
            p + "self_attn.v_proj.weight": (kv_heads * hd, hidden), p + "self_attn.o_proj.weight": (hidden, heads * hd),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        })
    return shapes


def llama_config(*, hidden: int, heads: int, kv_heads: int, layers: int, vocab: int, inter: int,
                 context: int = 2048) -> dict:
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=hidden,
                num_attention_heads=heads, num_key_value_heads=kv_heads, num_hidden_layers=layers, vocab_size=vocab,
                intermediate_size=inter, max_position_embeddings=context, rms_norm_eps=1e-6, rope_theta=10000.0,
                tie_word_embeddings=False, bos_token_id=1, eos_token_id=0, hidden_act="silu")


def write_random_llama(folder: Path, *, hidden=64, heads=4, kv_heads=2, layers=2, vocab=VOCAB, inter=128, seed=0,
                       scale=0.2, norm_offset=1.0, context=2048, tokenizer=True) -> Path:
    """A random Llama checkpoint written with numpy + safetensors only (no torch)."""
    import numpy as np
    from safetensors.numpy import save_file

    dims = dict(hidden=hidden, heads=heads, kv_heads=kv_heads, layers=layers, vocab=vocab, inter=inter)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {k: (rng.standard_normal(s) * scale + (norm_offset if len(s) == 1 else 0.0)).astype(np.float32)
               for k, s in llama_shapes(**dims).items()}
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(llama_config(**dims, context=context), indent=2))
    if tokenizer:
        tokenizer_files(folder)
    return folder
