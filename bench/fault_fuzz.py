"""Proof at scale (issue 22): 10,000 generated bad inputs and 100+ injected faults, with their counts.

Generated inputs (tests/fuzzkinds.py, tests/fuzzargs.py): mutated safetensors headers and bytes, GGUF
headers and tensor tables, config.json values, tokenizer files, TOML recipes and `onnxforge build`
argument vectors, each run through the command line in-process (tests/fuzzcases.py) in a fresh folder
beside a user's files, under a 20 s alarm. Each kind is split in two chunks (chunk 0 derandomized,
chunk 1 from seed 1: the same cases every run), run by `--procs` processes.

Faults (tests/faultlib.py): SIGINT to the process group, SIGTERM, SIGHUP, kill -9 of a worker and of
the build, a full disk, a read-only output and two concurrent builds, in turn, at random points of
int4 builds (2 workers) of random 20-80 MB llama checkpoints.

It prints a table per part and the first failing cases of each kind with what reproduces them, and
exits 1 when any bad count (traceback, hang, unclear end, partial folder, orphan process, changed
input, an invalid input built) is not 0.

    python bench/fault_fuzz.py                                  # 10,000 inputs + 104 faults (~30 min on 2 cores)
    python bench/fault_fuzz.py --cases 600 --faults 8           # a smoke run, a few minutes
    python bench/fault_fuzz.py --json /tmp/ff.json              # also every kept failure, as JSON
    python bench/fault_fuzz.py --write-results                  # also replace its section of bench/RESULTS.md
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import faultlib  # noqa: E402
from fuzzargs import all_kinds  # noqa: E402
from fuzzcases import Counts  # noqa: E402
from fuzzkinds import run_kind  # noqa: E402

WEIGHTS = {"safetensors": 2, "gguf": 1.6, "config": 1.6, "tokenizer": 1.6, "toml": 1.6, "cli": 1.6}
CHUNKS = 2


def plan(total: int) -> list[tuple[str, int, int]]:
    """(kind, cases, chunk) tasks whose cases add up to `total`, in proportion to WEIGHTS."""
    scale = total / sum(WEIGHTS.values())
    per_kind = {k: int(w * scale) for k, w in WEIGHTS.items()}
    per_kind["safetensors"] += total - sum(per_kind.values())
    return [(k, n // CHUNKS + (c < n % CHUNKS), c) for k, n in per_kind.items() for c in range(CHUNKS)]


def run_task(task: tuple[str, int, int], scratch: str) -> tuple[dict, float]:
    kind_name, n, chunk = task
    folder = Path(tempfile.mkdtemp(prefix=f"{kind_name}{chunk}-", dir=scratch))
    kind = {k.name: k for k in all_kinds()}[kind_name](folder)
    counts, start = Counts(), time.perf_counter()
    run_kind(kind, n, counts, folder, chunk=chunk)
    shutil.rmtree(folder, ignore_errors=True)
    return counts.to_dict(), time.perf_counter() - start


def generated(total: int, procs: int, scratch: Path) -> tuple[Counts, float]:
    counts, start = Counts(), time.perf_counter()
    tasks = sorted(plan(total), key=lambda t: -t[1])
    with ProcessPoolExecutor(procs) as pool:
        for task, (result, seconds) in zip(tasks, pool.map(run_task, tasks, [str(scratch)] * len(tasks))):
            counts.merge(result)
            print(f"  {task[0]} chunk {task[2]}: {task[1]} drawn cases in {seconds:.0f} s", file=sys.stderr, flush=True)
    return counts, time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=10_000, help="generated inputs in all (default 10000)")
    ap.add_argument("--faults", type=int, default=104, help="fault-injection cases (default 104: 13 of each fault)")
    ap.add_argument("--procs", type=int, default=2, help="processes running generated inputs (default 2)")
    ap.add_argument("--seed", type=int, default=0, help="the faults' random points and checkpoints")
    ap.add_argument("--json", help="write the counts and every kept failure here")
    ap.add_argument("--write-results", action="store_true", help="also replace this section of bench/RESULTS.md")
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="onnxforge-fault-fuzz-"))
    try:
        counts, gen_seconds = generated(args.cases, args.procs, scratch) if args.cases else (Counts(), 0.0)
        start = time.perf_counter()
        table, bad_faults = faultlib.run_faults(args.faults, scratch, seed=args.seed,
                                                log=lambda m: print(m, file=sys.stderr, flush=True)) \
            if args.faults else ({}, [])
        fault_seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"generated inputs: {sum(r['cases'] for r in counts.table.values())} cases in {gen_seconds:.0f} s "
          f"({args.procs} processes)")
    print(counts.format_table())
    if table:
        print(f"\nfaults: {sum(v['cases'] for v in table.values())} cases in {fault_seconds:.0f} s")
        print(faultlib.format_table(table))
    if counts.bad() or bad_faults:
        print("\nfailing cases (up to 3 per kind and column):")
        print(counts.format_failures())
        for fault, column, detail in bad_faults[:24]:
            print(f"{fault} {column}: {detail[:400]}")
    if args.json:
        Path(args.json).write_text(json.dumps({"generated": counts.to_dict(), "faults": {k: dict(v) for k, v in table.items()},
                                               "bad_faults": bad_faults, "seconds": [gen_seconds, fault_seconds]},
                                              indent=1, default=str))
    bad = counts.bad() + len(bad_faults)
    print(f"\nbad: {bad}")
    if args.write_results:
        from common import header_lines, write_section

        write_section(TITLE, results_body(header_lines(), " ".join(sys.argv[1:]), counts, gen_seconds, table,
                                          fault_seconds, bad_faults))
    return 1 if bad else 0


TITLE = "Fault fuzz: generated bad inputs and injected faults (bench/fault_fuzz.py)"


def results_body(header: list[str], argv: str, counts: Counts, gen_seconds: float, table: dict, fault_seconds: float,
                 bad_faults: list) -> str:
    """The RESULTS.md section: the command, both tables and the failing cases."""
    n_gen = sum(r["cases"] for r in counts.table.values())
    n_faults = sum(v["cases"] for v in table.values())
    lines = header + [f"- command: `python bench/fault_fuzz.py{' ' + argv if argv else ''}`: {n_gen} generated "
                      f"inputs in {gen_seconds:.0f} s (2 processes), {n_faults} faults in {fault_seconds:.0f} s",
                      f"- bad (tracebacks, hangs, unclear ends, partial folders, orphans, changed inputs, invalid "
                      f"inputs built): {counts.bad() + len(bad_faults)}", "", "```", counts.format_table(), "```"]
    if table:
        lines += ["", "```", faultlib.format_table(table), "```"]
    failures = counts.format_failures()
    if failures or bad_faults:
        lines += ["", "failing cases (up to 3 per kind and column):", "", "```", failures]
        lines += [f"{fault} {column}: {detail[:300]}" for fault, column, detail in bad_faults[:12]] + ["```"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
