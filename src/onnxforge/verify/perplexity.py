"""Sliding-window perplexity, shared by `onnxforge perplexity` (onnxruntime) and `verify` (transformers).

The windowing follows the Hugging Face docs' "perplexity of fixed-length models": windows of `window`
tokens start every `stride` tokens; each window scores only the tokens that no earlier window scored, so
every token from the second on is scored exactly once, with as much left context as the window allows.

This module must not import torch or transformers: `onnxforge perplexity` runs without them.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from ..errors import RunError

LogitsFn = Callable[[np.ndarray], np.ndarray]  # ids (seq,) int64 -> logits (seq, vocab)


@dataclass
class Perplexity:
    ppl: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # tokens scored
    windows: int
    window: int
    stride: int

    def to_json(self) -> dict:
        return asdict(self)


def windows(n: int, window: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, end, first_scored) for each window over n tokens; positions [first_scored, end) are scored."""
    if window < 2:
        raise RunError(f"the perplexity window must be at least 2 tokens, got {window}; pass --window 2 or more")
    if not 1 <= stride <= window:
        raise RunError(f"the stride must be between 1 and the window ({window}), got {stride}; pass a smaller --stride")
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        first = max(prev_end, begin + 1)  # the first token of a window has no context inside it
        if first < end:
            yield begin, end, first
        prev_end = end
        if end == n:
            break


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per row, computed in float64."""
    x = logits.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(x - m).sum(axis=-1)) + m[:, 0]
    return lse - x[np.arange(len(targets)), targets]


def perplexity(ids: Sequence[int], logits_fn: LogitsFn, window: int = 512, stride: int = 256,
               progress: Callable[[int, int], None] | None = None) -> Perplexity:
    """Perplexity of `ids` under `logits_fn`, which maps a window of ids to its logits (one row per id)."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if len(ids) < 2:
        raise RunError(f"perplexity needs a text of at least 2 tokens, this one has {len(ids)}; pass a longer --text")
    total, count, nwin = 0.0, 0, 0
    spans = list(windows(len(ids), window, stride))
    for k, (begin, end, first) in enumerate(spans):
        logits = np.asarray(logits_fn(ids[begin:end]))
        if logits.ndim == 3:
            logits = logits[0]
        # logits at position p predict token p+1: score targets [first, end) with rows [first-1, end-1)
        rows = logits[first - 1 - begin:end - 1 - begin]
        nll = token_nll(rows, ids[first:end])
        total += float(nll.sum())
        count += len(nll)
        nwin += 1
        if progress:
            progress(k + 1, len(spans))
    mean = total / count
    return Perplexity(ppl=math.exp(mean), nll=mean, tokens=count, windows=nwin, window=window, stride=stride)


# -- onnxruntime side (no torch) ---------------------------------------------------------------------

def context_length(model_dir: str | Path) -> int | None:
    cfg = json.loads((Path(model_dir) / "genai_config.json").read_text())
    return cfg.get("model", {}).get("context_length")


def decoder(model_dir: str | Path, threads: int = 0):
    """An `OrtDecoder` that also feeds position_ids when the graph asks for them (other builders' models)."""
    from .ort_runner import OrtDecoder

    class Decoder(OrtDecoder):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.inputs = {i.name for i in self.session.get_inputs()}
            self.output_names = [o.name for o in self.session.get_outputs()]

        def step(self, ids: np.ndarray) -> np.ndarray:
            if "position_ids" not in self.inputs:
                return super().step(ids)
            ids = np.asarray(ids, dtype=np.int64)
            ids = ids.reshape(ids.shape[0] if ids.ndim == 2 else 1, -1)
            total = self.length + ids.shape[1]
            feeds = {"input_ids": ids, "attention_mask": np.ones((ids.shape[0], total), dtype=np.int64),
                     "position_ids": np.tile(np.arange(self.length, total, dtype=np.int64), (ids.shape[0], 1)),
                     **self.past}
            outs = dict(zip(self.output_names, self.session.run(self.output_names, feeds)))
            self.carry(outs)
            self.length = total
            return outs["logits"].astype(np.float32)

    return Decoder(model_dir, threads=threads)


def ort_logits_fn(model_dir: str | Path, threads: int = 0) -> LogitsFn:
    """A logits function running the built model in plain onnxruntime (fresh KV cache per window)."""
    return decoder(model_dir, threads=threads).window_logits


def tokenize_file(model_dir: str | Path, text: str) -> list[int]:
    """Token ids of `text` with the model folder's tokenizer.json (`tokenizers`), else onnxruntime-genai's."""
    path = Path(model_dir) / "tokenizer.json"
    if path.is_file():
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(path)).encode(text).ids
    import onnxruntime_genai as og

    from .ort_runner import load_genai_model

    return [int(t) for t in og.Tokenizer(load_genai_model(model_dir)).encode(text)]


def effective_window(model_dir: str | Path, window: int) -> int:
    ctx = context_length(model_dir)
    return min(window, ctx) if ctx else window


def run_cli(args) -> int:
    """`onnxforge perplexity OUT_DIR --text FILE`: onnxruntime only."""
    import sys
    import time

    text = Path(args.text).read_text(encoding="utf-8", errors="replace")
    ids = tokenize_file(args.model_dir, text)
    if args.max_tokens:
        ids = ids[:args.max_tokens]
    window = effective_window(args.model_dir, args.window)
    stride = min(args.stride, window)
    if window != args.window:
        print(f"note: window capped at the model's context length, {window}", file=sys.stderr)
    start = time.perf_counter()
    fn = ort_logits_fn(args.model_dir, threads=args.threads or 0)
    show = sys.stderr.isatty()

    def progress(k, n):
        if show:
            print(f"\rwindow {k}/{n}", end="", file=sys.stderr, flush=True)

    res = perplexity(ids, fn, window=window, stride=stride, progress=progress)
    if show:
        print(file=sys.stderr)
    secs = time.perf_counter() - start
    if args.json:
        print(json.dumps({**res.to_json(), "seconds": secs, "model": str(args.model_dir), "text": str(args.text)}))
    else:
        print(f"perplexity {res.ppl:.4f}  (nll {res.nll:.4f} nats/token over {res.tokens} tokens, "
              f"{res.windows} windows of {window}, stride {stride}, {secs:.1f} s)")
    return 0
