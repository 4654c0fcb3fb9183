"""CUDA graph capture (genai_config.json's `enable_cuda_graph`): off by default, on where asked.

Measured on an H200 (bench/RESULTS.md "CUDA decode", 2026-12-05, onnxruntime-genai-cuda 0.18.0): capture speeds a
batch-1 decode step 1.15-1.84x, but a generator of batch 8 fails its prompt under capture in both builders' builds
("GroupQueryAttention: batch_size must be 1 when sequence_length > 1 and past context is given"). The batch is the
user's choice at run time, so the default is off (as the anchor writes) and `enable_cuda_graph=true` turns it on
for batch-1 use; the checks below say where capture cannot work or is not established, as a note either way.

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
`cuda_graph_default` judges whether a graph is one that captured on the H200 (the ops below at fp16 / bf16).
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
    """(capturable, why) for a -e cuda build: `io_dtype` the activations' ("fp32", "fp16", "bf16"), `op_types` the built
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
    return True, ("CUDA graph capture off (the default, as the anchor writes): onnxruntime-genai 0.18 fails a batch of "
                  "more than one prompt under capture; --extra_options enable_cuda_graph=true captures the decode "
                  "steps for batch-1 use (1.15-1.84x decode measured on an H200)")


def forced_note(capturable: bool, why: str) -> str | None:
    """The note for enable_cuda_graph=true: batch 1 only, and where capture is not established, why."""
    if capturable:
        return ("CUDA graph capture on (enable_cuda_graph=true): decode steps replay a captured graph; batch 1 only "
                "(onnxruntime-genai 0.18 fails larger batches' prompts under capture), max_length fixed per generator")
    reason = why.split(": ", 1)[1].replace(" (enable_cuda_graph=true forces it)", "")
    return f"CUDA graph capture on as asked (enable_cuda_graph=true), though {reason}; batch 1 only"
