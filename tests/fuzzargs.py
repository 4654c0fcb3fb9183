"""Generated TOML recipes and `onnxforge build` argument vectors (kinds for fuzzcases.run_case).

The values come from the real option tables (RECIPE_KEYS, the rule keys, EXTRA_OPTIONS, the schemes,
templates, precisions and methods) with values of every type and edge ranges. What makes one invalid
is computed from the Recipe's field types and the ranges issue 22 names (`recipe_problems`,
`cli_problems`); a build from an invalid one counts as `accepted`.
"""
from __future__ import annotations

import json
import math
import tomllib
from dataclasses import fields
from pathlib import Path

from hypothesis import strategies as st

from fuzzcases import Case
from fuzzkinds import Kind, build_argv, plain_checkpoint, write_files
from fuzzlib import LLAMA_CONFIG
from onnxforge.quant.options import EXTRA_OPTIONS, RECIPE_KEYS
from onnxforge.quant.recipe import METHODS, PRECISIONS, PROVIDERS, Recipe
from onnxforge.quant.schemes import schemes
from onnxforge.quant.templates import templates

CONTEXT = LLAMA_CONFIG["max_position_embeddings"]
FLOATS = ("fp32", "fp16", "bf16")
BLOCKS = (16, 32, 64, 128, 256)
NOMATCH = ("/model/layer.0/*", "/lm_head/MatMull", "", "[", "model.layer.0.*")  # patterns no llama weight matches
PATTERNS = ("*", "lm_head", "/lm_head/MatMul", "model.layers.0.*", "*q_proj*", "/model/layers.0/*", *NOMATCH)
IGNORED_OPTIONS = ("fuse_qk_norm_gqa", "enable_cuda_graph", "hf_token")  # use_qdq is built (tests/test_qdq.py)
FIELD_TYPES = {f.name: f.type for f in fields(Recipe)}
BOOL_KEYS = {k for k, t in FIELD_TYPES.items() if t.startswith("bool")}
INT_KEYS = {k for k, t in FIELD_TYPES.items() if t.startswith("int")} - {"num_layers"}
CHOICES = {"precision": PRECISIONS, "provider": PROVIDERS, "method": METHODS, "scheme": tuple(schemes()),
           "template": tuple(templates()), "moe_quant_type": ("int4", "int8", "mxfp4")}
RULE_KEYS = ("match", "scheme", "bits", "block_size", "method", "symmetric", "accuracy_level", "keep_float")

# ----------------------------------------------------------------------------- TOML recipes

STRINGS = st.sampled_from(["true", "false", "1", "0", "32", "int4", "int8", "fp16", "fp32", "bf16", "source", "cpu",
                           "cuda", "rtn", "k_quant", "hqq", "default", "int4_wo_64", "int8_wo", "uint4_wo_32", "llama",
                           "qwen2", "bogus", "MatMul", "Gather", *PATTERNS])
SCALARS = st.one_of(st.booleans(), st.sampled_from([-(2**63), -1, 0, 1, 2, 3, 4, 5, 8, 15, 16, 17, 32, 33, 48, 64, 128,
                                                     256, 512, 2**31, 2**63 - 1]),
                    st.sampled_from([0.0, 0.5, 32.0, -1.5, math.nan, math.inf, -math.inf]), st.text(max_size=5), STRINGS)
VALUES = st.one_of(SCALARS, SCALARS, st.lists(SCALARS, max_size=3),
                   st.dictionaries(st.sampled_from(["int4_block_size", "bogus", "accuracy_level", "use_qdq"]), SCALARS,
                                   max_size=2))
GOOD = {"precision": list(PRECISIONS), "provider": ["cpu"], "method": list(METHODS), "block_size": list(BLOCKS),
        "accuracy_level": [0, 1, 4], "qmoe_block_size": [0, 32], "qmoe_weights_prepacked": [-1, 0],
        "scheme": ["int4_wo_64", "int8_wo", "uint4_wo_32"], "template": ["llama", "default"],
        "op_types": [["MatMul"], ["MatMul", "Gather"]], "keep_float": [["lm_head"], ["model.layers.0.*"]],
        "extra_options": [{"int4_block_size": "64"}, {"int4_is_symmetric": "false"}], "moe_quant_type": ["int4"],
        **{k: [True, False] for k in BOOL_KEYS}}
RECIPE_KEY_NAMES = sorted(RECIPE_KEYS - {"rules"}) + ["block_sise", "Precision"]


def key_value(keys, good):
    return st.sampled_from(keys).flatmap(
        lambda k: st.tuples(st.just(k), st.one_of(st.sampled_from(good.get(k, [0])), VALUES)))


RULE = st.tuples(st.one_of(st.sampled_from(PATTERNS), SCALARS, st.none()),
                 st.lists(key_value(list(RULE_KEYS[1:]) + ["bogus"], {"bits": [2, 4, 8], **GOOD}), max_size=3,
                          unique_by=lambda kv: kv[0]))
MALFORMED = ["precision = \n", "[[rules]\n", "block_size = 32\nblock_size = 64\n", "precision = 'int4\n", "= 3\n",
             "symmetric = True\n", "block_size = 0x20\n", "block_size = 3_2\n", "rules = [1, 2]\n",
             "[rules]\nmatch = 1\n", "precision = \"\xff\"\n", "keep_float = \"lm_head\"\n", "\ufeffprecision = \"int4\"\n",
             "[[rules]]\nmatch = \"*\"\nbits = 3\n", "block_size = 64 # comment\n", "native = 1\n", "rules = \"x\"\n"]
TOML_CASES = st.one_of(
    st.tuples(st.just("recipe"), st.lists(key_value(RECIPE_KEY_NAMES, GOOD), max_size=4, unique_by=lambda kv: kv[0]),
              st.lists(RULE, max_size=2), st.sampled_from([None, None, "fp32", "int4", "int8", "fp16"])),
    st.tuples(st.just("raw"), st.sampled_from(MALFORMED), st.just([]), st.sampled_from([None, "int4"])),
)


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"


def toml_text(pairs, rules) -> str:
    lines = [f"{k} = {toml_value(v)}" for k, v in pairs]
    for match, rule_pairs in rules:
        lines.append("\n[[rules]]")
        if match is not None:
            lines.append(f"match = {toml_value(match)}")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in rule_pairs)
    return "\n".join(lines) + "\n"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def value_problem(key: str, v) -> str:
    """Why `key = v` is not a valid recipe value ('' if it is, as far as the types and named ranges go)."""
    if key in BOOL_KEYS and not isinstance(v, bool):
        return f"{key} wants a boolean, got {v!r}"
    if key in INT_KEYS and not _is_int(v):
        return f"{key} wants an integer, got {v!r}"
    if key in CHOICES and (not isinstance(v, str) or v not in CHOICES[key]):
        return f"{key} wants one of {CHOICES[key]}, got {v!r}"
    if key == "block_size" and v not in BLOCKS:
        return f"block_size {v} is not one of {BLOCKS}"
    if key == "accuracy_level" and v not in range(5):
        return f"accuracy_level {v} is not 0..4"
    if key == "qmoe_block_size" and v < 0:
        return f"qmoe_block_size {v} < 0"
    if key == "qmoe_weights_prepacked" and v not in (-1, 0, 1):
        return f"qmoe_weights_prepacked {v} not in -1, 0, 1"
    if key in ("op_types", "keep_float"):
        items = v if isinstance(v, list) else [v]
        if not all(isinstance(x, str) for x in items):
            return f"{key} wants strings, got {v!r}"
        if key == "keep_float" and any(x in NOMATCH for x in items):
            return f"keep_float pattern {v!r} matches no weight"
    return ""


def rule_problems(i: int, rule) -> list[str]:
    if not isinstance(rule, dict):
        return [f"rules[{i}] is not a table"]
    problems = [f"rules[{i}] unknown key {k!r}" for k in rule if k not in RULE_KEYS]
    match = rule.get("match")
    if not isinstance(match, str):
        problems.append(f"rules[{i}].match {match!r} is not a pattern")
    elif match in NOMATCH:
        problems.append(f"rules[{i}].match {match!r} matches no weight")
    if "bits" in rule and (not _is_int(rule["bits"]) or rule["bits"] not in (2, 4, 8)):
        problems.append(f"rules[{i}].bits {rule['bits']!r}")
    if "keep_float" in rule and not isinstance(rule["keep_float"], bool):
        problems.append(f"rules[{i}].keep_float {rule['keep_float']!r} is not a boolean")
    problems += [f"rules[{i}].{p}" for k in ("block_size", "method", "symmetric", "accuracy_level", "scheme")
                 if k in rule for p in [value_problem(k, rule[k])] if p]
    return problems


def recipe_problems(data: dict, cli_precision: str | None) -> list[str]:
    problems = []
    for key, v in data.items():
        if key not in RECIPE_KEYS or key == "native":
            problems.append(f"unknown recipe key {key!r}")
        elif key == "rules":
            problems += ([p for i, r in enumerate(v) for p in rule_problems(i, r)] if isinstance(v, list)
                         else [f"rules {v!r} is not an array of tables"])
        elif key == "extra_options":
            if not isinstance(v, dict) or any(k not in EXTRA_OPTIONS for k in v):
                problems.append(f"extra_options {v!r}")
        elif value_problem(key, v):
            problems.append(value_problem(key, v))
    if cli_precision and data.get("precision", cli_precision) != cli_precision:
        problems.append(f"-p {cli_precision} contradicts the recipe's precision {data['precision']!r}")
    return problems


class TomlKind(Kind):
    name, strategy = "toml", TOML_CASES

    def __init__(self, scratch: Path):
        super().__init__(scratch)
        self.files = plain_checkpoint()

    def make(self, folder, drawn):
        what, pairs, rules, precision = drawn
        text = pairs if what == "raw" else toml_text(pairs, rules)
        (folder / "recipe.toml").write_text(text, encoding="utf-8", errors="surrogateescape")
        write_files(folder / "ckpt", self.files)
        try:
            problems = recipe_problems(tomllib.loads(text), precision)
        except tomllib.TOMLDecodeError as e:
            problems = [f"malformed TOML ({e})"]
        argv = build_argv("ckpt", precision, "--recipe", "recipe.toml")
        return Case(self.name, argv, f"recipe.toml = {text!r}; onnxforge {' '.join(argv)}", invalid=problems)

    def pinned(self):
        return [("recipe", [("symmetric", "false")], [], None), ("recipe", [("prune_lm_head", "false")], [], None),
                ("recipe", [("block_size", "32")], [], "int4"), ("raw", "native = 1\n", [], None)]


# ----------------------------------------------------------------------------- command lines

INT_ARGS = {"--block-size": ["-1", "0", "1", "15", "16", "32", "33", "48", "64", "128", "256", "512", str(2**31),
                             str(2**64), "x", "32.0", ""],
            "--max-length": ["-5", "0", "1", "16", str(CONTEXT), str(CONTEXT + 1), "99999999", "x", str(2**63)],
            "--workers": ["-1", "0", "1", "1", "1", "2", "1000000", "x", "1.5"]}
STR_ARGS = {"-p": ["fp32", "fp16", "bf16", "int4", "int4", "int8", "source", "int3", "", "INT4"],
            "-e": ["cpu", "cpu", "cpu", "cuda", "dml", "webgpu", "tpu", ""],
            "-c": ["cache", ""], "--recipe": ["good.toml", "bad.toml", "missing.toml", "notes.txt", "."],
            "--scheme": sorted(schemes()) + ["bogus", "", "int4_wo_48"], "--method": list(METHODS) + ["bogus", ""]}
SWITCHES = ["--asymmetric", "--int8-last-matmul", "--int8-mixed-layers", "--unpack-matmul", "--requantize",
            "--overwrite", "--strict"]
OPTION_VALUES = ["true", "false", "1", "0", "banana", "", "32", "-1", "0.5", "k_quant", "rtn", "int8", "MatMul", "*",
                 "/lm_head/MatMul", "/lm_head/MatMull", "/model/layer.0/*"]
EXCLUDE_OPTIONS = ("nodes_to_exclude", "int4_nodes_to_exclude")
EXTRA = st.one_of(st.builds(lambda k, v: f"{k}={v}", st.sampled_from(sorted(EXTRA_OPTIONS) + ["bogus"]),
                            st.sampled_from(OPTION_VALUES)), st.sampled_from(["novalue", "=1"]))
FLAG_VALUES = {**{k: st.sampled_from(v) for k, v in {**INT_ARGS, **STR_ARGS}.items()},
               "--keep-float": st.lists(st.sampled_from(PATTERNS), min_size=1, max_size=2),
               "--extra_options": st.lists(EXTRA, min_size=1, max_size=3)}
TARGETS = ["out", "out", "out", "out", "empty", "out/sub", "ckpt", ".", "mine", "notes.txt", "ckpt/inner"]
MODELS = ["ckpt"] * 8 + ["missing", "notes.txt", "mine", ""]
CLI_CASES = st.tuples(
    st.sampled_from(MODELS), st.sampled_from(TARGETS),
    st.lists(st.sampled_from(sorted(FLAG_VALUES)), max_size=3, unique=True).flatmap(
        lambda names: st.fixed_dictionaries({n: FLAG_VALUES[n] for n in names})),
    st.lists(st.sampled_from(SWITCHES), max_size=3, unique=True), st.booleans())


def cli_argv(model: str, target: str, flags: dict, switches: list[str], quiet: bool) -> list[str]:
    argv = ["build", "-m", model, "-o", target] + (["--quiet"] if quiet else [])
    for k, v in flags.items():
        if k == "--keep-float":
            argv += [x for p in v for x in ("--keep-float", p)]
        elif k == "--extra_options":
            argv += [k, *v]
        else:
            argv += [k, v]
    return argv + switches


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def cli_problems(target: str, flags: dict, switches: list[str]) -> list[str]:
    problems = []
    workers, block, max_length = (_int(flags.get(k)) for k in ("--workers", "--block-size", "--max-length"))
    if workers is not None and workers < 0:
        problems.append(f"--workers {workers}")
    if block is not None and block not in BLOCKS:
        problems.append(f"--block-size {block}")
    if max_length is not None and not 1 <= max_length <= CONTEXT:
        problems.append(f"--max-length {max_length} outside 1..{CONTEXT} (the context)")
    problems += [f"--keep-float {p!r} matches no weight" for p in flags.get("--keep-float", []) if p in NOMATCH]
    for item in flags.get("--extra_options", []):
        key, _, value = item.partition("=")
        if key in IGNORED_OPTIONS and value not in ("false", "0"):
            problems.append(f"--extra_options {item} is accepted and ignored")
        if key in EXCLUDE_OPTIONS and any(p in NOMATCH for p in value.split(",")):
            problems.append(f"--extra_options {item} names a node no weight has")
    precision = flags.get("-p")
    method_options = [k for k in ("--method", "--block-size", "--scheme") if k in flags]
    method_options += [s for s in switches if s in ("--asymmetric", "--int8-last-matmul", "--int8-mixed-layers")]
    if precision in FLOATS and method_options:
        problems.append(f"-p {precision} contradicts {method_options}")
    if precision and precision != "int4" and flags.get("--recipe") == "good.toml":
        problems.append(f"-p {precision} contradicts good.toml's precision int4")
    scheme = flags.get("--scheme", "")
    if (precision == "int4" and scheme.startswith("int8")) or (precision == "int8" and "int4" in scheme):
        problems.append(f"-p {precision} contradicts --scheme {scheme}")
    if target in (".", "ckpt", "ckpt/inner", "notes.txt", "mine"):
        problems.append(f"-o {target} is the current folder, the input, inside it, a file or a folder of the user's")
    return problems


class CliKind(Kind):
    name, strategy = "cli", CLI_CASES

    def __init__(self, scratch: Path):
        super().__init__(scratch)
        self.files = plain_checkpoint()

    def make(self, folder, drawn):
        model, target, flags, switches, quiet = drawn
        write_files(folder / "ckpt", self.files)
        argv = cli_argv(model, target, flags, switches, quiet)
        return Case(self.name, argv, "onnxforge " + " ".join(repr(a) if not a or " " in a else a for a in argv),
                    invalid=cli_problems(target, flags, switches), target=target)

    def pinned(self):
        return [("ckpt", "out", {"--workers": "-1"}, [], True), ("ckpt", "out", {"--block-size": "0", "-p": "int4"}, [], True),
                ("ckpt", "ckpt", {}, ["--overwrite"], True), ("ckpt", ".", {}, ["--overwrite"], True),
                ("ckpt", "mine", {}, ["--overwrite"], True), ("ckpt", "out", {"--max-length": "-5"}, [], True)]


def all_kinds() -> list[type[Kind]]:
    from fuzzkinds import ConfigKind, GGUFKind, SafetensorsKind, TokenizerKind

    return [SafetensorsKind, GGUFKind, ConfigKind, TokenizerKind, TomlKind, CliKind]
