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
"""
from __future__ import annotations

from .errors import RecipeError
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
