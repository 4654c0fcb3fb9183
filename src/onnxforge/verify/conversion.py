"""The conversion verdict of `verify`: the ONNX model against transformers holding the build's own weights.

The logits are compared on the same sequences as the quantization verdict (prompt + the original
reference's greedy continuation); each stored tensor is also compared with the checkpoint tensor it was
made from (relative difference): a tensor zeroed, swapped or taken from the wrong place shows there
whatever the precision, a graph or config mistake shows in the logits, and the rotary tables are compared
with the reference's own frequencies (verify/stored_rope.py), so a wrong rope base shows at any precision.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

# threshold name -> (metric key, direction), as parity.THRESHOLDS
CONVERSION_THRESHOLDS = {
    "max_kl": ("mean_kl", "max"),
    "min_top1": ("top1", "min"),
    "max_weight_error": ("weight_error", "max"),
    "max_rotary_error": ("rotary_error", "max"),
}


def conversion_limits(precision: str, given: dict | None, defaults: bool) -> dict:
    """The conversion thresholds in force: the precision's defaults (unless `defaults` is false), then
    `given` (None keeps a default, "off" drops it)."""
    from .thresholds import CONVERSION_DEFAULTS

    given = given or {}
    base = dict(CONVERSION_DEFAULTS[precision]) if defaults else {}
    base.update({k: v for k, v in given.items() if v is not None and v != "off"})
    out = {}
    for name, value in base.items():
        if name not in CONVERSION_THRESHOLDS:
            raise ValueError(f"unknown conversion threshold {name!r}; choose from {', '.join(CONVERSION_THRESHOLDS)}")
        if given.get(name) == "off":
            continue
        value = float(value)
        out[name] = value / 100.0 if name == "min_top1" and value > 1 else value
    return out


def judge_conversion(model, out_dir: Path, runs: Sequence[tuple[list[int], np.ndarray]], limits: dict,
                     per_prompt: list[dict]) -> dict:
    """Load the stored weights into `model` (in place), compare its logits with the ONNX model's on `runs`
    ((sequence, onnx logits) per prompt); adds "conversion" figures to each of `per_prompt`."""
    import torch

    from .parity import check_thresholds, compare_logits, nan_max, nonfinite_failures
    from .stored import load_stored_weights

    stored = load_stored_weights(model, out_dir)
    if stored.kept_quantized and any(k in limits for k in ("max_kl", "min_top1")):
        limits = {k: v for k, v in limits.items() if k in ("max_weight_error", "max_rotary_error")}
        stored.notes.append("max_kl and min_top1 not judged: with original weights in the reference, their "
                            "quantization noise would be taken for conversion error")
    kls, top1s = [], []
    conv_prompts = []
    for (seq, got), p in zip(runs, per_prompt):
        with torch.no_grad():
            ref = model(torch.tensor([seq])).logits[0].float().numpy()[len(seq) - len(got):]
        m = compare_logits(ref, got)
        kls.append(m["kl"]), top1s.append(m["top1"])
        p["conversion"] = {"max_abs_diff": float(m["max_abs_diff"].max()), "mean_kl": float(m["kl"].mean()),
                           "top1": float(m["top1"].mean()), "kl": m["kl"].tolist()}
        conv_prompts.append({**p["conversion"], "nonfinite": {"stored-weights reference":
                                                              int((~np.isfinite(ref)).sum())}})
    worst, weight_error = stored.max_error
    worst_rotary = max(stored.rotary, key=lambda k: np.nan_to_num(stored.rotary[k], nan=np.inf), default=None)
    metrics = {
        "max_abs_diff": nan_max(p["max_abs_diff"] for p in conv_prompts),
        "mean_kl": float(np.concatenate(kls).mean()),
        "top1": float(np.concatenate(top1s).mean()),
        "weight_error": weight_error,
        "worst_weight": worst,
        "weights_compared": len(stored.errors),
        "rotary_error": stored.rotary[worst_rotary] if worst_rotary else 0.0,
        "worst_rotary": worst_rotary,
    }
    failures = nonfinite_failures(conv_prompts, {k: v for k, v in metrics.items()
                                                 if k not in ("worst_weight", "worst_rotary")})
    failures += check_thresholds(metrics, limits, CONVERSION_THRESHOLDS)
    return {"metrics": metrics, "thresholds": limits, "failures": failures, "passed": not failures,
            "weight_errors": stored.errors, "rotary_errors": stored.rotary, "notes": stored.notes}



def conversion_lines(conv: dict) -> list[str]:
    """The conversion verdict's part of verify's table."""
    m = conv["metrics"]
    worst = f" ({m['worst_weight']})" if m.get("worst_weight") else ""
    lines = ["", "conversion: the ONNX model against the reference holding the build's own weights (dequantized):",
             f"  max|dlogit| {m['max_abs_diff']:.3g}   mean KL {m['mean_kl']:.3g}   top-1 {100 * m['top1']:.1f}%   "
             f"weights: largest relative difference {m['weight_error']:.3g}{worst} of {m['weights_compared']} tensors"]
    if m.get("worst_rotary"):
        lines.append(f"  rotary tables against the reference's frequencies: largest relative difference "
                     f"{m['rotary_error']:.3g} ({m['worst_rotary']})")
    lines += [f"  note: {n}" for n in conv.get("notes", [])]
    from .parity import threshold_lines

    return lines + threshold_lines(conv, CONVERSION_THRESHOLDS, "conversion ")
