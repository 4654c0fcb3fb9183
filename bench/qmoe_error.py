"""Where onnxruntime's CPU QMoE error comes from (issue 24): one QMoE node against numpy on its own stored weights.

The experts are random, quantized by onnxforge's QMoE path (quant/qmoe.py, rtn symmetric), and the reference is
the same top-k SwiGLU mixture computed in float64 from the weights the op holds (quant/qmoe.dequantize_qmoe):
so any difference is the kernel's arithmetic, not the quantization. Varied: bits (4, 8), block (0 = per
channel, 16, 32, 128) and accuracy_level (0, 4); and the float MoE op on the same dequantized weights (fp32 and
fp16, what `--extra_options moe_experts=fp32|fp16` builds),
with its size and speed against QMoE at the same shape.

    python bench/qmoe_error.py            # 64 experts, hidden 1024, width 512, 32 tokens; ~2 minutes on 2 cores
    python bench/qmoe_error.py --smoke    # tiny, seconds
    python bench/qmoe_error.py --experts 128 --hidden 2048 --width 768 --blocks 0,32   # Qwen3-30B-A3B's shape
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper as h

from onnxforge.quant.qmoe import dequantize_qmoe, qmoe_arrays, quantize_expert

THREADS = 2


def stored(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes, scales, the float weights they stand for) of (E, N, K) experts at `bits` / `block`."""
    out = [qmoe_arrays(quantize_expert(x, bits=bits, block_size=block, symmetric=True, method="rtn"), not block)
           for x in w]
    codes = np.stack([o[0] for o in out])
    scales = np.stack([o[1] for o in out]).astype(np.float32)
    deq = np.stack([dequantize_qmoe(c, s, None, bits, block) for c, s in zip(codes, scales)])
    return codes, scales, deq


def session(op: str, inits: dict[str, np.ndarray], H: int, E: int, k: int, dtype: int = T.FLOAT,
            **attrs) -> ort.InferenceSession:
    names = ["x", "r", "w1", "", "w2"] if op == "MoE" else ["x", "r", "w1", "s1", "", "w2", "s2"]
    node = h.make_node(op, names, ["y"], domain="com.microsoft", k=k, activation_type="swiglu", swiglu_fusion=1,
                       normalize_routing_weights=1, **attrs)
    graph = h.make_graph([node], "g", [h.make_tensor_value_info("x", dtype, [None, H]),
                                       h.make_tensor_value_info("r", dtype, [None, E])],
                         [h.make_tensor_value_info("y", dtype, [None, H])],
                         [onnx.numpy_helper.from_array(v, n) for n, v in inits.items()])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 21), h.make_opsetid("com.microsoft", 1)],
                         ir_version=10)
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    with tempfile.TemporaryDirectory() as tmp:  # external data: an fp32 MoE of a real shape is over protobuf's 2 GB
        onnx.save(model, f"{tmp}/m.onnx", save_as_external_data=True, location="m.data")
        return ort.InferenceSession(f"{tmp}/m.onnx", so, providers=["CPUExecutionProvider"])


def reference(x: np.ndarray, r: np.ndarray, w1: np.ndarray, w2: np.ndarray, k: int) -> np.ndarray:
    """Top-k of softmax(r), renormalised; fc1 rows interleaved gate/up; SiLU(gate) x up; in float64."""
    x = x.astype(np.float64)
    p = np.exp(r - r.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = np.zeros((x.shape[0], w2.shape[1]))
    for t in range(x.shape[0]):
        top = np.argsort(-p[t])[:k]
        for e, wt in zip(top, p[t, top] / p[t, top].sum()):
            a = w1[e].astype(np.float64) @ x[t]
            g, u = a[0::2], a[1::2]
            y[t] += wt * (w2[e].astype(np.float64) @ (g / (1 + np.exp(-g)) * u))
    return y


def timed(s: ort.InferenceSession, feed: dict, reps: int) -> float:
    s.run(None, feed)
    start = time.perf_counter()
    for _ in range(reps):
        s.run(None, feed)
    return (time.perf_counter() - start) / reps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--blocks", default="0,16,32,128", help="QMoE blocks to try (0: per channel)")
    args = ap.parse_args()
    global THREADS
    THREADS = args.threads
    E, H, I, k, tokens = (4, 64, 32, 2, 4) if args.smoke else (args.experts, args.hidden, args.width, 2, 32)
    rng = np.random.default_rng(0)
    w1 = (rng.normal(size=(E, 2 * I, H)) / np.sqrt(H)).astype(np.float32)
    w2 = (rng.normal(size=(E, H, I)) / np.sqrt(I)).astype(np.float32)
    x = rng.normal(size=(tokens, H)).astype(np.float32)
    r = rng.normal(size=(tokens, E)).astype(np.float32)
    feed = {"x": x, "r": r}
    reps = 3 if args.smoke else 10
    print(f"E={E} H={H} I={I} top-{k}, {tokens} tokens, {THREADS} threads, onnxruntime {ort.__version__}; "
          "|difference| to float64 on the op's own weights")
    print(f"{'op':<6} {'bits':>4} {'block':>5} {'acc':>3} {'max |diff|':>11} {'max |ref|':>9} {'rel':>9} "
          f"{'weights MB':>10} {'ms/run':>7}")
    for bits in (4, 8):
        for block in [b for b in map(int, args.blocks.split(",")) if b == 0 or (H % b == 0 and I % b == 0)]:
            c1, s1, d1 = stored(w1, bits, block)
            c2, s2, d2 = stored(w2, bits, block)
            ref = reference(x, r, d1, d2, k)
            for level in (0, 4):
                attrs = dict(expert_weight_bits=bits, accuracy_level=level, **({"block_size": block} if block else {}))
                s = session("QMoE", {"w1": c1, "s1": s1, "w2": c2, "s2": s2}, H, E, k, **attrs)
                diff = np.abs(s.run(None, feed)[0] - ref).max()
                mb = sum(a.nbytes for a in (c1, s1, c2, s2)) / 2**20
                print(f"{'QMoE':<6} {bits:>4} {block:>5} {level:>3} {diff:>11.3g} {np.abs(ref).max():>9.3g} "
                      f"{diff / np.abs(ref).max():>9.2e} {mb:>10.1f} {timed(s, feed, reps):>7.2f}")
            if (bits, block) in ((4, 32), (8, 32)):  # the float MoE op on the same dequantized weights (moe_experts)
                for name, np_t, onnx_t in (("fp32", np.float32, T.FLOAT), ("fp16", np.float16, T.FLOAT16)):
                    w = {"w1": d1.astype(np_t), "w2": d2.astype(np_t)}
                    s = session("MoE", w, H, E, k, onnx_t)
                    fed = {n: v.astype(np_t) for n, v in feed.items()}  # moe_experts=fp16 casts x and the router
                    diff = np.abs(s.run(None, fed)[0].astype(np.float64) - ref).max()
                    print(f"{'MoE':<6} {name:>4} {'-':>5} {'-':>3} {diff:>11.3g} {np.abs(ref).max():>9.3g} "
                          f"{diff / np.abs(ref).max():>9.2e} {sum(a.nbytes for a in w.values()) / 2**20:>10.1f} "
                          f"{timed(s, fed, reps):>7.2f}")


if __name__ == "__main__":
    main()
