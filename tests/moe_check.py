"""Helpers for the mixture-of-experts tests: tiny configs per family, the QMoE initializers of a built
model, and the transformers model with its experts replaced by what the QMoE op holds (dequantized
with onnxforge's own QMoE dequantization, which tests/test_moe_op.py checks against the op itself)."""
from __future__ import annotations

import numpy as np

# 4-8 experts, top-2, 2-3 layers, dense and MoE layers where the family has both; sizes that QMoE's
# blocks of 16 divide (hidden 64, expert intermediate 32 / 48), kv heads 1 where allowed.
FAMILIES = {
    "mixtral": dict(cls="MixtralConfig", hidden_size=64, num_attention_heads=4, num_key_value_heads=1,
                    intermediate_size=48, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
                    sliding_window=12),
    "qwen3_moe": dict(cls="Qwen3MoeConfig", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                      intermediate_size=80, moe_intermediate_size=32, num_hidden_layers=3, num_experts=8,
                      num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1], tie_word_embeddings=False),
    "qwen2_moe": dict(cls="Qwen2MoeConfig", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=80, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                      num_hidden_layers=3, num_experts=6, num_experts_per_tok=2, norm_topk_prob=False,
                      mlp_only_layers=[0]),
    "olmoe": dict(cls="OlmoeConfig", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=32,
                  num_hidden_layers=2, num_experts=6, num_experts_per_tok=2, clip_qkv=1.5),
    "granitemoe": dict(cls="GraniteMoeConfig", hidden_size=64, num_attention_heads=4, num_key_value_heads=1,
                       intermediate_size=48, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
                       embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=2.0,
                       attention_multiplier=0.2),
    "ernie4_5_moe": dict(cls="Ernie4_5_MoeConfig", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=80, moe_intermediate_size=32, num_hidden_layers=3, moe_num_experts=6,
                         moe_k=2, moe_num_shared_experts=1, use_bias=True),
    "phimoe": dict(cls="PhimoeConfig", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=48, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2),
}


def qmoe_nodes(out_dir) -> list[dict]:
    """Per QMoE node of a built model: its layer, attributes and the arrays of fc1 / fc2."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(out_dir / "model.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    arr = lambda n: numpy_helper.to_array(inits[n]) if n else None  # noqa: E731
    nodes = []
    for n in model.graph.node:
        if n.op_type != "QMoE" or n.name.endswith("_1"):  # the sparse mixer's second pass shares the weights
            continue
        a = {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute}
        ins = list(n.input) + [""] * (15 - len(n.input))
        nodes.append({"layer": int(n.name.split("layers.")[1].split("/")[0]), "attrs": a,
                      "bits": a.get("expert_weight_bits", 4), "block": a.get("block_size", 0),
                      "fc1": (arr(ins[2]), arr(ins[3]), arr(ins[11])), "fc2": (arr(ins[5]), arr(ins[6]), arr(ins[12]))})
    return nodes


def dequantized_experts(node: dict) -> tuple[np.ndarray, np.ndarray]:
    """(fc1 (E, 2I, H) interleaved, fc2 (E, H, I)) float32 as the QMoE node stores them."""
    from onnxforge.quant.qmoe import dequantize_qmoe

    out = []
    for data, scales, zp in (node["fc1"], node["fc2"]):
        out.append(np.stack([dequantize_qmoe(data[e], scales[e], None if zp is None else zp[e], node["bits"],
                                             node["block"]) for e in range(data.shape[0])]))
    return out[0], out[1]


def experts_module(model, layer: int):
    for name, mod in model.named_modules():
        if name.endswith((f"layers.{layer}.mlp.experts", f"layers.{layer}.block_sparse_moe.experts",
                          f"layers.{layer}.feed_forward.experts")):  # feed_forward: LFM2-MoE
            return mod
    raise KeyError(f"layer {layer} has no experts module")


def moe_reference(folder, out_dir, model=None):
    """The transformers model with every weight dequantized as the build stored it: MatMulNBits weights
    through tests/quant_ref.py, QMoE experts from the op's own arrays."""
    import torch
    from quant_ref import dequantized_reference

    model = dequantized_reference(folder, out_dir, model)
    gpt_oss = model.config.model_type == "gpt_oss"
    with torch.no_grad():
        for node in qmoe_nodes(out_dir):
            fc1, fc2 = dequantized_experts(node)
            experts = experts_module(model, node["layer"])
            if gpt_oss:  # (E, H, 2I) with gate / up alternating, down (E, I, H)
                experts.gate_up_proj.copy_(torch.from_numpy(fc1.transpose(0, 2, 1).copy()))
                experts.down_proj.copy_(torch.from_numpy(fc2.transpose(0, 2, 1).copy()))
            else:  # (E, 2I, H): gate rows, then up rows
                experts.gate_up_proj.copy_(torch.from_numpy(np.concatenate([fc1[:, 0::2], fc1[:, 1::2]], axis=1)))
                experts.down_proj.copy_(torch.from_numpy(fc2))
    return model
