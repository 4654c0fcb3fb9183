"""Measure what `onnxforge verify` reports for correct builds at each precision and for wrong models, so
that its default thresholds (src/onnxforge/verify/thresholds.py) sit between the two. Prints one table
and writes it to OUT/results.json; docs/verify.md keeps the figures.

Checkpoints (both float, so every precision below is quantized by onnxforge itself):
  * SmolLM2-135M-Instruct: the demo GGUF (Q4_1) loaded by transformers and saved as an fp32 safetensors
    folder, once;
  * a tiny random Llama (tests/tiny.py, seed 0), and the same shape with seed 1 as a wrong reference.
Correct builds: fp32, fp16, int8, int4 (default recipe) and int4 k_quant_mixed, each verified against the
checkpoint it was built from. bf16 cannot run on onnxruntime's CPU provider, so its row is emulated:
transformers' own model in bf16 against the same model in fp32 (fp16 is emulated the same way, to show how
close emulation comes to a real onnxruntime fp16 build).
Wrong models: the tiny build against the other seed; SmolLM2 builds against a reference with
rope_theta halved (a config converted wrongly) and one with layer 15's mlp.down_proj zeroed (one tensor
lost).

    python bench/verify_thresholds.py [--out bench/_work/verify]      # about 15 minutes on 2 cores

`--conversion` measures the conversion verdict instead (the build against the reference holding its own
stored weights): for SmolLM2-135M (built from the demo GGUF, verified against it) and the tiny Llama, at
fp32, fp16, int8, int4 (default and k_quant) and, for the GGUF, exact import (no -p), the correct build and
three wrong ones made from it: layer L's down_proj lost (its scales, or its float weight, zeroed in
model.onnx.data), layers L and L-1 swapped (their initializers' bytes exchanged) and rope_theta halved (the
cos/sin caches recomputed). Each row: conversion KL / top-1, weight error, rotary error (the tables against
transformers' frequencies), quantization KL / top-1. Two prompts x 8 tokens: about 1.5 minutes a SmolLM2 row
and 10 s a tiny row on 2 busy cores (about 45 minutes in all).

    python bench/verify_thresholds.py --conversion [--out bench/_work/verify] [--models smollm2,tiny]

Memory of the conversion verdict: the stored weights are dequantized 16 MB at a time into the reference's
own parameters (verify/stored.py), so the peak stays what verify needed before: for a 1B model (1.24 B
parameters) about 7 GB (fp32 reference 4.9 GB + the int4 build opened by onnxruntime and by
onnxruntime-genai, ~1 GB each): estimated from those sizes, not measured.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np  # noqa: E402

import onnxforge  # noqa: E402
from onnxforge.quant.recipe import Recipe  # noqa: E402
from onnxforge.verify import parity  # noqa: E402

RECIPES = {
    "fp32": Recipe(precision="fp32"),
    "fp16": Recipe(precision="fp16"),
    "int8": Recipe(precision="int8"),
    "int4": Recipe(precision="int4"),
    "int4 k_quant_mixed": Recipe(precision="int4", method="k_quant", int8_last_matmul=True, int8_mixed_layers=True),
}
KEYS = ("max_abs_diff", "mean_kl", "top1", "greedy_agreement")


def measure(model_dir: Path, reference: Path) -> dict:
    r = parity.verify(model_dir, reference, write=False, plot=False, defaults=False)
    return {k: r["metrics"][k] for k in KEYS}


def emulate(reference: Path, dtype: str) -> dict:
    """transformers in `dtype` against transformers in fp32, on verify's prompts and positions."""
    import torch

    model, tok = parity.load_reference(reference)
    low = parity.load_reference(reference)[0].to(getattr(torch, dtype))
    eos = [model.generation_config.eos_token_id] if isinstance(model.generation_config.eos_token_id, int) else []
    kl, top1, diff = [], [], []
    for text in parity.DEFAULT_PROMPTS:
        ids = list(tok(text)["input_ids"])
        seq = ids + parity.reference_greedy(model, ids, 16, eos, 0)
        with torch.no_grad():
            a = model(torch.tensor([seq])).logits[0].float().numpy()
            b = low(torch.tensor([seq])).logits[0].float().numpy()
        m = parity.compare_logits(a, b)
        kl.append(m["kl"]), top1.append(m["top1"]), diff.append(m["max_abs_diff"])
    return {"max_abs_diff": float(np.concatenate(diff).max()), "mean_kl": float(np.concatenate(kl).mean()),
            "top1": float(np.concatenate(top1).mean()), "greedy_agreement": None}


def smollm2_float(out: Path) -> Path:
    """The demo GGUF as an fp32 Hugging Face folder (transformers dequantizes it)."""
    folder = out / "smollm2-hf"
    if not (folder / "config.json").exists():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from onnxforge.sources.aliases import resolve_model

        gguf = resolve_model("smollm2-135m")
        kw = {"gguf_file": gguf.name}
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw)
        config = model.config
        if hasattr(config, "quantization_config"):  # transformers refuses to save a model loaded from GGUF
            del config.quantization_config
        clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        clean.load_state_dict(model.state_dict())
        clean.save_pretrained(folder, safe_serialization=True)
        AutoTokenizer.from_pretrained(str(gguf.parent), **kw).save_pretrained(folder)
    return folder


def variant(base: Path, out: Path, name: str, *, config=None, zero: str | None = None) -> Path:
    """A copy of `base` with its config.json dict changed by `config` or one tensor zeroed."""
    folder = out / name
    if folder.exists():
        return folder
    shutil.copytree(base, folder)
    if config:
        cfg = json.loads((folder / "config.json").read_text())
        config(cfg)
        (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    if zero:
        from safetensors.numpy import load_file, save_file

        for f in folder.glob("*.safetensors"):
            tensors = load_file(f)
            if zero in tensors:
                tensors[zero] = np.zeros_like(tensors[zero])
                save_file(tensors, f, metadata={"format": "pt"})
    return folder


def halve_rope_theta(cfg: dict) -> None:
    where = cfg["rope_parameters"] if isinstance(cfg.get("rope_parameters"), dict) else cfg  # transformers 5 / 4
    where["rope_theta"] = where["rope_theta"] / 2


CONVERSION_BUILDS = {  # label -> build arguments (None: the GGUF's own blocks, no -p)
    "int4": Recipe(precision="int4"),
    "exact import": None,
    "fp32": Recipe(precision="fp32"),
    "int8": Recipe(precision="int8"),
    "fp16": Recipe(precision="fp16"),
    "int4 k_quant": Recipe(precision="int4", method="k_quant"),
}
CONVERSION_PROMPTS = parity.DEFAULT_PROMPTS[:2]


def _layer_inits(folder: Path, layer: int) -> list[str]:
    from test_verify_two_refs import initializer_names

    return [n for n in initializer_names(folder) if n.startswith(f"model.layers.{layer}.")]


def wrong_build(built: Path, out: Path, case: str, layer: int) -> Path:
    """A copy of `built` with one projection lost, two layers swapped or rope_theta halved."""
    from test_verify_two_refs import patch_initializer

    folder = out / f"{built.name}-{case}"
    if folder.exists():
        return folder
    shutil.copytree(built, folder, ignore=shutil.ignore_patterns("verify.*"))
    names = _layer_inits(folder, layer)
    if case == "lost":
        down = [n for n in names if ".mlp.down_proj." in n]
        target = next((n for n in down if n.endswith("_scales")), down[0])
        patch_initializer(folder, target, np.zeros_like)
    elif case == "swapped":
        for a in names:
            b = a.replace(f"model.layers.{layer}.", f"model.layers.{layer - 1}.")
            saved = {}
            patch_initializer(folder, a, lambda x: saved.setdefault(a, x.copy()))
            patch_initializer(folder, b, lambda x: saved.setdefault(b, x.copy()))
            patch_initializer(folder, a, lambda x: saved[b])
            patch_initializer(folder, b, lambda x: saved[a])
    elif case == "rope_halved":
        halve_cached_rope(folder)
    return folder


def halve_cached_rope(folder: Path) -> None:
    """cos/sin caches for rope_theta / 2, from the stored ones: inv_freq_i = theta^(-i/cols) becomes
    inv_freq_i x 2^(i/cols) (plain rope; position 1 holds cos/sin of inv_freq itself)."""
    from test_verify_two_refs import patch_initializer

    cache = {}
    patch_initializer(folder, "cos_cache", lambda a: cache.setdefault("cos", a.copy()))
    patch_initializer(folder, "sin_cache", lambda a: cache.setdefault("sin", a.copy()))
    cos1, sin1 = cache["cos"][1].astype(np.float64), cache["sin"][1].astype(np.float64)
    cols = cos1.shape[0]
    inv = np.arctan2(sin1, cos1) * 2.0 ** (np.arange(cols) / cols)
    pos = np.arange(cache["cos"].shape[0], dtype=np.float64)[:, None]
    patch_initializer(folder, "cos_cache", lambda a: np.cos(pos * inv).astype(a.dtype))
    patch_initializer(folder, "sin_cache", lambda a: np.sin(pos * inv).astype(a.dtype))


def conversion_row(built: Path, reference: Path) -> dict:
    r = parity.verify(built, reference, prompts=CONVERSION_PROMPTS, tokens=8, write=False, plot=False,
                      defaults=False)
    c = r["conversion"]["metrics"]
    return {"conv_kl": c["mean_kl"], "conv_top1": c["top1"], "conv_max_abs_diff": c["max_abs_diff"],
            "weight_error": c["weight_error"], "rotary_error": c.get("rotary_error"),
            "quant_kl": r["metrics"]["mean_kl"], "quant_top1": r["metrics"]["top1"]}


CASES = ("correct", "lost", "swapped", "rope halved")


def conversion_table(out: Path, models: list[str], cases: list[str] = CASES, builds: list[str] | None = None) -> None:
    from tiny import make_model

    from onnxforge.sources.aliases import resolve_model

    sources = {}
    if "tiny" in models:
        if not (out / "tiny_a").exists():
            make_model("llama", out / "tiny_a", seed=0)
        sources["tiny Llama"] = (out / "tiny_a", out / "tiny_a", 1)
    if "smollm2" in models:  # built from the GGUF; verified against the same values as an fp32 folder (loads fast)
        sources["SmolLM2-135M"] = (resolve_model("smollm2-135m"), smollm2_float(out), 20)
    if "smollm2-float" in models:  # built from that fp32 folder: every precision quantizes from float
        sources["SmolLM2-135M fp32 folder"] = (smollm2_float(out), smollm2_float(out), 20)
    rows = []
    for name, (source, reference, layer) in sources.items():
        for label, recipe in CONVERSION_BUILDS.items():
            if (recipe is None and source.suffix != ".gguf") or (builds and label not in builds):
                continue  # the tiny Llama is a float checkpoint: nothing to import exactly
            tag = name.split()[0] + ("-float" if "fp32 folder" in name else "")
            built = out / f"conv-{tag}-{label.replace(' ', '_')}"
            if not built.exists():
                onnxforge.build(source, built, recipe=recipe) if recipe else onnxforge.build(source, built)
            for case in cases:
                folder = built if case == "correct" else wrong_build(built, out, case.replace(" ", "_"), layer)
                row = dict(model=name, build=label, case=case, **conversion_row(folder, reference))
                print(json.dumps(row), flush=True)
                rows.append(row)
    print("| model | build | case | conversion KL | conversion top-1 | weight error | rotary error | quantization KL "
          "| quantization top-1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['build']} | {r['case']} | {r['conv_kl']:.3g} | {100 * r['conv_top1']:.1f}% | "
              f"{r['weight_error']:.3g} | {r['rotary_error']:.2g} | {r['quant_kl']:.3g} | {100 * r['quant_top1']:.1f}% |")
    (out / "conversion.json").write_text(json.dumps(rows, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/_work/verify")
    ap.add_argument("--conversion", action="store_true", help="measure the conversion verdict (see above)")
    ap.add_argument("--models", default="smollm2,tiny",
                    help="with --conversion: smollm2 (built from the GGUF), smollm2-float (built from it as an fp32 "
                         "folder), tiny")
    ap.add_argument("--cases", default=",".join(CASES), help="with --conversion: which of " + ", ".join(CASES))
    ap.add_argument("--builds", help="with --conversion: which of " + ", ".join(CONVERSION_BUILDS) + " (default all)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.conversion:
        return conversion_table(out, args.models.split(","), args.cases.split(","),
                                args.builds.split(",") if args.builds else None)
    from tiny import make_model

    smol = smollm2_float(out)
    tiny_a, tiny_b = out / "tiny_a", out / "tiny_b"
    if not tiny_a.exists():
        make_model("llama", tiny_a, seed=0)
        make_model("llama", tiny_b, seed=1)
    rows = []
    for name, source in (("SmolLM2-135M", smol), ("tiny Llama", tiny_a)):
        for label, recipe in RECIPES.items():
            built = out / f"{name.split()[0]}-{label.replace(' ', '_')}"
            if not built.exists():
                onnxforge.build(source, built, recipe=recipe)
            rows.append((name, label, "correct", measure(built, source)))
        for dtype in ("bfloat16", "float16"):
            rows.append((name, {"bfloat16": "bf16", "float16": "fp16"}[dtype], "correct, emulated in transformers",
                         emulate(source, dtype)))
    for label in ("fp32", "int4"):
        rows.append(("tiny Llama", label, "wrong: other seed", measure(out / f"tiny-{label}", tiny_b)))
    rope = variant(smol, out, "smollm2-hf-rope-half", config=halve_rope_theta)
    down = variant(smol, out, "smollm2-hf-no-down15", zero="model.layers.15.mlp.down_proj.weight")
    for label in ("fp32", "int4"):
        rows.append(("SmolLM2-135M", label, "wrong: rope_theta halved", measure(out / f"SmolLM2-135M-{label}", rope)))
        rows.append(("SmolLM2-135M", label, "wrong: layer 15 down_proj zero",
                     measure(out / f"SmolLM2-135M-{label}", down)))
    print(f"| model | build | case | max abs diff | mean KL | top-1 | greedy |\n|---|---|---|---|---|---|---|")
    for model, label, case, m in rows:
        g = "-" if m["greedy_agreement"] is None else f"{100 * m['greedy_agreement']:.0f}%"
        print(f"| {model} | {label} | {case} | {m['max_abs_diff']:.3g} | {m['mean_kl']:.3g} | {100 * m['top1']:.1f}% | {g} |")
    (out / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
