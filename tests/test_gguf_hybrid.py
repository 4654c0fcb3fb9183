"""GGUF input for the state-carrying families (issue 25 item 5), from files written by llama.cpp's own
convert_hf_to_gguf.py (tests/real_converter.py, the llama-cpp-python 0.3.36 sdist) from tiny random
transformers models, and quantized by llama.cpp's own quantizer (llama_model_quantize).

Qwen3.5 dense (qwen35) and MoE (qwen35moe) and Qwen3-Next (qwen3next): the converter turns A_log into
-exp(A_log), squeezes the conv1d, adds 1 to every norm but the gated one, writes Qwen3-Next's interleaved
in_proj_qkvz apart as attn_qkv / attn_gate (and keeps in_proj_ba), and moves Qwen3.5's value heads from grouped
to tiled order (in_proj_qkv's v rows, in_proj_z, in_proj_a/b, A_log, dt_bias, conv1d's v channels, out_proj's
columns); sources/gguf_maps.py undoes each (views, offsets). Every tensor read back equals transformers' state
dict exactly; the fp32 build equals transformers within 1e-4 over a 12-token prompt and 20 cached decode steps,
and over the prompt fed in two chunks; the Q8_0 file built as stored (MatMulNBits holding the file's blocks,
reordered rows included) gives the logits of its own fp32 build.

LFM2 / LFM2-MoE (lfm2, lfm2moe), GLM-4.5 MoE (glm4moe, its MTP layer counted in block_count and left out), Granite
4.0 hybrid (granitehybrid, with and without experts) and Llama 4 (llama4) the same way: fp32 within 1e-4 of
transformers over 20 cached decode steps (hybrids also over a two-chunk prefill), and a Q8_0 file as stored equal
to its own fp32 build (8-bit QMoE experts kept float: they quantize their activations, tests/test_moe_as_stored.py).
Where llama.cpp fixes what the HF config leaves open (LFM2-MoE's routed scale, Granite hybrid's NoPE, Llama 4's
chunk, NoPE interval and temperature), the tiny models take the published values.
"""
from __future__ import annotations

import ctypes
import json

import numpy as np
import pytest
from family_check import FP32_TOL
from test_family_hybrid import steps
from test_family_qwen_next import FAMILIES as QWEN, make_hybrid, tokens

import onnxforge
from onnxforge.errors import ConfigError
from onnxforge.quant.recipe import Recipe
from onnxforge.sources.gguf import GGUFSource

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from conftest import genai_greedy, reference_greedy, reference_logits  # noqa: E402

# Qwen3-Next as llama.cpp converts it: experts on every layer (the converter has no dense-layer tensors for it)
QWEN_GGUF = {"qwen3_5": (QWEN["qwen3_5"], "qwen35", "Qwen3_5ForCausalLM"),
             "qwen3_5_moe": (QWEN["qwen3_5_moe"], "qwen35moe", "Qwen3_5MoeForCausalLM"),
             "qwen3_next": (("Qwen3NextConfig", {k: v for k, v in QWEN["qwen3_next"][1].items()
                                                 if k != "mlp_only_layers"}), "qwen3next", "Qwen3NextForCausalLM")}
_CACHE: dict = {}


def converted(tmp_path_factory, name: str, **overrides):
    """(transformers model, HF folder, F32 GGUF by llama.cpp's converter), once a session."""
    key = (name, *sorted(overrides.items()))
    if key not in _CACHE:
        from real_converter import real_convert

        (config_class, params), _, _ = QWEN_GGUF[name]
        params = {**params, **overrides}
        seed = params.pop("seed", 0)
        folder = tmp_path_factory.mktemp(f"gguf-{name}")
        model = make_hybrid(folder / "hf", config_class, seed, **params)
        # no MTP layers in the tiny checkpoint: the converter asserts some unless told --no-mtp
        path = real_convert(folder / "hf", folder / "F32.gguf", "f32", pre="gpt-2", extra=("--no-mtp",))
        _CACHE[key] = (model, folder / "hf", path)
    return _CACHE[key]


def quantize(f32, ftype: str):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the producers extra) quantizes the file")
    out = f32.with_name(f"{ftype}.gguf")
    if not out.exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
        params.nthread = 1
        assert llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), ctypes.byref(params)) == 0
    return out


def split_stacked_experts(name: str, a: np.ndarray, out: dict) -> bool:
    """transformers' stacked experts as sources/gguf.py names llama.cpp's (module weights, gate_up_proj split into
    `mlp.experts.gate_proj.weight` / `up_proj.weight`) into `out`; False for any other tensor."""
    if name.endswith("mlp.experts.gate_up_proj"):
        half = a.shape[1] // 2
        out[name.replace("gate_up_proj", "gate_proj.weight")] = a[:, :half]
        out[name.replace("gate_up_proj", "up_proj.weight")] = a[:, half:]
        return True
    if name.endswith("mlp.experts.down_proj"):
        out[f"{name}.weight"] = a
        return True
    return False


def fp32_build_matches(path, out, model, arch: str, tokens=tokens, chunked: bool = False, greedy: bool = True,
                       label: str = "") -> float:
    """A GGUF file built at fp32: read as `arch` with no tensor left unread, logits within FP32_TOL of transformers'
    over the prompt and 20 cached decode steps (and with the prompt in two chunks where `chunked`), and
    onnxruntime-genai's greedy tokens equal transformers' where `greedy`. Returns the largest difference."""
    onnxforge.build(path, out, "fp32")
    report = json.loads((out / "build_report.json").read_text())
    assert report["architecture"] == arch and not report.get("unread_tensors"), report
    prompt, decode = tokens()
    ref = reference_logits(model, prompt + decode)
    diff = 0.0
    for first in [[prompt]] + ([[prompt[:5], prompt[5:]]] if chunked else []):
        got = steps(out, first + [[t] for t in decode])
        diff = max(diff, float(np.abs(got - ref).max()))
        assert diff < FP32_TOL, diff
    if label:
        print(f"{label}: fp32 GGUF build vs transformers max |diff| {diff:.3g}")
    if greedy:
        p, _ = tokens(1)  # onnxruntime-genai runs the GGUF build as is (its genai_config.json, states and all)
        assert genai_greedy(out, p) == reference_greedy(model, p)
    return diff


def as_stored_matches_fp32(path, folder, keep_float=(), tokens=tokens, label: str = "") -> dict:
    """A quantized GGUF file built as stored (-p source, accuracy_level 0, `keep_float` groups float) into
    folder/source and at fp32 into folder/fp32: logits within FP32_TOL of each other over the prompt and 20 cached
    decode steps. Returns the as-stored build's report (JSON)."""
    report = onnxforge.build(path, folder / "source", recipe=Recipe(precision="source", accuracy_level=0,
                                                                   keep_float=tuple(keep_float))).to_json()
    onnxforge.build(path, folder / "fp32", "fp32")
    prompt, decode = tokens()
    got = steps(folder / "source", [prompt] + [[t] for t in decode])
    want = steps(folder / "fp32", [prompt] + [[t] for t in decode])
    diff = float(np.abs(got - want).max())
    if label:
        print(f"{label}: as stored vs its fp32 build max |diff| {diff:.3g}")
    assert diff < FP32_TOL, diff
    return report


def stored_blocks_exact(source, origin: str | None = None) -> tuple[set, set]:
    """Every non-expert weight the file stores in a block form: the graph's own dequantization of the blocks the
    build carries (test_prequant_gguf.op_dequantize) against gguf-py's of the stored tensor (bit for bit, or within
    the rounding of a centred type's offset: test_gguf_source.assert_same_weight), each of type `origin` if given.
    Returns (the names checked, the types seen)."""
    from gguf.quants import dequantize
    from test_gguf_source import assert_same_weight
    from test_prequant_gguf import op_dequantize

    names, origins = set(), set()
    for hf in source.tensor_names():
        fmt = source.native_format(hf)
        if fmt is None or not fmt.bits or ".experts." in hf:
            continue
        if origin is not None:
            assert fmt.origin == origin, hf
        N, K = source.shape(hf)
        stored = source._tensors[hf]
        ref = dequantize(np.asarray(stored.data), stored.tensor_type).reshape(N, K)
        blocks = source.native_blocks(hf, fmt.bits, fmt.block_size)
        assert_same_weight(op_dequantize(blocks, K, N), ref, blocks, err_msg=hf)
        names.add(hf)
        origins.add(fmt.origin)
    return names, origins


def hf_state(model) -> dict[str, np.ndarray]:
    """transformers' state dict with stacked experts' gate_up_proj split as llama.cpp stores them (sources/gguf.py
    names stacked experts as module weights: `mlp.experts.gate_proj.weight`), and Qwen3-Next's in_proj_qkvz /
    in_proj_ba (per key head g: [q_g, k_g, v_g, z_g] and [b_g, a_g]) as Qwen3.5's in_proj_qkv, _z, _b, _a."""
    c = model.config
    k, r = c.linear_num_key_heads, c.linear_num_value_heads // c.linear_num_key_heads
    kd, vd = c.linear_key_head_dim, r * c.linear_value_head_dim
    out = {}
    for name, t in model.state_dict().items():
        a = t.detach().numpy()
        if name.endswith("in_proj_qkvz.weight"):
            g = a.reshape(k, 2 * kd + 2 * vd, -1)
            q, kk, v, z = np.split(g, [kd, 2 * kd, 2 * kd + vd], axis=1)
            p = name.replace("in_proj_qkvz.weight", "in_proj_")
            out[p + "qkv.weight"] = np.concatenate([x.reshape(-1, a.shape[1]) for x in (q, kk, v)])
            out[p + "z.weight"] = z.reshape(-1, a.shape[1])
        elif name.endswith("in_proj_ba.weight"):
            b, aa = np.split(a.reshape(k, 2 * r, -1), 2, axis=1)
            p = name.replace("in_proj_ba.weight", "in_proj_")
            out[p + "b.weight"], out[p + "a.weight"] = b.reshape(-1, a.shape[1]), aa.reshape(-1, a.shape[1])
        elif not split_stacked_experts(name, a, out):
            out[name] = a
    return out


@pytest.mark.parametrize("name", list(QWEN_GGUF))
def test_qwen_linear_attention_gguf_fp32(tmp_path_factory, tmp_path, name):
    model, _, path = converted(tmp_path_factory, name)
    _, arch, hf_arch = QWEN_GGUF[name]
    with GGUFSource(path) as source:
        assert source._arch == arch and source.config["architectures"] == [hf_arch]
        state = hf_state(model)
        assert sorted(source.tensor_names()) == sorted(state)
        for tensor in source.tensor_names():  # every converter transform undone exactly
            got = source.read(tensor)
            assert got.shape == state[tensor].shape, tensor
            np.testing.assert_allclose(got, state[tensor], rtol=1e-6, atol=1e-7, err_msg=tensor)
    fp32_build_matches(path, tmp_path / "out", model, hf_arch, chunked=True)


@pytest.mark.parametrize("name", ["qwen3_5", "qwen3_5_moe"])
def test_qwen_linear_attention_gguf_q8_0_as_stored(tmp_path_factory, tmp_path, name):
    """llama.cpp's quantizer writes the 2-D weights as Q8_0: built as stored, every one is the file's blocks as
    they are (the reordered rows moved whole; out_proj's reordered columns too, value heads of 32 being whole
    Q8_0 blocks), and the logits equal the fp32 build of the same file over the prompt and 20 cached decode
    steps. With value heads of 8, out_proj's columns move within blocks: it is requantized, and said so.
    The MoE's experts are kept float (--keep-float): 8-bit QMoE quantizes its activations to int8, ~1% of the
    logits (tests/test_moe_as_stored.py measures that part)."""
    _, _, f32 = converted(tmp_path_factory, name, linear_value_head_dim=32)
    path = quantize(f32, "Q8_0")
    with GGUFSource(path) as source:
        for proj in ("in_proj_qkv", "in_proj_z", "out_proj"):
            w = f"model.layers.0.linear_attn.{proj}.weight"
            assert source.stored_format(w) == "Q8_0" and source.native_format(w).bits == 8, proj
    with GGUFSource(quantize(converted(tmp_path_factory, name)[2], "Q8_0")) as narrow:
        assert narrow.native_format("model.layers.0.linear_attn.out_proj.weight").bits == 0
    keep = ("/model/layers.*/moe/experts/*",) if "moe" in name else ()
    report = as_stored_matches_fp32(path, tmp_path, keep)
    storage = {g["label"]: g["storage"] for g in report["groups"]}
    for proj in ("qkv_proj", "z_proj", "out_proj"):
        assert storage[f"/model/layers.0/linear_attn/{proj}"] == "int8 block 32 (exact Q8_0)", storage


def converted_lfm2(tmp_path_factory, name: str):
    """(transformers model, F32 GGUF by llama.cpp's converter) of the tiny LFM2 / LFM2-MoE, once a session.
    LFM2-MoE with routed_scaling_factor 1.0, as published: the converter writes no routed scale (llama.cpp's
    graph has none), so a GGUF cannot carry the tiny test model's 1.5."""
    if name not in _CACHE:
        from real_converter import real_convert

        folder = tmp_path_factory.mktemp(f"gguf-{name}")
        if name == "lfm2":
            import tiny
            from test_family_hybrid import LFM2

            model = tiny.make_model("lfm2", folder / "hf", **LFM2)
        else:
            from test_family_lfm2_moe import make

            model = make(folder / "hf", routed_scaling_factor=1.0)
        _CACHE[name] = (model, real_convert(folder / "hf", folder / "F32.gguf", "f32", pre="gpt-2"))
    return _CACHE[name]


@pytest.mark.parametrize("name,arch", [("lfm2", "Lfm2ForCausalLM"), ("lfm2_moe", "Lfm2MoeForCausalLM")])
def test_lfm2_gguf_fp32_and_q8_0(tmp_path_factory, tmp_path, name, arch):
    """LFM2 / LFM2-MoE from llama.cpp's converter (conv layers are the ones with head_count_kv 0, the MLP width
    already adjusted, conv kernels squeezed to (C, K), the final norm as token_embd_norm, LFM2-MoE's expert bias as
    exp_probs_b): the fp32 build equals transformers over the prompt, 20 cached decode steps and a two-chunk
    prefill; llama.cpp's Q8_0 of it built as stored equals its own fp32 build."""
    model, path = converted_lfm2(tmp_path_factory, name)
    with GGUFSource(path) as source:
        state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
        conv = source.read("model.layers.0.conv.conv.weight")
        np.testing.assert_array_equal(conv, state["model.layers.0.conv.conv.weight"])
    fp32_build_matches(path, tmp_path / "out", model, arch, chunked=True)
    keep = ("/model/layers.*/moe/experts/*",) if "moe" in name else ()
    report = as_stored_matches_fp32(quantize(path, "Q8_0"), tmp_path, keep)
    assert {g["storage"] for g in report["groups"] if "conv/in_proj" in g["label"]} == {"int8 block 32 (exact Q8_0)"}


def test_glm4_moe_gguf_fp32_and_q8_0(tmp_path_factory, tmp_path):
    """GLM-4.5-style MoE from llama.cpp's converter (glm4moe: block_count counts the MTP layer, nextn_predict_layers
    1, which is left out; sigmoid routing with exp_probs_b, expert_weights_scale 2.5 and _norm, shared experts,
    partial rotary, q/k norms and biases): the fp32 build equals transformers over the prompt and 20 cached decode
    steps; llama.cpp's Q8_0 built as stored (experts kept float) equals its own fp32 build. The tokenizer gets the
    four special tokens the converter's GLM vocabulary reads ([gMASK], <|user|>, <|endoftext|>, <|observation|>)."""
    from real_converter import real_convert
    from test_family_newer import make_glm
    from tokenizers import AddedToken, Tokenizer

    folder = tmp_path / "hf"
    model = make_glm(folder, vocab_size=324)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("[gMASK]", "<|user|>", "<|endoftext|>",
                                                                   "<|observation|>")])
    tok.save(str(folder / "tokenizer.json"))
    path = real_convert(folder, tmp_path / "F32.gguf", "f32", pre="gpt-2")
    with GGUFSource(path) as source:
        assert source._key("block_count") == 4 and source.config["num_hidden_layers"] == 3
    fp32_build_matches(path, tmp_path / "out", model, "Glm4MoeForCausalLM", greedy=False)
    as_stored_matches_fp32(quantize(path, "Q8_0"), tmp_path, ("/model/layers.*/moe/experts/*",))


@pytest.mark.parametrize("variant", ["moe", "dense"])
def test_granite_hybrid_gguf_fp32_and_q8_0(tmp_path_factory, tmp_path, variant):
    """Granite 4.0 hybrid from llama.cpp's converter (granitehybrid: Mamba2 layers are those with head_count_kv 0;
    A written as -exp(A_log) (heads, 1), D (heads, 1), conv1d squeezed, the gated norm (groups, inner / groups);
    Q/K rows permuted; no rotary, as the converter writes for every hybrid and published granite-4.0-h has): the
    fp32 build equals transformers over the prompt, 20 cached decode steps and a two-chunk prefill, with experts
    and a shared MLP and without experts; llama.cpp's Q8_0 built as stored equals its own fp32 build. The tiny
    config.json names its layers "mamba" / "attention" as the published ones do (transformers 5 writes
    linear_attention / full_attention, which this converter does not recognise: a file with no attention layer,
    refused by name)."""
    from real_converter import real_convert
    from test_family_granite_hybrid import make

    folder = tmp_path / "hf"
    # the dense one with no experts used either (llama.cpp refuses expert_used_count above expert_count)
    model = make(folder, **({} if variant == "moe" else {"num_local_experts": 0, "num_experts_per_tok": 0}))
    legacy = {"linear_attention": "mamba", "full_attention": "attention"}
    config = json.loads((folder / "config.json").read_text())
    written = dict(config, layer_types=[legacy[t] for t in config["layer_types"]])
    (folder / "config.json").write_text(json.dumps(written))
    path = real_convert(folder, tmp_path / "F32.gguf", "f32", pre="gpt-2")
    fp32_build_matches(path, tmp_path / "out", model, "GraniteMoeHybridForCausalLM", chunked=True)
    keep = ("/model/layers.*/moe/experts/*",) if variant == "moe" else ()
    as_stored_matches_fp32(quantize(path, "Q8_0"), tmp_path, keep)
    if variant == "dense":  # the converter's reading of transformers 5's layer names: refused, naming the fix
        (folder / "config.json").write_text(json.dumps(config))
        bad = real_convert(folder, tmp_path / "no-attention.gguf", "f32", pre="gpt-2")
        with pytest.raises(ConfigError, match="no attention layer"):
            GGUFSource(bad)


def test_llama4_gguf_fp32_and_q8_0(tmp_path_factory, tmp_path):
    """Llama 4 text from llama.cpp's converter (llama4: experts stacked apart, down_proj transposed back, no
    permutation): a tiny Llama4ForCausalLM with Scout's fixed values (chunk 8192, NoPE every fourth layer, the
    temperature's floor 8192 and scale 0.1, the q/k norm: what llama.cpp's graph hard-codes, no GGUF key carrying
    them) builds at fp32 equal to transformers over the prompt and 20 cached decode steps; llama.cpp's Q8_0 built as
    stored (experts float) equals its own fp32 build."""
    from real_converter import real_convert
    from test_family_llama4 import TEXT
    from tiny import make_model

    published = dict(TEXT, attention_chunk_size=8192, floor_scale=8192, attn_scale=0.1)
    model = make_model("llama4", tmp_path / "hf", cls="Llama4TextConfig", **published)
    path = real_convert(tmp_path / "hf", tmp_path / "F32.gguf", "f32", pre="gpt-2")
    fp32_build_matches(path, tmp_path / "out", model, "Llama4ForCausalLM", greedy=False)
    as_stored_matches_fp32(quantize(path, "Q8_0"), tmp_path, ("/model/layers.*/moe/experts/*",))


def test_qwen35_gguf_with_mtp_layers_leaves_them_out(tmp_path_factory, tmp_path):
    """A Qwen3.5 checkpoint with a multi-token-prediction layer (mtp.*, as published), converted with it: the
    converter appends it as block 4 (blk.4.nextn.*, block_count 5, nextn_predict_layers 1, recurrent_layers of 5);
    the build reads the 4 decoder layers only and equals transformers (which has no MTP layer either)."""
    import shutil

    from real_converter import real_convert
    from safetensors.torch import load_file, save_file

    model, hf, _ = converted(tmp_path_factory, "qwen3_5")
    folder = tmp_path / "hf"
    shutil.copytree(hf, folder)
    state = load_file(folder / "model.safetensors")
    gen = torch.Generator().manual_seed(0)
    state.update({"mtp.layers.0." + k[len("model.layers.3."):]: v.clone() for k, v in state.items()
                  if k.startswith("model.layers.3.")})
    state["mtp.fc.weight"] = torch.randn(64, 128, generator=gen) * 0.02
    state.update({f"mtp.{n}.weight": torch.zeros(64) for n in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm")})
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    path = real_convert(folder, tmp_path / "F32.gguf", "f32", pre="gpt-2")
    with GGUFSource(path) as source:
        assert source._key("block_count") == 5 and source._key("nextn_predict_layers") == 1
        assert source.config["num_hidden_layers"] == 4 and not any(".layers.4." in t for t in source.tensor_names())
    out = tmp_path / "out"
    onnxforge.build(path, out, "fp32")
    prompt, decode = tokens()
    ref = reference_logits(model, prompt + decode)
    got = steps(out, [prompt] + [[t] for t in decode])
    assert np.abs(got - ref).max() < FP32_TOL, np.abs(got - ref).max()


def test_qwen35_moe_gguf_from_the_published_form(tmp_path):
    """The form users convert: Qwen3_5MoeForConditionalGeneration (text_config, model.language_model.*, a vision
    tower) through llama.cpp's converter gives a qwen35moe text GGUF (the tower goes to an mmproj file, not made
    here) whose fp32 build equals transformers' wrapper on text within 1e-4."""
    from real_converter import real_convert
    from tiny import VOCAB, spread_weights, tokenizer_files

    params = dict(QWEN["qwen3_5_moe"][1])
    seed = params.pop("seed")
    text = dict(params, vocab_size=VOCAB, max_position_embeddings=256, bos_token_id=1, eos_token_id=0, pad_token_id=0)
    vision = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64, patch_size=4,
                  num_position_embeddings=16)
    config = transformers.Qwen3_5MoeConfig(text_config=text, vision_config=vision, image_token_id=300,
                                           video_token_id=301, vision_start_token_id=302, vision_end_token_id=303)
    torch.manual_seed(seed)
    model = transformers.Qwen3_5MoeForConditionalGeneration(config).eval()
    spread_weights(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and ".linear_attn.norm." not in name and "visual" not in name:
                p.sub_(1.0)
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    tokenizer_files(folder)
    path = real_convert(folder, tmp_path / "F32.gguf", "f32", pre="gpt-2", extra=("--no-mtp",))
    out = tmp_path / "out"
    onnxforge.build(path, out, "fp32")
    assert json.loads((out / "build_report.json").read_text())["architecture"] == "Qwen3_5MoeForCausalLM"
    prompt, decode = tokens()
    ref = reference_logits(model, prompt + decode)
    got = steps(out, [prompt] + [[t] for t in decode])
    assert np.abs(got - ref).max() < FP32_TOL, np.abs(got - ref).max()


def rewrite(src, dst, **changes):
    """A copy of the F32 GGUF `src` with metadata `changes` ({key: (value, GGUFValueType)}), written by gguf-py."""
    import gguf

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in changes:
            continue
        array = f.types[0] == gguf.GGUFValueType.ARRAY
        writer.add_key_value(key, f.contents(), f.types[0], sub_type=f.types[-1] if array else None)
    for key, (value, vtype) in changes.items():
        writer.add_key_value(key, value, vtype)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.array(t.data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def test_variants_llamacpp_computes_otherwise_are_refused_by_name(tmp_path_factory, tmp_path):
    """One ConfigError naming the key, before a weight is read: an lfm2moe file routed otherwise than on sigmoid
    scores, and a llama4 file with sliding_window 0 (every layer full attention, MobileLLM-style)."""
    import gguf

    _, lfm2moe = converted_lfm2(tmp_path_factory, "lfm2_moe")
    bad = rewrite(lfm2moe, tmp_path / "softmax.gguf",
                  **{"lfm2moe.expert_gating_func": (1, gguf.GGUFValueType.UINT32)})
    with pytest.raises(ConfigError, match="expert_gating_func 1"):
        GGUFSource(bad)
    from real_converter import real_convert
    from test_family_llama4 import TEXT
    from tiny import make_model

    make_model("llama4", tmp_path / "hf", cls="Llama4TextConfig", **TEXT)
    path = real_convert(tmp_path / "hf", tmp_path / "F32.gguf", "f32", pre="gpt-2")
    bad = rewrite(path, tmp_path / "all-full.gguf",
                  **{"llama4.attention.sliding_window": (0, gguf.GGUFValueType.UINT32)})
    with pytest.raises(ConfigError, match="sliding_window 0"):
        GGUFSource(bad)
    with GGUFSource(rewrite(path, tmp_path / "copy.gguf")) as source:  # the copy itself reads
        assert source.config["architectures"] == ["Llama4ForCausalLM"]


def test_qwen35_gguf_q4_k_m_moves_out_proj_sub_blocks_exactly(tmp_path_factory, tmp_path):
    """llama.cpp's Q4_K_M of a Qwen3.5 whose out_proj rows are 256 wide (value heads of 64): out_proj is Q4_K, its
    columns reordered in runs of 64, whole sub-blocks of the op's 32-wide form, so it is carried over exactly (the
    sub-blocks' scales and offsets move with their codes); built as stored, its logits equal the fp32 build of the
    same file."""
    _, _, f32 = converted(tmp_path_factory, "qwen3_5", linear_value_head_dim=64)
    path = quantize(f32, "Q4_K_M")
    out_proj = "model.layers.0.linear_attn.out_proj.weight"
    with GGUFSource(path) as source:
        assert source.stored_format(out_proj) == "Q4_K" and source.native_format(out_proj).bits == 4
    report = as_stored_matches_fp32(path, tmp_path)
    storage = {g["label"]: g["storage"] for g in report["groups"]}
    assert "exact Q4_K" in storage["/model/layers.0/linear_attn/out_proj"], storage
