"""GGUF input for Gemma 4's text decoder (llama.cpp's gemma4), from files written by llama.cpp's own
convert_hf_to_gguf.py (tests/real_converter.py, the llama-cpp-python 0.3.36 sdist) from the tiny random
Gemma4ForCausalLM of tests/test_family_gemma4.py (sliding layers of head size 16 and 2 kv heads, full layers of 32
and 1 kv head with k = v, the proportional rotary at 0.25, layer scalars, final softcapping, a window of 8).

The converter writes each layer's kind as sliding_window_pattern, head_count_kv per layer, the sliding layers'
sizes as *_swa keys, layer_scalar as layer_output_scale, no attn_v where k is v, and the proportional rotary as a
rope_freqs tensor (1 for a rotated pair, 1e30 for the rest); sources/gguf_maps.py reads them back. Its vocabulary
is a SentencePiece BPE read from tokenizer.json (gguf's LlamaHfVocab): the tiny model gets one, trained by
sentencepiece and loaded by transformers' LlamaTokenizer, whose ids the GGUF build's tokenizer reproduces (after the
<bos> the file says to add). Every tensor equals transformers'; the fp32 build equals transformers within 1e-4 over
a 12-token prompt and 20 cached decode steps; onnxruntime-genai's greedy tokens equal transformers'; llama.cpp's
Q8_0 built as stored equals its own fp32 build. The MoE block (test_family_gemma4.MOE: 26B-A4B's form) and the
per-layer inputs with KV sharing and double-wide MLPs (test_family_gemma4.PLE: E2B / E4B's) pass the same checks.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from test_gguf_hybrid import as_stored_matches_fp32, fp32_build_matches, quantize, rewrite, stored_blocks_exact

from onnxforge.errors import ConfigError
from onnxforge.sources.gguf import GGUFSource

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from test_family_gemma4 import make_causal, tokens  # noqa: E402

_CACHE: dict = {}


def converted(tmp_path_factory, form: str = "dense"):
    """(transformers model, its tokenizer, F32 GGUF by llama.cpp's converter), once a session per form: "dense",
    "moe" (test_family_gemma4.MOE, the router's scale vectors spread), "ple" (test_family_gemma4.PLE: per-layer
    inputs, the last 2 layers sharing KV, their MLPs double-wide), "ple_v" (PLE with a v projection on the full
    layers, attention_k_eq_v off, as E2B / E4B have it: the shared full layer has none)."""
    if form not in _CACHE:
        from real_converter import real_convert, sentencepiece_tokenizer
        from test_family_gemma4 import MOE, PLE, _router_scales
        from tiny import VOCAB

        folder = tmp_path_factory.mktemp(f"gguf-gemma4-{form}")
        ple_v = {**PLE, "attention_k_eq_v": False, "num_global_key_value_heads": None}
        model = make_causal(folder / "hf", **{"moe": MOE, "ple": PLE, "ple_v": ple_v}.get(form, {}))
        if form == "moe":
            _router_scales(model)
            model.save_pretrained(folder / "hf", safe_serialization=True)
        sentencepiece_tokenizer(folder / "hf", VOCAB)
        (folder / "spm").mkdir()
        shutil.move(folder / "hf" / "tokenizer.model", folder / "spm" / "tokenizer.model")
        tok = transformers.LlamaTokenizer.from_pretrained(folder / "spm", add_prefix_space=False, legacy=False)
        tok.save_pretrained(folder / "hf")  # tokenizer.json: BPE with byte fallback, as LlamaHfVocab reads
        _CACHE[form] = model, tok, real_convert(folder / "hf", folder / "F32.gguf", "f32")
    return _CACHE[form]


def test_gemma4_gguf_fp32_and_genai(tmp_path_factory, tmp_path):
    from tiny import TEXT

    model, tok, path = converted(tmp_path_factory)
    with GGUFSource(path) as source:
        cfg = source.config
        assert cfg["architectures"] == ["Gemma4ForCausalLM"] and cfg["attention_k_eq_v"] is True
        assert (cfg["head_dim"], cfg["global_head_dim"], cfg["num_key_value_heads"],
                cfg["num_global_key_value_heads"]) == (16, 32, 2, 1)
        assert cfg["rope_parameters"]["full_attention"]["partial_rotary_factor"] == 0.25
        assert cfg["layer_types"] == model.config.layer_types
        state = {k: v.detach().numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
        assert sorted(source.tensor_names()) == sorted(state)
        for name in source.tensor_names():
            np.testing.assert_array_equal(source.read(name), state[name], err_msg=name)
    out = tmp_path / "out"
    fp32_build_matches(path, out, model, "Gemma4ForCausalLM", tokens=tokens, label="gemma4")
    built = transformers.PreTrainedTokenizerFast.from_pretrained(out)
    for text in (TEXT[:400], " a leading space", "two\nlines  and spaces"):  # the file adds <bos>; the source, not
        assert built(text)["input_ids"] == [1, *tok(text)["input_ids"]], text


def test_gemma4_gguf_q8_0_as_stored(tmp_path_factory, tmp_path):
    _, _, f32 = converted(tmp_path_factory)
    path = quantize(f32, "Q8_0")
    report = as_stored_matches_fp32(path, tmp_path, tokens=tokens, label="gemma4 Q8_0")
    storage = {g["label"]: g["storage"] for g in report["groups"]}
    assert storage["/model/layers.1/attn/qkv_proj"].endswith("(exact Q8_0)"), storage
    assert all(kind.startswith("fp32") or "(exact Q8_0)" in kind for kind in storage.values()), storage


FORMS = {"moe": {"enable_moe_block": True, "num_experts": 4, "top_k_experts": 2, "moe_intermediate_size": 32},
         "ple": {"hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": 320, "num_kv_shared_layers": 2,
                 "use_double_wide_mlp": True, "intermediate_size": 96},
         "ple_v": {"num_kv_shared_layers": 2, "attention_k_eq_v": False, "num_key_value_heads": 2}}


@pytest.mark.parametrize("form", FORMS)
def test_gemma4_forms_gguf_fp32_and_genai(tmp_path_factory, tmp_path, form):
    """The MoE block (26B-A4B's form) as the converter writes it: expert_count / expert_used_count /
    expert_feed_forward_length, ffn_gate_up_exps and ffn_down_exps stacked as transformers stacks them (E, 2I, H)
    and (E, H, I), the router as ffn_gate_inp with its scale vectors as ffn_gate_inp.scale and ffn_down_exps.scale,
    the extra norms as post_ffw_norm_1 / pre_ffw_norm_2 / post_ffw_norm_2. E2B / E4B's form:
    embedding_length_per_layer_input, per_layer_token_embd (its rows: vocab_size_per_layer_input),
    per_layer_model_proj, per_layer_proj_norm, per layer inp_gate / proj / post_norm; attention.shared_kv_layers
    (the shared layers have no attn_k / attn_v), feed_forward_length per layer (twice on the shared layers:
    use_double_wide_mlp); with attention_k_eq_v off too (the shared full layer has no attn_v, the others have).
    Each: the config says what transformers' does, every tensor equals transformers', the
    fp32 build equals transformers within 1e-4 over 20 cached decode steps, genai's greedy tokens equal."""
    model, _, path = converted(tmp_path_factory, form)
    with GGUFSource(path) as source:
        cfg = source.config
        assert {k: cfg[k] for k in FORMS[form]} == FORMS[form] == {k: getattr(model.config, k) for k in FORMS[form]}
        state = {k: v.detach().numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
        assert sorted(source.tensor_names()) == sorted(state)
        for name in source.tensor_names():
            np.testing.assert_array_equal(source.read(name), state[name], err_msg=name)
    fp32_build_matches(path, tmp_path / "out", model, "Gemma4ForCausalLM", tokens=tokens, label=f"gemma4 {form}")


@pytest.mark.parametrize("form", FORMS)
def test_gemma4_forms_gguf_q8_0_as_stored(tmp_path_factory, tmp_path, form):
    """llama.cpp's Q8_0 of each file, built as stored: every non-expert weight with a block form is the file's
    blocks as they are (the graph's MatMulNBits of them equals gguf-py's dequantization bit for bit); the logits
    equal the fp32 build of the same file over the prompt and 20 cached decode steps."""
    _, _, f32 = converted(tmp_path_factory, form)
    path = quantize(f32, "Q8_0")
    with GGUFSource(path) as source:
        exact, _ = stored_blocks_exact(source, "Q8_0")
    want = {f"model.layers.{i}.{p}.weight" for i in range(4)
            for p in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    want |= {"model.embed_tokens.weight", "model.layers.0.self_attn.k_proj.weight"}
    assert want <= exact, sorted(want - exact)
    report = as_stored_matches_fp32(path, tmp_path, tokens=tokens,
                                    label=f"gemma4 {form} Q8_0 ({len(exact)} weights' blocks exact)")
    storage = {g["label"]: g["storage"] for g in report["groups"]}
    assert storage["/model/layers.1/attn/qkv_proj"].endswith("(exact Q8_0)"), storage
    assert all(kind.startswith("fp32") or "(exact Q8_0)" in kind for kind in storage.values()), storage


@pytest.mark.parametrize("key,value,vtype", [("feed_forward_length", [96, 96, 192, 96], "ARRAY"),
                                             ("attention.shared_kv_layers", 4, "UINT32")])
def test_gemma4_gguf_inconsistent_sharing_is_refused(tmp_path_factory, tmp_path, key, value, vtype):
    """MLP sizes per layer that are neither one size nor twice it on the KV-sharing layers (Gemma4TextConfig's
    use_double_wide_mlp), or every layer sharing KV: one ConfigError naming the key, before a weight is read (the
    E2B-form file rewritten by gguf-py)."""
    import gguf

    _, _, path = converted(tmp_path_factory, "ple")
    bad = rewrite(path, tmp_path / "bad.gguf", **{f"gemma4.{key}": (value, getattr(gguf.GGUFValueType, vtype))})
    with pytest.raises(ConfigError, match=key):
        GGUFSource(bad)
