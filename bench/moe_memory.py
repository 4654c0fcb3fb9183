"""Peak memory of a mixture-of-experts build: a random Mixtral-shaped checkpoint at two depths (8 experts, top-2;
bf16, one shard per layer, per-expert tensors) built at fp32 (MoE op) and int4 / int8 (QMoE), each in its own
child process; peak RSS (summed over the build's process tree) against the checkpoint's size, one expert's
and one layer's experts. Each build's graph is checked to hold one MoE / QMoE node per layer, with the
expert bits and block the label names.

Experts are read one at a time and written as they are made (graph/experts.py, writer Pieces), so the
peak stays at a few experts plus the writer's bytes in flight, whatever the number of experts or layers.

    python bench/moe_memory.py               # hidden 1024, 8 experts of 3 x 1024 x 3584: 16 layers (2.8 GiB
                                             # bf16) and the same at 4 layers (0.8 GiB); 3 minutes on 2 cores
    python bench/moe_memory.py --smoke       # tiny, seconds
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from build_memory import tree_rss  # noqa: E402

WORK = HERE / "_work"
BIG = dict(hidden_size=1024, num_hidden_layers=16, intermediate_size=3584, vocab_size=32000, num_attention_heads=16,
           num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2)
SMOKE = dict(hidden_size=128, num_hidden_layers=2, intermediate_size=256, vocab_size=512, num_attention_heads=4,
             num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2)
BUILDS = {"fp32": ["-p", "fp32"], "int4 rtn": ["-p", "int4", "--method", "rtn"],
          "int8 per-channel": ["-p", "int8", "--extra_options", "qmoe_block_size=0"]}
EXPECT = {"fp32": ("MoE", None, None), "int4 rtn": ("QMoE", 4, 32), "int8 per-channel": ("QMoE", 8, None)}
# Where the peak goes, measured on the full run (tracemalloc snapshots at the highest live total, VmRSS
# sampled by the tensor being written, per-process RSS of the tree); update it when the figures move:
NOTE = """Where the peak goes (full run; tracemalloc snapshots, VmRSS sampled by the tensor being written, RSS per
process): about 80 MiB after imports and 30 MiB of graph objects; the experts' live arrays are at most about
150 MiB (the expert being written and the two graph/experts.py's each_expert computes ahead, in fp32, with
their interleave / quantizer temporaries: 3-4 experts of 42 MiB, under half of one layer's experts); the
highest point is the last layer's experts overlapping lm_head, which the writer produces ahead (at fp32 a
125 MiB (1024, 32000) MatMul weight plus its whole 62 MiB bf16 read; quantized, row slices of about 45
MiB); about 100 MiB more is freed memory glibc keeps in its per-thread arenas (MALLOC_MMAP_THRESHOLD_=1048576
brings the fp32 / int4 peaks to about 0.33 / 0.27 GiB). int8 (method default) quantizes the non-expert
weights in two worker processes of about 110 MiB each (quant/pool.py): the tree's peak is 0.2 GiB above
the build process's own. The peaks are the same at 4 and 16 layers."""


def make_checkpoint(folder: Path, dims: dict) -> Path:
    import ml_dtypes
    from safetensors.numpy import save_file

    if (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    H, I, V, n, E = (dims[k] for k in ("hidden_size", "intermediate_size", "vocab_size", "num_hidden_layers",
                                       "num_local_experts"))
    kv = H // dims["num_attention_heads"] * dims["num_key_value_heads"]
    bf16 = ml_dtypes.bfloat16

    def rand(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(bf16)

    weight_map = {}

    def save(tensors: dict, name: str) -> None:
        save_file(tensors, str(folder / name))
        weight_map.update({k: name for k in tensors})

    save({"model.embed_tokens.weight": rand(V, H), "model.norm.weight": np.ones(H, bf16),
          "lm_head.weight": rand(V, H)}, "model-embed.safetensors")
    for i in range(n):
        p = f"model.layers.{i}."
        t = {p + "self_attn.q_proj.weight": rand(H, H), p + "self_attn.k_proj.weight": rand(kv, H),
             p + "self_attn.v_proj.weight": rand(kv, H), p + "self_attn.o_proj.weight": rand(H, H),
             p + "input_layernorm.weight": np.ones(H, bf16), p + "post_attention_layernorm.weight": np.ones(H, bf16),
             p + "block_sparse_moe.gate.weight": rand(E, H)}
        for e in range(E):
            q = f"{p}block_sparse_moe.experts.{e}."
            t.update({q + "w1.weight": rand(I, H), q + "w3.weight": rand(I, H), q + "w2.weight": rand(H, I)})
        save(t, f"model-{i:05d}.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = dict(dims, architectures=["MixtralForCausalLM"], model_type="mixtral", hidden_act="silu",
                  max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=1e6, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    sys.path.insert(0, str(HERE.parent / "tests"))
    import tiny

    tiny.tokenizer_files(folder)
    return folder


def measure(cmd: list[str], every: float = 0.02) -> tuple[float, int, int, int]:
    """Run one build; (seconds, peak summed RSS of its process tree sampled every `every` s, the largest
    single process's ru_maxrss, exit code). Default / k_quant / hqq quantize non-expert weights in worker
    processes (quant/pool.py), so the build process's own maximum is not the whole footprint."""
    with tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True)
        tree = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            tree = max(tree, tree_rss(proc.pid))
            time.sleep(every)
        seconds = time.perf_counter() - t
        proc.returncode = rc = os.waitstatus_to_exitcode(status)
        if rc:
            err.seek(0)
            sys.stderr.write(err.read()[-3000:])
    return seconds, max(tree, usage.ru_maxrss * 1024), usage.ru_maxrss * 1024, rc


def moe_nodes(out: Path) -> list:
    import onnx

    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    return [n for n in model.graph.node if n.domain == "com.microsoft" and n.op_type in ("MoE", "QMoE")]


def check_graph(out: Path, label: str, layers: int) -> str:
    """'' if the graph holds one expected MoE / QMoE node per layer, else what is wrong."""
    op, bits, block = EXPECT[label]
    nodes = moe_nodes(out)
    if len(nodes) != layers or any(n.op_type != op for n in nodes):
        return f"expected {layers} {op} nodes, got {[n.op_type for n in nodes]}"
    for n in nodes:
        attrs = {a.name: a.i for a in n.attribute if a.type == a.INT}
        if bits is not None and (attrs.get("expert_weight_bits"), attrs.get("block_size")) != (bits, block):
            return (f"{n.name}: expert_weight_bits {attrs.get('expert_weight_bits')}, "
                    f"block_size {attrs.get('block_size')}")
    return ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--work", default=str(WORK))
    ap.add_argument("--write-results", action="store_true", help="also update bench/RESULTS.md")
    args = ap.parse_args()
    work = Path(args.work)
    dims = SMOKE if args.smoke else BIG
    # the same model at two depths: the peak should not follow the checkpoint's size
    shallow = dict(dims, num_hidden_layers=1 if args.smoke else 4)
    stem = "mixtral-smoke" if args.smoke else "mixtral-8e"
    checkpoints = [(dims, make_checkpoint(work / stem, dims)),
                   (shallow, make_checkpoint(work / f"{stem}-{shallow['num_hidden_layers']}l", shallow))]
    expert = 3 * dims["hidden_size"] * dims["intermediate_size"] * 4  # one expert, fp32 while it is worked on
    layer = expert * dims["num_local_experts"]
    gb, mb = 1 << 30, 1 << 20
    lines = [f"MoE build peak RSS: random Mixtral-shaped bf16 checkpoints (hidden {dims['hidden_size']}, "
             f"{dims['num_local_experts']} experts of intermediate {dims['intermediate_size']}, top-2; one expert "
             f"{expert / mb:.0f} MiB in fp32, one layer's experts {layer / mb:.0f} MiB in fp32 / {layer / 2 / mb:.0f} "
             f"MiB in bf16), {os.cpu_count()} cores",
             "peak: the summed RSS of the build's process tree (sampled every 20 ms); largest process: ru_maxrss",
             f"{'build':<18} {'layers':>6} {'ckpt GiB':>9} {'seconds':>8} {'peak GiB':>9} {'largest process':>16} "
             f"{'peak / ckpt':>12} {'peak / layer experts':>21} {'output GiB':>11}"]
    ok = True
    for d, ckpt in checkpoints:
        size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
        for label, flags in BUILDS.items():
            out = work / f"out-moe-{os.getpid()}"
            cmd = [sys.executable, "-m", "onnxforge", "build", "-m", str(ckpt), "-o", str(out), *flags,
                   "--overwrite", "--quiet"]
            seconds, peak, own, rc = measure(cmd)
            built = sum(f.stat().st_size for f in out.glob("*")) if out.exists() else 0
            wrong = check_graph(out, label, d["num_hidden_layers"]) if rc == 0 else "build failed"
            ok &= not wrong
            lines.append(f"{label:<18} {d['num_hidden_layers']:>6} {size / gb:>9.2f} {seconds:>8.1f} {peak / gb:>9.2f} "
                         f"{own / gb:>16.2f} {peak / size:>11.2f}x {peak / layer:>20.2f}x {built / gb:>11.2f}"
                         + (f"  FAILED: {wrong}" if wrong else ""))
            shutil.rmtree(out, ignore_errors=True)
    print("\n".join(lines))
    if args.write_results:
        import common

        body = "\n".join(common.header_lines() + ["", "```", *lines, "```", "", NOTE])
        common.write_section("Mixture-of-experts build memory (bench/moe_memory.py)", body)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
