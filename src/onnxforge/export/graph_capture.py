"""CUDA graph capture by default where it is safe (genai_config.json's `enable_cuda_graph`).

What onnxruntime-genai (0.16-0.18 runtime, src/generators.cpp, models/kv_cache.cpp, position_inputs.cpp) and
onnxruntime's CUDA provider need for a captured decode step:
  * past_present_share_buffer true (genai refuses capture without it: "Graph capture is not supported with
    past_present_share_buffer set to false"); onnxforge always writes it. The KV cache is then allocated at max_length
    once and the attention mask is a static (batch, max_length) buffer written in place;
  * only 1-token decode steps are captured (prompt runs are not), one graph per generator, so batch and max_length
    are fixed for the graph's life (a new generator captures anew);
  * every compute node on the CUDA provider: onnxruntime refuses to capture a session with a node on the CPU. At
    fp32, GroupQueryAttention has no CUDA kernel (fp16 and bf16 only) and runs on the CPU: no capture;
  * no control flow (If) and no kernel that synchronises with the host. Measured on an H200 for plain decoders (issue
    28: 1.18-1.31x decode); not established for the MoE kernels, the recurrent / convolution mixers, or GQA's local
    window with the static mask (genai: "SlidingWindow does not support graph capture"), so those stay off.
The default is on only for graphs made of the ops below at fp16 / bf16 activations; `enable_cuda_graph=false` turns it
off, `=true` forces it on.
"""
from __future__ import annotations

from typing import Iterable

# the op types of a plain decoder (dense MLP, GQA with rotary, RMS / Layer norms, MatMulNBits / GatherBlockQuantized)
# that ran with CUDA graphs on the H200; anything else keeps the default off
CAPTURE_SAFE_OPS = frozenset({
    "Add", "Cast", "Concat", "Div", "Expand", "FastGelu", "FusedMatMul", "Gather", "GatherBlockQuantized", "Gelu",
    "GroupQueryAttention", "LayerNormalization", "MatMul", "MatMulNBits", "Mul", "QuickGelu", "ReduceSum", "Relu",
    "Reshape", "Shape", "Sigmoid", "SimplifiedLayerNormalization", "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization", "Slice", "Softmax", "Split", "Squeeze", "Sub", "Tanh", "Transpose",
    "Unsqueeze",
})


def cuda_graph_default(spec, io_dtype: str, op_types: Iterable[str] | None) -> tuple[bool, str]:
    """(on, why) for a -e cuda build: `io_dtype` the activations' ("fp32", "fp16", "bf16"), `op_types` the built
    graph's (None for config_only: judged from the spec alone)."""
    off = " (enable_cuda_graph=true forces it)"
    if io_dtype == "fp32":
        return False, ("CUDA graph capture off: at fp32 GroupQueryAttention runs on the CPU provider (its CUDA kernel is "
                       "fp16/bf16 only), which onnxruntime's capture refuses" + off)
    kinds = {layer.kind for layer in spec.layers}
    if kinds != {"attention"}:
        return False, f"CUDA graph capture off: layers of kind {', '.join(sorted(kinds - {'attention'}))}" + off
    if spec.moe is not None:
        return False, "CUDA graph capture off: mixture-of-experts kernels are not established under capture" + off
    if spec.sliding_window:
        return False, "CUDA graph capture off: sliding-window attention under capture is not established" + off
    extra = sorted(set(op_types or ()) - CAPTURE_SAFE_OPS)
    if extra:
        return False, f"CUDA graph capture off: the graph has {', '.join(extra)}" + off
    return True, ("CUDA graph capture on (enable_cuda_graph 1): decode steps replay a captured graph (batch and "
                  "max_length fixed per generator); --extra_options enable_cuda_graph=false turns it off")
