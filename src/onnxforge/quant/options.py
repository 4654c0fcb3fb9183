"""Map the onnxruntime-genai builder's `--extra_options` (and our TOML recipes) onto a Recipe.

Every key is known, every value is checked: an unknown key or a bad value is a RecipeError that
names what is accepted (the anchor silently ignores some). On the command line every value is a string
("true"/"false"/"1"/"0" are the anchor's booleans); a TOML file has real types, so there a string where a
boolean or an integer belongs (`symmetric = "false"`, also inside its `[extra_options]` table) is an error
naming the key, the type wanted and its line.
"""
from __future__ import annotations

import re
import tomllib
from dataclasses import fields, replace
from pathlib import Path
from typing import Callable, Mapping

from ..errors import RecipeError
from .recipe import FIELD_KINDS, METHODS, Recipe, Rule, wrong_type
from .storage import Storage
from .types import BLOCK_SIZES

# algo_config aliases -> (method, placement flags)
ALGO_ALIASES: dict[str, tuple[str, dict]] = {
    "default": ("default", {}),
    "rtn": ("rtn", {}),
    "k_quant": ("k_quant", {}),
    "hqq": ("hqq", {}),
    "rtn_last": ("rtn", {"int8_last_matmul": True}),
    "k_quant_last": ("k_quant", {"int8_last_matmul": True}),
    "k_quant_mixed": ("k_quant", {"int8_last_matmul": True, "int8_mixed_layers": True}),
    "k_quant_linear": ("k_quant", {"int8_linear_attn": True}),
}


def parse_bool(key: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise RecipeError(f"{key}={value!r}: expected true or false")


def parse_int(key: str, value: object) -> int:
    try:
        return int(str(value))
    except ValueError:
        raise RecipeError(f"{key}={value!r}: expected an integer") from None


def parse_list(value: object) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [v.strip() for v in str(value).replace(";", ",").split(",") if v.strip()]


def _algo(key: str, value: object) -> dict:
    alias = str(value).strip()
    if alias not in ALGO_ALIASES:
        raise RecipeError(f"{key}={value!r}: unknown algorithm; choose one of: {', '.join(ALGO_ALIASES)}")
    method, placement = ALGO_ALIASES[alias]
    return {"method": method, **placement}


def _mixed_precision(key: str, value: object) -> dict:
    out = {}
    for item in parse_list(value):
        where, _, bits = item.partition(":")
        if bits not in ("int8", "8"):
            raise RecipeError(f"{key}: {item!r} must be of the form last_matmul:int8 or mixed_layers:int8")
        flag = {"last_matmul": "int8_last_matmul", "mixed_layers": "int8_mixed_layers",
                "linear_attn": "int8_linear_attn"}.get(where)
        if flag is None:
            raise RecipeError(f"{key}: unknown placement {where!r}; use last_matmul, mixed_layers or linear_attn")
        out[flag] = True
    return out


def _op_types(key: str, value: object) -> dict:
    items = value if isinstance(value, (list, tuple)) else str(value).replace("/", ",")
    return {"op_types": frozenset(parse_list(items))}


def _exclude(key: str, value: object) -> dict:
    return {"keep_float": tuple(parse_list(value))}


def _shared(key: str, value: object) -> dict:
    return {"shared_embeddings": parse_bool(key, value)}


def _typed(kind: str, fn: Callable[[str, object], dict]) -> Callable[[str, object], dict]:
    fn.kind = kind  # type: ignore[attr-defined]  # the TOML type the option takes ("bool", "int")
    return fn


def _flag(field: str) -> Callable[[str, object], dict]:
    return _typed("bool", lambda key, value: {field: parse_bool(key, value)})


def _int(field: str) -> Callable[[str, object], dict]:
    return _typed("int", lambda key, value: {field: parse_int(key, value)})


def _off_only(why: str) -> Callable[[str, object], dict]:
    """An anchor option onnxforge does not build: false is accepted (it changes nothing), true is refused."""
    def check(key: str, value: object) -> dict:
        if parse_bool(key, value):
            raise RecipeError(f"{key}=true: {why}; drop the option or set it to false")
        return {}

    return _typed("bool", check)


def _hf_token(key: str, value: object) -> dict:
    raise RecipeError(f"{key} is taken by `onnxforge build --extra_options {key}=...` or build(hf_token=...), not in "
                      "a recipe (a recipe is written into build_report.json, and a token is a secret); move it there")


def hub_token(items: list[str]) -> tuple[str | bool | None, list[str]]:
    """The anchor's `hf_token` out of `--extra_options` (a secret: it never enters the recipe or the report), and
    the other options: false = no token, true = the stored login / HF_TOKEN (the default), else the token itself."""
    tokens = [item.partition("=")[2].strip() for item in items if item.partition("=")[0].strip() == "hf_token"]
    rest = [item for item in items if item.partition("=")[0].strip() != "hf_token"]
    if len(set(tokens)) > 1:
        raise RecipeError("extra option hf_token is given twice with different values; keep one")
    if not tokens:
        return None, rest
    value = tokens[0]
    if not value:
        raise RecipeError("hf_token= is empty; give false, true or the token")
    low = value.lower()
    return (False if low in ("0", "false") else None if low in ("1", "true") else value), rest


def _moe_type(key: str, value: object) -> dict:
    return {"moe_quant_type": str(value).strip()}


def _moe_experts(key: str, value: object) -> dict:  # onnxforge's own: float experts (Recipe checks the value)
    return {"moe_experts": str(value).strip()}


def _use_8bits_moe(key: str, value: object) -> dict:  # the anchor's older spelling; moe_quant_type wins
    return {"moe_quant_type": "int8" if parse_bool(key, value) else "int4"}


def _no_remote_code(key: str, value: object) -> dict:
    if parse_bool(key, value):
        raise RecipeError(f"{key}=true would run code shipped with the model; onnxforge never does. Drop the option")
    return {}


def _adapter_path(key: str, value: object) -> dict:
    raise RecipeError(f"{key}: onnxforge builds a LoRA adapter either switched at run time (`--adapter DIR`, "
                      "build(adapters=[DIR]): a NAME.onnx_adapter file for og.Adapters) or folded into the weights "
                      "(`--merge-adapter DIR`, build(merge_adapter=DIR)); the anchor's always-on branch is neither: "
                      "use one of those and drop the option")


for _fn in (_shared, _use_8bits_moe, _no_remote_code):
    _typed("bool", _fn)


EXTRA_OPTIONS: dict[str, Callable[[str, object], dict]] = {
    "int4_algo_config": _algo,
    "algo_config": _algo,
    "int4_block_size": _int("block_size"),
    "block_size": _int("block_size"),
    "int4_is_symmetric": _flag("symmetric"),
    "is_symmetric": _flag("symmetric"),
    "int4_accuracy_level": _int("accuracy_level"),
    "accuracy_level": _int("accuracy_level"),
    "int4_nodes_to_exclude": _exclude,
    "nodes_to_exclude": _exclude,
    "int4_op_types_to_quantize": _op_types,
    "op_types_to_quantize": _op_types,
    "matmul_mixed_precision": _mixed_precision,
    "shared_embeddings": _shared,
    "int4_tied_embeddings": _shared,
    "unpack_matmul": _flag("unpack_matmul"),
    "disable_qkv_fusion": _flag("unpack_matmul"),
    "fuse_qkv": _typed("bool", lambda key, value: {"unpack_matmul": not parse_bool(key, value)}),
    "prune_lm_head": _flag("prune_lm_head"),
    "drop_activation_quant": _flag("drop_activation_quant"),
    "exclude_embeds": _flag("exclude_embeds"),
    "exclude_lm_head": _flag("exclude_lm_head"),
    "include_hidden_states": _flag("include_hidden_states"),
    "config_only": _flag("config_only"),
    "hf_remote": _no_remote_code,
    "adapter_path": _adapter_path,
    "int8_last_matmul": _flag("int8_last_matmul"),
    "int8_mixed_layers": _flag("int8_mixed_layers"),
    "int8_linear_attn": _flag("int8_linear_attn"),
    "moe_quant_type": _moe_type,
    "use_8bits_moe": _use_8bits_moe,
    "qmoe_block_size": _int("qmoe_block_size"),
    "moe_experts": _moe_experts,
    "mla_cache": lambda key, value: {"mla_cache": str(value).strip()},  # onnxforge's own (Recipe checks the value)
    "qmoe_weights_prepacked": _int("qmoe_weights_prepacked"),
    "use_cuda_bf16": _flag("use_cuda_bf16"),  # a quantized CUDA build's activations in bf16 (Recipe.use_cuda_bf16)
    "use_qdq": _flag("use_qdq"),  # DequantizeLinear + MatMul / Gather in place of MatMulNBits (Recipe.use_qdq)
    # the anchor's options onnxforge does not build: false is accepted, true refused
    "fuse_qk_norm_gqa": _off_only("onnxforge writes the q/k norms as their own ops before GroupQueryAttention "
                                  "(the fused form is not built)"),
    "enable_cuda_graph": _flag("enable_cuda_graph"),
    "enable_dml_graph": _flag("enable_dml_graph"),
    "enable_webgpu_graph": _off_only("WebGPU graph capture needs the anchor's graph-capture form of the attention "
                                     "mask and position ids, which onnxforge does not build (enableGraphCapture=0 is "
                                     "written)"),
    "hf_token": _hf_token,
}


def _not_built(why: str) -> Callable[[str, object], dict]:
    """An anchor option whose every value changes what is built, which onnxforge does not build: refused."""
    def refuse(key: str, value: object) -> dict:
        raise RecipeError(f"{key}={value}: {why}; drop the option")

    return refuse


_SPECULATIVE = "speculative decoding drafters (DFlash 2, DSpark, MTP) are not built by onnxforge"
_PAGED = "paged attention (the continuous-batching engine's PagedAttention graph) is not built by onnxforge"
_KV = "a quantized or rotated KV cache is not built by onnxforge (the cache is in the activation dtype)"
# the rest of onnxruntime-genai 0.18's --extra_options (builder.py's list): each refused with its reason, so no key is
# ever accepted and ignored (tests/test_runtime_options.py checks the list against the anchor's source)
ANCHOR_NOT_BUILT: dict[str, Callable[[str, object], dict]] = {
    "matmulnbits_weights_prepacked": _not_built("onnxforge writes MatMulNBits in the raw block layout that ONNX "
                                                "Runtime prepacks at load, not CUDA's fpA_intB prepacked layouts"),
    "num_hidden_layers": _not_built("a build has the checkpoint's layers (the anchor's unit-test option); cut the "
                                    "checkpoint's config instead"),
    "filename": _not_built("the model is always model.onnx (genai_config.json names it)"),
    "exclude_mtp": _off_only("onnxforge never builds a multi-token-prediction head"),
    "aux_hidden_state_layers": _not_built(_SPECULATIVE),
    "dflash2_path": _not_built(_SPECULATIVE), "dflash2_num_draft_tokens": _not_built(_SPECULATIVE),
    "dflash2_fuse_gate_up": _not_built(_SPECULATIVE), "dflash2_fuse_qkv": _not_built(_SPECULATIVE),
    "dflash2_precision": _not_built(_SPECULATIVE), "dspark_path": _not_built(_SPECULATIVE),
    "dspark_num_draft_tokens": _not_built(_SPECULATIVE), "dspark_top_k": _not_built(_SPECULATIVE),
    "max_draft_tokens": _not_built(_SPECULATIVE), "mtp_quant_config": _not_built(_SPECULATIVE),
    "fuse_mlp_gate_up": _off_only("onnxforge packs gate/up into one MatMul on its own when they share storage "
                                  "(--unpack-matmul keeps them apart); the anchor's Split form is not built"),
    "linear_attn_op": _not_built("onnxforge builds linear attention with the CPU LinearAttention op only"),
    "state_update_capacity": _not_built(_PAGED), "state_window": _not_built("recurrent state history is not built"),
    "enable_cuda_fpa_intb_gemm": _off_only("the fpA_intB CUDA kernel session option is not written"),
    "use_paged_attention": _off_only(_PAGED), "paged_block_size": _not_built(_PAGED),
    "paged_chunk_size": _not_built(_PAGED), "gpu_utilization_factor": _not_built(_PAGED),
    "max_batch_size": _not_built(_PAGED), "max_scheduled_tokens": _not_built(_PAGED), "num_blocks": _not_built(_PAGED),
    "windowed_kv_cache": _not_built("onnxforge writes a sliding-window model's cache as genai_config.json's "
                                    "sliding_window section says, with no switch"),
    "use_device_allocator_for_initializers": _off_only("that session option is not written into genai_config.json"),
    "kv_cache_quant_scheme": _not_built(_KV), "kv_cache_rotation": _not_built(_KV), "kv_cache_scale_file": _not_built(_KV),
    "use_webgpu_fp32": _off_only("WebGPU builds take fp16 I/O; build -p fp32 -e cpu for fp32"),
}


def parse_extra_options(items: list[str] | Mapping[str, object]) -> dict[str, object]:
    """`["k=v", ...]` (the anchor's command-line form) or a mapping -> dict, keys checked."""
    if isinstance(items, Mapping):
        pairs = dict(items)
    else:
        pairs = {}
        for item in items:
            key, sep, value = item.partition("=")
            if not sep:
                raise RecipeError(f"extra option {item!r} must be key=value")
            key, value = key.strip(), value.strip()
            if pairs.get(key, value) != value:
                raise RecipeError(f"extra option {key} is given twice ({key}={pairs[key]} and {key}={value}); keep one")
            pairs[key] = value
    for key in sorted(set(pairs) & set(ANCHOR_NOT_BUILT)):
        ANCHOR_NOT_BUILT[key](key, pairs[key])  # refused with its reason (or a no-op false)
    pairs = {k: v for k, v in pairs.items() if k not in ANCHOR_NOT_BUILT}
    unknown = sorted(set(pairs) - set(EXTRA_OPTIONS))
    if unknown:
        raise RecipeError(f"unknown extra option(s) {', '.join(unknown)}; accepted: {', '.join(sorted(EXTRA_OPTIONS))}")
    return pairs


def apply_extra_options(recipe: Recipe, options: Mapping[str, object]) -> Recipe:
    """Two options (or an option and its alias) that set one thing differently are an error, not a silent win
    (except the anchor's documented rule: moe_quant_type overrides use_8bits_moe)."""
    changes: dict = {}
    setter: dict[str, str] = {}
    pairs = parse_extra_options(options).items()
    for key, value in sorted(pairs, key=lambda kv: kv[0] != "use_8bits_moe"):  # moe_quant_type overrides it
        for name, v in EXTRA_OPTIONS[key](key, value).items():
            if changes.get(name, v) != v and setter[name] != "use_8bits_moe":
                raise RecipeError(f"extra options {setter[name]} and {key} contradict each other (they set {name} to "
                                  f"{changes[name]!r} and {v!r}); keep one")
            changes[name], setter[name] = v, key
    return replace(recipe, **changes)


# ---- TOML recipes ----------------------------------------------------------------------------
INTERNAL_FIELDS = {"num_layers", "native", "seen", "template_float"}  # set by the build, not by a recipe file
RECIPE_KEYS = {f.name for f in fields(Recipe)} - INTERNAL_FIELDS | {"extra_options", "template", "scheme"}


RULE_KINDS = {"match": "str", "scheme": "str", "bits": "int", "block_size": "int", "method": "str",
              "symmetric": "bool", "accuracy_level": "int", "keep_float": "bool"}


def line_of(text: str, key: str, table: str | None = None, index: int = 0) -> int | None:
    """The line of `key = ...` in TOML `text`: at the top level, in `[table]`, or in the index-th `[[table]]`
    (tomllib gives no positions). An inline table's key is found on the line that opens it."""
    current, count = None, -1
    lines = text.splitlines()
    for no, line in enumerate(lines, 1):
        head = re.match(r"\s*(\[\[?)\s*([^\]]+?)\s*\]", line)
        if head:
            current = head.group(2).strip()
            count = count + 1 if head.group(1) == "[[" and current == table else (index if current == table else -1)
            continue
        if current == table and (table is None or count == index) and re.match(rf"\s*{re.escape(key)}\s*=", line):
            return no
    if table is not None:
        for no, line in enumerate(lines, 1):
            if re.match(rf"\s*{re.escape(table)}\s*=", line) and re.search(rf"\b{re.escape(key)}\s*=", line):
                return no
    return None


class _Where:
    """Names a key in the recipe's errors: `FILE:LINE: key` when the file's text is known."""

    def __init__(self, text: str = "", origin: str = "recipe"):
        self.text, self.origin = text, origin

    def __call__(self, key: str, table: str | None = None, index: int = 0) -> str:
        line = line_of(self.text, key, table, index) if self.text else None
        return f"{self.origin}:{line}: " if line else f"{self.origin}: "

    def check(self, shown: str, value: object, kind: str | None, key: str, table: str | None = None,
              index: int = 0) -> None:
        msg = wrong_type(shown, value, kind) if kind else None
        if msg:
            raise RecipeError(self(key, table, index) + msg)


def _rule(i: int, entry: object, where: _Where = _Where()) -> Rule:
    if not isinstance(entry, dict) or "match" not in entry:
        raise RecipeError(f"rules[{i}] must be a table with 'match' and 'scheme' or bits/block_size/method/symmetric")
    allowed = set(RULE_KINDS)
    unknown = set(entry) - allowed
    if unknown:
        raise RecipeError(f"rules[{i}]: unknown key(s) {sorted(unknown)}; accepted: {sorted(allowed)}")
    for key, value in entry.items():
        where.check(f"rules[{i}].{key}", value, RULE_KINDS[key], key, "rules", i)
    if entry.get("keep_float"):
        return Rule(str(entry["match"]), None)
    if "scheme" in entry:
        from .schemes import get_scheme

        st = get_scheme(str(entry["scheme"]))
    else:
        st = Storage(bits=4)
    overrides = {k: entry[k] for k in ("bits", "block_size", "method", "symmetric", "accuracy_level") if k in entry}
    if "method" in overrides and overrides["method"] not in METHODS:
        raise RecipeError(f"rules[{i}]: unknown method {overrides['method']!r}; choose one of {', '.join(METHODS)}")
    st = replace(st, **overrides)
    for key, value, allowed in (("bits", st.bits, (2, 4, 8)), ("block_size", st.block_size, BLOCK_SIZES),
                                ("accuracy_level", st.accuracy_level, (None, 0, 1, 2, 3, 4))):
        if value not in allowed:
            shown = ", ".join(str(a) for a in allowed if a is not None)
            raise RecipeError(where(key, "rules", i) + f"rules[{i}].{key} must be one of {shown}, got {value}")
    return Rule(str(entry["match"]), st)


def _check_types(data: Mapping[str, object], where: _Where) -> None:
    """Real TOML types: a string where a boolean or an integer belongs names the key, the type and the line."""
    for key, value in data.items():
        if key in FIELD_KINDS or key in ("template", "scheme"):
            where.check(key, value, FIELD_KINDS.get(key, "str"), key)
        elif key in ("op_types", "keep_float") and not isinstance(value, str) and \
                not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise RecipeError(where(key) + f"{key} takes a list of strings, got {value!r}")
        elif key == "extra_options":
            if not isinstance(value, Mapping):
                raise RecipeError(where(key) + f"extra_options takes a table ([extra_options]), got {value!r}")
            for option, v in value.items():
                where.check(f"extra_options.{option}", v, getattr(EXTRA_OPTIONS.get(option), "kind", None), option,
                            "extra_options")


def recipe_from_mapping(data: Mapping[str, object], base: Recipe, text: str = "", origin: str = "recipe") -> Recipe:
    """A recipe from TOML data over `base`; `text` (the file's) lets errors name lines of `origin`."""
    unknown = sorted(set(data) - RECIPE_KEYS)
    if unknown:
        raise RecipeError(f"unknown recipe key(s) {', '.join(unknown)}; accepted: {', '.join(sorted(RECIPE_KEYS))}")
    where = _Where(text, origin)
    _check_types(data, where)
    changes: dict = {}
    for key, value in data.items():
        if key == "rules":
            if not isinstance(value, list):
                raise RecipeError("rules must be an array of tables ([[rules]])")
            changes["rules"] = tuple(_rule(i, e, where) for i, e in enumerate(value))
        elif key == "op_types" or key == "keep_float":
            changes[key] = frozenset(parse_list(value)) if key == "op_types" else tuple(parse_list(value))
        elif key in ("template", "scheme", "extra_options"):
            continue
        else:
            changes[key] = value
    recipe = replace(base, **changes)
    if "scheme" in data:
        from .schemes import apply_scheme

        recipe = apply_scheme(recipe, str(data["scheme"]))
        if "precision" in data and recipe.precision != data["precision"]:
            raise RecipeError(where("scheme") + f"scheme {data['scheme']!r} stores {recipe.precision} weights, but "
                              f"precision is {data['precision']!r}: the scheme would win; drop one of them")
    if "template" in data:
        from .templates import apply_template

        recipe = apply_template(recipe, str(data["template"]))
    if "extra_options" in data:
        recipe = apply_extra_options(recipe, data["extra_options"])  # type: ignore[arg-type]
    return recipe


def load_recipe_file(path: str | Path, base: Recipe) -> Recipe:
    try:
        text = Path(path).read_text(encoding="utf-8")
        data = tomllib.loads(text)
    except FileNotFoundError:
        raise RecipeError(f"recipe file {path} not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise RecipeError(f"recipe file {path} is not valid TOML: {e}") from None
    except OSError as e:
        raise RecipeError(f"recipe file {path} cannot be read: {e.strerror}") from None
    return recipe_from_mapping(data, base, text, str(path))
