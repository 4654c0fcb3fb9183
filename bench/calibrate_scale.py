"""Calibrated int4 at scale (issue 27's targets): time and peak memory of a 1.1B-shaped calibrated build on this
machine, and the memory bound of a 70B shape.

The model is TinyLlama-1.1B's shape (22 layers, hidden 2048, 32 heads / 4 KV heads, intermediate 5632, vocab 32000,
untied lm_head) from bench/scale.py's seeded synthetic source (random bf16 weights: the time and memory of
calibration do not depend on the values; the quality figures are bench/quality.py's, on SmolLM2-135M). The build
is the one a user runs, `onnxforge build -m MODEL -o OUT -p int4 --method gptq` (default calibration: the offline
standard-library docstrings, 64 samples x 256 tokens), in a child process; peak memory is the largest sum of the
resident sets of its process tree, sampled every 0.2 s, beside the child's own ru_maxrss.

    python bench/calibrate_scale.py                          # gptq, the whole 1.1B shape (about 10 min)
    python bench/calibrate_scale.py --methods gptq,awq+gptq
    python bench/calibrate_scale.py --samples 32             # fewer calibration tokens
    python bench/calibrate_scale.py --smoke                  # a tiny shape, seconds
    python bench/calibrate_scale.py --write-results          # also update bench/RESULTS.md

The 70B figure is the bound from the shapes (what calibration holds at its peak: the layer's hidden states and the
MLP's intermediate for every calibration token, and one Hessian while its inverse factor is made, gptq.input_factor),
checked against the same formula's prediction for the measured 1.1B run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import scale  # noqa: E402
from scale import LLAMA3_70B, SMOKE, tokenizer_dir  # noqa: E402

TINYLLAMA = dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                 intermediate_size=5632, vocab_size=32000)
GIB = 1 << 30

CHILD = """
import json, resource, sys, time
sys.path.insert(0, {here!r})
from scale import SyntheticSource
from pathlib import Path
import onnxforge
from onnxforge.calibrate.data import Calibration
from onnxforge.quant.recipe import Recipe
src = SyntheticSource({dims!r}, None, Path({tok!r}))
t = time.perf_counter()
report = onnxforge.build(src, {out!r}, recipe=Recipe(precision="int4", method={method!r}), overwrite=True,
                         calibration=Calibration(samples={samples!r}, length={length!r}))
cal = report.recipe.get("calibration", {{}})
print(json.dumps({{"seconds": time.perf_counter() - t, "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "calibration_seconds": cal.get("seconds"), "bytes": sum(report.files.values())}}))
"""


def bound(dims: dict, tokens: int) -> dict:
    """Bytes calibration holds at its peak (float32): in the MLP, the layer's input hidden states and their normed
    copy (2 x T x H), the intermediate (T x I), and down_proj's Hessian, factored in place (I^2, plus I x 256
    panels: gptq.input_factor); one layer's float weights (gate, up, down: 3 x H x I) and one slice of GPTQ rows.
    The build that follows streams (bench/scale.py)."""
    h, i = dims["hidden_size"], dims["intermediate_size"]
    parts = {"hidden states (2 x T x H)": 2 * tokens * h * 4, "intermediate (T x I)": tokens * i * 4,
             "Hessian, factored in place (I^2)": i * i * 4, "float weights (3 x H x I)": 3 * h * i * 4}
    parts["total"] = sum(parts.values())
    return parts


def run_child(dims: dict, method: str, samples: int, length: int, out: Path, tok: Path) -> dict:
    code = CHILD.format(here=str(HERE), dims=dims, tok=str(tok), out=str(out), method=method, samples=samples,
                        length=length)
    return scale.run_child(code, method)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="a tiny shape, seconds")
    ap.add_argument("--methods", default="gptq")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--work", default=str(HERE / "_work"))
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args(argv)
    import shutil

    import common

    dims = SMOKE if args.smoke else TINYLLAMA
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tok = tokenizer_dir(work)
    tokens = args.samples * args.length
    lines = [f"{'1.1B' if not args.smoke else 'smoke'}-shaped synthetic Llama (hidden {dims['hidden_size']}, "
             f"{dims['num_hidden_layers']} layers, intermediate {dims['intermediate_size']}, vocab "
             f"{dims['vocab_size']}), int4 block 32, calibration {args.samples} x {args.length} = {tokens} tokens",
             f"{'method':<10} {'build s':>8} {'calib s':>8} {'peak GiB (tree)':>16} {'peak GiB (own)':>15} "
             f"{'targets (600 s, 1.5 GiB)':>25}"]
    ok = True
    for method in args.methods.split(","):
        out = work / f"calibrate-scale-{method.replace('+', '_')}"
        common.log(f"int4 {method}: {tokens} calibration tokens")
        r = run_child(dims, method, args.samples, args.length, out, tok)
        shutil.rmtree(out, ignore_errors=True)
        met = r["seconds"] < 600 and r["tree_peak"] < 1.5 * GIB
        ok &= met or args.smoke
        lines.append(f"{method:<10} {r['seconds']:>8.0f} {r['calibration_seconds'] or float('nan'):>8.0f} "
                     f"{r['tree_peak'] / GIB:>16.2f} {r['maxrss'] / GIB:>15.2f} {'met' if met else 'NOT met':>25}")
    for name, shape in (("this shape", dims), ("Llama-3-70B shape", LLAMA3_70B)):
        b = bound(shape, tokens)
        lines.append(f"calibration's peak bound, {name} (hidden {shape['hidden_size']}, intermediate "
                     f"{shape['intermediate_size']}), {tokens} tokens: {b['total'] / GIB:.2f} GiB = "
                     + ", ".join(f"{k} {v / GIB:.2f}" for k, v in b.items() if k != "total"))
    print("\n".join(lines))
    if args.write_results:
        body = "\n".join(common.header_lines() + [
            "", "`python bench/calibrate_scale.py" + (" --smoke" if args.smoke else "") + f" --methods {args.methods}"
            + (f" --samples {args.samples}" if args.samples != 64 else "") + "`", "", "```", *lines, "```"])
        common.write_section("calibrated int4 at scale (bench/calibrate_scale.py)" + (" (smoke)" if args.smoke else ""),
                             body)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
