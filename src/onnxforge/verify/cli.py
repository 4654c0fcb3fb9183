"""Sub-commands that run or measure built models (verify, perplexity, run, chat).

Heavy modules are imported inside the command functions: `onnxforge --help` stays fast, and
`perplexity`, `run` and `chat` never import torch or transformers.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

SEED_MAX = 2 ** 31 - 1  # onnxruntime-genai's random_seed is a C int


def _int_in(low: int, high: int | None, what: str):
    """An argparse type: an integer in [low, high]; `what` says the range in the message."""
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {value!r}") from None
        if n < low or (high is not None and n > high):
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return n
    return parse


def _float_in(ok, what: str):
    """An argparse type: a finite number for which ok(x) holds; `what` says the range in the message."""
    def parse(value: str) -> float:
        try:
            x = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {value!r}") from None
        if not math.isfinite(x) or not ok(x):
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return x
    return parse


_positive = _int_in(1, None, "a positive integer")


def _add_sampling(p) -> None:
    g = p.add_argument_group("generation", "defaults come from the model's genai_config.json search section")
    g.add_argument("--max-length", type=_positive,
                   help="total tokens, prompt included (onnxruntime-genai's meaning; capped at the context length)")
    g.add_argument("--max-new-tokens", type=_positive, help="new tokens at most (default 256 when no --max-length)")
    g.add_argument("--temperature", type=_float_in(lambda x: x >= 0, "a number >= 0 (0 picks the likeliest token)"),
                   help="sampling temperature, >= 0 (onnxruntime-genai 0.18 samples greedily at 0)")
    g.add_argument("--top-p", type=_float_in(lambda x: 0 < x <= 1, "a probability in (0, 1]"),
                   help="nucleus sampling: keep the likeliest tokens up to this probability, in (0, 1]")
    g.add_argument("--top-k", type=_positive, help="sample among the k likeliest tokens (1 .. the vocabulary size)")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--do-sample", dest="do_sample", action="store_true", default=None, help="sample")
    mode.add_argument("--greedy", dest="do_sample", action="store_false", help="greedy decoding")
    g.add_argument("--seed", type=_int_in(0, SEED_MAX, f"an integer from 0 to {SEED_MAX}"),
                   help=f"random seed for sampling (0 .. {SEED_MAX})")
    p.add_argument("--show-prompt", action="store_true", help="print the prompt text sent to the model on stderr")


def _threshold(value: str) -> float | str:
    if value.lower() == "off":
        return "off"
    return _float_in(lambda x: x >= 0, "a number >= 0 or 'off'")(value)


def add_commands(sub) -> None:
    """Register the measurement sub-commands on the main parser."""
    p = sub.add_parser(
        "verify", help="compare a built model with its transformers reference (logits, KL, greedy, perplexity)",
        description="Run the built model in onnxruntime and the reference in transformers (fp32, CPU) on a few "
                    "prompts; report max abs logit difference, KL(reference||onnx), top-1 and greedy agreement, "
                    "and perplexity of both with --text. Writes verify.json and verify.png into the model folder. "
                    "Exit code 1 when a threshold given here is missed; 2 on an error, and when verify.json or "
                    "verify.png cannot be written (the results are printed first).")
    p.add_argument("model_dir", help="built model folder")
    p.add_argument("--reference", required=True, help="Hugging Face checkpoint folder or .gguf file")
    p.add_argument("--prompts", help="text file, one prompt per line (default: built-in English prompts)")
    p.add_argument("--text", help="text file for perplexity of both models")
    p.add_argument("--tokens", type=_positive, default=16, help="greedy tokens generated per prompt (default 16)")
    p.add_argument("--window", type=_positive, default=512, help="perplexity window (default 512)")
    p.add_argument("--stride", type=_positive, default=256, help="perplexity stride (default 256)")
    p.add_argument("--max-tokens", type=_positive, help="use only the first N tokens of --text")
    from .thresholds import DEFAULTS

    shown = "; ".join(f"{p}: " + ", ".join(f"{k} {v:g}" for k, v in d.items()) for p, d in DEFAULTS.items())
    t = p.add_argument_group(
        "thresholds (exit code 1 when one is missed)",
        f"Defaults by the precision the weights are stored in ({shown}); docs/verify.md says how they were "
        "measured. A flag replaces one; X=off drops it.")
    t.add_argument("--max-abs-diff", type=_threshold, metavar="X", help="largest allowed max abs logit difference")
    t.add_argument("--min-top1", type=_threshold, metavar="X", help="smallest top-1 agreement (0..1, or percent if > 1)")
    t.add_argument("--max-kl", type=_threshold, metavar="X", help="largest allowed mean KL divergence")
    t.add_argument("--max-ppl-ratio", type=_threshold, metavar="X", help="largest allowed ppl(onnx)/ppl(reference)")
    t.add_argument("--min-greedy", type=_threshold, metavar="X",
                   help="smallest greedy agreement (0..1, or percent if > 1)")
    c = p.add_argument_group(
        "conversion thresholds (exit code 1 when one is missed)",
        "Judged against the reference holding the build's own stored weights, dequantized, so that quantization "
        "noise is not in them; defaults in docs/verify.md. X=off drops one; --no-thresholds drops them too.")
    c.add_argument("--max-conversion-kl", type=_threshold, metavar="X", help="largest allowed mean KL")
    c.add_argument("--min-conversion-top1", type=_threshold, metavar="X", help="smallest top-1 agreement")
    c.add_argument("--max-weight-error", type=_threshold, metavar="X",
                   help="largest allowed ||stored - original|| / ||original|| of any weight tensor")
    c.add_argument("--max-rotary-error", type=_threshold, metavar="X",
                   help="largest allowed relative difference of a rotary cos/sin table from the reference's frequencies")
    t.add_argument("--no-thresholds", action="store_true", help="report only; no default thresholds")
    p.add_argument("--no-plot", action="store_true", help="do not write verify.png")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("perplexity",
                       help="sliding-window perplexity of a built model on a text file (onnxruntime only)",
                       description="Perplexity like the Hugging Face docs' fixed-length models: windows of --window "
                                   "tokens every --stride tokens, each scoring only tokens not scored before. "
                                   "Needs neither torch nor transformers.")
    p.add_argument("model_dir", help="built model folder")
    p.add_argument("--text", required=True, help="UTF-8 text file")
    p.add_argument("--window", type=_positive, default=512, help="tokens per window (default 512)")
    p.add_argument("--stride", type=_positive, default=256, help="tokens between window starts (default 256)")
    p.add_argument("--max-tokens", type=_positive, help="use only the first N tokens of the text")
    p.add_argument("--threads", type=_positive, help="onnxruntime intra-op threads (default: all cores)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_perplexity)

    p = sub.add_parser("run", help="generate from a prompt through onnxruntime-genai, streaming to stdout")
    p.add_argument("model_dir", help="built model folder")
    p.add_argument("prompt")
    p.add_argument("--chat-template", action="store_true",
                   help="wrap the prompt as a user message in the chat template")
    p.add_argument("--system", help="system message (with --chat-template)")
    _add_sampling(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("chat", help="interactive chat through onnxruntime-genai (reads stdin; /exit or EOF ends)")
    p.add_argument("model_dir", help="built model folder")
    p.add_argument("--system", help="system message")
    _add_sampling(p)
    p.set_defaults(func=cmd_chat)


def _check_model_dir(path: str, tokenizer: str = "genai") -> None:
    """One error naming a missing, damaged or truncated file of the folder (verify/folder.py)."""
    from .folder import check_model_folder

    check_model_folder(path, tokenizer)


def _check_file(path: str, what: str) -> None:
    from pathlib import Path

    from ..errors import RunError

    if not Path(path).is_file():
        raise RunError(f"{what} {path} does not exist; pass the path of a UTF-8 text file")


def _check_prompts(path: str) -> None:
    """A --prompts file must hold a prompt: an empty one is not taken as "use the built-in prompts"."""
    from ..errors import RunError

    try:
        lines = [ln for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise RunError(f"cannot read the prompts file {path} ({e}); pass a UTF-8 text file, one prompt per line") \
            from None
    if not lines:
        raise RunError(f"the prompts file {path} has no prompt (no line with text in it); write one prompt per "
                       "line, or leave out --prompts to use the built-in ones")


def cmd_verify(args) -> int:
    _check_model_dir(args.model_dir, "optional")  # the reference's tokenizer may serve
    if not Path(args.reference).exists():
        from ..errors import RunError

        raise RunError(f"reference {args.reference} does not exist; pass the Hugging Face folder or .gguf file "
                       "the model was built from")
    for path, what in ((args.text, "text file"), (args.prompts, "prompts file")):
        if path:
            _check_file(path, what)
    if args.prompts:
        _check_prompts(args.prompts)
    from .parity import run_cli

    return run_cli(args)


def cmd_perplexity(args) -> int:
    _check_model_dir(args.model_dir, "any")  # tokenizer.json, else onnxruntime-genai's tokenizer
    _check_file(args.text, "text file")
    from .perplexity import run_cli

    return run_cli(args)


def cmd_run(args) -> int:
    _check_model_dir(args.model_dir)
    from .generate import run_cli

    return run_cli(args)


def cmd_chat(args) -> int:
    _check_model_dir(args.model_dir)
    from .generate import chat_cli

    return chat_cli(args)
