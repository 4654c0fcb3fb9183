"""References for quantized builds: the same transformers model with every quantized weight
replaced by its dequantized value, computed with onnxforge's own quantizers."""
from __future__ import annotations

import json

import numpy as np


def load_reference(folder):
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def dequantized_reference(folder, out_dir):
    """Load the checkpoint in transformers and dequantize each weight the way the build stored it.

    Which weights were quantized, and how, is read from the built model's node attributes
    (MatMulNBits / GatherBlockQuantized), so the reference follows the graph, not a guess.
    """
    import onnx
    import torch

    from onnxforge.quant.methods import dequantize, quantize

    report = json.loads((out_dir / "build_report.json").read_text())
    recipe = report["recipe"]
    g = onnx.load(str(out_dir / "model.onnx"), load_external_data=False).graph
    bits_of = {}
    for n in g.node:
        if n.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            a = {x.name: x.i for x in n.attribute}
            sym = not (len(n.input) > 3 and n.input[3])
            bits_of[n.name] = (a["bits"], a["block_size"], sym)
    model = load_reference(folder)
    storages = {grp["label"]: grp["storage"] for grp in report["groups"]}

    def method_of(label: str) -> str:
        st = storages.get(label, "")
        return next((m for m in ("k_quant", "hqq", "rtn", "default") if f" {m} " in f" {st} "), recipe["method"])

    def qdq(w: np.ndarray, node: str, label: str) -> np.ndarray:
        bits, block, sym = bits_of[node]
        return dequantize(quantize(w, bits=bits, block_size=block, symmetric=sym, method=method_of(label)))

    with torch.no_grad():
        emb = model.get_input_embeddings()
        head = model.get_output_embeddings()
        if head.weight is emb.weight:  # untie: the graph may store the two differently
            head.weight = torch.nn.Parameter(emb.weight.detach().clone())
        for name, p in model.named_parameters():
            if p.ndim != 2:
                continue
            for node, label in _nodes_for(name):
                if node in bits_of:
                    p.copy_(torch.from_numpy(qdq(p.numpy(), node, label)))
                    break
        if model.config.tie_word_embeddings and "/model/embed_tokens/GatherBlockQuantized" not in bits_of \
                and "/lm_head/MatMul" in bits_of and _shared(g):
            emb.weight.copy_(head.weight)
    return model


def _shared(graph) -> bool:
    return any(n.op_type == "GatherBlockQuantized" for n in graph.node)


def _nodes_for(param: str) -> list[tuple[str, str]]:
    """HF parameter name -> candidate (ONNX node that holds it when quantized, report label)."""
    if param == "lm_head.weight":
        return [("/lm_head/MatMul", "/lm_head")]
    if param == "model.embed_tokens.weight":
        return [("/model/embed_tokens/GatherBlockQuantized", "/model/embed_tokens")]
    parts = param.split(".")  # model.layers.{i}.self_attn.q_proj.weight
    i, block, proj = parts[2], parts[3], parts[4]
    group = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
             "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}.get(proj, proj)
    sub = "attn" if block == "self_attn" else "mlp"
    return [(f"/model/layers.{i}/{sub}/{name}/MatMul", f"/model/layers.{i}/{sub}/{name}") for name in (group, proj)]
