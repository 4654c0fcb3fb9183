"""The kinds of generated input bench/fault_fuzz.py and tests/test_fault_fuzz.py run (see fuzzcases.py).

safetensors, gguf and config reuse tests/test_fuzz.py's strategies (fuzzlib.py); tokenizer mutates
tokenizer.json / tokenizer_config.json / generation_config.json; toml draws recipes from the real
RECIPE_KEYS and rule keys with values of every TOML type; cli draws `onnxforge build` flag subsets with
edge values and output targets among the user's own files. Where the generator knows an input is
invalid (a computed fact: `tokenizers` cannot load the file, a value's type is not the field's, a
range the issue names), the Case says why, and a build from it counts as `accepted`.
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
from hypothesis import given, seed
from hypothesis import strategies as st

import fuzzlib
from fuzzcases import Case, Counts, run_case, user_files
from fuzzlib import INTS, JSON_JUNK, LLAMA_CONFIG, NON_UTF8



class Kind:
    """`strategy` draws a case; `make(folder, drawn)` writes the input into `folder` and returns the Case."""

    name = ""
    strategy = st.nothing()

    def __init__(self, scratch: Path):
        self.scratch = scratch

    def make(self, folder: Path, drawn) -> Case:
        raise NotImplementedError

    def pinned(self) -> list:
        return []


def build_argv(model: str, precision: str | None, *extra: str, out: str = "out") -> list[str]:
    argv = ["build", "-m", model, "-o", out, "--quiet", "--workers", "1"]
    return argv + (["-p", precision] if precision else []) + list(extra)


def write_files(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def plain_checkpoint(vocab: int = fuzzlib.VOCAB) -> dict[str, bytes]:
    """file name -> bytes of a tiny llama checkpoint (kept in memory: each case writes a fresh copy)."""
    from safetensors.numpy import save

    return {"config.json": json.dumps(dict(LLAMA_CONFIG, vocab_size=vocab)).encode(),
            "model.safetensors": save(fuzzlib.llama_tensors(np.random.default_rng(0), vocab=vocab))}


# ----------------------------------------------------------------------------- checkpoint files


class SafetensorsKind(Kind):
    name, strategy = "safetensors", fuzzlib.SAFETENSORS_CASES

    def __init__(self, scratch: Path):
        super().__init__(scratch)
        self.raw = fuzzlib.safetensors_bytes(fuzzlib.llama_tensors(np.random.default_rng(0)))

    def make(self, folder, drawn):
        header_ops, byte_ops, precision = drawn
        fuzzlib.write_safetensors_case(folder / "ckpt", self.raw, header_ops, byte_ops)
        return Case(self.name, build_argv("ckpt", precision), f"mutate_safetensors(header_ops={header_ops!r}, "
                    f"byte_ops={byte_ops!r}); build -p {precision}")

    def pinned(self):
        return [([], [], "fp32"), ([], [("truncate", 0.5)], "int4")]


class GGUFKind(Kind):
    name, strategy = "gguf", fuzzlib.GGUF_CASES

    def __init__(self, scratch: Path):
        super().__init__(scratch)
        base = scratch / "gguf-base"
        base.mkdir(exist_ok=True)
        self.raw = fuzzlib.gguf_bytes(base)
        self.slots, self.header_end = fuzzlib.gguf_slots(self.raw)

    def make(self, folder, drawn):
        ops, precision = drawn
        (folder / "model.gguf").write_bytes(fuzzlib.mutate_gguf(self.raw, self.slots, self.header_end, ops))
        return Case(self.name, build_argv("model.gguf", precision), f"mutate_gguf(ops={ops!r}); build -p {precision}")

    def pinned(self):
        return [([], "fp32"), ([("slot", "array_count", 0, 2**40)], "fp32")]


class ConfigKind(Kind):
    name, strategy = "config", fuzzlib.CONFIG_CASES

    def __init__(self, scratch: Path):
        from safetensors.numpy import save_file

        super().__init__(scratch)
        self.weights = scratch / "config-base.safetensors"
        save_file(fuzzlib.llama_tensors(np.random.default_rng(0)), str(self.weights))

    def make(self, folder, drawn):
        ops, precision = drawn
        fuzzlib.write_config_case(folder / "ckpt", self.weights, ops)
        return Case(self.name, build_argv("ckpt", precision), f"config ops {ops!r}; build -p {precision}")

    def pinned(self):
        return [([("set", "model_type", "llama")], "fp32")]


# ----------------------------------------------------------------------------- tokenizer files

TOKENIZER_PATHS = [("model",), ("model", "type"), ("model", "vocab"), ("model", "merges"), ("model", "unk_token"),
                   ("model", "byte_fallback"), ("model", "dropout"), ("added_tokens",), ("normalizer",),
                   ("pre_tokenizer",), ("decoder",), ("post_processor",), ("version",), ("truncation",), ("padding",)]
MODEL_TYPES = st.sampled_from(["WordLevel", "Unigram", "WordPiece", "BPE", "Bogus", "", "bpe"])
TC_KEYS = ["chat_template", "bos_token", "eos_token", "pad_token", "unk_token", "added_tokens_decoder",
           "model_max_length", "add_bos_token", "tokenizer_class", "additional_special_tokens"]
TC_VALUES = st.one_of(JSON_JUNK, st.sampled_from([
    "{% for m in messages %}{{ m['content'] }}{% endfor %}", "{{ unclosed", "{% endfor %}", "<notatoken>", "<s>",
    {"content": "<s>"}, {"content": 3}, 10**30, -1, [{"name": "default", "template": "{{x}}"}], [1], {"0": {"content": 1}}]))
GEN_KEYS = ["bos_token_id", "eos_token_id", "pad_token_id", "max_length", "temperature", "top_p", "do_sample"]
TOKENIZER_OPS = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(TOKENIZER_PATHS), st.one_of(JSON_JUNK, MODEL_TYPES)),
    st.tuples(st.just("model_type"), MODEL_TYPES),
    st.tuples(st.just("convert"), st.sampled_from(["WordLevel", "Unigram", "WordPiece"])),
    st.tuples(st.just("vocab_id"), st.integers(0, 10**4), st.one_of(INTS, st.text(max_size=2), st.none())),
    st.tuples(st.just("added"), st.integers(0, 9), st.sampled_from(["id", "content", "special"]), JSON_JUNK),
    st.tuples(st.just("add_token"), st.one_of(INTS, st.integers(-3, 400))),
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("insert"), st.integers(0, 10**5), NON_UTF8),
    st.tuples(st.just("replace"), st.sampled_from([b"", b"{", b"null", b"[]", b"{}", b"\x00" * 8, b'{"model": 3}'])),
    st.tuples(st.just("delete"), st.sampled_from(["tokenizer.json", "tokenizer_config.json"])),
    st.tuples(st.just("tc"), st.sampled_from(TC_KEYS), TC_VALUES),
    st.tuples(st.just("tc_replace"), st.sampled_from([b"", b"{", b"[]", b"\xff\xfe"])),
    st.tuples(st.just("gen"), st.sampled_from(GEN_KEYS), st.one_of(JSON_JUNK, st.just(2**40), st.just([0, 10**6]))),
)
TOKENIZER_CASES = st.tuples(st.lists(TOKENIZER_OPS, min_size=1, max_size=3), st.sampled_from(["fp32", "fp32", "int4"]))


def convert_model(tok: dict, to: str) -> dict:
    vocab = tok["model"].get("vocab") if isinstance(tok.get("model"), dict) else None
    vocab = vocab if isinstance(vocab, dict) else {"<s>": 0}
    if to == "WordLevel":
        return {"type": "WordLevel", "vocab": vocab, "unk_token": "<s>"}
    if to == "WordPiece":
        return {"type": "WordPiece", "vocab": vocab, "unk_token": "<s>", "continuing_subword_prefix": "##",
                "max_input_chars_per_word": 100}
    return {"type": "Unigram", "unk_id": 0, "vocab": [[t, -1.0] for t in vocab], "byte_fallback": False}


def mutate_tokenizer(tok: dict, tc: dict, gen: dict, ops) -> dict[str, bytes | None]:
    """The three files after `ops` (None: the file is absent)."""
    tok, tc, gen = copy.deepcopy(tok), copy.deepcopy(tc), copy.deepcopy(gen)
    for op in ops:
        if op[0] == "set":
            node = tok
            for k in op[1][:-1]:
                node = node.get(k) if isinstance(node, dict) else None
            if isinstance(node, dict):
                node[op[1][-1]] = op[2]
        elif op[0] == "model_type" and isinstance(tok.get("model"), dict):
            tok["model"]["type"] = op[1]
        elif op[0] == "convert":
            tok["model"] = convert_model(tok, op[1])
        elif op[0] == "vocab_id" and isinstance(tok.get("model"), dict) and isinstance(tok["model"].get("vocab"), dict):
            vocab = tok["model"]["vocab"]
            if vocab:
                vocab[list(vocab)[op[1] % len(vocab)]] = op[2]
        elif op[0] == "added" and isinstance(tok.get("added_tokens"), list) and tok["added_tokens"]:
            entry = tok["added_tokens"][op[1] % len(tok["added_tokens"])]
            if isinstance(entry, dict):
                entry[op[2]] = op[3]
        elif op[0] == "add_token" and isinstance(tok.get("added_tokens"), list):
            tok["added_tokens"].append({"id": op[1], "content": f"<x{op[1]}>", "single_word": False, "lstrip": False,
                                        "rstrip": False, "normalized": False, "special": True})
        elif op[0] == "tc":
            tc[op[1]] = op[2]
        elif op[0] == "gen":
            gen[op[1]] = op[2]
    files = {"tokenizer.json": json.dumps(tok).encode(), "tokenizer_config.json": json.dumps(tc).encode(),
             "generation_config.json": json.dumps(gen).encode()}
    for op in ops:
        data = files["tokenizer.json"]
        if op[0] == "truncate" and data is not None:
            files["tokenizer.json"] = data[:int(len(data) * op[1])]
        elif op[0] == "insert" and data is not None:
            at = op[1] % (len(data) + 1)
            files["tokenizer.json"] = data[:at] + op[2] + data[at:]
        elif op[0] == "replace":
            files["tokenizer.json"] = op[1]
        elif op[0] == "tc_replace":
            files["tokenizer_config.json"] = op[1]
        elif op[0] == "delete":
            files[op[1]] = None
    return files


def tokenizer_problem(data: bytes | None) -> str:
    """Why the `tokenizers` library (the producer of the format) cannot load tokenizer.json, or ''."""
    from tokenizers import Tokenizer

    if data is None:
        return ""
    try:
        Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # noqa: BLE001 -- whatever the producer refuses is corrupt
        return f"tokenizers cannot load tokenizer.json ({str(e)[:80]})"
    return ""


class TokenizerKind(Kind):
    name, strategy = "tokenizer", TOKENIZER_CASES

    def __init__(self, scratch: Path):
        import tiny

        super().__init__(scratch)
        base = scratch / "tokenizer-base"
        base.mkdir(exist_ok=True)
        tiny.tokenizer_files(base)
        self.tok = json.loads((base / "tokenizer.json").read_text())
        self.tc = json.loads((base / "tokenizer_config.json").read_text())
        self.gen = {"bos_token_id": 1, "eos_token_id": 0}
        self.files = plain_checkpoint(vocab=tiny.VOCAB)

    def make(self, folder, drawn):
        ops, precision = drawn
        ckpt = write_files(folder / "ckpt", self.files)
        files = mutate_tokenizer(self.tok, self.tc, self.gen, ops)
        for name, data in files.items():
            if data is not None:
                (ckpt / name).write_bytes(data)
        problem = tokenizer_problem(files["tokenizer.json"])
        return Case(self.name, build_argv("ckpt", precision), f"tokenizer ops {ops!r}; build -p {precision}",
                    invalid=[problem] if problem else [], expect_tokenizer_warning=files["tokenizer.json"] is None)

    def pinned(self):
        return [([("tc", "chat_template", "{{ unclosed")], "fp32"), ([("truncate", 0.5)], "fp32"),
                ([("convert", "WordLevel")], "fp32"), ([("delete", "tokenizer.json")], "fp32")]


# ----------------------------------------------------------------------------- running a kind


def run_kind(kind: Kind, n: int, counts: Counts, scratch: Path, seconds: int = fuzzlib.CASE_SECONDS,
             chunk: int = 0) -> None:
    """The kind's pinned cases, then `n` drawn by Hypothesis: derandomized (the same cases every run) for
    chunk 0, from seed `chunk` for the others (other cases, the same each run)."""
    counter = [0]
    options = {} if chunk == 0 else {"derandomize": False}

    def one(drawn):
        counter[0] += 1
        folder = scratch / f"{kind.name}{counter[0]}"
        case = None
        try:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            user_files(folder)
            case = kind.make(folder, drawn)
            run_case(counts, case, folder, seconds)
        except Exception as e:  # noqa: BLE001 -- the harness's own file operations failed: a build broke this process
            counts.add(kind.name, "traceback", case.repro if case else repr(drawn),
                       f"this process failed after the case (a build closed a file descriptor it did not own, or "
                       f"the like; the culprit may be an earlier case): {type(e).__name__}: {e}")

    with fuzzlib.guarded():
        for drawn in kind.pinned() if chunk == 0 else []:
            one(drawn)

        @fuzzlib.fuzz_settings(n, **options)
        @given(kind.strategy)
        def fuzz(drawn):
            one(drawn)

        (seed(chunk)(fuzz) if chunk else fuzz)()

