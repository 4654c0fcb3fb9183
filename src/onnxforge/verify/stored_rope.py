"""The build's rotary tables against the reference's own (verify's conversion verdict).

The ONNX model holds its rotary embedding as computed tables: `cos_cache` / `sin_cache` (context, rotary_dim/2)
per rope key (`_sliding_attention`, ...; LongRoPE's long factors in `_long`), already times the attention
factor, derived by onnxforge from config.json. transformers derives the same from the same file: its rotary
module's `inv_freq` (`<layer type>_inv_freq` per layer type) and `attention_scaling`. Each table is compared
with cos / sin(position x inv_freq) x attention_scaling (float32, as both compute it) over its positions up to
the reference's original context (past it, dynamic scaling is recomputed at run time), as one relative
difference per table. A wrong rope base or scaling then fails at every precision, where in the logits it can
hide inside the int8 activations' noise (SmolLM2-135M's rope base halved moves its logits by KL ~2.6e-3).
"""
from __future__ import annotations

import re

import numpy as np

_TABLE = re.compile(r"^(?P<fn>cos|sin)_cache(?:_(?P<key>(?!long$).+?))?(?P<long>_long)?$")


def _inv_freq(model, key: str, long: bool):
    """(inv_freq float32, attention scaling, original context) of rope key `key`, or a reason it is not found."""
    layer_typed, plain = [], []
    for _, mod in model.named_modules():
        own = dict(mod.named_buffers(recurse=False))
        if f"{key}_inv_freq" in own:
            layer_typed.append(mod)
        elif "inv_freq" in own:
            plain.append(mod)
    typed = bool(layer_typed)
    mods = layer_typed or plain
    values = {tuple(np.asarray(getattr(m, f"{key}_inv_freq" if typed else "inv_freq").float())) for m in mods}
    if len(values) != 1:
        return f"{len(values) or 'no'} different rotary frequencies in the reference for {key}"
    mod = mods[0]
    prefix = f"{key}_" if typed else ""
    inv = getattr(mod, f"{prefix}inv_freq").float()
    if long:
        import transformers.modeling_rope_utils as ru

        rope_type = mod.rope_type[key] if typed else mod.rope_type
        params = mod.config.rope_parameters[key] if typed else mod.config.rope_parameters
        inv = ru.ROPE_INIT_FUNCTIONS[rope_type](mod.config, None, seq_len=params["original_max_position_embeddings"] + 1,
                                                layer_type=key if typed else None)[0].float()
    original = getattr(mod, "original_max_seq_len", None)
    return np.asarray(inv, dtype=np.float32), float(getattr(mod, f"{prefix}attention_scaling", 1.0)), original


def compare_rotary(model, inits, report) -> None:
    """One relative difference per rotary table of the build (`report.rotary`); a table the reference has no
    counterpart for is named in `report.notes`."""
    for name in sorted(inits.protos):
        m = _TABLE.match(name)
        if m is None:
            continue
        found = _inv_freq(model, m.group("key") or "full_attention", bool(m.group("long")))
        stored = np.asarray(inits.read(name), dtype=np.float32)
        if isinstance(found, str) or found[0].shape[0] != stored.shape[1]:
            why = found if isinstance(found, str) else f"{found[0].shape[0]} frequencies in the reference"
            report.notes.append(f"{name} {tuple(stored.shape)} not compared: {why}")
            continue
        inv, scale, original = found
        rows = min(stored.shape[0], original or stored.shape[0])
        angles = np.outer(np.arange(rows, dtype=np.float32), inv).astype(np.float32)
        ref = (np.cos(angles) if m.group("fn") == "cos" else np.sin(angles)) * np.float32(scale)
        diff = stored[:rows].astype(np.float64) - ref
        norm = float(np.linalg.norm(ref))
        report.rotary[name] = float(np.linalg.norm(diff) / norm) if norm > 0 else float(np.abs(diff).max() > 0)
