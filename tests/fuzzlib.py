"""Generated bad inputs for onnxforge builds, shared by tests/test_fuzz.py, tests/test_fault_fuzz.py and
bench/fault_fuzz.py: tiny llama checkpoints (safetensors, GGUF), Hypothesis strategies of mutations of
safetensors headers, GGUF headers and tensor tables and config.json values, the functions that apply
them, and the per-case guard (an alarm and an address-space cap).
"""
from __future__ import annotations

import json
import math
import resource
import signal
import struct
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

import tiny  # noqa: E402

CASE_SECONDS = 20
MEMORY_HEADROOM = 4 << 30  # address space a case may add before an allocation fails (MemoryError)


def fuzz_settings(n: int, derandomize: bool = True):
    return settings(max_examples=n, derandomize=derandomize, deadline=None, database=None, print_blob=False,
                    suppress_health_check=list(HealthCheck))


# ----------------------------------------------------------------------------- tiny inputs

HIDDEN, HEADS, KV_HEADS, LAYERS, VOCAB, INTER = 32, 2, 1, 1, 64, 64  # head_dim 16 (CPU GQA needs 16k)


def llama_tensors(rng: np.random.Generator, vocab: int = VOCAB) -> dict[str, np.ndarray]:
    shapes = tiny.llama_shapes(hidden=HIDDEN, heads=HEADS, kv_heads=KV_HEADS, layers=LAYERS, vocab=vocab, inter=INTER)
    return {k: (rng.standard_normal(s) * 0.2).astype(np.float32) for k, s in shapes.items()}


LLAMA_CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=HIDDEN,
                    num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, num_hidden_layers=LAYERS,
                    vocab_size=VOCAB, intermediate_size=INTER, max_position_embeddings=64, rms_norm_eps=1e-6,
                    rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=0,
                    hidden_act="silu")


def safetensors_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    from safetensors.numpy import save

    return save(tensors)


def gguf_bytes(folder: Path) -> bytes:
    """A complete tiny llama GGUF (byte-level BPE vocabulary), written by gguf.GGUFWriter."""
    import gguf
    from tokenizers import pre_tokenizers

    rng = np.random.default_rng(0)
    tokens = ["<s>", "</s>"] + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["Ġt"]
    path = folder / "base.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("fuzz")
    w.add_context_length(64)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3] + [1] * (len(tokens) - 2))
    w.add_token_merges(["Ġ t"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    gguf_names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                  "lm_head.weight": "output.weight", "input_layernorm": "attn_norm", "post_attention_layernorm":
                  "ffn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                  "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                  "mlp.down_proj": "ffn_down"}
    for name, array in llama_tensors(rng, vocab=len(tokens)).items():
        if name in gguf_names:
            g = gguf_names[name]
        else:
            _, _, i, rest = name.split(".", 3)
            g = f"blk.{i}.{gguf_names[rest.rsplit('.', 1)[0]]}.weight"
        w.add_tensor(g, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


# ----------------------------------------------------------------------------- the per-case guard


class Hang(BaseException):
    """Raised by the per-case alarm; a BaseException so that no `except Exception` in the code under
    test can turn it into an ordinary error."""


@contextmanager
def guarded():
    """A per-case alarm, and an address-space cap so a huge allocation fails instead of swapping."""

    def on_alarm(signum, frame):
        raise Hang("a case ran past its time limit")

    old_handler = signal.signal(signal.SIGALRM, on_alarm)
    old_limit = resource.getrlimit(resource.RLIMIT_AS)
    vm = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize() if sys.platform == "linux" else 0
    if vm and old_limit[0] == resource.RLIM_INFINITY:
        resource.setrlimit(resource.RLIMIT_AS, (vm + MEMORY_HEADROOM, old_limit[1]))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old_handler)
        resource.setrlimit(resource.RLIMIT_AS, old_limit)


# ----------------------------------------------------------------------------- safetensors

INTS = st.sampled_from([0, 1, 2, 31, 32, 33, 64, 1024, 4096, -1, -32, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63,
                        2**64, 2**64 + 1, 10**40])
JSON_JUNK = st.one_of(st.none(), st.booleans(), st.floats(), st.text(max_size=4), INTS,
                      st.lists(st.integers(-3, 3), max_size=2), st.dictionaries(st.text(max_size=2), INTS, max_size=2))
DTYPE_VALUES = st.one_of(
    st.sampled_from(["F32", "F16", "BF16", "F64", "I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64", "BOOL",
                     "F8_E4M3", "F8_E5M2", "f32", "F32 ", "", "Q4_0", "F4"]),
    JSON_JUNK)
DIM = st.one_of(INTS, st.integers(-5, 70), st.floats(), st.text(max_size=2), st.none(), st.booleans())
SHAPES = st.one_of(st.lists(DIM, max_size=4), JSON_JUNK)
OFFSETS = st.one_of(st.lists(st.one_of(INTS, st.integers(-10, 300_000), st.floats(), st.none()), max_size=3), JSON_JUNK)
NON_UTF8 = st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80", b"\xe2\x82"])

HEADER_OPS = st.one_of(
    st.tuples(st.just("dtype"), st.integers(0, 99), DTYPE_VALUES),
    st.tuples(st.just("shape"), st.integers(0, 99), SHAPES),
    st.tuples(st.just("offsets"), st.integers(0, 99), OFFSETS),
    st.tuples(st.just("overlap"), st.integers(0, 99), st.integers(0, 99), st.booleans()),
    st.tuples(st.just("shift"), st.integers(0, 99), st.sampled_from([-4, -1, 1, 2, 4, 1 << 20, 1 << 40])),
    st.tuples(st.just("drop"), st.integers(0, 99)),
    st.tuples(st.just("duplicate"), st.integers(0, 99), st.booleans()),
    st.tuples(st.just("rename"), st.integers(0, 99), st.text(max_size=8)),
    st.tuples(st.just("entry"), st.integers(0, 99), JSON_JUNK),
    st.tuples(st.just("metadata"), JSON_JUNK),
    st.tuples(st.just("extra"), st.text(max_size=6), DTYPE_VALUES, SHAPES, OFFSETS),
)
BYTE_OPS = st.one_of(
    st.tuples(st.just("header_len"), st.one_of(INTS, st.integers(-64, 64)), st.booleans()),
    st.tuples(st.just("non_utf8"), st.integers(0, 10**6), NON_UTF8),
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("data"), st.integers(0, 10**6), st.sampled_from([b"\xff\xff\xff\xff", b"\x00\x00\x80\x7f",
                                                                        b"\x00\x00\x80\xff", b"\xff\xff\x7f\x7f"])),
    st.tuples(st.just("pad"), st.integers(1, 64)),
)
SAFETENSORS_CASES = st.tuples(st.lists(HEADER_OPS, max_size=3), st.lists(BYTE_OPS, max_size=2),
                              st.sampled_from(["fp32", "fp32", "int4"]))


def mutate_safetensors(raw: bytes, header_ops, byte_ops) -> bytes:
    (n,) = struct.unpack("<Q", raw[:8])
    data = raw[8 + n:]
    pairs = list(json.loads(raw[8:8 + n]).items())  # (name, entry); a list so duplicates can exist
    tensor_idx = [i for i, (k, _) in enumerate(pairs) if k != "__metadata__"]

    def pick(i: int) -> int:
        return tensor_idx[i % len(tensor_idx)]

    for op in header_ops:
        if not tensor_idx:
            break
        kind = op[0]
        if kind in ("dtype", "shape", "offsets"):
            i = pick(op[1])
            name, entry = pairs[i]
            if isinstance(entry, dict):
                entry = dict(entry, **{{"offsets": "data_offsets"}.get(kind, kind): op[2]})
            pairs[i] = (name, entry)
        elif kind == "overlap":
            i, j = pick(op[1]), pick(op[2])
            if isinstance(pairs[i][1], dict) and isinstance(pairs[j][1], dict):
                src = pairs[j][1]
                entry = dict(src) if op[3] else dict(pairs[i][1], data_offsets=src.get("data_offsets"))
                pairs[i] = (pairs[i][0], entry)
        elif kind == "shift":
            i = pick(op[1])
            entry = pairs[i][1]
            if isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list):
                offs = [o + op[2] if isinstance(o, int) else o for o in entry["data_offsets"]]
                pairs[i] = (pairs[i][0], dict(entry, data_offsets=offs))
        elif kind == "drop":
            del pairs[pick(op[1])]
            tensor_idx = [i for i, (k, _) in enumerate(pairs) if k != "__metadata__"]
        elif kind == "duplicate":
            i = pick(op[1])
            pairs.insert(i + 1 if op[2] else len(pairs), pairs[i])
            tensor_idx = [i for i, (k, _) in enumerate(pairs) if k != "__metadata__"]
        elif kind == "rename":
            i = pick(op[1])
            pairs[i] = (op[2], pairs[i][1])
        elif kind == "entry":
            i = pick(op[1])
            pairs[i] = (pairs[i][0], op[2])
        elif kind == "metadata":
            pairs = [p for p in pairs if p[0] != "__metadata__"] + [("__metadata__", op[1])]
            tensor_idx = [i for i, (k, _) in enumerate(pairs) if k != "__metadata__"]
        elif kind == "extra":
            pairs.append((op[1], {"dtype": op[2], "shape": op[3], "data_offsets": op[4]}))
            tensor_idx = [i for i, (k, _) in enumerate(pairs) if k != "__metadata__"]
    header = ("{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in pairs) + "}").encode()
    length = len(header)
    for op in byte_ops:
        kind = op[0]
        if kind == "non_utf8":  # inside the header text, keeping the length field right
            at = op[1] % (len(header) + 1)
            header = header[:at] + op[2] + header[at:]
            length = len(header)
        elif kind == "pad":  # trailing spaces are allowed by the format
            header += b" " * op[1]
            length = len(header)
    blob = bytearray(struct.pack("<Q", length) + header + data)
    for op in byte_ops:
        kind = op[0]
        if kind == "header_len":
            value = op[1] if op[2] else length + op[1]
            blob[:8] = (value % 2**64).to_bytes(8, "little")
        elif kind == "flip":
            blob[op[1] % (8 + len(header))] = op[2]
        elif kind == "data" and len(blob) > 8 + len(header) + 4:
            at = 8 + len(header) + op[1] % (len(blob) - 8 - len(header) - 4)
            blob[at:at + 4] = op[2]
    for op in byte_ops:
        if op[0] == "truncate":
            del blob[int(len(blob) * op[1]):]
    return bytes(blob)


# ----------------------------------------------------------------------------- GGUF

SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_slots(data: bytes) -> tuple[dict[str, list[tuple[int, int, int]]], int]:
    """kind -> [(offset, width, value type)] of every count, length, type, dim and offset in a GGUF
    header (and every scalar metadata value); plus where the tensor infos end."""
    slots: dict[str, list[tuple[int, int, int]]] = {}

    def add(kind: str, pos: int, width: int, vtype: int = -1) -> None:
        slots.setdefault(kind, []).append((pos, width, vtype))

    for kind, pos, width in (("magic", 0, 4), ("version", 4, 4), ("n_tensors", 8, 8), ("n_kv", 16, 8)):
        add(kind, pos, width)
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    p = 24

    def string(p: int, kind: str) -> int:
        add(kind, p, 8)
        return p + 8 + struct.unpack_from("<Q", data, p)[0]

    def value(p: int, vtype: int) -> int:
        if vtype == 8:
            return string(p, "string_length")
        if vtype == 9:
            add("array_type", p, 4)
            add("array_count", p + 4, 8)
            atype, count = struct.unpack_from("<IQ", data, p)
            p += 12
            if atype in SCALAR_SIZES:
                return p + SCALAR_SIZES[atype] * count
            for _ in range(count):
                p = value(p, atype)
            return p
        add("scalar", p, SCALAR_SIZES[vtype], vtype)
        return p + SCALAR_SIZES[vtype]

    for _ in range(n_kv):
        p = string(p, "key_length")
        add("value_type", p, 4)
        vtype = struct.unpack_from("<I", data, p)[0]
        p = value(p + 4, vtype)
    for _ in range(n_tensors):
        p = string(p, "name_length")
        add("n_dims", p, 4)
        n_dims = struct.unpack_from("<I", data, p)[0]
        p += 4
        for _ in range(n_dims):
            add("dim", p, 8)
            p += 8
        add("tensor_type", p, 4)
        add("tensor_offset", p + 4, 8)
        p += 12
    return slots, p


# gguf 0.19's GGUFReader walks a metadata array one element per Python call with no bounds check, and
# a read past the end returns an empty view that does not advance the offset: a lying array count
# (or an array retyped into an array of arrays) loops up to 2**64 times while memory grows. Until
# onnxforge's GGUF source checks array headers against the file size before GGUFReader sees them,
# those mutations run in `test_gguf_lying_array_count_does_not_hang` (xfail, strict) and are kept
# out of the general fuzz. Set this to False once that is fixed.
GGUF_ARRAY_COUNT_BUG = False
ARRAY_HEADER_KINDS = ("array_type", "array_count")
GGUF_KINDS = ["magic", "version", "n_tensors", "n_kv", "key_length", "value_type", "string_length", "array_type",
              "array_count", "scalar", "name_length", "n_dims", "dim", "tensor_type", "tensor_offset"]
FUZZ_GGUF_KINDS = [k for k in GGUF_KINDS if not (GGUF_ARRAY_COUNT_BUG and k in ARRAY_HEADER_KINDS)]
GGUF_INTS = st.one_of(st.sampled_from([0, 1, 2, 3, 4, 5, 7, 8, 9, 12, 13, 31, 32, 33, 39, 255, 256, 1024, 2**16,
                                       2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**63 - 1, 2**63, 2**64 - 1]),
                      st.integers(-40, 40).map(lambda d: ("delta", d)))
GGUF_FLOATS = st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -1.0, 1e38, 1e-45, 0.5, 2.0, 1e6])
GGUF_OPS = st.one_of(
    st.tuples(st.just("slot"), st.sampled_from(FUZZ_GGUF_KINDS), st.integers(0, 10**6), GGUF_INTS),
    st.tuples(st.just("float"), st.integers(0, 10**6), GGUF_FLOATS),
    st.tuples(st.just("flip"), st.integers(0, 10**7), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.floats(0, 1)),
)
GGUF_CASES = st.tuples(st.lists(GGUF_OPS, min_size=1, max_size=3), st.sampled_from(["fp32", "fp32", "int4"]))


def mutate_gguf(raw: bytes, slots, header_end: int, ops, keep: frozenset[int] = frozenset()) -> bytes:
    """Apply `ops`; byte flips never land on the offsets in `keep`."""
    blob = bytearray(raw)
    floats = [s for s in slots["scalar"] if s[2] in (6, 12)]
    for op in ops:
        if op[0] == "slot" and slots.get(op[1]):
            pos, width, _ = slots[op[1]][op[2] % len(slots[op[1]])]
            value = op[3]
            if isinstance(value, tuple):
                value = int.from_bytes(blob[pos:pos + width], "little") + value[1]
            blob[pos:pos + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")
        elif op[0] == "float" and floats:
            pos, width, _ = floats[op[1] % len(floats)]
            blob[pos:pos + width] = struct.pack("<f" if width == 4 else "<d", op[2])
        elif op[0] == "flip" and op[1] % header_end not in keep:
            blob[op[1] % header_end] = op[2]
    for op in ops:
        if op[0] == "truncate":
            del blob[int(len(blob) * op[1]):]
    return bytes(blob)


# ----------------------------------------------------------------------------- config.json

NAN, INF = float("nan"), float("inf")
NUMBERS = st.sampled_from([-(2**63), -7, -1, 0, 1, 2, 3, 4, 5, 7, 8, 16, 32, 33, 64, 2**31, 2**63, 10**30,
                           0.0, -0.5, 0.5, 1.0, 1.5, 1e-9, 1e308, NAN, INF, -INF])
CONFIG_JUNK = st.one_of(
    st.none(), st.booleans(), st.text(max_size=5),
    st.sampled_from(["", "64", "NaN", "false", "true", "default", "llama3", "yarn", "silu", "gelu",
                     "sliding_attention", "LlamaForCausalLM"]),
    st.lists(st.one_of(NUMBERS, st.text(max_size=3), st.none()), max_size=3),
    st.dictionaries(st.text(max_size=4), NUMBERS, max_size=2),
)
VALUES = st.one_of(NUMBERS, NUMBERS, CONFIG_JUNK)
FACTORS = st.one_of(st.lists(NUMBERS, max_size=9), st.just([1.0] * 8), st.just([1.0] * 7), CONFIG_JUNK)
ROPE = st.fixed_dictionaries({}, optional={
    "rope_type": st.one_of(st.sampled_from(["default", "linear", "dynamic", "llama3", "yarn", "longrope", "ntk",
                                            "su", "mrope", ""]), CONFIG_JUNK),
    "type": st.sampled_from(["linear", "dynamic", "yarn", "bogus"]),
    "factor": VALUES, "low_freq_factor": VALUES, "high_freq_factor": VALUES,
    "original_max_position_embeddings": VALUES, "beta_fast": VALUES, "beta_slow": VALUES,
    "attention_factor": VALUES, "mscale": VALUES, "mscale_all_dim": VALUES, "truncate": VALUES,
    "short_factor": FACTORS, "long_factor": FACTORS, "rope_theta": VALUES, "partial_rotary_factor": VALUES,
})
CONFIG_KEYS = sorted(set(LLAMA_CONFIG) | {
    "head_dim", "partial_rotary_factor", "sliding_window", "layer_types", "use_sliding_window", "attention_bias",
    "mlp_bias", "hidden_activation", "pad_token_id", "rope_scaling", "rope_parameters"})
CONFIG_OPS = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(CONFIG_KEYS), VALUES),
    st.tuples(st.just("del"), st.sampled_from(CONFIG_KEYS)),
    st.tuples(st.just("set"), st.sampled_from(["rope_scaling", "rope_parameters"]),
              st.one_of(ROPE, st.fixed_dictionaries({"full_attention": ROPE}))),
    st.tuples(st.just("set"), st.just("layer_types"),
              st.lists(st.sampled_from(["full_attention", "sliding_attention", "chunked", None, 3]), max_size=2)),
    st.tuples(st.just("set"), st.just("architectures"),
              st.sampled_from([["LlamaForCausalLM"], ["MistralForCausalLM"], ["Qwen2ForCausalLM"],
                               ["Qwen3ForCausalLM"], ["BertForMaskedLM"], "LlamaForCausalLM", [], [None], [3]])),
)
CONFIG_CASES = st.tuples(st.lists(CONFIG_OPS, min_size=1, max_size=4), st.sampled_from(["fp32", "fp32", "int4"]))


def write_safetensors_case(folder: Path, raw: bytes, header_ops, byte_ops) -> Path:
    """`folder` with LLAMA_CONFIG and `raw` mutated by the ops as model.safetensors."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    (folder / "model.safetensors").write_bytes(mutate_safetensors(raw, header_ops, byte_ops))
    return folder


def write_config_case(folder: Path, weights: Path, ops) -> Path:
    """`folder` with a link to `weights` and LLAMA_CONFIG changed by the ops (NaN / Infinity as Python's json writes them)."""
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(weights)
    cfg = dict(LLAMA_CONFIG)
    for op in ops:
        if op[0] == "set":
            cfg[op[1]] = op[2]
        else:
            cfg.pop(op[1], None)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder

