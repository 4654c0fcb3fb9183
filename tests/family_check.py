"""The checks every family passes, on a tiny random model made with transformers (tests/tiny.py):
fp32 logits equal transformers' within 1e-4 for a prefill and 8 cached decode steps, onnxruntime-genai's
greedy 20 tokens equal transformers' generate, and an int4 build equals the transformers model with
onnxforge's dequantized weights (accuracy_level 0, as tests/test_quant_e2e.py does)."""
from __future__ import annotations

import numpy as np
from conftest import genai_greedy, onnx_step_logits, prompt_and_decode, reference_greedy, reference_logits
from quant_ref import dequantized_reference

import onnxforge
from onnxforge.quant.recipe import Recipe

FP32_TOL = 1e-4


def max_diff(out, model, seed: int = 0) -> float:
    prompt, decode = prompt_and_decode(seed)
    ref = reference_logits(model, prompt + decode)
    got = onnx_step_logits(out, prompt, decode)
    assert got.shape == ref.shape
    return float(np.abs(got - ref).max())


def check_fp32(folder, model, out, **build) -> None:
    onnxforge.build(folder, out, "fp32", **build)
    diff = max_diff(out, model)
    assert diff < FP32_TOL, f"max abs diff vs transformers {diff}"
    prompt, _ = prompt_and_decode(1)
    assert genai_greedy(out, prompt) == reference_greedy(model, prompt)


def check_int4(folder, out, method: str = "rtn", model=None) -> None:
    onnxforge.build(folder, out, recipe=Recipe(precision="int4", method=method, accuracy_level=0))
    diff = max_diff(out, dequantized_reference(folder, out, model))
    assert diff < FP32_TOL, f"max abs diff vs the dequantized reference {diff}"


def check_fp16(folder, model, out) -> None:
    """fp16: within 2% of the logit range, >= 90% equal argmax (the bound tests/test_build_core.py uses)."""
    onnxforge.build(folder, out, "fp16")
    prompt, decode = prompt_and_decode()
    ref = reference_logits(model, prompt + decode)
    got = onnx_step_logits(out, prompt, decode).astype(np.float32)
    assert np.abs(got - ref).max() < 0.02 * (ref.max() - ref.min())
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
