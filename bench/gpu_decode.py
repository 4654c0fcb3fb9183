"""CUDA decode benchmark (issue 28): onnxforge's `-e cuda` builds against the anchor's of the same checkpoint.

Run on the GPU machine (../shared/GPU.md). A random Llama checkpoint of a real model's shape (bf16, made on the GPU
with torch, never carried) is built by both builders at each precision, then every build runs in
onnxruntime-genai-cuda with CUDA graph capture off and on (set at load time through og.Config, the same switch
`enable_cuda_graph` writes into genai_config.json), alternating models each round, median of --reps rounds:
prefill time (prompt -> first token) and decode speed (tokens per second per sequence over --decode tokens),
at every batch x prompt length. Prints one table with ratios against the anchor's default build and against the
anchor with CUDA graphs, and the memory-bandwidth floor (weight bytes / HBM bandwidth).

    python3 bench/gpu_decode.py build   --work /tmp/gd --shape 1.1b --precisions fp16,bf16,int4
    python3 bench/gpu_decode.py measure --work /tmp/gd --shape 1.1b --precisions fp16,bf16,int4 --out $OUT
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from common import time_generation  # noqa: E402
SHAPES = {  # LlamaForCausalLM shapes: TinyLlama-1.1B, Llama-3-8B
    "1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000, rope_theta=10000.0, max_position_embeddings=4096),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,  # a smoke run
                 num_key_value_heads=2, vocab_size=512, rope_theta=10000.0, max_position_embeddings=4096),
}
HBM_BYTES_PER_S = 4.8e12  # H200 HBM3e
PROVIDER = "cuda"  # --provider cpu: a smoke run of this script where there is no GPU


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_checkpoint(shape: str, dest: Path) -> Path:
    if (dest / "model.safetensors").is_file():
        return dest
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT / "tests"))
    import tiny

    c = SHAPES[shape]
    dest.mkdir(parents=True, exist_ok=True)
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", rms_norm_eps=1e-5,
               tie_word_embeddings=False, torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2,
               attention_bias=False, mlp_bias=False, **c)
    (dest / "config.json").write_text(json.dumps(cfg, indent=1))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(0)
    H, I, V, L = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    d = H // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * d

    def rnd(*s, std=0.02):
        return (torch.randn(*s, generator=g, device=dev, dtype=torch.float32) * std).to(torch.bfloat16).cpu()

    w = {"model.embed_tokens.weight": rnd(V, H), "lm_head.weight": rnd(V, H),
         "model.norm.weight": torch.ones(H, dtype=torch.bfloat16)}
    for i in range(L):
        p = f"model.layers.{i}."
        w.update({p + "self_attn.q_proj.weight": rnd(H, H), p + "self_attn.k_proj.weight": rnd(kv, H),
                  p + "self_attn.v_proj.weight": rnd(kv, H), p + "self_attn.o_proj.weight": rnd(H, H),
                  p + "mlp.gate_proj.weight": rnd(I, H), p + "mlp.up_proj.weight": rnd(I, H),
                  p + "mlp.down_proj.weight": rnd(H, I),
                  p + "input_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
                  p + "post_attention_layernorm.weight": torch.ones(H, dtype=torch.bfloat16)})
    save_file(w, str(dest / "model.safetensors"), metadata={"format": "pt"})
    tiny.tokenizer_files(dest)
    return dest


def build(kind: str, ckpt: Path, out: Path, precision: str, cache: Path) -> tuple[str, float, str]:
    if (out / "genai_config.json").is_file():
        return f"{kind}-{precision}", 0.0, "cached"
    # "int4-bf16" / "int8-bf16": a quantized build with bf16 activations (both builders' use_cuda_bf16=true)
    base, _, io = precision.partition("-")
    extra = ["--extra_options", "use_cuda_bf16=true"] if io == "bf16" else []
    if kind == "ours":
        cmd = [sys.executable, "-m", "onnxforge", "build", "-m", str(ckpt), "-o", str(out), "-p", base,
               "-e", "cuda", *extra]
    else:
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(ckpt), "-o", str(out),
               "-p", base, "-e", "cuda", "-c", str(cache), *extra]
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=580)
    ok = done.returncode == 0 and (out / "genai_config.json").is_file()
    return f"{kind}-{precision}", time.perf_counter() - t, "ok" if ok else (done.stderr or done.stdout)[-600:]


def weight_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".data", ".onnx") or f.name.endswith(".data"))


class Runner:
    """One build loaded once in genai-cuda, CUDA graph capture off or on; `once(batch, prompt)` times a prefill
    (prompt -> first token) and `decode` further tokens."""

    def __init__(self, folder: Path, graph: bool, decode: int):
        import onnxruntime_genai as og

        self.og, self.decode = og, decode
        cfg = og.Config(str(folder))
        cfg.clear_providers()
        if PROVIDER == "cuda":
            cfg.append_provider("cuda")
            cfg.set_provider_option("cuda", "enable_cuda_graph", "1" if graph else "0")
        self.model = og.Model(cfg)
        self.vocab = json.loads((folder / "genai_config.json").read_text())["model"]["vocab_size"]

    def once(self, batch: int, prompt: int) -> tuple[float, float]:
        import numpy as np

        og = self.og
        ids = np.random.default_rng(prompt).integers(3, min(self.vocab, 30000), (batch, prompt)).astype(np.int32)
        total = prompt + 1 + self.decode
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=total, min_length=total, do_sample=False, batch_size=batch)
        gen = og.Generator(self.model, params)
        timed = time_generation(gen, ids, self.decode)
        del gen
        return timed


def fpa_variant(folder: Path) -> Path:
    """A sibling of `folder` (its files linked) whose genai_config.json adds the session option
    ep.cuda.fpa_intb_gemm "1": what the anchor writes for enable_cuda_fpa_intb_gemm=true."""
    dest = folder.with_name(folder.name + "-fpa")
    dest.mkdir(exist_ok=True)
    for f in folder.iterdir():
        if f.name != "genai_config.json" and not (dest / f.name).exists():
            (dest / f.name).symlink_to(f.resolve())
    cfg = json.loads((folder / "genai_config.json").read_text())
    cfg["model"]["decoder"]["session_options"]["ep.cuda.fpa_intb_gemm"] = "1"
    (dest / "genai_config.json").write_text(json.dumps(cfg, indent=1))
    return dest


def logits_diff(a: Path, b: Path) -> tuple[float, float]:
    """max |logits(a) - logits(b)| over a 16-token prompt and 3 decode steps through genai, and max |logits(a)|."""
    import numpy as np
    import onnxruntime_genai as og

    rows = {}
    for key, folder in (("a", a), ("b", b)):
        cfg = og.Config(str(folder))
        cfg.clear_providers()
        if PROVIDER == "cuda":
            cfg.append_provider("cuda")
        model = og.Model(cfg)
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=24, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(np.arange(100, 116, dtype=np.int32))
        out = [np.asarray(gen.get_logits(), np.float32).ravel()]
        for t in (200, 300, 400):
            gen.append_tokens(np.array([t], np.int32))
            out.append(np.asarray(gen.get_logits(), np.float32).ravel())
        rows[key] = np.stack(out)
        del gen, model
    return float(np.abs(rows["a"] - rows["b"]).max()), float(np.abs(rows["a"]).max())


def measure(folders: dict[str, Path], cases: list[tuple[int, int]], decode: int, reps: int) -> dict:
    """Every variant loaded once and kept (so clocks and allocators see all alike); per case, one warm-up each,
    then rounds alternate over the variants; medians."""
    runners, failed = {}, {}
    for name, folder in folders.items():
        for graph in (False, True):
            key = f"{name}{' +graph' if graph else ''}"
            try:
                runners[key] = Runner(folder, graph, decode)
            except Exception as e:  # noqa: BLE001 - a failing variant is a table cell
                failed[key] = str(e).splitlines()[0][:120]
    out = {}
    for case in cases:
        res, runs = dict(failed), {}
        for k, r in runners.items():
            try:
                r.once(*case)
                runs[k] = []
            except Exception as e:  # noqa: BLE001
                res[k] = str(e).splitlines()[0][:120]
        for _ in range(reps):
            for k in runs:
                runs[k].append(runners[k].once(*case))
        for k, v in runs.items():
            res[k] = (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v))
        out[case] = res
        log(f"b{case[0]} s{case[1]}: {res}")
    del runners
    return out


def main(argv=None) -> int:
    global PROVIDER, HBM_BYTES_PER_S
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("phase", choices=["build", "measure"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/gd"))
    ap.add_argument("--shape", default="1.1b", choices=sorted(SHAPES))
    ap.add_argument("--precisions", default="fp16,bf16,int4")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompts", default="128,2048")
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, help="folder for decode.md / builds.json")
    ap.add_argument("--fpa", action="store_true", help="int4: also each build with the session option "
                    "ep.cuda.fpa_intb_gemm 1 (onnxruntime's fpA_intB kernels for MatMulNBits, prepacked at load)")
    ap.add_argument("--hbm", type=float, default=HBM_BYTES_PER_S,
                    help="memory bandwidth in bytes/s for the floor (default the H200's 4.8e12; H100 SXM 3.35e12)")
    ap.add_argument("--provider", default="cuda", choices=["cuda", "cpu"], help="cpu: smoke-test the script")
    args = ap.parse_args(argv)
    PROVIDER, HBM_BYTES_PER_S = args.provider, args.hbm
    precisions = args.precisions.split(",")
    ckpt = args.work / f"ckpt-{args.shape}"
    if args.phase == "build":
        t = time.perf_counter()
        make_checkpoint(args.shape, ckpt)
        log(f"checkpoint {args.shape}: {time.perf_counter() - t:.0f} s")
        jobs = [(k, ckpt, args.work / f"{k}-{args.shape}-{p}", p, args.work / "cache") for p in precisions
                for k in ("ours", "anchor")]
        with ThreadPoolExecutor(len(jobs)) as ex:
            res = list(ex.map(lambda j: build(*j), jobs))
        for name, secs, status in res:
            print(f"{name}: {secs:.0f} s {status}")
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"builds-{args.shape}.json").write_text(json.dumps(res, indent=1))
        return 0

    import onnxruntime_genai as og

    lines = [f"shape {args.shape} ({json.dumps(SHAPES[args.shape])}), onnxruntime-genai {og.__version__}, "
             f"decode {args.decode} tokens, median of {args.reps}; tok/s per sequence; ratios vs the anchor's "
             "build (default, then with CUDA graphs)", "",
             "| precision | batch | prompt | build | weights GB | floor ms/token | prefill ms | decode tok/s | "
             "decode vs anchor | vs anchor +graph | prefill vs anchor |", "|" + "---|" * 11]
    cases = [(b, s) for b in map(int, args.batches.split(",")) for s in map(int, args.prompts.split(","))]
    for p in precisions:
        folders = {k: args.work / f"{k}-{args.shape}-{p}" for k in ("ours", "anchor")}
        folders = {k: f for k, f in folders.items() if (f / "genai_config.json").is_file()}
        if args.fpa and p == "int4":
            folders.update({f"{k}-fpA_intB": fpa_variant(f) for k, f in list(folders.items())})
        if args.fpa and p == "int4":
            for k in [k for k in folders if k.endswith("-fpA_intB")]:
                d, ref = logits_diff(folders[k.removesuffix("-fpA_intB")], folders[k])
                lines.insert(1, f"{k} vs {k.removesuffix('-fpA_intB')}: max |logits diff| {d:.3g} over 4 steps "
                                f"(max |logits| {ref:.3g})")
        for (b, s), res in measure(folders, cases, args.decode, args.reps).items():
            base, graph = res.get("anchor"), res.get("anchor +graph")
            for k, v in res.items():
                size = weight_bytes(folders[k.split(" ")[0]])
                floor = f"{1000 * size / HBM_BYTES_PER_S:.2f}"
                if isinstance(v, str):
                    lines.append(f"| {p} | {b} | {s} | {k} | {size / 1e9:.2f} | {floor} | {v} | | | | |")
                    continue
                r1 = f"{v[1] / base[1]:.2f}x" if isinstance(base, tuple) else "-"
                r2 = f"{v[1] / graph[1]:.2f}x" if isinstance(graph, tuple) else "-"
                r3 = f"{base[0] / v[0]:.2f}x" if isinstance(base, tuple) else "-"
                lines.append(f"| {p} | {b} | {s} | {k} | {size / 1e9:.2f} | {floor} | {1000 * v[0]:.1f} | "
                             f"{v[1]:.1f} ({1000 / v[1]:.2f} ms) | {r1} | {r2} | {r3} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"decode-{args.shape}.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
