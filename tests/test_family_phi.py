"""phi-2 (PhiForCausalLM) and Phi-3 / Phi-4-mini (Phi3ForCausalLM): fp32, int4, fp16, LongRoPE and GGUF.

Tiny models exercise every quirk: phi-2's parallel block on one LayerNorm with bias, partial rotary
0.4 of a head of 80 (rotary 32), gelu_new, biases on q/k/v/dense/fc1/fc2 and the lm_head, one KV
head, the optional per-head q/k LayerNorm; Phi-3's fused qkv_proj / gate_up_proj, a sliding window
(6) shorter than the 24-token test sequence, an odd intermediate size; Phi-4-mini's partial rotary
0.75 (rotary 48 of 64), LongRoPE short/long factors and tied embeddings. The LongRoPE test crosses
original_max_position_embeddings during a cached decode.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import genai_greedy, onnx_step_logits, prompt_and_decode, reference_greedy, reference_logits
from family_check import check_fp16, check_fp32, check_int4

import onnxforge
from onnxforge.archs.registry import architecture_for
from onnxforge.verify.ort_runner import OrtDecoder

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def longrope(half: int, original: int) -> dict:
    return {"rope_type": "longrope", "rope_theta": 10_000.0, "original_max_position_embeddings": original,
            "short_factor": [1.0 + 0.1 * i for i in range(half)], "long_factor": [2.0 + 0.3 * i for i in range(half)]}


PHI2 = dict(cls="PhiConfig", hidden_size=160, num_attention_heads=2, num_key_value_heads=1, intermediate_size=97,
            num_hidden_layers=2, partial_rotary_factor=0.4)  # head 80, rotary 32
PHI4_MINI = dict(cls="Phi3Config", hidden_size=128, num_attention_heads=2, num_key_value_heads=1, intermediate_size=97,
                 num_hidden_layers=2, partial_rotary_factor=0.75, tie_word_embeddings=True,  # head 64, rotary 48
                 original_max_position_embeddings=64, rope_scaling=longrope(24, 64))
CONFIGS = {
    "phi2": PHI2,
    "phi2_qk_layernorm": {**PHI2, "hidden_size": 64, "num_key_value_heads": 2, "partial_rotary_factor": 0.5,
                          "qk_layernorm": True},
    "phi3": dict(cls="Phi3Config", hidden_size=64, num_attention_heads=2, num_key_value_heads=1, intermediate_size=97,
                 num_hidden_layers=2, sliding_window=6),
    "phi4_mini": PHI4_MINI,
}


@pytest.fixture(scope="module")
def phi(tmp_path_factory):
    """name -> (checkpoint folder, transformers model), made once per module."""
    from tiny import make_model

    cache: dict = {}

    def get(name: str, **config):
        if name not in cache:
            folder = tmp_path_factory.mktemp(name)
            cache[name] = (folder, make_model(name, folder, **(config or CONFIGS[name])))
        return cache[name]

    return get


def _graph(out):
    return onnx.load(str(out / "model.onnx"), load_external_data=False).graph


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fp32(phi, tmp_path, name):
    folder, model = phi(name)
    out = tmp_path / "out"
    check_fp32(folder, model, out)
    g = _graph(out)
    gqa = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in g.node
           if n.op_type == "GroupQueryAttention"]
    window = getattr(model.config, "sliding_window", None) or -1
    assert [a["local_window_size"] for a in gqa] == [window] * model.config.num_hidden_layers
    shapes = {t.name: tuple(t.dims) for t in g.initializer}
    head = model.config.hidden_size // model.config.num_attention_heads
    rotary = int(head * model.config.rope_parameters["partial_rotary_factor"])
    assert shapes["cos_cache"] == (model.config.max_position_embeddings, rotary // 2)  # partial rotary in GQA
    assert ("cos_cache_long" in shapes) == (name == "phi4_mini")
    ops = {n.op_type for n in g.node}
    if name.startswith("phi2"):
        assert "SkipLayerNormalization" in ops and "LayerNormalization" in ops and "FastGelu" in ops
        assert {n.name for n in g.node} >= {"/lm_head/Add", "/model/layers.0/parallel/Add"}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_int4(phi, tmp_path, name):
    folder, model = phi(name)
    out = tmp_path / "out"
    check_int4(folder, out)  # loads its own copy: the reference is dequantized in place
    nodes = {n.name: n.op_type for n in _graph(out).node}
    for node in ("/model/layers.0/attn/qkv_proj/MatMul", "/lm_head/MatMul"):  # the anchor's names
        assert nodes[node] == "MatMulNBits"
    assert nodes["/model/layers.0/mlp/" + ("up_proj" if name.startswith("phi2") else "gate_up_proj") + "/MatMul"] \
        == "MatMulNBits"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fp16(phi, tmp_path, name):
    folder, model = phi(name)
    check_fp16(folder, model, tmp_path / "out")


def test_partial_rotary_gqa_cannot_take_is_applied_before_it(phi, tmp_path):
    """GroupQueryAttention wants cos/sin caches with a multiple of 8 columns (rotary_dim % 16 == 0): rotary 24
    goes through RotaryEmbedding on q and k before it (graph/parts.py), and matches transformers."""
    folder, model = phi("phi2_rotary24", **{**PHI2, "hidden_size": 64, "partial_rotary_factor": 0.75})
    check_fp32(folder, model, tmp_path / "out")
    assert sum(n.op_type == "RotaryEmbedding" for n in _graph(tmp_path / "out").node) == 4


# -- LongRoPE across original_max_position_embeddings -------------------------------------------------
def _cached_reference(model, prompt: list[int], decode: list[int]) -> list[np.ndarray]:
    """transformers step by step with its KV cache: each forward picks short or long factors from its
    own newest position, and the cache keeps keys as they were rotated (what the ONNX model does)."""
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        steps = [out.logits[0].numpy()]
        for t in decode:
            out = model(torch.tensor([[t]]), past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits[0].numpy())
    return steps


def test_longrope_switches_at_the_original_length(phi, tmp_path):
    original = 32
    folder, model = phi("phi3_longrope", **{**PHI4_MINI, "max_position_embeddings": 128,
                                            "original_max_position_embeddings": original,
                                            "rope_scaling": longrope(24, original)})
    out = tmp_path / "out"
    onnxforge.build(folder, out, "fp32")
    ids = np.random.default_rng(3).integers(2, 320, 44).tolist()
    dec = OrtDecoder(out)
    # a prefill longer than the original length: long factors for every position, as transformers
    dec.reset()
    assert np.abs(dec.step(np.array([ids]))[0] - reference_logits(model, ids)).max() < 1e-4
    # prompt 16, then 28 cached decode steps: lengths 17..44 cross 32
    prompt, decode = ids[:16], ids[16:]
    got = dec.logits_for(prompt, decode)
    cached = _cached_reference(model, prompt, decode)
    assert max(np.abs(g - r).max() for g, r in zip(got, cached)) < 1e-4
    whole = reference_logits(model, ids[:original])  # one forward of 32 tokens: short factors throughout
    short_steps = np.concatenate(got[:original - len(prompt) + 1])
    assert np.abs(short_steps - whole).max() < 1e-4
    # past the switch, keys cached before it stay short-rotated, so a cached decode is not a full
    # re-run (transformers' generate() drops its cache once, at the switch); the tables differ
    last_full = reference_logits(model, ids)[-1]
    assert np.abs(got[-1][-1] - last_full).max() > 1e-3


# -- config.json spellings ----------------------------------------------------------------------------
def _phi3_config(**kw) -> dict:
    base = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "vocab_size": 320, "hidden_size": 128,
            "num_attention_heads": 2, "num_hidden_layers": 2, "intermediate_size": 97, "max_position_embeddings": 256,
            "original_max_position_embeddings": 64, "partial_rotary_factor": 0.75}
    return {**base, **kw}


def test_phi3_legacy_rope_types_are_longrope():
    """Phi3Config reads rope types "su" and "yarn" as LongRoPE, and the top-level original length wins
    over the one in rope_scaling (transformers 5.23 reads "yarn" so; its "su" fails validation)."""
    factors = {k: v for k, v in longrope(24, 64).items() if k.endswith("factor")}
    want = architecture_for(_phi3_config()).make_spec(_phi3_config(rope_scaling={"type": "longrope", **factors}))
    rope = want.rope
    assert (rope.kind, rope.param("original_max_position_embeddings"), rope.factor) == ("longrope", 64, 4.0)
    for kind in ("su", "yarn"):
        cfg = _phi3_config(rope_scaling={"type": kind, **factors, "original_max_position_embeddings": 8})
        assert architecture_for(cfg).make_spec(cfg) == want
    parsed = transformers.Phi3Config(**{k: v for k, v in _phi3_config().items() if k != "architectures"},
                                     rope_scaling={"type": "yarn", **factors})
    assert parsed.rope_parameters["rope_type"] == "longrope"
    assert parsed.rope_parameters["original_max_position_embeddings"] == 64


MINIMAL = {  # config.json files that leave most keys to transformers' defaults
    "PhiForCausalLM": {"model_type": "phi"},
    "Phi3ForCausalLM": {"model_type": "phi3"},
}


@pytest.mark.parametrize("arch", list(MINIMAL))
def test_missing_keys_take_transformers_defaults(arch):
    raw = {"architectures": [arch], **MINIMAL[arch]}
    spec = architecture_for(raw).make_spec(raw)
    c = transformers.AutoConfig.for_model(**MINIMAL[arch])
    a = spec.attention
    assert (spec.hidden_size, spec.num_layers, spec.vocab_size, spec.mlp.intermediate_size, spec.context_length) == (
        c.hidden_size, c.num_hidden_layers, c.vocab_size, c.intermediate_size, c.max_position_embeddings)
    assert (a.num_heads, a.num_kv_heads, a.head_dim) == (c.num_attention_heads, c.num_key_value_heads,
                                                         c.hidden_size // c.num_attention_heads)
    assert spec.norm.eps == (getattr(c, "layer_norm_eps", None) or c.rms_norm_eps)
    assert spec.mlp.activation == c.hidden_act and spec.tie_embeddings == c.tie_word_embeddings
    assert spec.rope.rotary_dim == int(a.head_dim * c.rope_parameters["partial_rotary_factor"])
    assert spec.layer_windows == (0,) * c.num_hidden_layers


def test_phi_reads_layer_norm_eps_only():
    cfg = {"architectures": ["PhiForCausalLM"], "model_type": "phi", "layer_norm_eps": 1e-4, "rms_norm_eps": 0.5}
    assert architecture_for(cfg).make_spec(cfg).norm.eps == 1e-4


# -- GGUF: written as llama.cpp's convert_hf_to_gguf.py Phi2Model / Phi3MiniModel write it -----------
GGUF_CONFIGS = {
    # phi2: the converter writes feed_forward_length = 4 x hidden and head_count_kv = head_count
    "phi2": {**PHI2, "num_key_value_heads": 2, "intermediate_size": 640},
    "phi2_fused_qkv": {**PHI2, "num_key_value_heads": 2, "intermediate_size": 640},
    "phi3": CONFIGS["phi3"],
    "phi4_mini": PHI4_MINI,
}


def write_phi_gguf(path, model, vocab: dict, fused_qkv: bool = False) -> None:
    """Phi2Model / Phi3MiniModel.set_gguf_parameters and generate_extra_tensors, gguf's tensor names;
    `fused_qkv`: phi-2 converted from the old `transformer.h.N.mixer.Wqkv` checkpoints (attn_qkv)."""
    import gguf
    from test_gguf_source import add_vocab, write_gguf_tensors

    c = model.config
    phi3 = c.model_type == "phi3"
    arch = "phi3" if phi3 else "phi2"
    w = gguf.GGUFWriter(path, arch)
    w.add_name("tiny")
    n_embd, n_head, rope = c.hidden_size, c.num_attention_heads, c.rope_parameters
    rope_dims = int(rope.get("partial_rotary_factor", 1.0) * n_embd) // n_head
    w.add_context_length(c.max_position_embeddings)
    if phi3:
        w.add_rope_scaling_orig_ctx_len(c.original_max_position_embeddings)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(c.intermediate_size if phi3 else 4 * n_embd)
    w.add_block_count(c.num_hidden_layers)
    w.add_head_count(n_head)
    w.add_head_count_kv(c.num_key_value_heads if phi3 else n_head)
    if phi3:
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
    else:
        w.add_layer_norm_eps(c.layer_norm_eps)
    w.add_rope_dimension_count(rope_dims)
    if phi3:
        w.add_rope_freq_base(rope["rope_theta"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    if phi3:
        w.add_sliding_window(c.sliding_window or 0)
    else:
        w.add_add_bos_token(False)
    add_vocab(w, vocab)
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    if phi3 and rope.get("long_factor"):  # generate_extra_tensors: 128k models
        scale = c.max_position_embeddings / c.original_max_position_embeddings
        w.add_rope_scaling_attn_factors(
            np.sqrt(1 + np.log(scale) / np.log(c.original_max_position_embeddings)) if scale > 1 else 1.0)
        w.add_tensor("rope_factors_long.weight", np.asarray(rope["long_factor"], dtype=np.float32))
        w.add_tensor("rope_factors_short.weight", np.asarray(rope["short_factor"], dtype=np.float32))
    if fused_qkv:
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}.self_attn."
            for suffix in ("weight", "bias"):
                state[p + "qkv_proj." + suffix] = np.concatenate([state.pop(p + f"{x}_proj.{suffix}") for x in "qkv"])
    if c.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # save_pretrained leaves it out; the converter writes no `output`
    write_gguf_tensors(w, state, arch, c.num_hidden_layers)


@pytest.mark.parametrize("name", list(GGUF_CONFIGS))
def test_gguf_equals_the_hf_build(tmp_path, name):
    from test_gguf_source import sentencepiece_vocab, train_byte_level_vocab
    from tiny import make_model

    vocab = sentencepiece_vocab() if name == "phi3" else train_byte_level_vocab()  # Phi-3: SentencePiece
    if name.startswith("phi2"):  # GPT-2's tokenizer: no BOS (Phi2Model writes add_bos_token false), no template
        vocab = {k: v for k, v in vocab.items() if k not in ("add_bos", "chat_template")}
    model = make_model(name, tmp_path / "hf", **GGUF_CONFIGS[name], vocab_size=len(vocab["tokens"]))
    path = tmp_path / f"{name}.gguf"
    write_phi_gguf(path, model, vocab, fused_qkv=name.endswith("fused_qkv"))
    onnxforge.build(tmp_path / "hf", tmp_path / "hf-out", "fp32")
    onnxforge.build(path, tmp_path / "gguf-out", "fp32")
    graphs = [_graph(tmp_path / o) for o in ("hf-out", "gguf-out")]
    attrs = [[(n.op_type, sorted((a.name, onnx.helper.get_attribute_value(a)) for a in n.attribute)) for n in g.node]
             for g in graphs]
    assert attrs[0] == attrs[1]  # same graph: windows, partial rotary, LongRoPE switch, biases, norms
    tables = [{t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / o / "model.onnx")).graph.initializer
               if "_cache" in t.name} for o in ("hf-out", "gguf-out")]
    assert tables[0].keys() == tables[1].keys() and all(np.array_equal(tables[0][k], tables[1][k]) for k in tables[0])
    prompt, decode = prompt_and_decode()
    from_hf = onnx_step_logits(tmp_path / "hf-out", prompt, decode)
    from_gguf = onnx_step_logits(tmp_path / "gguf-out", prompt, decode)
    assert np.abs(from_gguf - from_hf).max() < 1e-4
    assert np.abs(from_gguf - reference_logits(model, prompt + decode)).max() < 1e-4
    if name == "phi4_mini":  # the GGUF's own tokenizer and genai config run in onnxruntime-genai
        assert genai_greedy(tmp_path / "gguf-out", prompt) == reference_greedy(model, prompt)
