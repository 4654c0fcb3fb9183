"""Build-time and peak-memory benchmark on a random ~1B Llama (hidden 2048, 16 layers, intermediate
8192, vocab 32000), at fp32 and int4 (rtn, k_quant, default), optionally against the
onnxruntime-genai builder (--anchor).

Each build runs in its own child process; peak RSS is the larger of its largest process (getrusage
RUSAGE_CHILDREN, measured around one child at a time) and the largest sum over its process tree (the
build and its quantization workers, sampled). Prints figures and ratios.

    python bench/build_memory.py                      # onnxforge fp32 + int4 rtn/k_quant/default
    python bench/build_memory.py --anchor             # also the onnxruntime-genai builder
    python bench/build_memory.py --smoke              # tiny model, seconds (used by the test suite)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
WORK = HERE / "_work"
BIG = dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, vocab_size=32000,
           num_attention_heads=32, num_key_value_heads=4)
SMOKE = dict(hidden_size=128, num_hidden_layers=2, intermediate_size=256, vocab_size=512,
             num_attention_heads=4, num_key_value_heads=2)
ANCHOR = {"fp32": ("fp32", None), "int4 rtn": ("int4", "rtn"), "int4 k_quant": ("int4", "k_quant"),
          "int4 default": ("int4", "default")}


def make_checkpoint(folder: Path, dims: dict, dtype: str = "bfloat16") -> Path:
    """A random Llama in safetensors (one shard per layer), written tensor by tensor with numpy."""
    import ml_dtypes
    from safetensors.numpy import save_file

    if (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    H, I, V, n = dims["hidden_size"], dims["intermediate_size"], dims["vocab_size"], dims["num_hidden_layers"]
    kv = H // dims["num_attention_heads"] * dims["num_key_value_heads"]
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32

    def rand(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np_dtype)

    weight_map = {}

    def save(tensors: dict, name: str) -> None:
        save_file(tensors, str(folder / name))
        weight_map.update({k: name for k in tensors})

    save({"model.embed_tokens.weight": rand(V, H), "model.norm.weight": np.ones(H, np_dtype),
          "lm_head.weight": rand(V, H)}, "model-embed.safetensors")
    for i in range(n):
        p = f"model.layers.{i}."
        save({p + "self_attn.q_proj.weight": rand(H, H), p + "self_attn.k_proj.weight": rand(kv, H),
              p + "self_attn.v_proj.weight": rand(kv, H), p + "self_attn.o_proj.weight": rand(H, H),
              p + "mlp.gate_proj.weight": rand(I, H), p + "mlp.up_proj.weight": rand(I, H),
              p + "mlp.down_proj.weight": rand(H, I), p + "input_layernorm.weight": np.ones(H, np_dtype),
              p + "post_attention_layernorm.weight": np.ones(H, np_dtype)}, f"model-{i:05d}.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = dict(dims, architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
                  max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2, torch_dtype=dtype)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    sys.path.insert(0, str(HERE.parent / "tests"))
    import tiny  # a small byte-level BPE tokenizer: the anchor refuses a folder without one

    tiny.tokenizer_files(folder)
    return folder


def tree_rss(pid: int) -> int:
    """Resident bytes of pid and all its descendants (a build and its quantization worker processes)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:")), 0)
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def run_child(cmd: list[str]) -> tuple[float, int, int]:
    """Run one build; returns (seconds, peak bytes, return code). The peak is the larger of the largest
    single process (getrusage RUSAGE_CHILDREN of a helper that runs only this build) and the largest sum
    over the build's process tree (the build and its worker processes), sampled every 0.1 s."""
    import time

    code = ("import json,sys,subprocess,time,resource;t=time.perf_counter();"
            "p=subprocess.Popen(sys.argv[1:],stdout=subprocess.DEVNULL,stderr=subprocess.PIPE,text=True);"
            "print(p.pid,flush=True);err=p.communicate()[1];"
            "sys.stderr.write(err[-3000:] if p.returncode else '');"
            "print(json.dumps([time.perf_counter()-t,resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss*1024,p.returncode]))")
    helper = subprocess.Popen([sys.executable, "-c", code, *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = helper.stdout.readline().strip()
    tree = 0
    if first.isdigit():
        while helper.poll() is None:
            tree = max(tree, tree_rss(int(first)))
            time.sleep(0.1)
    out, err = helper.communicate()
    if helper.returncode or not out.strip():
        sys.stderr.write(err)
        return 0.0, 0, 1
    if err:
        sys.stderr.write(err)
    seconds, peak, rc = json.loads(out.strip().splitlines()[-1])
    return seconds, max(peak, tree), rc


def ours(ckpt: Path, out: Path, label: str) -> list[str]:
    precision, method = ANCHOR[label]
    cmd = [sys.executable, "-m", "onnxforge", "build", "-m", str(ckpt), "-o", str(out), "-p", precision,
           "--overwrite", "--quiet"]
    if method:
        cmd += ["--extra_options", f"int4_algo_config={method}"]
    return cmd


def anchor(ckpt: Path, out: Path, label: str) -> list[str]:
    """The anchor's command; 0.18 silently ignores the legacy `int4_algo_config` spelling, so use `algo_config`."""
    precision, method = ANCHOR[label]
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(ckpt), "-o", str(out), "-p",
           precision, "-e", "cpu", "-c", str(WORK / "hf_cache")]
    if method:
        cmd += ["--extra_options", f"algo_config={method}"]
    return cmd


def anchor_available() -> bool:
    try:
        import importlib.util

        return all(importlib.util.find_spec(m) for m in ("onnxruntime_genai", "torch", "transformers"))
    except Exception:
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model; seconds")
    ap.add_argument("--anchor", action="store_true", help="also run the onnxruntime-genai builder")
    ap.add_argument("--builds", default=",".join(ANCHOR), help=f"comma list of {', '.join(ANCHOR)}")
    ap.add_argument("--work", default=str(WORK))
    ap.add_argument("--write-results", action="store_true", help="also update bench/RESULTS.md")
    args = ap.parse_args()
    work = Path(args.work)
    ckpt = make_checkpoint(work / ("llama-smoke" if args.smoke else "llama-1b"), SMOKE if args.smoke else BIG)
    labels = [b.strip() for b in args.builds.split(",") if b.strip()]
    rows = []
    for label in labels:
        s, peak, rc = run_child(ours(ckpt, work / f"out-ours-{os.getpid()}", label))
        row = {"build": label, "ours_s": s, "ours_peak": peak, "ours_ok": rc == 0}
        if args.anchor and anchor_available():
            a_s, a_peak, a_rc = run_child(anchor(ckpt, work / f"out-anchor-{os.getpid()}", label))
            row.update(anchor_s=a_s, anchor_peak=a_peak, anchor_ok=a_rc == 0)
        rows.append(row)
        shutil.rmtree(work / f"out-ours-{os.getpid()}", ignore_errors=True)
        shutil.rmtree(work / f"out-anchor-{os.getpid()}", ignore_errors=True)
    title = "smoke" if args.smoke else "random Llama ~1.1B (hidden 2048, 16 layers, vocab 32000)"
    print_table(rows, title)
    if args.write_results:
        import contextlib
        import io

        import common

        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            print_table(rows, title)
        from onnxforge.quant import _native

        kernel = "its C kernel" if _native.KQUANT is not None else "the numpy reference (the C kernel is not built)"
        notes = [f"onnxforge on {os.cpu_count()} workers; k_quant ran {kernel}, in threads (ctypes releases the GIL); "
                 "default and hqq in worker processes. The anchor's rows pass `algo_config=` (onnxruntime-genai "
                 "0.18 silently ignores the legacy `int4_algo_config=` spelling). Issue 14's target for k_quant is "
                 "1/20 of the anchor's time."]
        body = "\n".join(common.header_lines() + ["", "```", text.getvalue().rstrip(), "```"] + notes)
        common.write_section("Build time and peak memory by int4 method (bench/build_memory.py)", body)
    if args.anchor and not anchor_available():
        print("anchor: onnxruntime-genai builder not available (needs onnxruntime-genai, torch, transformers)")
    return 0 if all(r["ours_ok"] for r in rows) else 1


def print_table(rows: list[dict], title: str) -> None:
    gb = 1 << 30
    print(f"build time and peak RSS, {title}, {os.cpu_count()} cores")
    print(f"{'build':<14} {'onnxforge s':>11} {'peak GB':>8} | {'anchor s':>9} {'peak GB':>8} | {'time ratio':>10} {'mem ratio':>9}")
    for r in rows:
        line = f"{r['build']:<14} {r['ours_s']:>11.1f} {r['ours_peak'] / gb:>8.2f}"
        if "anchor_s" in r and r.get("anchor_ok"):
            line += (f" | {r['anchor_s']:>9.1f} {r['anchor_peak'] / gb:>8.2f} | {r['anchor_s'] / r['ours_s']:>9.1f}x"
                     f" {r['anchor_peak'] / max(r['ours_peak'], 1):>8.1f}x")
        elif "anchor_s" in r:
            line += " | anchor failed"
        if not r["ours_ok"]:
            line += "  (onnxforge FAILED)"
        print(line)


if __name__ == "__main__":
    sys.exit(main())
