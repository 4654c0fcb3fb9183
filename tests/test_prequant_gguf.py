"""GGUF weights carried over exactly (issue 13): every linear block type onto MatMulNBits, no value changed.

The quantized files are made by the producers themselves: gguf-py's `gguf.quants.quantize` (Q4_0, Q4_1,
Q5_0, Q5_1, Q8_0, TQ2_0) and llama.cpp's own quantizer through llama-cpp-python's
`llama_model_quantize` for the K and IQ types (a test-only dependency, `pip install -e ".[producers]"`:
those tests skip without it).
For each type:
- every weight, dequantized by the ONNX ops themselves (MatMulNBits, plus the offsets correction where
  the type has a minimum, over an identity matrix at accuracy_level 0), equals gguf-py's dequantization
  bit for bit in fp32 for the types without a minimum; the types with one (Q4_1, Q5_1, Q2_K, Q4_K,
  Q5_K) are stored centred (codes q - c, offset m + c x d rounded once in fp32, sources/gguf_blocks.py),
  and there the op's weight is within half an ulp of the offset plus one ulp of the weight of
  gguf-py's, and MatMulNBits alone gives the centred codes times the scale exactly;
- a tiny model built as stored (`-p source`) gives the logits of the fp32 build of the same file.
"""
from __future__ import annotations

import ctypes
import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from conftest import onnx_step_logits, prompt_and_decode
from gguf import GGMLQuantizationType as QT

import onnxforge
from onnxforge.graph.builder import GraphBuilder
from onnxforge.graph.emitter import Emitter
from onnxforge.quant.recipe import Recipe
from onnxforge.quant.storage import Storage
from onnxforge.sources.gguf import GGUFSource

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from test_gguf_source import assert_same_weight, tiny_model, train_byte_level_vocab, write_gguf  # noqa: E402

ort = pytest.importorskip("onnxruntime")

GGUF_PY_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
# llama.cpp file types -> the block types they produce for this model
LLAMA_CPP_FTYPES = {"Q2_K": "LLAMA_FTYPE_MOSTLY_Q2_K", "Q3_K_S": "LLAMA_FTYPE_MOSTLY_Q3_K_S",
                    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q5_K_S": "LLAMA_FTYPE_MOSTLY_Q5_K_S",
                    "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K", "IQ4_XS": "LLAMA_FTYPE_MOSTLY_IQ4_XS"}


@pytest.fixture(scope="module")
def vocab():
    return train_byte_level_vocab()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("prequant_gguf")


def _model(vocab):
    # K types need rows of 256: hidden 256, intermediate 512; small weights keep fp32 logits well below 1e-4
    model = tiny_model("llama", len(vocab["tokens"]), hidden_size=256, intermediate_size=512,
                       tie_word_embeddings=True)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.1)
    return model


@pytest.fixture(scope="module")
def f32_file(folder, vocab):
    path = folder / "tiny-F32.gguf"
    write_gguf(path, _model(vocab), vocab, QT.F32)
    return path


def producer_file(kind: str, folder: Path, vocab, f32: Path) -> Path:
    path = folder / f"tiny-{kind}.gguf"
    if path.exists():
        return path
    if kind in GGUF_PY_TYPES or kind == "TQ2_0":
        write_gguf(path, _model(vocab), vocab, QT[kind])
        return path
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the producers extra) quantizes the K types")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_CPP_FTYPES[kind])
    params.nthread = 1
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(path).encode(), ctypes.byref(params)) == 0
    return path


def op_dequantize(blocks, K: int, N: int) -> np.ndarray:
    """The (N, K) weight as the graph's own ops compute it: the Emitter's MatMulNBits (+ offsets) over I_K."""
    b = GraphBuilder()
    emitter = Emitter(b, None, None, None, None)
    st = Storage(bits=blocks.bits, block_size=blocks.block_size, method="source", offsets=blocks.offsets is not None,
                 symmetric=blocks.zero_points is None, accuracy_level=0, origin=blocks.origin)
    arrays = [blocks.data, blocks.scales, blocks.zero_points, blocks.offsets]
    ws = [b.const(a) for a in arrays if a is not None]
    x = b.input("x", ir.DataType.FLOAT, [1, K, K])
    y = emitter.matmul_nbits(x, ws, "/w", K, N, st)
    b.output(y, "y", ir.DataType.FLOAT, [1, K, N])
    proto = ir.serde.serialize_model(b.to_model("test", "0"))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": np.eye(K, dtype=np.float32)[None]})[0][0].T


def gguf_dequantize(source: GGUFSource, name: str) -> np.ndarray:
    """gguf-py's dequantization of the tensor (read() is exactly that, with llama.cpp's Q/K row order undone)."""
    return source.read(name)


def check_ops_exact(path: Path) -> set[str]:
    """Every 2-D tensor with an exact form: op output == gguf dequantization, bit for bit where the type
    has no minimum; for a centred type within the rounding of its offset (see the module docstring), and
    MatMulNBits' own part (the centred codes x scale) exact: the whole weight minus the offsets computed
    in float64 from gguf-py's values. Returns the types."""
    seen = set()
    with GGUFSource(path) as source:
        for name in source.tensor_names():
            fmt = source.native_format(name)
            if fmt is None or fmt.bits == 0:
                continue
            N, K = source.shape(name)
            blocks = source.native_blocks(name, fmt.bits, fmt.block_size)
            got, ref = op_dequantize(blocks, K, N), gguf_dequantize(source, name)
            assert_same_weight(got, ref, blocks, err_msg=f"{path.name}: {name}")
            if blocks.offsets is not None:
                offsets = np.repeat(blocks.offsets, fmt.block_size, axis=1)
                # the part MatMulNBits computes, d x (q - c), is exact: gguf-py's weight minus the offset,
                # in float64, lands on it within the offset's own rounding
                codes_part = op_dequantize(dataclasses.replace(blocks, offsets=None), K, N).astype(np.float64)
                half_ulps = 0.5 * (np.spacing(np.abs(offsets)) + np.spacing(np.abs(ref)))
                excess = np.abs(codes_part - (ref - offsets.astype(np.float64))) - half_ulps
                assert excess.max() <= 0, f"{path.name}: {name}: MatMulNBits' part off by {excess.max()}"
            seen.add(fmt.origin)
    return seen


def check_model_exact(path: Path, f32_build: Path, tmp: Path) -> dict:
    out = tmp / f"{path.stem}-source"
    report = onnxforge.build(path, out, recipe=Recipe(precision="source", accuracy_level=0))
    prompt, decode = prompt_and_decode()
    prompt, decode = [t % 300 + 5 for t in prompt], [t % 300 + 5 for t in decode[:3]]
    ref_out = tmp / f"{path.stem}-fp32"
    onnxforge.build(path, ref_out, "fp32")
    diff = np.abs(onnx_step_logits(out, prompt, decode) - onnx_step_logits(ref_out, prompt, decode)).max()
    assert diff < 1e-4, f"{path.name}: as stored vs fp32 build of the same file, max abs diff {diff}"
    print(f"{path.name}: as stored vs fp32 build, max abs logit diff {diff:.2e}")
    return json.loads((out / "build_report.json").read_text())


@pytest.mark.parametrize("kind", GGUF_PY_TYPES + ("Q2_K", "Q3_K_S", "Q4_K_M", "Q5_K_S", "Q6_K"))
def test_block_type_carried_over_exactly(kind, folder, vocab, f32_file, tmp_path):
    path = producer_file(kind, folder, vocab, f32_file)
    seen = check_ops_exact(path)
    expected = {"Q2_K": {"Q2_K"}, "Q3_K_S": {"Q3_K"}, "Q4_K_M": {"Q4_K", "Q6_K"}, "Q5_K_S": {"Q5_K"},
                "Q6_K": {"Q6_K"}}.get(kind, {kind})
    assert expected <= seen, (kind, seen)
    report = check_model_exact(path, f32_file, tmp_path)
    stored = {g["storage"] for g in report["groups"]}
    assert any(f"(exact {t})" in s for t in expected for s in stored), stored
    assert not any("re-quantized" in s or "dequantized" in s for s in stored), stored
    assert report["shared_embeddings"]  # tied: the embedding reads the lm_head's blocks (and offsets)
    assert any("carried over exactly" in n and "accuracy_level 0" in n for n in report["notes"])


def test_codebook_and_ternary_types_are_requantized_and_said(folder, vocab, f32_file, tmp_path):
    """TQ2_0 (gguf-py) and IQ4_XS (llama.cpp, when installed) have no exact MatMulNBits form: -p source
    stores them at int8 and the report says where they came from."""
    kinds = ["TQ2_0"]
    try:
        import llama_cpp  # noqa: F401
        kinds.append("IQ4_XS")
    except ImportError:
        pass
    for kind in kinds:
        path = producer_file(kind, folder, vocab, f32_file)
        report = onnxforge.build(path, tmp_path / kind, recipe=Recipe(precision="source"))
        stored = {g["storage"] for g in report.groups}
        assert any("int8 rtn sym block 32 (re-quantized" in s and "no exact MatMulNBits form" in s for s in stored), stored


def test_int4_keeps_4_bit_blocks_and_requantizes_wider_ones(folder, vocab, f32_file, tmp_path):
    """-p int4 on a Q4_K_M file: Q4_K stays exact, Q6_K is re-quantized (and the report says why)."""
    path = producer_file("Q4_K_M", folder, vocab, f32_file)
    report = onnxforge.build(path, tmp_path / "int4", recipe=Recipe(precision="int4"))
    stored = {g["storage"] for g in report.groups}
    assert any("(exact Q4_K)" in s for s in stored), stored
    assert any("(re-quantized Q6_K: 8-bit storage > int4)" in s for s in stored), stored
    report = onnxforge.build(path, tmp_path / "fp32", recipe=Recipe(precision="fp32"))
    assert any("fp32 (dequantized Q4_K)" == s for s in {g["storage"] for g in report.groups})


def test_no_precision_means_as_stored(folder, vocab, f32_file, tmp_path):
    """The API's and the CLI's default: a GGUF keeps its blocks; a float file builds at fp32 as before."""
    path = producer_file("Q4_1", folder, vocab, f32_file)
    report = onnxforge.build(path, tmp_path / "q")
    assert report.precision == "source" and any("(exact Q4_1)" in g["storage"] for g in report.groups)
    report = onnxforge.build(f32_file, tmp_path / "f")
    assert report.precision == "fp32" and {g["storage"] for g in report.groups} == {"fp32"}
