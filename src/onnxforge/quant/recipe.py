"""A recipe decides, for every weight by its name, how it is stored.

Independent axes:
  * precision / io dtype  (fp32, fp16, bf16, int4, int8, or source: pre-quantized weights as stored)
  * the INT4 method       (rtn, k_quant, hqq, default) with block size, symmetry, accuracy level
  * where INT8 goes       (last MatMul, the llama.cpp mixed layers, linear attention)
  * what stays float      (templates per model type, user exclusions, op types)
  * user rules            (glob patterns on ONNX node names or HF module names -> storage), last match wins
Overrides compose in this order: base precision -> INT8 placement -> template keep-float ->
exclusions -> user rules.
"""
from __future__ import annotations

import difflib
import fnmatch
import re
from dataclasses import dataclass, field, fields, replace
from typing import Callable, Sequence

from ..errors import RecipeError
from ..sources.base import NativeFormat
from ..spec import ModelSpec
from .storage import Storage

PRECISIONS = ("fp32", "fp16", "bf16", "int4", "int8", "source")
PROVIDERS = ("cpu", "cuda", "dml", "webgpu")
METHODS = ("default", "rtn", "k_quant", "hqq", "gptq", "awq", "awq+gptq")  # the last three calibrate (calibrate/)
OP_TYPES = ("MatMul", "Gather")
MOE_QUANT_TYPES = ("int4", "int8", "mxfp4")
MOE_FLOAT_EXPERTS = ("fp32", "fp16")  # moe_experts: the float MoE op on the dequantized experts
MLA_CACHES = ("full", "latent")  # mla_cache: what a latent-attention layer's KV cache holds
FLOAT_PRECISIONS = ("fp32", "fp16", "bf16")

# the type each field takes (None allowed where the default is None): a wrong type is one error naming it
_KINDS = {"bool": (lambda v: isinstance(v, bool), "a boolean (true or false)"),
          "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
          "str": (lambda v: isinstance(v, str), "a string")}
FIELD_KINDS = {
    "precision": "str", "provider": "str", "method": "str", "block_size": "int", "symmetric": "bool",
    "accuracy_level": "int", "int8_last_matmul": "bool", "int8_mixed_layers": "bool", "int8_linear_attn": "bool",
    "unpack_matmul": "bool", "prune_lm_head": "bool", "shared_embeddings": "bool", "moe_quant_type": "str",
    "qmoe_block_size": "int", "qmoe_weights_prepacked": "int", "moe_experts": "str", "mla_cache": "str",
    "requantize": "bool",
    "drop_activation_quant": "bool", "exclude_embeds": "bool", "exclude_lm_head": "bool",
    "include_hidden_states": "bool", "config_only": "bool", "enable_cuda_graph": "bool", "enable_dml_graph": "bool",
    "use_qdq": "bool", "use_cuda_bf16": "bool",
}


def type_name(value: object) -> str:
    """How a value's type reads in an error: 'a string', 'an integer', ..."""
    for t, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
                    (list, "an array"), (tuple, "an array"), (dict, "a table")):
        if isinstance(value, t):
            return name
    return f"a {type(value).__name__}"


def wrong_type(key: str, value: object, kind: str) -> str | None:
    """The message when `value` is not of `kind` ("bool", "int", "str"), else None."""
    ok, wanted = _KINDS[kind]
    if ok(value):
        return None
    return f"{key} takes {wanted}, got {value!r} ({type_name(value)})"


@dataclass(frozen=True)
class Rule:
    """`pattern` (glob) -> storage; `storage=None` keeps the weight float."""

    pattern: str
    storage: Storage | None

    def matches(self, names: Sequence[str]) -> bool:
        return any(fnmatch.fnmatchcase(n, self.pattern) for n in names)


@dataclass(frozen=True)
class Recipe:
    precision: str = "fp32"
    provider: str = "cpu"
    method: str = "default"
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int | None = None  # None: 4 (int8 compute) on CPU, 0 elsewhere, like the anchor
    int8_last_matmul: bool = False
    int8_mixed_layers: bool = False
    int8_linear_attn: bool = False
    op_types: frozenset[str] = frozenset({"MatMul"})
    keep_float: tuple[str, ...] = ()  # user exclusions (each must match a weight: check_patterns)
    rules: tuple[Rule, ...] = ()
    unpack_matmul: bool = False
    # logits for the last position only (prefill skips the lm_head on every other row; the anchor's option)
    prune_lm_head: bool = False
    shared_embeddings: bool | None = None  # None: share whenever the checkpoint ties them
    moe_quant_type: str | None = None  # experts: None follows the precision; "int4", "int8"; "mxfp4" (CUDA)
    # experts' QMoE blocks along K; 0: one scale per output channel; None: 32, or what divides the experts
    qmoe_block_size: int | None = None
    qmoe_weights_prepacked: int = -1  # the anchor's option; onnxforge writes the raw layout (0) either way
    # experts through the float MoE op, dequantized to this dtype ("fp32": exact arithmetic, "fp16"), whatever the
    # precision and the experts' stored format; None: QMoE where the experts are quantized (moe_quant_type, -p)
    moe_experts: str | None = None
    # latent attention's KV cache (DeepSeek-V3, Kimi-K2; graph/mla.py): "full" the up-projected k and v of every
    # head, "latent" the compressed latent and the rotary key as one shared head (43-85x smaller; CPU only)
    mla_cache: str = "full"
    num_layers: int = 0  # set by bind()
    # int4/int8 keep a pre-quantized weight whose exact form has at most that many bits; True re-quantizes it
    requantize: bool = False
    # a pre-quantized checkpoint tuned with quantized activations (W4A8, W8A8) is built as weight-only, warned
    drop_activation_quant: bool = False
    # output shaping, the anchor's options (graph/decoder.py): an `inputs_embeds` input instead of `input_ids`; a
    # `hidden_states` output (the final norm's) instead of `logits`, or beside them; genai_config.json and the
    # tokenizer without a model
    exclude_embeds: bool = False
    exclude_lm_head: bool = False
    include_hidden_states: bool = False
    config_only: bool = False
    # runtime options written into genai_config.json's provider_options, as the anchor writes them (only for the
    # provider they belong to: set for another, they are refused)
    enable_cuda_graph: bool | None = None  # None: off (the anchor's default), with a note on -e cuda (export/graph_capture.py)
    enable_dml_graph: bool = True  # the anchor's default: DirectML graph capture on
    # the anchor's use_qdq: every quantized weight as DequantizeLinear (blocked int4/int8, opset 21) + MatMul, and
    # DequantizeLinear + Gather for a quantized embedding, for the providers that take QDQ graphs (QNN, OpenVINO,
    # NPUs); the same codes and scales as the MatMulNBits / GatherBlockQuantized build (graph/weights.py qdq_arrays)
    use_qdq: bool = False
    # the anchor's use_cuda_bf16: a quantized (int4 / int8 / as-stored) CUDA build computes in bf16, not fp16
    # (activations, KV cache, MatMulNBits / GatherBlockQuantized scales): fp16's range without its overflow
    use_cuda_bf16: bool = False
    # names -> the stored quantized form of the weight they name (set by bind(); see quant/native.py)
    native: Callable[[Sequence[str]], NativeFormat | None] | None = field(default=None, compare=False, repr=False)
    template_float: tuple[str, ...] = ()  # what the model-type template keeps float (may match nothing)
    # every name storage() was asked about (bind() starts it): user patterns are checked against it
    seen: set[str] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        for key, kind in FIELD_KINDS.items():
            value = getattr(self, key)
            if value is not None or key not in ("accuracy_level", "shared_embeddings", "moe_quant_type",
                                                "qmoe_block_size", "moe_experts", "enable_cuda_graph"):
                msg = wrong_type(key, value, kind)
                if msg:
                    raise RecipeError(msg)
        for key in ("keep_float", "template_float"):
            if isinstance(getattr(self, key), str) or not all(isinstance(p, str) for p in getattr(self, key)):
                raise RecipeError(f"{key} takes a list of glob patterns (strings), got {getattr(self, key)!r}")
        _one_of("precision", self.precision, PRECISIONS)
        _one_of("execution provider", self.provider, PROVIDERS)
        _one_of("int4 method", self.method, METHODS)
        self._check_graph_capture()
        self._check_moe()
        self._check_shaping()
        self._check_qdq()
        if self.use_cuda_bf16 and (self.provider != "cuda" or self.precision in FLOAT_PRECISIONS):
            where = (f"-e {self.provider} (bf16 kernels are CUDA's)" if self.provider != "cuda" else
                     f"-p {self.precision}, whose precision already sets the activations (use -p bf16)")
            raise RecipeError(f"use_cuda_bf16=true makes a quantized CUDA build (-p int4, int8 or source -e cuda) "
                              f"compute in bf16; it cannot apply to {where}")
        if self.block_size not in (16, 32, 64, 128, 256):
            raise RecipeError(f"block size must be one of 16, 32, 64, 128, 256, got {self.block_size}")
        if self.accuracy_level not in (None, 0, 1, 2, 3, 4):
            raise RecipeError(f"accuracy_level must be 0 to 4, got {self.accuracy_level}")
        bad = set(self.op_types) - set(OP_TYPES)
        if bad:
            raise RecipeError(f"op types {sorted(bad)} cannot be quantized; choose from {', '.join(OP_TYPES)}")

    def _check_moe(self) -> None:
        if self.moe_quant_type not in (None, *MOE_QUANT_TYPES):
            raise RecipeError(f"moe_quant_type={self.moe_quant_type!r} is not supported; choose one of "
                              f"{', '.join(MOE_QUANT_TYPES)} (int2 and nvfp4 experts are not built)")
        if self.moe_quant_type == "mxfp4" and self.provider != "cuda":
            raise RecipeError("moe_quant_type=mxfp4 runs on CUDA only (onnxruntime's CPU QMoE has no fp4 kernel); "
                              f"use int4 or int8 experts on {self.provider}")
        if self.moe_quant_type == "mxfp4" and self.io.dtype == "fp32":  # QMoE's CUDA kernel: fp16 / bf16 only
            raise RecipeError("moe_quant_type=mxfp4 with -p fp32: onnxruntime's CUDA QMoE takes fp16 or bf16 activations "
                              "only, and its CPU QMoE has no fp4 kernel, so nothing could run it; use -p int4, fp16 or "
                              "bf16")
        if self.qmoe_block_size not in (None, 0, 16, 32, 64, 128, 256):
            raise RecipeError(f"qmoe_block_size must be 0 (per channel) or one of 16, 32, 64, 128, 256, "
                              f"got {self.qmoe_block_size}")
        if self.moe_experts not in (None, *MOE_FLOAT_EXPERTS):
            raise RecipeError(f"moe_experts={self.moe_experts!r} is not supported; choose fp32 (exact: the float MoE op "
                              "on the dequantized experts) or fp16 (half the size); onnxruntime's CPU MoE op has no "
                              "bf16 kernel")
        if self.mla_cache not in MLA_CACHES:
            raise RecipeError(f"mla_cache={self.mla_cache!r} is not supported; choose full (every head's k and v) or "
                              "latent (the compressed latent as one shared head)")
        if self.mla_cache == "latent" and self.provider != "cpu":
            raise RecipeError(f"mla_cache=latent: its attention head is kv_lora_rank + qk_rope_head_dim wide (576 for "
                              f"DeepSeek-V3), which GroupQueryAttention runs on the CPU provider only (its {self.provider} "
                              "kernels are not established for it); use -e cpu or drop the option")
        if self.moe_experts and self.moe_quant_type:
            raise RecipeError(f"moe_experts={self.moe_experts} keeps the experts float, but moe_quant_type="
                              f"{self.moe_quant_type} quantizes them; drop one of them")
        if self.qmoe_weights_prepacked not in (-1, 0, 1):
            raise RecipeError(f"qmoe_weights_prepacked must be -1, 0 or 1, got {self.qmoe_weights_prepacked}")
        if self.qmoe_weights_prepacked == 1:
            raise RecipeError("qmoe_weights_prepacked=1 (CUTLASS-prepacked experts) is not built: onnxforge writes "
                              "the raw [E, N, K/pack] layout that every provider prepacks at load; use 0 or -1")

    def _check_shaping(self) -> None:
        """Output-shaping options that contradict another option are an error, never a silent pick."""
        if self.exclude_lm_head:
            for other, on in (("include_hidden_states", self.include_hidden_states),
                              ("prune_lm_head", self.prune_lm_head), ("int8_last_matmul", self.int8_last_matmul),
                              ("shared_embeddings", self.shared_embeddings)):
                if on:
                    also = " (exclude_lm_head already outputs hidden_states)" if other == "include_hidden_states" else ""
                    raise RecipeError(f"exclude_lm_head=true leaves the lm_head out, so {other}=true has nothing to "
                                      f"act on{also}; drop one of them")
        if self.exclude_embeds:
            for other, on in (("shared_embeddings", self.shared_embeddings), ("op_types Gather", "Gather" in self.op_types)):
                if on:
                    raise RecipeError(f"exclude_embeds=true leaves the embedding out, so {other} has nothing to act on; "
                                      "drop one of them")
        if self.config_only:
            skip = {"precision", "provider", "exclude_embeds", "exclude_lm_head", "include_hidden_states",
                    "config_only", "enable_cuda_graph", "enable_dml_graph", "num_layers", "native", "seen", "template_float"}
            given = [f.name for f in fields(self) if f.name not in skip and getattr(self, f.name) != f.default]
            if given:
                raise RecipeError(f"config_only=true writes genai_config.json and the tokenizer, no weights, so "
                                  f"{', '.join(given)} would be ignored; drop {'it' if len(given) == 1 else 'them'} (or config_only)")

    def _check_qdq(self) -> None:
        """Options that act on MatMulNBits only would be accepted and ignored with use_qdq: refused."""
        if not self.use_qdq:
            return
        levels = [f"accuracy_level={self.accuracy_level}"] if self.accuracy_level is not None else []
        levels += [f"rules[{i}].accuracy_level={r.storage.accuracy_level}" for i, r in enumerate(self.rules)
                   if r.storage is not None and r.storage.accuracy_level is not None]
        if levels:
            raise RecipeError(f"use_qdq=true writes DequantizeLinear + MatMul, which compute in the activation dtype, "
                              f"but {levels[0]} sets MatMulNBits' compute type and would be ignored; drop one of them")
        if self.moe_quant_type:
            raise RecipeError(f"use_qdq=true: moe_quant_type={self.moe_quant_type} quantizes a mixture of experts' "
                              "experts, which have no QDQ form (they are QMoE); drop one of them")

    def _check_graph_capture(self) -> None:
        """A provider's graph-capture option set for another provider would be accepted and ignored: refused."""
        for key, value, default, provider in (("enable_cuda_graph", self.enable_cuda_graph, False, "cuda"),
                                              ("enable_dml_graph", self.enable_dml_graph, True, "dml")):
            if value is not None and value != default and self.provider != provider:
                raise RecipeError(f"{key}={str(value).lower()} is an option of the {provider} execution provider, but "
                                  f"the build is for {self.provider}; use -e {provider} or drop the option")
        if self.provider != "cuda" and self.enable_cuda_graph is False:  # off where it is never on: the default
            object.__setattr__(self, "enable_cuda_graph", None)
        if self.enable_cuda_graph and self.io.dtype == "fp32":
            raise RecipeError("enable_cuda_graph=true: at fp32 GroupQueryAttention runs on the CPU provider (its CUDA "
                              "kernel is fp16/bf16 only), and onnxruntime captures only a graph with every node on "
                              "CUDA; use -p fp16, bf16 or int4, or drop the option")

    # -- derived ------------------------------------------------------------------------------
    @property
    def io(self) -> Storage:
        """Activation dtype: quantized CPU models compute in fp32, GPU ones in fp16 (bf16 with use_cuda_bf16)."""
        if self.precision in ("fp32", "fp16", "bf16"):
            return Storage(dtype=self.precision)
        if self.provider == "cpu":
            return Storage(dtype="fp32")
        return Storage(dtype="bf16" if self.use_cuda_bf16 else "fp16")

    @property
    def accuracy(self) -> int:
        if self.accuracy_level is not None:
            return self.accuracy_level
        return 4 if self.provider == "cpu" else 0

    @property
    def base_bits(self) -> int:
        return {"int4": 4, "int8": 8}.get(self.precision, 0)

    def _as_stored(self, names: Sequence[str], op: str) -> Storage | None:
        """The weight's own exact form when the recipe keeps it: always under "source", under int4/int8
        when that form has at most as many bits. A "source" weight with no exact form (codebook types)
        is re-quantized to int8 (rtn, symmetric, block 32); float weights stay float."""
        if self.native is None or self.precision not in ("source", "int4", "int8") or self.requantize:
            return None
        fmt = self.native(names)
        if fmt is None or (self.precision != "source" and (op not in self.op_types or fmt.bits > self.base_bits)):
            return None
        if fmt.bits == 0:
            return Storage(dtype=self.io.dtype, bits=8) if self.precision == "source" else None
        return Storage(dtype=self.io.dtype, bits=fmt.bits, block_size=fmt.block_size, method="source",
                       symmetric=not fmt.zero_points, offsets=fmt.offsets, origin=fmt.origin)

    def bind(self, spec: ModelSpec, native: Callable[[Sequence[str]], NativeFormat | None] | None = None) -> "Recipe":
        return replace(self, num_layers=spec.num_layers, native=native or self.native, seen=set())

    # -- checks that need no weights ------------------------------------------------------------
    def check_patterns(self) -> None:
        """Each user pattern (keep_float, rules) matched a name the build asked about, else an error naming the
        closest names. Template patterns may match nothing (a dense model has no router)."""
        if self.seen is None:
            return
        names = sorted(self.seen)
        for what, pattern in [("keep-float pattern", p) for p in self.keep_float] + \
                             [("rule", r.pattern) for r in self.rules]:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.4)
                raise RecipeError(
                    f"{what} {pattern!r} matches no weight of this model (patterns are globs on ONNX node names, "
                    f"e.g. /model/layers.0/attn/qkv_proj/MatMul, or on Hugging Face module names); closest names: "
                    f"{', '.join(map(repr, close)) or 'none'}")

    def check_quantizes(self, named: Sequence[str] = ()) -> None:
        """Method options on a build that quantizes nothing would be ignored: an error instead. `named`: what
        the user set explicitly (`--method default` is named although it equals the default)."""
        if self.precision not in FLOAT_PRECISIONS or self.moe_quant_type or any(r.storage for r in self.rules):
            return
        given = [what for what, on in ((f"method {self.method}", self.method != "default"),
                                       (f"block size {self.block_size}", self.block_size != 32),
                                       ("asymmetric", not self.symmetric),
                                       ("int8_last_matmul", self.int8_last_matmul),
                                       ("int8_mixed_layers", self.int8_mixed_layers),
                                       ("int8_linear_attn", self.int8_linear_attn),
                                       ("use_qdq", self.use_qdq)) if on]
        given = list(dict.fromkeys([*given, *named]))
        if given:
            raise RecipeError(
                f"{', '.join(given)} set how weights are quantized, but this build is {self.precision} and nothing is "
                f"quantized, so they would be ignored: add -p int4 or -p int8 (or a scheme, a quantizing rule or "
                f"moe_quant_type), or drop them")

    # -- the decision ---------------------------------------------------------------------------
    def storage(self, names: Sequence[str], op: str) -> Storage:
        if self.seen is not None:
            self.seen.update(names)
        st = self._base(names, op)
        for pattern in self.keep_float + self.template_float:
            if any(fnmatch.fnmatchcase(n, pattern) for n in names):
                st = self.io
        for rule in self.rules:
            if rule.matches(names):
                st = rule.storage or self.io
        if st.quantized:  # scales in the activation dtype; the recipe's accuracy level unless the rule set one
            level = self.accuracy if st.accuracy_level is None else st.accuracy_level
            st = replace(st, dtype=self.io.dtype, accuracy_level=level)
        return st

    def _base(self, names: Sequence[str], op: str) -> Storage:
        kept = self._as_stored(names, op)
        if kept is not None:
            return kept
        if not self.base_bits or op not in self.op_types:
            return self.io
        st = Storage(dtype=self.io.dtype, bits=self.base_bits, block_size=self.block_size, method=self.method,
                     symmetric=self.symmetric)
        if self._wants_int8(names):
            st = replace(st, bits=8)
        return st

    def _wants_int8(self, names: Sequence[str]) -> bool:
        if self.int8_last_matmul and any(n.startswith("/lm_head") or n == "lm_head" for n in names):
            return True
        if self.int8_mixed_layers:
            layer = _layer_of(names)
            if layer is not None and mixed_layer_gets_int8(layer, self.num_layers):
                # llama.cpp bumps attn_v and ffn_down; a packed qkv goes up as a whole (as the anchor does)
                fused = r"|/qkv_proj/" if not self.unpack_matmul else ""
                return any(re.search(r"(\bv_proj|down_proj" + fused + ")", n) for n in names)
        if self.int8_linear_attn:
            return any("linear_attn" in n for n in names)
        return False

    def share_embeddings(self, spec: ModelSpec, embed: Storage, lm_head: Storage) -> bool:
        if self.shared_embeddings is False or self.exclude_embeds or self.exclude_lm_head:
            return False
        if self.shared_embeddings and not spec.tie_embeddings:
            raise RecipeError(
                "shared_embeddings=true asks to share the embedding with the lm_head, but this checkpoint does not "
                "tie them (tie_word_embeddings is false); drop the option"
            )
        if not spec.tie_embeddings:
            return False
        if lm_head.quantized:
            return "Gather" in self.op_types or self.shared_embeddings is not False
        return embed == lm_head

    def describe(self) -> dict:
        return {
            "precision": self.precision, "provider": self.provider, "method": self.method,
            "block_size": self.block_size, "symmetric": self.symmetric, "accuracy_level": self.accuracy,
            "int8_last_matmul": self.int8_last_matmul, "int8_mixed_layers": self.int8_mixed_layers,
            "int8_linear_attn": self.int8_linear_attn, "op_types": sorted(self.op_types),
            "keep_float": list(dict.fromkeys(self.keep_float + self.template_float)), "rules": [(r.pattern, r.storage.describe() if r.storage else "float")
                                                           for r in self.rules],
            "unpack_matmul": self.unpack_matmul, "prune_lm_head": self.prune_lm_head,
            "shared_embeddings": self.shared_embeddings,
            "moe_quant_type": self.moe_quant_type, "qmoe_block_size": self.qmoe_block_size,
            "moe_experts": self.moe_experts, "mla_cache": self.mla_cache,
            "requantize": self.requantize, "drop_activation_quant": self.drop_activation_quant,
            "exclude_embeds": self.exclude_embeds, "exclude_lm_head": self.exclude_lm_head,
            "include_hidden_states": self.include_hidden_states, "config_only": self.config_only,
            "enable_cuda_graph": self.enable_cuda_graph, "enable_dml_graph": self.enable_dml_graph,
            "use_qdq": self.use_qdq, "use_cuda_bf16": self.use_cuda_bf16,
        }


def mixed_layer_gets_int8(i: int, n: int) -> bool:
    """llama.cpp's rule for which layers get more bits (attn v / qkv and ffn down)."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _layer_of(names: Sequence[str]) -> int | None:
    for n in names:
        m = re.search(r"layers[./](\d+)", n)
        if m:
            return int(m.group(1))
    return None


def _one_of(what: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise RecipeError(f"unknown {what} {value!r}; choose one of: {', '.join(allowed)}")
