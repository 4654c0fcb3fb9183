"""A tiny com.microsoft QMoE node against numpy, with and without what onnxforge's MoE builds feed it.

Why: on an H200 (onnxruntime-gpu 1.31.1) ERNIE 4.5 MoE's int4 / int8 -e cuda builds missed transformers by 5.6 while
other QMoE families were fine. Reading onnxruntime's CUDA QMoE (contrib_ops/cuda/moe/moe_quantization.cc,
ComputeInternal) the routing is softmax + top k of router_probs only: the optional router_weights (input 14, which the
CPU kernel uses for mixing and ERNIE's CPU graph feeds) is never read. This script measures that, and the other inputs
the builds use (expert biases, GPT-OSS's clamped SwiGLU, zero-padded intermediate sizes), on whatever provider it has:

    python bench/qmoe_cuda_bias.py            # CUDA if onnxruntime has it (no CPU fallback), else the CPU
    python bench/qmoe_cuda_bias.py --cpu      # the CPU provider (the reference kernel)

One table: per case and bits, max |QMoE - numpy| for the schema's meaning ("schema") and for the reading that ignores
input 14 ("no input 14"; the same number where the case has no input 14), relative to max |numpy|, and a verdict.
Self-contained (numpy, onnx, onnxruntime); a few seconds on a GPU or a CPU.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import onnx
from onnx import TensorProto, helper

E, K_TOP, TOKENS, BLOCK = 4, 2, 8, 32


def quantize(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Symmetric block-wise codes of one expert (N, K) as QMoE takes them: uint8 (N, K * bits / 8) with element 2j in
    the low nibble at 4 bits, scales (N, K / BLOCK), zero point 2^(bits-1) implied; returns (data, scales, dequantized)."""
    N, K = w.shape
    qmax, zp = (1 << (bits - 1)) - 1, 1 << (bits - 1)
    blocks = w.reshape(N, K // BLOCK, BLOCK)
    scales = (np.abs(blocks).max(-1) / qmax).astype(np.float16)
    safe = np.where(scales == 0, 1, scales).astype(np.float32)
    codes = np.clip(np.rint(blocks / safe[..., None]) + zp, 0, 2 * zp - 1).astype(np.uint8)
    deq = ((codes.astype(np.float32) - zp) * scales.astype(np.float32)[..., None]).reshape(N, K)
    codes = codes.reshape(N, K)
    data = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8) if bits == 4 else codes
    return data, scales, deq


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def reference(x, probs, weights, fc1, b1, fc2, b2, act, use_input14: bool) -> np.ndarray:
    """The op's meaning in float64: select the top k (of router_probs, or of its softmax: the same experts), mix with
    router_weights at them (the schema, when given) or with the softmax of router_probs, renormalised."""
    x, out = x.astype(np.float64), np.zeros(x.shape, np.float64)
    alpha, beta, limit = act
    for t in range(x.shape[0]):
        p = softmax(probs[t].astype(np.float64))
        sel = np.argsort(-p, kind="stable")[:K_TOP]
        mix = (weights[t].astype(np.float64) if (weights is not None and use_input14) else p)[sel]
        mix = mix / mix.sum()
        for w, e in zip(mix, sel):
            h = fc1[e] @ x[t] + (0 if b1 is None else b1[e])
            gate, up = h[0::2], h[1::2]
            if limit is not None:
                gate, up = np.minimum(gate, limit), np.clip(up, -limit, limit)
            a = gate / (1 + np.exp(-alpha * gate)) * (up + beta)
            out[t] += w * (fc2[e] @ a + (0 if b2 is None else b2[e]))
    return out


def case(rng, bits: int, H: int, I: int, Ip: int, biases: bool, clamped: bool, routing: str):
    """Inputs and arrays of one QMoE node: experts of width I zero-padded to Ip (onnxforge -e cuda)."""
    f1 = rng.normal(0, 1 / np.sqrt(H), (E, 2 * I, H)).astype(np.float32)
    f2 = rng.normal(0, 1 / np.sqrt(I), (E, H, I)).astype(np.float32)
    pad1, pad2 = np.zeros((E, 2 * Ip, H), np.float32), np.zeros((E, H, Ip), np.float32)
    pad1[:, :2 * I], pad2[:, :, :I] = f1, f2  # interleaved fc1: the padded units' rows come last
    q1 = [quantize(pad1[e], bits) for e in range(E)]
    q2 = [quantize(pad2[e], bits) for e in range(E)]
    b1 = b2 = None
    if biases:
        b1 = np.zeros((E, 2 * Ip), np.float16)
        b1[:, :2 * I] = rng.normal(0, 0.5, (E, 2 * I))
        b2 = rng.normal(0, 0.5, (E, H)).astype(np.float16)
    x = rng.normal(0, 1, (TOKENS, H)).astype(np.float16)
    logits = rng.normal(0, 2, (TOKENS, E)).astype(np.float32)
    weights = None
    if routing == "plain":
        probs = logits
    else:  # ERNIE's: select on softmax + bias, mix with the softmax
        sm, bias = softmax(logits), rng.normal(0, 0.3, E).astype(np.float32)
        sel = np.argsort(-(sm + bias), axis=-1, kind="stable")[:, :K_TOP]
        if routing == "router_weights":  # the CPU graph: input 14
            probs, weights = sm + bias, sm
        else:  # "masked": the -e cuda graph (and the float MoE op's): unselected logits at fp16's lowest
            probs = np.full_like(logits, np.finfo(np.float16).min)
            np.put_along_axis(probs, sel, np.take_along_axis(logits, sel, -1), -1)
    act = (1.702, 1.0, 7.0) if clamped else (1.0, 0.0, None)
    deq1 = np.stack([q[2] for q in q1]).astype(np.float64)
    deq2 = np.stack([q[2] for q in q2]).astype(np.float64)
    args = (x, probs.astype(np.float16), None if weights is None else weights.astype(np.float16))
    refs = {use: reference(*args, deq1, None if b1 is None else b1.astype(np.float64), deq2,
                           None if b2 is None else b2.astype(np.float64), act, use) for use in (True, False)}
    arrays = dict(fc1=np.stack([q[0] for q in q1]), s1=np.stack([q[1] for q in q1]), b1=b1,
                  fc2=np.stack([q[0] for q in q2]), s2=np.stack([q[1] for q in q2]), b2=b2)
    return args, arrays, act, refs


def model(H: int, Ip: int, bits: int, arrays: dict, act, input14: bool, dtype) -> bytes:
    alpha, beta, limit = act
    inits = [helper.make_tensor(n, TensorProto.UINT8 if a.dtype == np.uint8 else dtype, a.shape, a.tobytes(),
                                raw=True) for n, a in arrays.items() if a is not None]
    names = ["x", "probs", "fc1", "s1", "b1" if arrays["b1"] is not None else "", "fc2", "s2",
             "b2" if arrays["b2"] is not None else "", "", "", "", "", "", "", "weights" if input14 else ""]
    while not names[-1]:
        names.pop()
    attrs = dict(k=K_TOP, activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=1,
                 activation_alpha=alpha, activation_beta=beta, expert_weight_bits=bits, block_size=BLOCK,
                 weights_prepacked=0)
    if limit is not None:
        attrs["swiglu_limit"] = limit
    node = helper.make_node("QMoE", names, ["y"], domain="com.microsoft", **attrs)
    ins = [helper.make_tensor_value_info("x", dtype, [None, H]),
           helper.make_tensor_value_info("probs", dtype, [None, E])]
    if input14:
        ins.append(helper.make_tensor_value_info("weights", dtype, [None, E]))
    graph = helper.make_graph([node], "qmoe", ins, [helper.make_tensor_value_info("y", dtype, [None, H])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 9
    return m.SerializeToString()


CASES = [  # name, H, I, I', biases, clamped (GPT-OSS), routing
    ("plain", 64, 64, 64, False, False, "plain"),
    ("fc1+fc2 biases", 64, 64, 64, True, False, "plain"),
    ("GPT-OSS clamped + biases", 64, 64, 64, True, True, "plain"),
    ("I 32 padded to 64 + biases", 64, 32, 64, True, True, "plain"),
    ("I 32 unpadded", 64, 32, 32, False, False, "plain"),
    ("ERNIE router_weights (input 14)", 64, 64, 64, False, False, "router_weights"),
    ("ERNIE masked logits (-e cuda now)", 64, 64, 64, False, False, "masked"),
]


def main() -> int:
    import onnxruntime as ort

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="use the CPU provider even where CUDA is available")
    ap.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16", help="activations (bf16: CUDA only)")
    a = ap.parse_args()
    cuda = not a.cpu and "CUDAExecutionProvider" in ort.get_available_providers()
    provider = "CUDAExecutionProvider" if cuda else "CPUExecutionProvider"
    if a.dtype == "bf16" and not cuda:
        print("bf16 QMoE has no CPU kernel: use --dtype fp16 here", file=sys.stderr)
        return 2
    dtype = TensorProto.FLOAT16 if a.dtype == "fp16" else TensorProto.BFLOAT16
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if cuda:
        opts.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    device = ""
    if cuda:
        try:
            import subprocess

            device = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                    text=True, timeout=20).stdout.strip().splitlines()[0]
        except Exception:  # noqa: BLE001 - the name is only printed
            device = "unknown GPU"
    print(f"QMoE vs numpy: onnxruntime {ort.__version__}, {provider}{' (' + device + ')' if device else ''}, "
          f"{a.dtype} activations, {E} experts, top {K_TOP}, {TOKENS} tokens, block {BLOCK}, weights_prepacked 0\n")
    print("| case | bits | H | I (op's) | max abs err, schema | max abs err, no input 14 | max abs ref | verdict |")
    print("|---|---|---|---|---|---|---|---|")
    start = time.time()
    for name, H, I, Ip, biases, clamped, routing in CASES:
        for bits in (4, 8):
            rng = np.random.default_rng(bits * 100 + len(name))
            (x, probs, weights), arrays, act, refs = case(rng, bits, H, I, Ip, biases, clamped, routing)
            if dtype == TensorProto.BFLOAT16:
                import ml_dtypes

                arrays = {k: (v.astype(ml_dtypes.bfloat16) if v is not None and v.dtype == np.float16 else v)
                          for k, v in arrays.items()}
            cast = (lambda v: v) if dtype == TensorProto.FLOAT16 else (lambda v: v.astype(__import__("ml_dtypes").bfloat16))
            feed = {"x": cast(x), "probs": cast(probs)}
            if weights is not None:
                feed["weights"] = cast(weights)
            try:
                sess = ort.InferenceSession(model(H, Ip, bits, arrays, act, weights is not None, dtype), opts,
                                            providers=[provider])
                y = sess.run(None, feed)[0].astype(np.float64)
            except Exception as err:  # noqa: BLE001 - the kernel's refusal is a result here
                msg = str(err).strip().splitlines()[-1][:110].replace("|", "/")
                print(f"| {name} | {bits} | {H} | {Ip} | error: {msg} | | | refused |")
                continue
            scale = float(np.abs(refs[True]).max())
            schema, ignored = (float(np.abs(y - refs[u]).max()) for u in (True, False))
            if schema <= 2e-2 * scale:
                verdict = "ok"
            elif ignored <= 2e-2 * scale:
                verdict = "WRONG: input 14 ignored"
            else:
                verdict = "WRONG"
            print(f"| {name} | {bits} | {H} | {Ip} | {schema:.2e} | {ignored:.2e} | {scale:.2f} | {verdict} |")
    print(f"\n({time.time() - start:.1f} s; verdict ok: schema error <= 2% of max |ref|)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
