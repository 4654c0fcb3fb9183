"""Which weight precisions onnxruntime can run on which execution provider.

A build for a pair that is not listed would write a model the provider cannot load, so `build` refuses
it before reading a weight (api._check_runtime_limits) and `onnxforge build --help` prints the table.

  * bf16: only CUDA has bf16 kernels for MatMul and the fused ops. onnxruntime's CPU provider has no
    bf16 MatMul (a bf16 build fails to load there: tests/test_trust.py checks it on every run);
    DirectML and WebGPU have no bf16 tensor support.
  * int8 (MatMulNBits with 8 bits): CPU, CUDA and WebGPU have the kernel (WebGPU's MatMulNBits
    accepts 4 and 8 bits); DirectML runs 4-bit MatMulNBits only.
  * "source" (pre-quantized weights carried over as stored) writes 4- and 8-bit MatMulNBits, so it
    follows int8.
The CPU row is checked on every test run (every precision listed for cpu loads and runs there); the
GPU rows come from the providers' kernel lists and cannot be checked on this machine.

Attention shapes (`check_attention_shape`) are one rule for every provider: onnxruntime's CPU, CUDA,
ROCm and WebGPU GroupQueryAttention kernels all start with the same shape check
(contrib_ops/cpu/bert/group_query_attention_helper.h, CheckInputs): head_size a multiple of 8; with
rotary (cos/sin caches) head_size a multiple of 16 and cos/sin caches of at most (head_size / 16) * 8
columns, a multiple of 8, i.e. a rotary dimension that is a multiple of 16. A head_size that is not a
multiple of 8 is refused; a rotary GQA cannot apply itself is applied before it (`rotary_in_gqa`).
tests/test_refusals.py runs that check on the CPU provider (`gqa_runs`) for each shape.
"""
from __future__ import annotations

from .errors import ConfigError, RecipeError
from .quant.recipe import PRECISIONS, PROVIDERS

RUNS_ON: dict[str, tuple[str, ...]] = {
    "fp32": PROVIDERS,
    "fp16": PROVIDERS,
    "bf16": ("cuda",),
    "int4": PROVIDERS,
    "int8": ("cpu", "cuda", "webgpu"),
    "source": ("cpu", "cuda", "webgpu"),
}


def precisions_on(provider: str) -> list[str]:
    return [p for p in PRECISIONS if provider in RUNS_ON.get(p, ())]


def valid_pairs(sep: str = "; ") -> str:
    """'cpu: fp32, fp16, int4, int8, source; cuda: ...' for help texts and errors."""
    return sep.join(f"{prov}: {', '.join(precisions_on(prov))}" for prov in PROVIDERS)


def _int8_parts(recipe) -> list[str]:
    """What a (non-int8) recipe still stores at 8 bits."""
    parts = []
    if recipe.int8_last_matmul:
        parts.append("the lm_head (int8_last_matmul)")
    if recipe.int8_mixed_layers:
        parts.append("the llama.cpp mixed layers (int8_mixed_layers)")
    if getattr(recipe, "int8_linear_attn", False):
        parts.append("linear attention (int8_linear_attn)")
    if getattr(recipe, "moe_quant_type", None) == "int8":
        parts.append("the experts (moe_quant_type=int8)")
    parts += [f"rule {r.pattern!r}" for r in recipe.rules if r.storage is not None and r.storage.bits == 8]
    return parts


def check_runs_on(recipe) -> None:
    """Raise RecipeError when the recipe would store weights its execution provider has no kernel for."""
    precision, provider = recipe.precision, recipe.provider
    if provider not in PROVIDERS:
        return  # Recipe itself rejects unknown names
    if precision not in RUNS_ON:
        raise RecipeError(f"precision {precision!r} has no entry in onnxforge.runs_on.RUNS_ON; add the providers "
                          "that run it")
    works = ", ".join(p for p in precisions_on(provider) if p != "source")
    if provider not in RUNS_ON[precision]:
        raise RecipeError(
            f"-p {precision} -e {provider} would build a model that onnxruntime cannot run: there are no {precision} "
            f"kernels for {provider}. On {provider} use -p {works}; {precision} runs on "
            f"{', '.join(RUNS_ON[precision])} (`onnxforge build --help` lists every pair)")
    int8 = _int8_parts(recipe) if precision != "int8" else []
    if int8 and provider not in RUNS_ON["int8"]:
        raise RecipeError(
            f"{' and '.join(int8)} would be stored at 8 bits, which onnxruntime cannot run on {provider} "
            f"(8-bit MatMulNBits runs on {', '.join(RUNS_ON['int8'])}); drop the int8 options for -e {provider}")


def rotary_in_gqa(head_dim: int, rotary_dim: int) -> bool:
    """Whether GroupQueryAttention can apply this rotary itself (do_rotary=1 with cos/sin caches). When it
    cannot, graph/parts.py applies it before the op (RotaryEmbedding on q and k) and GQA runs without it."""
    return head_dim % 16 == 0 and rotary_dim % 16 == 0 and rotary_dim <= head_dim


def attention_shape_problem(head_dim: int) -> str | None:
    """Why GroupQueryAttention cannot run this head size at all (None: it can)."""
    if head_dim % 8:
        return f"head_dim {head_dim} is not a multiple of 8, which GroupQueryAttention rejects"
    return None


def check_attention_shape(spec, provider: str = "cpu") -> None:
    """Raise ConfigError when the model's attention shape cannot run: a head size GroupQueryAttention rejects
    (every provider), or a partial rotary applied outside GQA on DirectML, whose RotaryEmbedding rotates whole
    heads (it takes the head size from the cos cache: DmlOperatorRotaryEmbedding.cpp)."""
    sizes = sorted({spec.attention_of(i).head_dim for i in range(spec.num_layers)})  # per layer where they differ
    for hd in sizes:
        _check_head(spec, hd, provider)


def _check_head(spec, hd: int, provider: str) -> None:
    problem = attention_shape_problem(hd)
    if problem:
        raise ConfigError(
            f"{problem}; this model cannot run on any execution provider (CPU, CUDA, ROCm and WebGPU share that "
            "shape check), so nothing is built. What would run: a head_dim (hidden_size / num_attention_heads, "
            "or config.json's head_dim) that is a multiple of 8")
    rotary = sorted({spec.rope_for(layer.rope).rotary_dim for layer in spec.layers if layer.rope is not None})
    partial = [d for d in rotary if d < hd and not rotary_in_gqa(hd, d)]
    if provider == "dml" and partial:
        raise ConfigError(
            f"rotary dimension {partial[0]} of head_dim {hd}: GroupQueryAttention cannot apply it (not a multiple "
            "of 16), and DirectML's RotaryEmbedding, which would apply it before the op, rotates whole heads only; "
            "this model cannot run on -e dml. It builds for -e cpu, cuda and webgpu (rotary applied before the op)")
