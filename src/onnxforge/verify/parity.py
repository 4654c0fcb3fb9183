"""`onnxforge verify`: a built model (onnxruntime) against its reference (transformers, fp32, CPU).

Per prompt, the reference's greedy continuation of `tokens` tokens is computed with transformers; the ONNX
model then reads prompt + continuation (prefill, then one token at a time through its KV cache) and both
next-token distributions are compared at every position: max abs logit difference, KL(reference || onnx),
top-1 agreement. Greedy generation through onnxruntime-genai is compared with transformers' greedy
`generate` (matching prefix length). With a text file, both perplexities use the same sliding windows.
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import CheckpointError, RunError
from .conversion import conversion_limits, judge_conversion
from .ort_runner import load_genai_model
from .perplexity import decoder, effective_window, perplexity, tokenize_file

DEFAULT_PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "To make a good cup of tea, first boil the water, then",
    "The three primary colors are red, yellow and",
]
RANDOM_PROMPT_LEN = 16

# threshold name -> (metric key, direction): "max" fails when metric > x, "min" when metric < x
THRESHOLDS = {
    "max_abs_diff": ("max_abs_diff", "max"),
    "max_kl": ("mean_kl", "max"),
    "min_top1": ("top1", "min"),
    "min_greedy": ("greedy_agreement", "min"),
    "max_ppl_ratio": ("ppl_ratio", "max"),
}


# pre-quantized checkpoints transformers itself loads on the CPU as float (GPT-OSS's MXFP4 experts: it decodes
# the blocks with convert_moe_packed_tensors when no triton kernel is there); the others are dequantized here
TRANSFORMERS_DEQUANTIZES = ("mxfp4",)


def load_reference(reference: str | Path):
    """(transformers model in fp32 on CPU, tokenizer or None) for an HF folder or a .gguf file."""
    import torch
    from transformers import AutoModelForCausalLM

    ref = Path(reference)
    kwargs = {}
    where = ref
    if ref.suffix.lower() == ".gguf":
        where, kwargs = ref.parent, {"gguf_file": ref.name}
    if not ref.exists():
        raise CheckpointError(f"reference {ref} does not exist")
    if ref.is_dir() and (ref / "config.json").is_file():
        quant = json.loads((ref / "config.json").read_text()).get("quantization_config")
        if quant is not None and quant.get("quant_method") not in TRANSFORMERS_DEQUANTIZES:
            return _dequantized_reference(ref), _tokenizer(ref, {})
    try:
        model = AutoModelForCausalLM.from_pretrained(str(where), dtype=torch.float32, **kwargs).eval()
    except ValueError as e:
        if "accelerate" in str(e):
            raise CheckpointError("transformers needs the package accelerate to load a GGUF reference: "
                                  "pip install accelerate") from None
        raise
    return model, _tokenizer(where, kwargs)


def _tokenizer(where: Path, kwargs: dict):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(where), **kwargs)
    except Exception:  # noqa: BLE001 - any failure means "no usable tokenizer"
        return None


def _dequantized_reference(ref: Path):
    """A pre-quantized HF folder (GPTQ, AWQ, compressed-tensors) as transformers' float model holding the
    checkpoint's weights dequantized, as it is done for a GGUF reference (no GPTQ/AWQ kernels needed)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..sources.open import open_source

    config = AutoConfig.from_pretrained(str(ref))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    source = open_source(ref)
    try:
        state = {n: torch.from_numpy(np.asarray(source.read(n), dtype=np.float32)) for n in source.tensor_names()}
    finally:
        source.close()
    missing, _ = model.load_state_dict(state, strict=False)
    model.tie_weights()
    if [m for m in missing if "lm_head" not in m]:
        raise CheckpointError(f"reference {ref}: tensors missing for transformers: {missing[:5]}")
    return model


def _vocab(out_dir: Path) -> int:
    return int(json.loads((out_dir / "genai_config.json").read_text())["model"]["vocab_size"])


def _eos_ids(out_dir: Path) -> list[int]:
    eos = json.loads((out_dir / "genai_config.json").read_text())["model"].get("eos_token_id")
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]


def prompt_ids(out_dir: Path, tokenizer, prompts: Sequence[str] | None) -> tuple[list[str], list[list[int]], str]:
    """Token ids per prompt and where they came from."""
    if tokenizer is not None:
        texts = list(prompts or DEFAULT_PROMPTS)
        ids = [list(tokenizer(t)["input_ids"]) for t in texts]
        return texts, ids, "reference tokenizer"
    if prompts:  # no reference tokenizer but prompts were given: the built model's tokenizer
        texts = list(prompts)
        return texts, [tokenize_file(out_dir, t) for t in texts], "model tokenizer"
    rng = np.random.default_rng(0)
    vocab = _vocab(out_dir)
    ids = [rng.integers(2, vocab, RANDOM_PROMPT_LEN).tolist() for _ in DEFAULT_PROMPTS]
    return [f"<random ids #{i}>" for i in range(len(ids))], ids, "fixed random ids (no tokenizer)"


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def compare_logits(ref: np.ndarray, got: np.ndarray) -> dict:
    """Per-position metrics of two (seq, vocab) logit arrays."""
    if ref.shape != got.shape:
        n = min(ref.shape[-1], got.shape[-1])
        ref, got = ref[..., :n], got[..., :n]
    lp_ref, lp_got = log_softmax(ref), log_softmax(got)
    kl = (np.exp(lp_ref) * (lp_ref - lp_got)).sum(axis=-1)
    return {
        "max_abs_diff": np.abs(ref.astype(np.float64) - got).max(axis=-1),
        "kl": np.maximum(kl, 0.0),
        "top1": ref.argmax(axis=-1) == got.argmax(axis=-1),
    }


def reference_greedy(model, prompt: list[int], n: int, eos: list[int], pad: int) -> list[int]:
    import torch
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1,
                           eos_token_id=eos or None, pad_token_id=pad)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), generation_config=cfg)
    return out[0, len(prompt):].tolist()


def genai_greedy(out_dir: Path, prompt: list[int], n: int, model=None) -> list[int]:
    """Greedy tokens from onnxruntime-genai; EOS is held back until n tokens (min_length), as in
    `reference_greedy` (transformers' min_new_tokens), so both always produce n tokens."""
    import onnxruntime_genai as og

    model = model or load_genai_model(out_dir)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + n, min_length=len(prompt) + n, do_sample=False,
                              repetition_penalty=1.0, num_beams=1)  # plain greedy whatever genai_config says
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    out = []
    while not gen.is_done() and len(out) < n:
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out


def _matching_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    k = 0
    for x, y in zip(a, b):
        if x != y:
            break
        k += 1
    return k


def normalise_thresholds(thresholds: dict | None) -> dict:
    out = {}
    for name, value in (thresholds or {}).items():
        if value is None:
            continue
        if name not in THRESHOLDS:
            raise ValueError(f"unknown threshold {name!r}; choose from {', '.join(THRESHOLDS)}")
        value = float(value)
        if name in ("min_top1", "min_greedy") and value > 1:  # given in percent
            value /= 100.0
        out[name] = value
    return out


def check_thresholds(metrics: dict, thresholds: dict, table: dict | None = None) -> list[str]:
    """Human-readable failures, one per missed threshold (`table`: name -> (metric, direction))."""
    failures = []
    for name, limit in thresholds.items():
        key, direction = (table or THRESHOLDS)[name]
        value = metrics.get(key)
        if value is None:
            failures.append(f"{name}: metric {key} was not measured")
        elif (direction == "max" and not value <= limit) or (direction == "min" and not value >= limit):
            sign = ">" if direction == "max" else "<"
            failures.append(f"{name}: {key} = {_fmt(key, value)} {sign} {_fmt(key, limit)}")
    return failures


def nan_max(values) -> float:
    """The largest value, NaN when any is NaN (Python's `max` skips a NaN that is not first)."""
    arr = np.asarray(list(values), dtype=np.float64)
    return float(arr.max()) if arr.size else float("nan")


def nonfinite_failures(per_prompt: Sequence[dict], metrics: dict, what: str = "") -> list[str]:
    """One failure per prompt whose logits hold NaN/Inf and per metric that is NaN/Inf, thresholds or not."""
    out = []
    for i, p in enumerate(per_prompt, 1):
        for side, n in p.get("nonfinite", {}).items():
            if n:
                out.append(f"{what}prompt {i}: {n} NaN/Inf values in the {side} logits")
        for key in ("max_abs_diff", "mean_kl", "top1"):
            if key in p and not np.isfinite(p[key]):
                out.append(f"{what}prompt {i}: {key} = {p[key]}")
    for key, value in metrics.items():
        if isinstance(value, float) and not np.isfinite(value):
            out.append(f"{what}{key} = {value} (NaN/Inf)")
    return out


def threshold_lines(verdict: dict, table: dict, label: str = "") -> list[str]:
    """One `ok`/`FAIL` line per threshold of `verdict` ({"metrics", "thresholds", "failures"}): the measured
    value against the limit; `table` maps a threshold's name to (metric key, "max" or "min")."""
    lines = []
    for name, limit in verdict["thresholds"].items():
        key, direction = table[name]
        bad = any(f.startswith(name + ":") for f in verdict["failures"])
        value = verdict["metrics"].get(key)
        shown = "-" if value is None else _fmt(key, value)
        sign = "<=" if direction == "max" else ">="
        lines.append(f"  {'FAIL' if bad else 'ok  '}  {label}{name}: {key} {shown} (want {sign} {_fmt(key, limit)})")
    return lines


def _fmt(key: str, v: float) -> str:
    if key in ("top1", "greedy_agreement"):
        return f"{100 * v:.1f}%"
    if key.startswith("ppl"):
        return f"{v:.4f}"
    return f"{v:.3g}"


def verify(out_dir: str | Path, reference: str | Path, *, prompts: Sequence[str] | None = None,
           text: str | Path | None = None, tokens: int = 16, window: int = 512, stride: int = 256,
           max_text_tokens: int | None = None, thresholds: dict | None = None, write: bool = True,
           plot: bool = True, log: Callable[[str], None] | None = None, defaults: bool = True,
           conversion_thresholds: dict | None = None) -> dict:
    """Compare the built model in `out_dir` with `reference`; returns the result dict (also verify.json).

    Two verdicts: the quantization's cost (the ONNX model against the original weights, `thresholds`) and
    the conversion (against the reference holding the build's own stored weights, `conversion_thresholds`,
    see verify/stored.py). `defaults`: start from the default thresholds of the stored precision
    (verify/thresholds.py); given thresholds override them, a value of None leaves a default in place and
    "off" drops it. verify.json/verify.png that cannot be written do not raise: result["write_error"] says
    which and why (verify/outputs.py; the CLI prints the results, then that error, and exits 2)."""
    import torch

    from .thresholds import defaults_for

    start = time.perf_counter()
    for name, value in (("tokens", tokens), ("window", window), ("stride", stride)):  # as the CLI's flags
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise RunError(f"{name} must be a positive integer, got {value!r}")
    out_dir = Path(out_dir)
    log = log or (lambda s: None)
    precision, base = defaults_for(out_dir)
    dropped = {k for k, v in (thresholds or {}).items() if v == "off"}
    given = {k: v for k, v in (thresholds or {}).items() if v is not None and v != "off"}
    thresholds = {k: v for k, v in normalise_thresholds({**(base if defaults else {}), **given}).items()
                  if k not in dropped}
    if "max_ppl_ratio" in thresholds and text is None:
        raise RunError("the max_ppl_ratio threshold needs a text file: pass --text FILE or --max-ppl-ratio off")
    log(f"loading reference {reference}")
    model, tokenizer = load_reference(reference)
    texts, ids, source = prompt_ids(out_dir, tokenizer, prompts)
    eos = _eos_ids(out_dir)
    pad = int(json.loads((out_dir / "genai_config.json").read_text())["model"].get("pad_token_id") or 0)

    og_model = load_genai_model(out_dir)
    dec = decoder(out_dir)
    per_prompt, runs = [], []  # runs: (sequence, onnx logits) per prompt, for the conversion's reference
    for text_i, prompt in zip(texts, ids):
        if not prompt:
            continue
        log(f"prompt {len(per_prompt) + 1}/{len(ids)}: {len(prompt)} tokens")
        ref_cont = reference_greedy(model, prompt, tokens, eos, pad) if tokens else []
        seq = prompt + ref_cont
        with torch.no_grad():
            ref_logits = model(torch.tensor([seq])).logits[0].float().numpy()
        got = np.concatenate(dec.logits_for(prompt, ref_cont), axis=0)
        ref_logits = ref_logits[len(seq) - len(got):]  # a pruned lm_head: from the prompt's last
        m = compare_logits(ref_logits, got)
        runs.append((seq, got))
        og_cont = genai_greedy(out_dir, prompt, tokens, og_model) if tokens else []
        match = _matching_prefix(ref_cont, og_cont)
        per_prompt.append({
            "prompt": text_i,
            "prompt_tokens": len(prompt),
            "prompt_ids_tail": prompt[-1],
            "positions": len(got),
            "max_abs_diff": float(m["max_abs_diff"].max()),
            "mean_kl": float(m["kl"].mean()),
            "top1": float(m["top1"].mean()),
            "greedy_match": match,
            "greedy_tokens": len(ref_cont),
            "reference_tokens": ref_cont,
            "onnx_tokens": og_cont,
            "nonfinite": {"onnx": int((~np.isfinite(got)).sum()), "reference": int((~np.isfinite(ref_logits)).sum())},
            "per_position": {"max_abs_diff": m["max_abs_diff"].tolist(), "kl": m["kl"].tolist(),
                             "top1": m["top1"].astype(int).tolist()},
        })
    if not per_prompt:
        raise RunError("no prompt gave any token; pass prompts with text in them (--prompts FILE)")
    notes = [f"prompt {i} ends with token {pad}, which genai_config.json has as pad_token_id: onnxruntime-genai takes "
             "pad tokens at the end of a prompt for padding and answers from the token before them, so its greedy "
             "tokens are not the reference's continuation. The mismatch is genai's, not the model's: set pad_token_id in "
             "genai_config.json to an id prompts do not end with (onnxforge build does so when the pad is the "
             "unknown or bos token)"
             for i, p in enumerate(per_prompt, 1) if p["prompt_ids_tail"] == pad]
    for p in per_prompt:
        del p["prompt_ids_tail"]
    all_kl = np.concatenate([p["per_position"]["kl"] for p in per_prompt])
    all_top1 = np.concatenate([p["per_position"]["top1"] for p in per_prompt])
    total_greedy = sum(p["greedy_tokens"] for p in per_prompt)
    metrics = {
        "max_abs_diff": nan_max([p["max_abs_diff"] for p in per_prompt]),
        "mean_kl": float(all_kl.mean()),
        "top1": float(all_top1.mean()),
        "positions": int(len(all_kl)),
        "greedy_agreement": (sum(p["greedy_match"] for p in per_prompt) / total_greedy) if total_greedy else None,
        "greedy_tokens": total_greedy,
    }
    ppl = None
    if text is not None:
        ppl = _perplexities(out_dir, model, Path(text), window, stride, max_text_tokens, dec, log)
        metrics.update(ppl_onnx=ppl["onnx"]["ppl"], ppl_reference=ppl["reference"]["ppl"],
                       ppl_ratio=ppl["onnx"]["ppl"] / ppl["reference"]["ppl"])
    failures = nonfinite_failures(per_prompt, metrics) + check_thresholds(metrics, thresholds)
    log("loading the build's stored weights into the reference (the conversion's reference)")
    conv_limits = conversion_limits(precision, conversion_thresholds, defaults)
    conversion = judge_conversion(model, out_dir, runs, conv_limits, per_prompt)
    failures += [f"conversion {f}" for f in conversion["failures"]]
    result = {
        "model": str(out_dir),
        "reference": str(reference),
        "prompt_source": source,
        "metrics": metrics,
        "conversion": conversion,
        "perplexity": ppl,
        "prompts": per_prompt,
        "thresholds": thresholds,
        "threshold_source": f"{precision} defaults" if defaults else "given",
        "failures": failures,
        "passed": not failures,
        "notes": notes,
        "versions": _versions(),
        "seconds": time.perf_counter() - start,
    }
    from .outputs import write_outputs

    write_outputs(result, out_dir, write=write, plot=plot)  # a failure is result["write_error"], not lost results
    return result


def _perplexities(out_dir, model, text: Path, window, stride, max_tokens, dec, log) -> dict:
    import torch

    ids = tokenize_file(out_dir, text.read_text(encoding="utf-8", errors="replace"))
    if max_tokens:
        ids = ids[:max_tokens]
    window = effective_window(out_dir, window)
    ref_ctx = getattr(model.config, "max_position_embeddings", None)
    if ref_ctx:
        window = min(window, ref_ctx)
    stride = min(stride, window)

    onnx_fn = dec.window_logits

    def ref_fn(x):
        with torch.no_grad():
            return model(torch.tensor(np.asarray(x).reshape(1, -1))).logits[0].float().numpy()

    log(f"perplexity over {len(ids)} tokens (window {window}, stride {stride})")
    onnx = perplexity(ids, onnx_fn, window, stride)
    ref = perplexity(ids, ref_fn, window, stride)
    return {"text": str(text), "onnx": onnx.to_json(), "reference": ref.to_json()}


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("onnxforge", "onnxruntime", "onnxruntime-genai", "torch", "transformers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def format_table(result: dict) -> str:
    m = result["metrics"]
    lines = [f"verify {result['model']}  vs  {result['reference']}  (prompts: {result['prompt_source']})", ""]
    head = f"{'#':>3}  {'tokens':>9}  {'max|dlogit|':>11}  {'mean KL':>9}  {'top-1':>7}  {'greedy':>8}  prompt"
    lines += [head, "-" * len(head)]
    for i, p in enumerate(result["prompts"], 1):
        toks = f"{p['prompt_tokens']}+{p['positions'] - p['prompt_tokens']}"
        greedy = f"{p['greedy_match']}/{p['greedy_tokens']}"
        prompt = p["prompt"].replace("\n", " ")
        prompt = prompt if len(prompt) <= 40 else prompt[:37] + "..."
        lines.append(f"{i:>3}  {toks:>9}  {p['max_abs_diff']:>11.3g}  {p['mean_kl']:>9.3g}  "
                     f"{100 * p['top1']:>6.1f}%  {greedy:>8}  {prompt}")
    lines.append("-" * len(head))
    greedy = "-" if m["greedy_agreement"] is None else f"{100 * m['greedy_agreement']:.1f}%"
    lines.append(f"{'all':>3}  {m['positions']:>9}  {m['max_abs_diff']:>11.3g}  {m['mean_kl']:>9.3g}  "
                 f"{100 * m['top1']:>6.1f}%  {greedy:>8}")
    lines += [f"note: {n}" for n in result.get("notes", [])]
    ppl = result.get("perplexity")
    if ppl:
        o, r = ppl["onnx"], ppl["reference"]
        lines += ["", f"perplexity on {ppl['text']} ({o['tokens']} tokens scored, window {o['window']}, "
                      f"stride {o['stride']}):",
                  f"  onnx {o['ppl']:.4f}   reference {r['ppl']:.4f}   ratio {m['ppl_ratio']:.5f}"]
    if result["thresholds"]:
        lines += ["", f"thresholds ({result.get('threshold_source', 'given')}; change with --max-kl etc., "
                      "drop one with =off, all with --no-thresholds):"]
        lines += threshold_lines(result, THRESHOLDS)
    if result.get("conversion"):
        from .conversion import conversion_lines

        lines += conversion_lines(result["conversion"])
    if result.get("json_path"):
        plot = f" and {result['plot_path']}" if result.get("plot_path") else ""
        lines += ["", f"wrote {result['json_path']}{plot}"]
    if result.get("plot_note"):
        lines.append(result["plot_note"])
    if result["failures"]:
        lines += ["", "FAIL: " + "; ".join(result["failures"])]
    else:
        n = len(result["thresholds"]) + len((result.get("conversion") or {}).get("thresholds", {}))
        lines += ["", "PASS" + (" (no thresholds)" if not n else f" ({n} thresholds met)")]
    return "\n".join(lines)


def run_cli(args) -> int:
    import sys

    prompts = None
    if args.prompts:
        prompts = [ln for ln in Path(args.prompts).read_text(encoding="utf-8").splitlines() if ln.strip()]
    thresholds = {"max_abs_diff": args.max_abs_diff, "min_top1": args.min_top1, "max_kl": args.max_kl,
                  "max_ppl_ratio": args.max_ppl_ratio, "min_greedy": args.min_greedy}
    conversion = {"max_kl": getattr(args, "max_conversion_kl", None),
                  "min_top1": getattr(args, "min_conversion_top1", None),
                  "max_weight_error": getattr(args, "max_weight_error", None),
                  "max_rotary_error": getattr(args, "max_rotary_error", None)}
    if args.max_ppl_ratio not in (None, "off") and not args.text:
        print("onnxforge: error: --max-ppl-ratio needs --text", file=sys.stderr)
        return 2
    result = verify(args.model_dir, args.reference, prompts=prompts, text=args.text, tokens=args.tokens,
                    window=args.window, stride=args.stride, max_text_tokens=args.max_tokens,
                    thresholds=thresholds, plot=not args.no_plot, defaults=not args.no_thresholds,
                    conversion_thresholds=conversion,
                    log=lambda s: print(s, file=sys.stderr, flush=True))
    print(format_table(result), flush=True)
    if result.get("write_error"):  # after the results: they are not lost to a folder that cannot be written
        print(f"onnxforge: error: {result['write_error']}", file=sys.stderr)
        return 2
    return 1 if result["failures"] else 0
