"""use_cuda_bf16 (the anchor's extra option; issue 28 item 3, bf16 I/O for quantized models): a quantized -e cuda build
computes in bf16 instead of fp16: inputs/outputs, KV cache and the MatMulNBits scales are bf16, the codes the same as
the fp16 build's. CPU has no bf16 kernels, so this checks the graph; bench/gpu.py's int4-bf16 column runs it on CUDA."""
from __future__ import annotations

import onnx
import pytest

import onnxforge
from onnxforge.errors import RecipeError
from onnxforge.quant.options import apply_extra_options
from onnxforge.quant.recipe import Recipe

BF16, FP16 = onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT16


def _graph(folder, out, precision, options=()):
    recipe = apply_extra_options(Recipe(precision=precision, provider="cuda"), list(options))
    report = onnxforge.build(folder, out, recipe=recipe)
    return onnx.load(str(out / "model.onnx")).graph, report


@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_quantized_cuda_build_in_bf16(tiny_models, tmp_path, precision):
    folder, _ = tiny_models("llama")
    g16, _ = _graph(folder, tmp_path / "fp16", precision)
    gbf, report = _graph(folder, tmp_path / "bf16", precision, ["use_cuda_bf16=true"])
    kinds = lambda g: {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output]}  # noqa: E731
    assert {n: t for n, t in kinds(gbf).items() if t in (BF16, FP16)} == {n: BF16 for n, t in kinds(g16).items()
                                                                          if t == FP16}
    init16 = {t.name: t for t in g16.initializer}
    scales = [t for t in gbf.initializer if t.name.endswith("scales")]
    assert scales and all(t.data_type == BF16 for t in scales)
    codes = [t for t in gbf.initializer if t.data_type == onnx.TensorProto.UINT8]
    assert codes and all(t.raw_data == init16[t.name].raw_data for t in codes)  # the same int4 / int8 codes
    assert report.recipe["use_cuda_bf16"] is True


@pytest.mark.parametrize("provider, precision, words", [
    ("cpu", "int4", "bf16 kernels are CUDA's"),
    ("cuda", "fp16", "use -p bf16"),
    ("cuda", "bf16", "use -p bf16"),
])
def test_use_cuda_bf16_where_it_cannot_apply_is_refused(provider, precision, words):
    with pytest.raises(RecipeError, match=words):
        apply_extra_options(Recipe(precision=precision, provider=provider), ["use_cuda_bf16=true"])
    apply_extra_options(Recipe(precision=precision, provider=provider), ["use_cuda_bf16=false"])  # false: fine
