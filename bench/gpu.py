"""The CUDA check (issue 28): every family in `onnxforge archs` as a tiny random transformers model, built with
`-e cuda` at fp32, fp16, bf16, int8 and int4; logits of a prefill and 8 cached decode steps against transformers
in fp32 (onnxruntime's CUDA provider), 20 greedy tokens in onnxruntime-genai-cuda against transformers' generate,
and the anchor's builder (`onnxruntime_genai.models.builder -e cuda`) on the same checkpoint. One table.

Run on a CUDA machine (../shared/GPU.md): `python3 bench/gpu.py --out DIR [--families llama,qwen3] [--no-anchor]`.
The tiny configs are the test suite's own (tests/tiny.py, tests/test_family_*.py, tests/moe_check.py, ...), so a
family the suite tests is a family this checks; a family of `onnxforge archs` with no tiny config is a row that says so.

Columns: `diff` is max |logits - transformers| over the prompt and the decode steps (the CUDA kernels' arithmetic
at fp32; rounding at fp16/bf16; quantization at int8/int4), `greedy` how many of 20 tokens equal transformers'.
`[n/m pos]` after a diff: n of the m positions are further than the suite's fp16 bound (2% of the reference's logit
range). A tiny random router has near-ties that rounding crosses (DeepSeek-V3's q_lora / plain_q: group margins of
3e-5 and 2e-4), so a position's experts flip and that position (and, through attention, later ones) moves by whole
logits, at fp16 and bf16 and in transformers' own half-precision runs alike: few positions far off with the rest
close is that, not a broken graph (test_family_deepseek_v3.py::test_fp16_is_fp16_rounding_without_router_near_ties).
A bf16 model's logits are read through onnxruntime-genai (the last position of each step), the others' through
onnxruntime. "fail: ..." is the first line of what went wrong.
"""
from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "src")]

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")
ANCHOR_PRECISIONS = ("fp32", "fp16", "int4")
CUDA = ("CUDAExecutionProvider", "CPUExecutionProvider")
EXTRA = (("test_family_gemma4", "TEXT", "Gemma4TextConfig"), ("test_family_llama4", "TEXT", "Llama4TextConfig"))
TABLES = ("FAMILIES", "CONFIGS")  # module-level {name: config} tables of the suite's tiny configs


def _suite_modules() -> list[str]:
    tests = ROOT / "tests"
    return ["tiny", "moe_check"] + sorted(p.stem for p in tests.glob("test_*.py")
                                           if p.stem.startswith(("test_family_", "test_moe")))


def tiny_configs() -> dict[str, dict]:
    """Every tiny config the suite makes family models from, by name: the modules' FAMILIES / CONFIGS tables,
    then any single module-level config (an UPPERCASE dict with a `cls`) of a config class not seen yet."""
    tables: dict[str, dict] = {}
    singles: dict[str, dict] = {}
    for module in _suite_modules():
        try:
            mod = importlib.import_module(module)
        except BaseException as err:  # noqa: BLE001 - pytest.importorskip raises a BaseException: said, skipped
            print(f"gpu: cannot import {module}: {err}", file=sys.stderr)
            continue
        for attr, value in vars(mod).items():
            if not attr.isupper() or not isinstance(value, dict):
                continue
            if attr in TABLES:
                for k, v in value.items():
                    if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str) and isinstance(v[1], dict):
                        v = {"cls": v[0], **v[1]}  # (config class, params): tests/test_family_qwen_next.py's form
                    if isinstance(v, dict) and "cls" in v and k not in tables:
                        tables[k] = v
            elif "cls" in value:
                singles.setdefault(attr.lower(), value)
    for module, attr, cls in EXTRA:  # text configs the suite builds through its own helpers
        try:
            tables.setdefault(module.split("_")[-1], {"cls": cls, **getattr(importlib.import_module(module), attr)})
        except BaseException as err:  # noqa: BLE001 - as above
            print(f"gpu: cannot import {module}: {err}", file=sys.stderr)
    seen = {cfg["cls"] for cfg in tables.values()}
    for name, cfg in singles.items():
        if cfg["cls"] not in seen:
            seen.add(cfg["cls"])
            tables.setdefault(name, cfg)
    return tables


def arch_of(cfg: dict) -> str:
    """The architecture transformers' AutoModelForCausalLM makes from a tiny config."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(transformers, cfg["cls"]).model_type, "?")


def ort_logits(out: Path, prompt, decode) -> np.ndarray:
    """Prefill + cached decode through onnxruntime's CUDA provider, TF32 off (fp32 math is fp32 math)."""
    from onnxforge.verify.ort_runner import OrtDecoder

    steps = OrtDecoder(out, providers=(("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"))
    return np.concatenate(steps.logits_for(prompt, decode), axis=0)


def genai_last_logits(out: Path, prompt, decode) -> np.ndarray:
    """The last position's logits after the prompt and after each decode token, through onnxruntime-genai."""
    import onnxruntime_genai as og

    model = og.Model(str(out))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + len(decode) + 1, do_sample=False)
    gen = og.Generator(model, params)
    rows = []
    gen.append_tokens(prompt)
    rows.append(np.asarray(gen.get_logits(), dtype=np.float32).reshape(-1))
    for t in decode:
        gen.append_tokens([t])
        rows.append(np.asarray(gen.get_logits(), dtype=np.float32).reshape(-1))
    return np.stack(rows)


class Reference:
    """transformers in fp32 on the original weights, and (for our builds) on the build's own stored weights
    (verify's conversion reference): logits of the prompt + decode ids and 20 greedy tokens."""

    def __init__(self, model, ids, g_prompt):
        from conftest import reference_greedy, reference_logits

        self.model, self.ids, self.g_prompt = model, ids, g_prompt
        self.logits = reference_logits(model, ids)
        self.greedy = reference_greedy(model, g_prompt)

    def stored(self, out: Path) -> tuple[np.ndarray, list[int]]:
        import copy

        from conftest import reference_greedy, reference_logits

        from onnxforge.verify.stored import load_stored_weights

        model = copy.deepcopy(self.model)
        load_stored_weights(model, out)
        return reference_logits(model, self.ids), reference_greedy(model, self.g_prompt)


def first_line(err: BaseException | str) -> str:
    text = str(err).strip().splitlines() or [type(err).__name__]
    line = next((t for t in reversed(text) if "Error" in t), text[-1]) if len(text) > 1 else text[0]
    return "fail: " + line.replace("|", "/")[:160]


def run_ours(folder: Path, out: Path, precision: str) -> None:
    """`precision`, or "int4-bf16" / "int8-bf16": that precision with use_cuda_bf16 (bf16 activations)."""
    import onnxforge
    from onnxforge.quant.options import apply_extra_options
    from onnxforge.quant.recipe import Recipe

    base, _, act = precision.partition("-")
    recipe = Recipe(precision=base, provider="cuda")
    if act == "bf16":
        recipe = apply_extra_options(recipe, ["use_cuda_bf16=true"])
    onnxforge.build(folder, out, recipe=recipe, overwrite=True)


def run_anchor(folder: Path, out: Path, precision: str, cache: Path) -> None:
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(folder), "-o", str(out),
           "-p", precision, "-e", "cuda", "-c", str(cache)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode or not (out / "genai_config.json").is_file():
        raise RuntimeError((done.stderr or done.stdout or f"rc {done.returncode}").strip())


def family_rows(name: str, cfg: dict, work: Path, precisions, anchor: bool) -> tuple[str, dict[str, str]]:
    from conftest import prompt_and_decode
    from tiny import make_model

    folder = work / name / "hf"
    model = make_model(name, folder, **cfg)
    prompt, decode = prompt_and_decode(0)
    ref = Reference(model, prompt + decode, prompt_and_decode(1)[0])
    cells: dict[str, str] = {}
    jobs = [("ours", p, run_ours) for p in precisions]
    if anchor:
        jobs += [("anchor", p, lambda f, o, p: run_anchor(f, o, p, work / name / "cache")) for p in ANCHOR_PRECISIONS]
    for who, precision, build in jobs:
        out = work / name / f"{who}-{precision}"
        try:
            build(folder, out, precision)
        except Exception as err:  # noqa: BLE001 - a build that fails is a cell of the table
            cells[f"{who} {precision}"] = "build " + first_line(err)
            continue
        try:
            cells[f"{who} {precision}"] = check_cell(out, ref, prompt, decode, precision, stored=who == "ours")
        except Exception as err:  # noqa: BLE001
            cells[f"{who} {precision}"] = "run " + first_line(err)
    return type(model).__name__, cells


def check_cell(out: Path, ref: Reference, prompt, decode, precision: str, stored: bool) -> str:
    """`d_stored / d_orig g/20`: max |logits - reference| against the build's stored weights (ours only: the
    CUDA kernels' arithmetic) and against the original weights (adds the quantization), and the greedy tokens
    equal to the stored-weight reference's (the original's for the anchor)."""
    from conftest import genai_greedy

    ref_logits, ref_greedy = ref.stored(out) if stored else (ref.logits, ref.greedy)
    if precision == "bf16" or precision.endswith("-bf16"):  # bf16 inputs: read through genai
        got = genai_last_logits(out, prompt, decode)
        first = len(prompt) - 1
        ref_logits, orig_logits = ref_logits[first:], ref.logits[first:]
    else:
        got = ort_logits(out, prompt, decode).astype(np.float32)
        orig_logits = ref.logits
    tokens = genai_greedy(out, ref.g_prompt)
    same = sum(a == b for a, b in zip(tokens, ref_greedy))
    lead = f"{diff(got, ref_logits)} / " if stored else ""
    bad = "" if np.isfinite(got).all() and np.isfinite(ref_logits).all() else " NaN"
    return f"{lead}{diff(got, orig_logits)} {same}/{len(ref_greedy)}{bad}"


def diff(got: np.ndarray, ref: np.ndarray) -> str:
    """max |got - ref| over every position, then `[n/m pos]` where n of the m positions (rows) are further than
    2% of ref's logit range (the suite's fp16 bound); at fp16 / bf16, few of them in a mixture of experts are
    router near-ties flipped (see the module docstring)."""
    per_row = np.abs(got - ref).reshape(len(ref), -1).max(-1)
    off = int((per_row > 0.02 * (ref.max() - ref.min())).sum())
    return f"{per_row.max():.1e}" + (f" [{off}/{len(per_row)} pos]" if off else "")


def _one(job):
    name, cfg, work, precisions, anchor = job
    start = time.perf_counter()
    try:
        arch, cells = family_rows(name, cfg, work, precisions, anchor)
    except Exception as err:  # noqa: BLE001
        traceback.print_exc()
        arch, cells = "?", {"error": "model " + first_line(err)}
    return name, arch, cells, time.perf_counter() - start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="where the table (gpu.md) goes")
    ap.add_argument("--work", type=Path, default=Path("/tmp/gpu-work"))
    ap.add_argument("--families", default="", help="comma-separated tiny config names (default: all)")
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--no-anchor", action="store_true")
    ap.add_argument("--jobs", type=int, default=4, help="families checked at once (processes)")
    ap.add_argument("--list", action="store_true", help="list the tiny configs and exit")
    args = ap.parse_args(argv)
    from onnxforge.archs.registry import load_families

    configs = tiny_configs()
    if args.list:
        print("\n".join(f"{k}: {v['cls']}" for k, v in configs.items()))
        return 0
    wanted = [f for f in args.families.split(",") if f] or list(configs)
    precisions = [p for p in args.precisions.split(",") if p]
    cols = [f"ours {p}" for p in precisions] + ([] if args.no_anchor else [f"anchor {p}" for p in ANCHOR_PRECISIONS])
    covered = {arch_of(cfg) for cfg in configs.values()}
    args.out.mkdir(parents=True, exist_ok=True)
    table = args.out / "gpu.md"
    jobs = [(name, configs[name], args.work, precisions, not args.no_anchor) for name in wanted]
    rows: dict[str, str] = {}
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(args.jobs) as pool:
        for name, arch, cells, took in pool.imap_unordered(_one, jobs):
            error = cells.get("error")
            rows[name] = f"| {name} | {arch} | " + " | ".join(cells.get(c, error or "-") for c in cols) + " |"
            print(rows[name], f"({took:.0f} s)", flush=True)
            write_table(table, cols, [rows[n] for n in wanted if n in rows], covered, load_families())
    return 0


def write_table(path: Path, cols, rows, covered, families) -> None:
    import onnxruntime as ort

    try:
        import onnxruntime_genai as og
        genai = og.__version__
    except Exception:  # noqa: BLE001
        genai = "?"
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout.strip() or "?"
    except (OSError, subprocess.TimeoutExpired):
        gpu = "no GPU"
    head = [f"CUDA check, {time.strftime('%Y-%m-%d')}, {gpu}, onnxruntime {ort.__version__}, "
            f"onnxruntime-genai {genai}. Cell (ours): max |logits - transformers fp32 on the build's stored weights| / "
            f"... on the original weights, each with [n/m pos] where n of m positions are further than 2% of the "
            f"reference's logit range (MoE at fp16/bf16: router near-ties flipped), and greedy tokens equal to the "
            f"stored-weight reference's of 20; "
            f"(anchor): against the original weights. onnxruntime CUDA with use_tf32=0; bf16 logits through genai "
            f"(last position of each step)", "",
            "| config | architecture | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    missing = sorted(set(families) - covered)
    tail = ["", "Families of `onnxforge archs` with no tiny config here: " + (", ".join(missing) or "none")]
    path.write_text("\n".join(head + rows + tail) + "\n")


if __name__ == "__main__":
    sys.exit(main())
