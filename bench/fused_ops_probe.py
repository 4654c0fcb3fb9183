"""Which execution providers have kernels for com.microsoft MatMulNBitsMlp / MatMulNBitsQkv (onnxruntime 1.31):
the fused norm + gate/up + SwiGLU and norm + q/k/v ops that would cut a decoder layer's kernels per token (issue 28).
On this CPU machine: no CPU kernel for either. `python3 bench/fused_ops_probe.py` on the GPU machine."""
import sys, numpy as np, onnx, onnxruntime as ort
from onnx import helper, TensorProto as TP
K, N, BS = 64, 128, 32
def nbits(n):
    return [np.random.default_rng(0).integers(0, 255, (n, K // BS, BS // 2), dtype=np.uint8),
            np.full((n * (K // BS),), 0.01, np.float16)]
def model(kind, ftype, np_t):
    inits = []
    def add(name, arr):
        inits.append(onnx.numpy_helper.from_array(arr.astype(np_t) if arr.dtype != np.uint8 else arr, name))
        return name
    if kind == "mlp":
        g, gs = nbits(N); u, us = nbits(N)
        node = helper.make_node("MatMulNBitsMlp", ["A", "", add("ns", np.ones(K, np_t)), add("gB", g), add("gs", gs), "", add("uB", u), add("us", us)],
                                ["Y"], domain="com.microsoft", activation="silu", K=K, N=N, block_size=BS, bits=4, epsilon=1e-5)
        outs = [helper.make_tensor_value_info("Y", ftype, None)]
    else:
        q, qs = nbits(N); k, ks = nbits(32); v, vs = nbits(32)
        node = helper.make_node("MatMulNBitsQkv", ["A", "", add("ns", np.ones(K, np_t)), add("qB", q), add("qs", qs), "", add("kB", k), add("ks", ks), "", add("vB", v), add("vs", vs)],
                                ["Q", "Kk", "V"], domain="com.microsoft", K=K, Nq=N, Nkv=32, block_size=BS, bits=4, epsilon=1e-5)
        outs = [helper.make_tensor_value_info(n, ftype, None) for n in ("Q", "Kk", "V")]
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", ftype, [1, 1, K])], outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)], ir_version=10)
for ep in [e for e in ("CUDAExecutionProvider", "CPUExecutionProvider") if e in ort.get_available_providers()]:
    for kind in ("mlp", "qkv"):
        for ftype, np_t in ((TP.FLOAT16, np.float16), (TP.FLOAT, np.float32)):
            so = ort.SessionOptions(); so.add_session_config_entry("session.disable_cpu_ep_fallback", "1") if ep != "CPUExecutionProvider" else None
            try:
                s = ort.InferenceSession(model(kind, ftype, np_t).SerializeToString(), so, providers=[ep])
                out = s.run(None, {"A": np.ones((1, 1, K), np_t)})
                print(ep, kind, np_t.__name__, "runs", out[0].shape)
            except Exception as e:
                print(ep, kind, np_t.__name__, "NO:", str(e).splitlines()[0][:200])
