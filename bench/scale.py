"""A 70B-shaped build on this machine: peak memory, wall time and throughput, with no 140 GB checkpoint.

Llama-3-70B's shapes (80 layers, hidden 8192, 64 heads / 8 KV heads, intermediate 28672, vocab 128256,
untied lm_head; 70.6 billion weights, 141 GB in bf16) come from a seeded synthetic source: an object
behind onnxforge's Source interface (the one the safetensors reader implements: `read` / `read_rows`
return bf16 arrays), handed to `onnxforge.build` as the model. Its weights are generated on demand,
per block of rows, from (tensor name, block) seeds, so any slice reads the same values whatever the
slicing. The disk could not hold the real checkpoint, and it cannot be downloaded here.

- int4 rtn: the whole model, written to disk in full (then deleted).
- int4 k_quant and hqq: a slice of 2 and 4 layers (with the embedding and the lm_head), extrapolated to
  80 layers as fixed + 80 x per layer, per layer = (t4 - t2) / 2.

Peak memory is the largest sum of the resident sets of the build's process tree (the build and its
quantization workers), sampled every 0.2 s, beside the build process's own ru_maxrss.

    python bench/scale.py                       # rtn in full + k_quant/hqq slices (an hour on 2 cores)
    python bench/scale.py --methods rtn         # one method
    python bench/scale.py --smoke               # a tiny shape, seconds
    python bench/scale.py --write-results       # also update bench/RESULTS.md

Run it in the background; it is a bench, not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from build_memory import tree_rss  # noqa: E402

LLAMA3_70B = dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                  intermediate_size=28672, vocab_size=128256)
SMOKE = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=512, vocab_size=1024)
GEN_ELEMENTS = 1 << 22  # values per generated block of rows


class SyntheticSource:
    """A Llama checkpoint whose bf16 weights are generated on demand (implements sources.base.Source)."""

    def __init__(self, dims: dict, layers: int | None = None, tokenizer_dir: Path | None = None):
        self.dims = dict(dims, num_hidden_layers=layers or dims["num_hidden_layers"])
        self.path = Path(f"synthetic-llama-{dims['hidden_size']}x{self.dims['num_hidden_layers']}")
        self.config = dict(self.dims, architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
                           max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                           tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16",
                           head_dim=dims["hidden_size"] // dims["num_attention_heads"])
        self.generation_config = None
        self._tokenizer_dir = tokenizer_dir
        H, I, V = dims["hidden_size"], dims["intermediate_size"], dims["vocab_size"]
        kv = H // dims["num_attention_heads"] * dims["num_key_value_heads"]
        self.shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
        for i in range(self.dims["num_hidden_layers"]):
            p = f"model.layers.{i}."
            self.shapes.update({p + "self_attn.q_proj.weight": (H, H), p + "self_attn.k_proj.weight": (kv, H),
                                p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.o_proj.weight": (H, H),
                                p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H),
                                p + "mlp.down_proj.weight": (H, I), p + "input_layernorm.weight": (H,),
                                p + "post_attention_layernorm.weight": (H,)})

    @property
    def weights(self) -> int:
        return sum(int(np.prod(s)) for s in self.shapes.values())

    def tensor_names(self) -> list[str]:
        return list(self.shapes)

    def has(self, name: str) -> bool:
        return name in self.shapes

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def read(self, name: str) -> np.ndarray:
        return self.read_rows(name, 0, self.shapes[name][0])

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        import ml_dtypes

        shape = self.shapes[name]
        if len(shape) == 1:  # norm weights: ones
            return np.ones(stop - start, dtype=ml_dtypes.bfloat16)
        cols = shape[1]
        rows_per = max(1, GEN_ELEMENTS // cols)
        out = np.empty((stop - start, cols), dtype=np.uint16)
        seed = zlib.crc32(name.encode())
        for block in range(start // rows_per, -(-stop // rows_per)):
            b0, b1 = block * rows_per, min((block + 1) * rows_per, shape[0])
            bits = np.frombuffer(np.random.default_rng([seed, block]).bytes((b1 - b0) * cols * 2), dtype=np.uint16)
            # sign, exponent 2^-7..2^-6 (|w| in [0.0078, 0.0156)), random 7-bit mantissa: bf16 weights
            bits = (bits & np.uint16(0x807F)) | np.uint16(0x3C00)
            lo, hi = max(start, b0), min(stop, b1)
            out[lo - start:hi - start] = bits.reshape(b1 - b0, cols)[lo - b0:hi - b0]
        return out.view(ml_dtypes.bfloat16)

    def native_blocks(self, name, bits, block_size):
        return None

    def write_tokenizer(self, out_dir: Path) -> list[str]:
        names = []
        if self._tokenizer_dir:
            for f in sorted(self._tokenizer_dir.iterdir()):
                shutil.copy(f, out_dir / f.name)
                names.append(f.name)
        return names

    def fingerprint(self) -> str:
        import hashlib

        return hashlib.sha256(json.dumps(self.config, sort_keys=True).encode()).hexdigest()

    def close(self) -> None:
        pass


def tokenizer_dir(work: Path) -> Path:
    folder = work / "scale-tokenizer"
    if not (folder / "tokenizer.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        sys.path.insert(0, str(HERE.parent / "tests"))
        import tiny

        tiny.tokenizer_files(folder)
    return folder


CHILD = """
import json, resource, sys, time
sys.path.insert(0, {here!r})
from scale import SyntheticSource, LLAMA3_70B, SMOKE
from pathlib import Path
import onnxforge
from onnxforge.quant.recipe import Recipe
dims = {dims!r}
src = SyntheticSource(dims, {layers!r}, Path({tok!r}))
t = time.perf_counter()
report = onnxforge.build(src, {out!r}, recipe=Recipe(precision="int4", method={method!r}), overwrite=True)
print(json.dumps({{"seconds": time.perf_counter() - t, "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "weights": src.weights, "bytes": sum(report.files.values())}}))
"""


def run_child(code: str, what: str) -> dict:
    """Run `code` in a child Python, sampling its process tree's resident set every 0.2 s: the JSON its last
    line prints, with "tree_peak" (bytes) added; a failure ends the benchmark naming `what`."""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        time.sleep(0.2)
    stdout, stderr = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"build failed ({what}):\n{stderr[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["tree_peak"] = peak
    return result


def run(dims: dict, layers: int | None, method: str, out: Path, tok: Path) -> dict:
    code = CHILD.format(here=str(HERE), dims=dims, layers=layers, tok=str(tok), out=str(out), method=method)
    result = run_child(code, f"{method}, {layers} layers")
    shutil.rmtree(out, ignore_errors=True)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="a tiny shape, seconds")
    ap.add_argument("--methods", default="rtn,k_quant,hqq")
    ap.add_argument("--work", default=str(HERE / "_work"), help="output folder's parent (needs ~50 GB for rtn)")
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args(argv)
    import common

    dims = SMOKE if args.smoke else LLAMA3_70B
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tok = tokenizer_dir(work)
    full = SyntheticSource(dims)
    gib = 1 << 30
    lines = [f"Llama-3-70B-shaped synthetic checkpoint: {full.weights / 1e9:.2f} B weights "
             f"({full.weights * 2 / 1e9:.0f} GB in bf16), {dims['num_hidden_layers']} layers, hidden "
             f"{dims['hidden_size']}, intermediate {dims['intermediate_size']}, vocab {dims['vocab_size']}; "
             f"{os.cpu_count()} cores, default workers",
             f"{'build':<30} {'seconds':>9} {'Mweights/s':>11} {'peak GiB (tree)':>16} {'peak GiB (build)':>17} "
             f"{'output GB':>10}"]
    ok = True
    for method in args.methods.split(","):
        out = work / f"scale-out-{os.getpid()}"
        if method == "rtn":
            common.log(f"int4 {method}: the whole model")
            r = run(dims, None, method, out, tok)
            label, seconds, weights, output = f"int4 {method} (full, written)", r["seconds"], r["weights"], r["bytes"]
            peak, own = r["tree_peak"], r["maxrss"]
        else:
            small, big = (1, 2) if args.smoke else (2, 4)
            common.log(f"int4 {method}: {small} and {big} layers")
            a, b = run(dims, small, method, out, tok), run(dims, big, method, out, tok)
            per = (b["seconds"] - a["seconds"]) / (big - small)
            fixed = a["seconds"] - small * per
            seconds = fixed + dims["num_hidden_layers"] * per
            label, weights, output = f"int4 {method} ({small}/{big}-layer slices)", full.weights, float("nan")
            peak, own = max(a["tree_peak"], b["tree_peak"]), max(a["maxrss"], b["maxrss"])
            lines.append(f"  {method}: {small} layers {a['seconds']:.1f} s, {big} layers {b['seconds']:.1f} s -> "
                         f"{per:.1f} s per layer, {fixed:.1f} s for embedding, lm_head and the rest")
        ok &= peak < 4 * gib or args.smoke
        lines.append(f"{label:<30} {seconds:>9.0f} {weights / seconds / 1e6:>11.1f} {peak / gib:>16.2f} "
                     f"{own / gib:>17.2f} {output / 1e9:>10.1f}" + ("" if peak < 4 * gib else "  OVER 4 GiB"))
    print("\n".join(lines))
    if args.write_results:
        body = "\n".join(common.header_lines() + ["", "`python bench/scale.py`" + (" --smoke" if args.smoke else "")
                                                    + ": peak under 4 GiB is the target.", "", "```", *lines, "```"])
        common.write_section("70B-shaped build (bench/scale.py)" + (" (smoke)" if args.smoke else ""), body)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
