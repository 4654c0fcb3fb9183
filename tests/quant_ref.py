"""References for quantized builds: the same transformers model with every quantized weight
replaced by its dequantized value, computed with onnxforge's own quantizers."""
from __future__ import annotations

import json

import numpy as np


def load_reference(folder):
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def dequantized_reference(folder, out_dir, model=None):
    """Load the checkpoint in transformers and dequantize each weight the way the build stored it.

    Which checkpoint tensors (or row ranges of fused ones) each quantized node holds is read from
    build_report.json ("sources"), how they were stored from the node attributes (MatMulNBits /
    GatherBlockQuantized), so the reference follows the build, for any family.
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
    model = model if model is not None else load_reference(folder)

    def qdq(w: np.ndarray, node: str, storage: str) -> np.ndarray:
        bits, block, sym = bits_of[node]
        method = next((m for m in ("k_quant", "hqq", "rtn", "default") if f" {m} " in f" {storage} "), recipe["method"])
        return dequantize(quantize(w, bits=bits, block_size=block, symmetric=sym, method=method))

    params = dict(model.named_parameters())
    with torch.no_grad():
        emb = model.get_input_embeddings()
        head = model.get_output_embeddings()
        if head.weight is emb.weight:  # untie: the graph may store the two differently
            head.weight = torch.nn.Parameter(emb.weight.detach().clone())
        for grp in report["groups"]:
            label = grp["label"]
            node = {"/model/embed_tokens": "/model/embed_tokens/GatherBlockQuantized"}.get(label, f"{label}/MatMul")
            if node not in bits_of or not grp["storage"].startswith("int"):
                continue
            for src in grp["sources"]:
                name, rows = _parse(src)
                p = head.weight if label == "/lm_head" else emb.weight if label == "/model/embed_tokens" else params[name]
                r = slice(*rows) if rows else slice(None)
                w = p[r].numpy()
                if w.ndim == 3:  # stacked experts as graph/dense_experts.py multiplies them: 2D rows (N, K)
                    E, N, K = w.shape
                    down = label.endswith("down_proj")  # (E, H, I) -> (H, E x I), else (E, N, K) -> (E x N, K)
                    flat = w.transpose(1, 0, 2).reshape(N, E * K) if down else w.reshape(E * N, K)
                    q = qdq(flat, node, grp["storage"])
                    w = q.reshape(N, E, K).transpose(1, 0, 2) if down else q.reshape(E, N, K)
                    p[r] = torch.from_numpy(np.ascontiguousarray(w))
                    continue
                p[r] = torch.from_numpy(qdq(w, node, grp["storage"]))
        if _shared(g) and "/lm_head/MatMul" in bits_of and not any(grp["label"] == "/model/embed_tokens"
                                                                   for grp in report["groups"]):
            emb.weight.copy_(head.weight)  # the lookup gathers from the lm_head's quantized weights
    return model


def _parse(source: str) -> tuple[str, tuple[int, int] | None]:
    if source.endswith("]"):
        name, rng = source[:-1].split("[")
        start, stop = rng.split(":")
        return name, (int(start), int(stop))
    return source, None


def _shared(graph) -> bool:
    return any(n.op_type == "GatherBlockQuantized" for n in graph.node)
