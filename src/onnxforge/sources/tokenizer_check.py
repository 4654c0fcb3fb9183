"""Is a tokenizer usable? Checked when a build starts (before any weight is read) and before `run`, `chat`,
`perplexity` and `verify` load a built folder.

A tokenizer.json or tokenizer_config.json that is not JSON, or a tokenizer.json the `tokenizers` library
cannot read, is damaged: an error naming the file. A missing tokenizer, or one onnxruntime-genai cannot use,
still builds (verify and perplexity can work without it), with a warning that `run`/`chat` will not work.

onnxruntime-genai 0.18, measured (tests/test_commands_errors.py): BPE tokenizer.json files load; WordLevel and
WordPiece ones either fail ("Cannot know how to parse line") or load and encode wrongly (four words gave 17 ids
and decoded to one), so the model type is checked by name as well as by loading it.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from ..errors import CheckpointError, OutputError

GENAI_MODELS = ("BPE", "Unigram")  # tokenizer.json model types onnxruntime-genai encodes with
JSON_FILES = ("tokenizer.json", "tokenizer_config.json")
CANNOT_RUN = "`run`/`chat` will not work"
NO_TOKENIZER = "there is no tokenizer.json"


def first_line(err: Exception, limit: int = 240) -> str:
    """The first line of an exception's message (runtimes raise multi-line ones), or its type's name."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__


def damage(path: Path) -> str | None:
    """What is wrong with tokenizer.json or tokenizer_config.json at `path` (present), or None."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        return f"is not valid JSON ({str(e)[:160]})"
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if not isinstance(data, dict):
        return f"must hold a JSON object, not {type(data).__name__}"
    if path.name != "tokenizer.json":
        return None
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exceptions
        return f"is JSON, but the tokenizers library cannot read it ({first_line(e, 160)})"
    return None


def first_damage(folder: Path) -> tuple[Path, str] | None:
    """(file, problem) for the first damaged tokenizer file in `folder`, or None."""
    for name in JSON_FILES:
        path = Path(folder) / name
        if path.is_file():
            problem = damage(path)
            if problem:
                return path, problem
    return None


def genai_problem(folder: Path) -> str | None:
    """Why onnxruntime-genai cannot tokenize with the tokenizer files in `folder` (read undamaged), or None:
    NO_TOKENIZER, or what is wrong with tokenizer.json ("is a WordLevel tokenizer, ...")."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file() and not (Path(folder) / "tokenizer.model").is_file():
        return NO_TOKENIZER
    kind = (json.loads(path.read_text(encoding="utf-8")).get("model") or {}).get("type") if path.is_file() else None
    if path.is_file() and kind not in GENAI_MODELS:
        return (f"is a {kind} tokenizer, which onnxruntime-genai does not read (it reads "
                f"{' and '.join(GENAI_MODELS)})")
    try:
        import onnxruntime_genai as og
    except ImportError:  # an optional extra: the model type above is all that can be checked
        return None
    with tempfile.TemporaryDirectory(prefix="onnxforge-tok-") as tmp:
        for name in JSON_FILES + ("tokenizer.model",):
            if (Path(folder) / name).is_file():
                (Path(tmp) / name).write_bytes((Path(folder) / name).read_bytes())
        (Path(tmp) / "genai_config.json").write_text(json.dumps({"model": {"context_length": 2048}}))
        try:
            og.Tokenizer(tmp).encode("Hello world")
        except Exception as e:  # noqa: BLE001 - genai raises plain RuntimeErrors
            return f"cannot be loaded by onnxruntime-genai ({first_line(e, 160)})"
    return None


def check_tokenizer(source) -> tuple[list[str], dict[str, bytes]]:
    """Check the tokenizer a build will write (via `source.write_tokenizer` into a scratch folder): raise
    CheckpointError for a damaged file; return the warnings for one `run`/`chat` cannot use, and the files as
    written (name -> bytes, kilobytes to a few MB), so the build writes these instead of making them again
    (a GGUF's tokenizer is rebuilt from its metadata: seconds for a large vocabulary)."""
    where = getattr(source, "path", None)
    with tempfile.TemporaryDirectory(prefix="onnxforge-tok-") as tmp:
        source.write_tokenizer(Path(tmp))
        files = {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}
        bad = first_damage(Path(tmp))
        if bad:
            path, problem = bad
            shown = Path(where) / path.name if where is not None and Path(where).is_dir() else (
                f"{path.name} made from {where}" if where is not None else path.name)
            raise CheckpointError(f"{shown} {problem}; fix or re-download the file")
        why = genai_problem(Path(tmp))
    if why is None:
        return [], files
    if why == NO_TOKENIZER:
        return [f"{CANNOT_RUN}, nor `perplexity`: the checkpoint has no tokenizer (no tokenizer.json"
                f"{f' in {where}' if where is not None else ''}); `verify` still works with its reference's "
                "tokenizer. Add the tokenizer files to the checkpoint and build again"], files
    return [f"{CANNOT_RUN}: the checkpoint's tokenizer.json {why}; `verify` and `perplexity` still work (they "
            "read tokenizer.json with the tokenizers library). Use a checkpoint with a BPE or Unigram tokenizer.json "
            "to chat with the model"], files


def write_tokenizer_files(folder: Path, files: dict[str, bytes]) -> None:
    """Write the files check_tokenizer returned into the build's folder."""
    for name, data in files.items():
        try:
            (folder / name).write_bytes(data)
        except OSError as e:
            raise OutputError(f"cannot write {name} into {folder}: {e.strerror}") from None
