"""GGUF in, ONNX out: tiny GGUFs written at test time and the embedded SmolLM2-135M."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import genai_greedy, onnx_step_logits, prompt_and_decode, reference_logits
from gguf import GGMLQuantizationType as QT
from test_gguf_source import tiny_model, train_byte_level_vocab, write_gguf

import onnxforge
from onnxforge.quant.recipe import Recipe
from onnxforge.sources.gguf import GGUFSource

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def hf_from_gguf(path: Path):
    """transformers' own GGUF loading (dequantized to fp32): the reference."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory):
    vocab = train_byte_level_vocab()
    folder = tmp_path_factory.mktemp("gguf")
    files = {}
    for qtype in (QT.F32, QT.Q8_0, QT.Q4_0):
        model = tiny_model("llama", len(vocab["tokens"]), hidden_size=128, intermediate_size=256)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.2)  # keep logits in a range where fp32 rounding stays far below 1e-4
        path = folder / f"tiny-{qtype.name}.gguf"
        write_gguf(path, model, vocab, qtype)
        files[qtype.name] = path
    return files


@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "Q4_0"])
def test_gguf_build_matches_transformers(tiny_ggufs, tmp_path, qtype):
    path = tiny_ggufs[qtype]
    out = tmp_path / "out"
    onnxforge.build(path, out, "fp32")
    ref_model = hf_from_gguf(path)
    prompt, decode = prompt_and_decode()
    prompt = [t % 200 + 5 for t in prompt]
    decode = [t % 200 + 5 for t in decode]
    diff = np.abs(onnx_step_logits(out, prompt, decode) - reference_logits(ref_model, prompt + decode)).max()
    assert diff < 1e-4, f"{qtype}: max abs diff {diff}"
    assert (out / "tokenizer.json").is_file()


@pytest.mark.parametrize("qtype,bits", [("Q4_0", 4), ("Q8_0", 8)])
def test_native_blocks_are_transcoded_losslessly(tiny_ggufs, tmp_path, qtype, bits):
    """-p int4 (int8) copies Q4_0 (Q8_0) blocks: the weights the ONNX model
    dequantizes are bit-identical to the GGUF's dequantized weights, and the report says so."""
    path = tiny_ggufs[qtype]
    out = tmp_path / "out"
    report = onnxforge.build(path, out, recipe=Recipe(precision=f"int{bits}", block_size=32, symmetric=True,
                                                      accuracy_level=0))
    transcoded = [g for g in report.groups if f"(exact {qtype})" in g["storage"]]
    assert len(transcoded) >= 4 * 2 + 1  # qkv, o, gate_up, down per layer + lm_head
    assert f"(exact {qtype})" in report.summary()
    model = onnx.load(str(out / "model.onnx"))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    src = GGUFSource(path)
    data, scales = inits[f"model.layers.1.attn.o_proj.weight_Q{bits}"], inits["model.layers.1.attn.o_proj.weight_scales"]
    if bits == 4:
        q = np.stack([data & 0x0F, data >> 4], axis=-1).reshape(data.shape[0], data.shape[1], 32)
    else:
        q = data
    deq = ((q.astype(np.float32) - 2 ** (bits - 1)) * scales[..., None]).reshape(data.shape[0], -1)
    np.testing.assert_array_equal(deq, src.read("model.layers.1.self_attn.o_proj.weight"))
    # and the whole model equals the fp32 build of the same GGUF (accuracy_level 0: fp32 compute)
    onnxforge.build(path, tmp_path / "fp32", "fp32")
    prompt, decode = prompt_and_decode()
    prompt = [t % 200 + 5 for t in prompt]
    a = onnx_step_logits(out, prompt, decode[:2])
    b = onnx_step_logits(tmp_path / "fp32", prompt, decode[:2])
    assert np.abs(a - b).max() < 1e-4


def test_requantize_recipe_requantizes_instead(tiny_ggufs, tmp_path):
    """-p int4 keeps Q4_0 blocks whatever the recipe's own int4 form; --requantize quantizes them again."""
    report = onnxforge.build(tiny_ggufs["Q4_0"], tmp_path / "kept", recipe=Recipe(precision="int4", symmetric=False))
    assert all("(exact Q4_0)" in g["storage"] for g in report.groups if "layers" in g["label"] and "proj" in g["label"])
    report = onnxforge.build(tiny_ggufs["Q4_0"], tmp_path / "out", recipe=Recipe(precision="int4", symmetric=False,
                                                                                requantize=True))
    assert not any("transcoded" in g["storage"] or "exact" in g["storage"] for g in report.groups)
    assert any("(re-quantized Q4_0: as the recipe asks)" in g["storage"] for g in report.groups)


# -- the embedded SmolLM2-135M --------------------------------------------------------------------
SMOL = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smol_path(smollm2_path):
    assert smollm2_path.name == SMOL
    return smollm2_path


@pytest.fixture(scope="module")
def smol_fp32(smol_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("smol") / "fp32"
    onnxforge.build(smol_path, out, "fp32")
    return out


def test_smollm2_fp32_greedy_matches_transformers(smol_path, smol_fp32):
    import onnxruntime_genai as og

    ref = hf_from_gguf(smol_path)
    tok = transformers.AutoTokenizer.from_pretrained(str(smol_path.parent), gguf_file=smol_path.name)
    prompt = tok("The capital of France is")["input_ids"]
    assert og.Tokenizer(og.Model(str(smol_fp32))).encode("The capital of France is").tolist() == prompt
    with torch.no_grad():
        want = ref.generate(torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20, do_sample=False,
                            pad_token_id=tok.eos_token_id)[0, len(prompt):].tolist()
    got = genai_greedy(smol_fp32, prompt, 20)
    assert got == want, (tok.decode(got), tok.decode(want))
    assert "Paris" in tok.decode(got)


PARAGRAPH = ("The Python programming language was created by Guido van Rossum and first released in 1991. "
             "It emphasizes code readability with significant indentation, and supports multiple programming "
             "paradigms.")


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("recipe,max_kl", [
    (Recipe(precision="int4"), 1.5),  # the anchor's default: ORT's RTN, symmetric, block 32 (measured 0.76)
    (Recipe(precision="int4", method="k_quant", symmetric=False, int8_last_matmul=True, int8_mixed_layers=True),
     0.5),  # k_quant_mixed with zero points (measured 0.22)
], ids=["default", "k_quant_mixed_asym"])
def test_smollm2_int4_builds_runs_and_stays_close(smol_path, smol_fp32, tmp_path, recipe, max_kl):
    """Next-token distributions of the int4 build vs the fp32 build on an English paragraph:
    mean KL below a bound about twice what was measured, so a broken layout (wrong nibble order,
    permutation, scales) fails while quantization noise passes."""
    import onnxruntime_genai as og

    from onnxforge.verify.ort_runner import OrtDecoder

    out = tmp_path / "int4"
    report = onnxforge.build(smol_path, out, recipe=recipe)
    assert report.shared_embeddings  # SmolLM2 ties its embeddings: one table, read through GatherBlockQuantized
    tok = og.Tokenizer(og.Model(str(out)))
    ids = tok.encode(PARAGRAPH).tolist()
    a = _log_softmax(OrtDecoder(smol_fp32).step(np.array([ids]))[0])
    b = _log_softmax(OrtDecoder(out).step(np.array([ids]))[0])
    kl = float((np.exp(a) * (a - b)).sum(-1).mean())
    assert kl < max_kl, f"mean KL {kl}"
    assert len(genai_greedy(out, ids[:8], 8)) == 8
    assert (out / "model.onnx.data").stat().st_size < 0.25 * (smol_fp32 / "model.onnx.data").stat().st_size


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_real_converter_llama_matches_transformers(tmp_path, outtype):
    """A GGUF written by llama.cpp's own convert_hf_to_gguf.py (tests/real_converter.py; its q8_0 is the converter's
    own quantization) from a tiny Llama with head_dim 48 (Q/K rows permuted by the converter), SentencePiece
    tokenizer: the fp32 build's logits equal transformers on the checkpoint the converter read (f32) or on
    transformers' own loading of the file (q8_0), and the tokenizer.json built from the file's vocabulary
    encodes text as the SentencePiece model does."""
    from real_converter import real_convert, sentencepiece_tokenizer
    from tiny import TEXT, VOCAB, make_model
    from tokenizers import Tokenizer

    model = make_model("llama", tmp_path / "hf")
    sentencepiece_tokenizer(tmp_path / "hf", VOCAB)
    path = real_convert(tmp_path / "hf", tmp_path / "hf" / f"tiny-{outtype}.gguf", outtype)
    out = tmp_path / "out"
    onnxforge.build(path, out, "fp32")
    ref_model = model if outtype == "f32" else hf_from_gguf(path)
    prompt, decode = prompt_and_decode()
    diff = np.abs(onnx_step_logits(out, prompt, decode) - reference_logits(ref_model, prompt + decode)).max()
    assert diff < 1e-4, diff
    import sentencepiece

    spm = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "hf" / "tokenizer.model"))
    text = TEXT[:120] + " Zebra!"  # Z: not in the training text, byte fallback
    assert Tokenizer.from_file(str(out / "tokenizer.json")).encode(text, add_special_tokens=False).ids == spm.encode(text)
