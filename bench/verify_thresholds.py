"""Measure what `onnxforge verify` reports for correct builds at each precision, and for wrong models,
so that its default thresholds (verify/thresholds.py) sit between the two. Prints one table.

Correct builds: SmolLM2-135M-Instruct (the demo GGUF; its Q4_1 weights dequantized are the reference)
at fp32, fp16, int8 and int4 (default and k_quant_mixed), and a tiny random Llama at the same precisions.
Wrong models: the tiny Llama built from one seed and verified against another seed's checkpoint, and
SmolLM2 int4 with one layer's MLP weights zeroed in the reference.

    python bench/verify_thresholds.py [--out bench/_work/verify]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import onnxforge  # noqa: E402
from onnxforge.quant.recipe import Recipe  # noqa: E402
from onnxforge.verify.parity import verify  # noqa: E402

RECIPES = {
    "fp32": Recipe(precision="fp32"),
    "fp16": Recipe(precision="fp16"),
    "int8": Recipe(precision="int8"),
    "int4": Recipe(precision="int4"),
    "int4 k_quant_mixed": Recipe(precision="int4", method="k_quant", int8_last_matmul=True, int8_mixed_layers=True),
}


def measure(model_dir: Path, reference: Path) -> dict:
    r = verify(model_dir, reference, write=False, plot=False, defaults=False)
    m = r["metrics"]
    return {k: m[k] for k in ("max_abs_diff", "mean_kl", "top1", "greedy_agreement")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/_work/verify")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from onnxforge.sources.aliases import resolve_model
    from tiny import make_model

    smol = resolve_model("smollm2-135m")
    tiny_a, tiny_b = out / "tiny_a", out / "tiny_b"
    if not tiny_a.exists():
        make_model("llama", tiny_a, seed=0)
        make_model("llama", tiny_b, seed=1)
    rows = []
    for name, source in (("SmolLM2-135M", smol), ("tiny llama", tiny_a)):
        for label, recipe in RECIPES.items():
            built = out / f"{name.split()[0]}-{label.replace(' ', '_')}"
            if not built.exists():
                onnxforge.build(source, built, recipe=recipe)
            rows.append((name, label, "correct", measure(built, source)))
    for label in ("fp32", "int4"):
        rows.append(("tiny llama", label, "wrong reference (other seed)",
                     measure(out / f"tiny-{label}", tiny_b)))
    print(f"{'model':<14} {'build':<20} {'case':<30} {'max|dlogit|':>11} {'mean KL':>9} {'top-1':>7} {'greedy':>7}")
    for model, label, case, m in rows:
        g = "-" if m["greedy_agreement"] is None else f"{100 * m['greedy_agreement']:.0f}%"
        print(f"{model:<14} {label:<20} {case:<30} {m['max_abs_diff']:>11.3g} {m['mean_kl']:>9.3g} "
              f"{100 * m['top1']:>6.1f}% {g:>7}")
    (out / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
