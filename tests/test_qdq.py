"""use_qdq (issue 26 item 4): quantized weights as DequantizeLinear (blocked int4/int8, opset 21) + MatMul, and
DequantizeLinear + Gather for a quantized embedding, in place of MatMulNBits / GatherBlockQuantized.

Each QDQ build is compared with the MatMulNBits build of the same recipe at accuracy_level 0: every
DequantizeLinear's weight, dequantized with numpy from the stored initializers, equals the MatMulNBits (or
GatherBlockQuantized) weight dequantized the same way, exactly; the logits through the KV cache match; onnxruntime-
genai's greedy tokens are equal. Refusals are one line, exit code 2, nothing written."""
from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import onnx
import pytest
from conftest import GEN_TOKENS, genai_greedy, onnx_step_logits, prompt_and_decode
from onnx import numpy_helper

import onnxforge
from onnxforge.cli import main
from onnxforge.errors import RecipeError
from onnxforge.quant.options import apply_extra_options, load_recipe_file
from onnxforge.quant.recipe import Recipe

CASES = {  # id -> (tiny family, precision, extra options)
    "int4_sym_gather": ("llama", "int4", {"int4_op_types_to_quantize": "MatMul,Gather"}),  # untied embedding
    "int4_tied": ("llama_tied", "int4", {}),  # one DequantizeLinear for the lm_head and the embedding
    "int4_asym_b64": ("llama", "int4", {"int4_is_symmetric": "false", "int4_block_size": "64"}),  # K 96, 160: a
    "int8_asym": ("llama", "int8", {"int4_is_symmetric": "false"}),                                # last part-block
    "int8_sym": ("llama", "int8", {}),
}


def _recipe(precision: str, **options) -> Recipe:
    return apply_extra_options(Recipe(precision=precision), options)


def _graph(out):
    model = onnx.load(str(out / "model.onnx"))  # with its external data
    g = model.graph
    return model, {i.name: i for i in g.initializer}, {n.name: n for n in g.node}


def _array(init) -> np.ndarray:
    """An initializer as numpy: int4/uint4 unpacked (onnx's own reading), everything else as stored."""
    arr = numpy_helper.to_array(init)
    if arr.dtype in (ml_dtypes.int4, ml_dtypes.uint4):
        arr = arr.astype(np.int8 if arr.dtype == ml_dtypes.int4 else np.uint8)
    return arr


def _dq_weight(node, inits) -> np.ndarray:
    """DequantizeLinear (blocked) in numpy: (q - zero point) * scale, each scale repeated over its block."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    axis, block = attrs["axis"], attrs["block_size"]
    q = _array(inits[node.input[0]]).astype(np.float32)
    scale = _array(inits[node.input[1]]).astype(np.float32)
    zp = _array(inits[node.input[2]]).astype(np.float32) if len(node.input) > 2 else np.zeros_like(scale)
    n = q.shape[axis]
    return (q - np.repeat(zp, block, axis).take(range(n), axis)) * np.repeat(scale, block, axis).take(range(n), axis)


def _nbits_weight(data, scales, zp, bits: int, block: int, K: int) -> np.ndarray:
    """MatMulNBits / GatherBlockQuantized in numpy: codes packed low bits first along K, (code - zp) * scale;
    (N, K)."""
    N = scales.shape[0]
    per = 8 // bits
    raw = np.asarray(data, np.uint8).reshape(N, -1)
    codes = np.stack([(raw >> (bits * i)) & ((1 << bits) - 1) for i in range(per)], -1).reshape(N, -1)
    kb = scales.shape[1]
    if zp is None:
        z = np.full((N, kb), 1 << (bits - 1), np.float32)
    else:
        zr = np.asarray(zp, np.uint8).reshape(N, -1)
        z = np.stack([(zr >> (bits * i)) & ((1 << bits) - 1) for i in range(per)], -1).reshape(N, -1)[:, :kb]
    w = (codes[:, :kb * block].astype(np.float32) - np.repeat(z.astype(np.float32), block, 1)) * \
        np.repeat(scales.astype(np.float32), block, 1)
    return w[:, :K]


def _nbits_node_weight(node, inits, nodes, K: int | None = None) -> np.ndarray:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "MatMulNBits":
        ins = [_array(inits[i]) for i in node.input[1:]]
        return _nbits_weight(ins[0], ins[1], ins[2] if len(ins) > 2 else None, attrs["bits"], attrs["block_size"],
                             attrs["K"])
    # GatherBlockQuantized(data, indices, scales, zero_points); data: a Reshape of an initializer (a shared one)
    data = node.input[0]
    if data not in inits:
        data = next(n.input[0] for n in nodes.values() if data in n.output and n.op_type == "Reshape")
    ins = [_array(inits[i]) for i in (data, *node.input[2:])]
    return _nbits_weight(ins[0], ins[1], ins[2] if len(ins) > 2 else None, attrs["bits"], attrs["block_size"], K)


def _build_pair(tiny_models, tmp_path, case):
    family, precision, options = CASES[case]
    folder, model = tiny_models(family)
    nbits = onnxforge.build(folder, tmp_path / "nbits", recipe=_recipe(precision, **options,
                                                                        int4_accuracy_level="0"), strict=True)
    qdq = onnxforge.build(folder, tmp_path / "qdq", recipe=_recipe(precision, **options, use_qdq="true"), strict=True)
    return folder, model, nbits, qdq


@pytest.mark.parametrize("case", list(CASES))
def test_qdq_weights_equal_matmulnbits(tiny_models, tmp_path, case):
    folder, model, nbits, qdq = _build_pair(tiny_models, tmp_path, case)
    bits = 8 if CASES[case][1] == "int8" else 4
    sym = CASES[case][2].get("int4_is_symmetric") != "false"
    _compare(tmp_path, nbits, qdq, bits, sym, model.config.vocab_size, model.config.hidden_size)


def test_qdq_gguf_offsets(tmp_path):
    """A GGUF Q4_1 (w = d x q + m: re-centred int4 codes with per-block offsets, carried over exactly with -p source):
    the QDQ build keeps the offsets' correction beside each MatMul and adds them to the gathered embedding rows."""
    torch = pytest.importorskip("torch")
    from gguf import GGMLQuantizationType as QT
    from test_gguf_source import tiny_model, train_byte_level_vocab, write_gguf

    vocab = train_byte_level_vocab()
    model = tiny_model("llama", len(vocab["tokens"]), hidden_size=128, intermediate_size=256)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.2)
    path = tmp_path / "tiny-Q4_1.gguf"
    write_gguf(path, model, vocab, QT.Q4_1)
    nbits = onnxforge.build(path, tmp_path / "nbits", recipe=Recipe(precision="source", accuracy_level=0))
    qdq = onnxforge.build(path, tmp_path / "qdq", recipe=Recipe(precision="source", use_qdq=True))
    assert any("(exact Q4_1)" in g["storage"] and g["storage"].endswith("QDQ") for g in qdq.groups)
    _, qinits, qnodes = _graph(tmp_path / "qdq")
    _, ninits, _ = _graph(tmp_path / "nbits")
    offsets = [n for n in qinits if n.endswith("_offsets")]
    assert offsets and all(np.array_equal(_array(qinits[n]), _array(ninits[n])) for n in offsets)
    assert "/model/embed_tokens/offsets/Add" in qnodes and "/lm_head/offsets/Add" in qnodes
    _compare(tmp_path, nbits, qdq, 4, True, model.config.vocab_size, model.config.hidden_size,
             prompt_of=lambda t: t % 200 + 5)


def _compare(tmp_path, nbits, qdq, bits: int, sym: bool, V: int, H: int, prompt_of=lambda t: t) -> None:
    """tmp_path/qdq against tmp_path/nbits: formats, reports, every DequantizeLinear's weight, logits, tokens."""
    assert nbits.weight_format == "MatMulNBits" and qdq.weight_format == "QDQ"
    saved = json.loads((tmp_path / "qdq" / "build_report.json").read_text())
    assert saved["weight_format"] == "QDQ" and saved["recipe"]["use_qdq"] is True
    assert "format: QDQ" in qdq.summary() and "format: MatMulNBits" in nbits.summary()
    assert qdq.shared_embeddings == nbits.shared_embeddings
    qm, qinits, qnodes = _graph(tmp_path / "qdq")
    nm, ninits, nnodes = _graph(tmp_path / "nbits")
    assert {o.domain: o.version for o in qm.opset_import}[""] >= 21 and qm.ir_version >= 10
    ops = {n.op_type for n in qnodes.values()}
    assert not ops & {"MatMulNBits", "GatherBlockQuantized"}, ops
    want = {(4, True): onnx.TensorProto.INT4, (4, False): onnx.TensorProto.UINT4,
            (8, True): onnx.TensorProto.INT8, (8, False): onnx.TensorProto.UINT8}[bits, sym]
    dqs = [n for n in qnodes.values() if n.op_type == "DequantizeLinear"]
    # every weight the MatMulNBits build quantizes is a DequantizeLinear here, and nothing else is
    assert len(dqs) == sum(n.op_type in ("MatMulNBits", "GatherBlockQuantized") for n in nnodes.values()) - \
        (1 if nbits.shared_embeddings else 0)
    for dq in dqs:
        base = dq.name[:-len("/DequantizeLinear")]
        codes = qinits[dq.input[0]]
        assert codes.data_type == want and len(dq.input) == (2 if sym else 3), dq.name
        if len(dq.input) == 3:
            assert qinits[dq.input[2]].data_type == want
        w = _dq_weight(dq, qinits)
        if base == "/model/embed_tokens":  # an untied table [V, H], blocks along H (axis 1), Gathered by rows
            assert [a.i for a in dq.attribute if a.name == "axis"] == [1] and w.shape == (V, H)
            ref = _nbits_node_weight(nnodes["/model/embed_tokens/GatherBlockQuantized"], ninits, nnodes, H)
        else:  # a MatMul's [K, N], blocks along K (axis 0), scales [K/block, N]
            assert [a.i for a in dq.attribute if a.name == "axis"] == [0]
            ref = _nbits_node_weight(nnodes[f"{base}/MatMul"], ninits, nnodes).T
            assert list(qinits[dq.input[1]].dims) == [-(-w.shape[0] // _block(dq)), w.shape[1]]
            assert any(n.op_type == "MatMul" and dq.output[0] in n.input for n in qnodes.values())
        assert w.shape == ref.shape and np.array_equal(w, ref), dq.name
        if base == "/lm_head" and qdq.shared_embeddings:  # the embedding Gathers the same dequantized weight
            assert any(n.op_type == "Gather" and n.input[0] == dq.output[0] for n in qnodes.values())
            assert np.array_equal(w.T, _nbits_node_weight(nnodes["/model/embed_tokens/GatherBlockQuantized"],
                                                          ninits, nnodes, H))

    # onnxruntime's CPU provider fuses DequantizeLinear + MatMul back into MatMulNBits at accuracy_level 4 (its
    # session option session.qdq_matmulnbits_accuracy_level); at 0 it is the accuracy_level 0 build's arithmetic
    prompt, decode = prompt_and_decode()
    prompt, decode = [prompt_of(t) for t in prompt], [prompt_of(t) for t in decode]
    a = _step_logits(tmp_path / "qdq", prompt, decode, {"session.qdq_matmulnbits_accuracy_level": "0"})
    b = onnx_step_logits(tmp_path / "nbits", prompt, decode)
    assert np.abs(a - b).max() < 1e-4, np.abs(a - b).max()
    # in onnxruntime-genai, with the graph optimizations that fuse it left out (basic), and as written
    basic = {"model": {"decoder": {"session_options": {"graph_optimization_level": "ORT_ENABLE_BASIC"}}}}
    assert _genai_greedy(tmp_path / "qdq", prompt, basic) == genai_greedy(tmp_path / "nbits", prompt)
    assert len(_genai_greedy(tmp_path / "qdq", prompt)) == GEN_TOKENS


def _step_logits(out, prompt, decode, entries: dict) -> np.ndarray:
    """onnx_step_logits with onnxruntime session config entries."""
    import onnxruntime as ort

    from onnxforge.verify.ort_runner import OrtDecoder

    dec = OrtDecoder(out)
    opts = ort.SessionOptions()
    for key, value in entries.items():
        opts.add_session_config_entry(key, value)
    dec.session = ort.InferenceSession(str(out / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    steps = dec.logits_for(prompt, decode)
    return np.concatenate(steps, axis=0)


def _genai_greedy(out, prompt: list[int], overlay: dict | None = None) -> list[int]:
    """genai_greedy with genai_config.json overlaid (og.Config.overlay)."""
    import onnxruntime_genai as og

    config = og.Config(str(out))
    if overlay:
        config.overlay(json.dumps(overlay))
    model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + GEN_TOKENS, min_length=len(prompt) + GEN_TOKENS,
                              do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    tokens = []
    while not gen.is_done():
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    return tokens


def _block(node) -> int:
    return next(a.i for a in node.attribute if a.name == "block_size")


def _cli(folder, out, capsys, *extra):
    code = main(["build", "-m", str(folder), "-o", str(out), "--quiet", *extra])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("extra, says", [
    (["-p", "int4", "--extra_options", "use_qdq=true", "int4_accuracy_level=4"], "accuracy_level=4"),
    (["-p", "fp32", "--extra_options", "use_qdq=true"], "use_qdq"),
    (["-p", "int4", "--extra_options", "use_qdq=true", "moe_quant_type=int8"], "moe_quant_type"),
])
def test_qdq_refusals(tiny_models, tmp_path, capsys, extra, says):
    folder, _ = tiny_models("llama")
    capsys.readouterr()  # transformers' progress bars when the fixture saves the model
    code, err = _cli(folder, tmp_path / "out", capsys, *extra)
    assert code == 2 and len(err) == 1 and says in err[0], err
    assert not (tmp_path / "out").exists()


def test_qdq_refused_with_qmoe_experts(tmp_path, capsys):
    """QMoE has no QDQ form: a mixture of experts with quantized experts is refused (nothing written); with
    moe_experts=fp32 (the float MoE op) every other quantized weight is QDQ."""
    from moe_check import FAMILIES
    from tiny import make_model

    make_model("mixtral", tmp_path / "hf", seed=0, **FAMILIES["mixtral"])
    capsys.readouterr()  # transformers' progress bars
    code, err = _cli(tmp_path / "hf", tmp_path / "out", capsys, "-p", "int4", "--extra_options", "use_qdq=true")
    assert code == 2 and len(err) == 1 and "QMoE" in err[0] and "moe_experts=fp32" in err[0], err
    assert not (tmp_path / "out").exists()
    report = onnxforge.build(tmp_path / "hf", tmp_path / "float-experts",
                             recipe=_recipe("int4", use_qdq="true", moe_experts="fp32"))
    _, _, nodes = _graph(tmp_path / "float-experts")
    ops = {n.op_type for n in nodes.values()}
    assert report.weight_format == "QDQ" and "MoE" in ops and "QMoE" not in ops and "MatMulNBits" not in ops
    onnxforge.build(tmp_path / "hf", tmp_path / "nbits", recipe=_recipe("int4", moe_experts="fp32",
                                                                       int4_accuracy_level="0"))
    prompt, decode = prompt_and_decode()
    a = _step_logits(tmp_path / "float-experts", prompt, decode, {"session.qdq_matmulnbits_accuracy_level": "0"})
    assert np.abs(a - onnx_step_logits(tmp_path / "nbits", prompt, decode)).max() < 1e-4


def test_use_qdq_option_and_recipe_key(tmp_path):
    base = Recipe(precision="int4")
    assert apply_extra_options(base, ["use_qdq=1"]).use_qdq is True
    assert apply_extra_options(base, ["use_qdq=false"]) == base
    recipe = tmp_path / "r.toml"
    recipe.write_text('precision = "int4"\nuse_qdq = true\n')
    assert load_recipe_file(recipe, Recipe()).use_qdq is True
    recipe.write_text('precision = "int4"\nuse_qdq = "true"\n')
    with pytest.raises(RecipeError, match=r"r\.toml:2: use_qdq takes a boolean"):
        load_recipe_file(recipe, Recipe())
    with pytest.raises(RecipeError, match="config_only"):
        Recipe(precision="int4", use_qdq=True, config_only=True)


@pytest.mark.parametrize("case", ["int4_tied", "int4_asym_b64"])
def test_verify_reads_qdq_weights_back(tiny_models, tmp_path, case):
    """`verify --reference` on a QDQ build: int4 thresholds (the stored precision read from the DequantizeLinear
    codes), and the conversion reference holds the QDQ weights, the MatMulNBits build's exactly (same per-tensor
    errors)."""
    from onnxforge.verify.parity import verify

    folder, _, _, _ = _build_pair(tiny_models, tmp_path, case)
    q = verify(tmp_path / "qdq", folder, tokens=8, plot=False, write=False)
    n = verify(tmp_path / "nbits", folder, tokens=8, plot=False, write=False)
    assert q["threshold_source"] == n["threshold_source"] == "int4 defaults"
    assert q["passed"] and q["conversion"]["passed"], q["failures"]
    assert q["conversion"]["weight_errors"] == n["conversion"]["weight_errors"]
    assert q["conversion"]["metrics"]["weights_compared"] == n["conversion"]["metrics"]["weights_compared"] > 0


def test_qdq_matches_the_anchors_qdq_build(tiny_models, tmp_path):
    """The anchor (onnxruntime-genai 0.18's builder, --extra_options use_qdq=true, its onnxruntime quantizer in QDQ
    mode) writes the same DequantizeLinear layout (int4 [K, N], axis 0, block 32, scales [K/block, N]) and, with
    onnxforge's default method, the same dequantized weights exactly; onnxforge packs gate and up into one MatMul
    (the anchor's two are its columns)."""
    import subprocess
    import sys

    folder, model = tiny_models("llama")
    done = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder), "-o",
                           str(tmp_path / "anchor"), "-p", "int4", "-e", "cpu", "--extra_options", "use_qdq=true"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    onnxforge.build(folder, tmp_path / "ours", recipe=_recipe("int4", use_qdq="true"))
    _, ainits, anodes = _graph(tmp_path / "anchor")
    _, oinits, onodes = _graph(tmp_path / "ours")
    I = model.config.intermediate_size
    compared = 0
    for name, node in anodes.items():
        if node.op_type != "DequantizeLinear":
            continue
        base = name[:-len("/MatMul_DQ_Q4")]
        cols = slice(None)
        if base.endswith(("/gate_proj", "/up_proj")):
            cols = slice(0, I) if base.endswith("/gate_proj") else slice(I, 2 * I)
            base = base.rsplit("/", 1)[0] + "/gate_up_proj"
        ours = onodes[f"{base}/DequantizeLinear"]
        attrs = lambda n: sorted((a.name, a.i) for a in n.attribute)  # noqa: E731
        assert attrs(ours) == attrs(node) == [("axis", 0), ("block_size", 32)]
        assert oinits[ours.input[0]].data_type == ainits[node.input[0]].data_type == onnx.TensorProto.INT4
        assert len(ours.input) == len(node.input) == 2  # symmetric: no zero points
        theirs = _dq_weight(node, ainits)
        assert np.array_equal(_dq_weight(ours, oinits)[:, cols], theirs), name
        assert list(ainits[node.input[1]].dims) == [theirs.shape[0] // 32, theirs.shape[1]]
        compared += 1
    assert compared == 2 * 5 + 1  # qkv, o, gate, up, down per layer + lm_head


def test_cpu_fuses_qdq_back_into_the_default_int4_build(tiny_models, tmp_path):
    """As written (no session option), onnxruntime's CPU provider fuses each DequantizeLinear + MatMul into
    MatMulNBits at accuracy_level 4: the QDQ build's logits are the default (accuracy_level 4) int4 build's."""
    folder, _ = tiny_models("llama")
    onnxforge.build(folder, tmp_path / "nbits", recipe=_recipe("int4"))
    onnxforge.build(folder, tmp_path / "qdq", recipe=_recipe("int4", use_qdq="true"))
    prompt, decode = prompt_and_decode()
    a = onnx_step_logits(tmp_path / "qdq", prompt, decode)
    assert np.abs(a - onnx_step_logits(tmp_path / "nbits", prompt, decode)).max() < 1e-6
    at_level_0 = _step_logits(tmp_path / "qdq", prompt, decode, {"session.qdq_matmulnbits_accuracy_level": "0"})
    assert np.abs(a - at_level_0).max() > 1e-3  # the option changes the arithmetic: the fusion is real


def test_two_bit_rule_fits_int4(tiny_models, tmp_path):
    """A 2-bit rule (MatMulNBits bits=2) has no 2-bit DequantizeLinear type at opset 21: its codes go into int4
    unchanged (code - 2 in [-2, 1]), every weight still the MatMulNBits build's exactly."""
    from onnxforge.quant.options import recipe_from_mapping

    folder, model = tiny_models("llama")
    rules = [{"match": "*down_proj*", "bits": 2}]
    nbits = onnxforge.build(folder, tmp_path / "nbits", recipe=recipe_from_mapping(
        {"precision": "int4", "accuracy_level": 0, "rules": rules}, Recipe()))
    qdq = onnxforge.build(folder, tmp_path / "qdq", recipe=recipe_from_mapping(
        {"precision": "int4", "use_qdq": True, "rules": rules}, Recipe()))
    _, _, nnodes = _graph(tmp_path / "nbits")
    assert {next(a.i for a in n.attribute if a.name == "bits") for n in nnodes.values()
            if n.op_type == "MatMulNBits" and "down_proj" in n.name} == {2}
    _compare(tmp_path, nbits, qdq, 4, True, model.config.vocab_size, model.config.hidden_size)
