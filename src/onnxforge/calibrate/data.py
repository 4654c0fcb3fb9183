"""Calibration text: a user's file (plain text, or JSON lines of prompts / chat turns) or the offline default,
tokenized with the model's own tokenizer and cut into samples of equal length.

The default needs no download and exists wherever Python does: the docstrings of a fixed list of pure-Python
standard-library modules (each module's, then its public classes' and functions' in name order), so it is
the same text for one Python version. It is English technical prose; the held-out text of bench/quality.py
(the Python docs' .rst sources) is another source.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConfigError, RecipeError

DEFAULT_SAMPLES = 64
DEFAULT_LENGTH = 256
DEFAULT_NAME = "python-stdlib-docstrings"
STDLIB_MODULES = (
    "argparse", "ast", "asyncio.events", "base64", "bisect", "calendar", "collections", "concurrent.futures",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message",
    "enum", "fileinput", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip",
    "heapq", "hmac", "html.parser", "http.client", "http.server", "imaplib", "inspect", "ipaddress", "json",
    "logging", "mailbox", "mimetypes", "numbers", "operator", "optparse", "os", "pathlib", "pickle", "pkgutil",
    "platform", "plistlib", "pprint", "queue", "random", "re", "sched", "secrets", "shelve", "shlex", "shutil",
    "smtplib", "socket", "socketserver", "statistics", "string", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "timeit", "tokenize", "traceback", "typing", "unittest.case", "urllib.parse",
    "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom", "zipfile",
)


@dataclass(frozen=True)
class Calibration:
    """What to calibrate on: `path` (None: the default text), `samples` sequences of `length` tokens."""

    path: str | None = None
    samples: int = DEFAULT_SAMPLES
    length: int = DEFAULT_LENGTH
    act_order: bool = False  # gptq: columns by decreasing Hessian diagonal (static groups), off by default

    def __post_init__(self) -> None:
        if not isinstance(self.act_order, bool):
            raise RecipeError(f"calibration act_order takes true or false, got {self.act_order!r}")
        for key, lo, hi in (("samples", 1, 4096), ("length", 8, 8192)):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise RecipeError(f"calibration {key} must be an integer from {lo} to {hi}, got {v!r}")
        if self.path is not None and not Path(self.path).is_file():
            raise RecipeError(f"calibration file {self.path} does not exist (give a plain-text file, or a .jsonl of "
                              "prompts / chat turns)")


@dataclass
class CalibrationText:
    ids: np.ndarray  # (samples, length) int64
    source: str
    sha256: str
    records: int = 0
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        return {"source": self.source, "sha256": self.sha256, "samples": int(self.ids.shape[0]),
                "length": int(self.ids.shape[1]), "tokens": int(self.ids.size), "records": self.records}


def default_text() -> str:
    """The offline default: standard-library docstrings (see the module docstring)."""
    import importlib

    import warnings

    with warnings.catch_warnings():  # typing.io and the like warn when read
        warnings.simplefilter("ignore", DeprecationWarning)
        return _docstrings(importlib)


def _docstrings(importlib) -> str:
    parts = []
    for name in STDLIB_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:  # a module a Python build leaves out (e.g. no _ssl): the text says which were read
            continue
        docs = [inspect.getdoc(mod) or ""]
        for attr in sorted(vars(mod)):
            obj = getattr(mod, attr)
            if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj):
                docs.append(inspect.getdoc(obj) or "")
        parts.append("\n\n".join(d for d in docs if d))
    return "\n\n".join(p for p in parts if p)


def load_texts(cal: Calibration, chat_template: str | None) -> tuple[list[str], str]:
    """The calibration texts (one per record) and a description of where they came from."""
    if cal.path is None:
        return [default_text()], f"{DEFAULT_NAME} (Python {'.'.join(map(str, __import__('sys').version_info[:2]))})"
    path = Path(cal.path)
    raw = path.read_text(encoding="utf-8", errors="strict")
    if path.suffix.lower() not in (".jsonl", ".ndjson"):
        return [raw], str(path)
    texts = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{n}: not a JSON object ({e.msg}); each line of a .jsonl calibration file is "
                              '{"text": ...}, {"prompt": ...} or {"messages": [{"role": ..., "content": ...}]}') from None
        texts.append(_record_text(rec, chat_template, f"{path}:{n}"))
    if not texts:
        raise ConfigError(f"{path} holds no records")
    return texts, str(path)


def _record_text(rec: object, chat_template: str | None, where: str) -> str:
    if isinstance(rec, dict) and isinstance(rec.get("text"), str):
        return rec["text"]
    if isinstance(rec, dict) and isinstance(rec.get("prompt"), str):
        messages = [{"role": "user", "content": rec["prompt"]}]
        if isinstance(rec.get("completion"), str):
            messages.append({"role": "assistant", "content": rec["completion"]})
    elif isinstance(rec, dict) and isinstance(rec.get("messages"), list):
        messages = rec["messages"]
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                   for m in messages):
            raise ConfigError(f"{where}: each message needs a string role and content")
    else:
        raise ConfigError(f'{where}: expected {{"text": ...}}, {{"prompt": ...}} or {{"messages": [...]}}')
    if not chat_template:
        raise ConfigError(f"{where}: prompts and chat turns are rendered through the model's chat template, but "
                          "its tokenizer_config.json has none; give {\"text\": ...} records or plain text")
    return render_chat(chat_template, messages)


def render_chat(template: str, messages: list[dict]) -> str:
    """The chat turns through the model's template, sandboxed the way transformers renders it (a template is
    data from the model files, never code run unsandboxed)."""
    try:
        import jinja2  # noqa: F401
    except ImportError:
        raise ConfigError("rendering chat turns through the chat template needs jinja2 (pip install jinja2); or "
                          "give plain text") from None
    from jinja2.exceptions import TemplateError

    from ..verify.generate import render_jinja2

    try:
        return render_jinja2(template, messages, False, {})
    except TemplateError as e:
        raise ConfigError(f"the model's chat template failed on a calibration record: {e}") from None


def tokenizer_for(source):
    """The model's tokenizer (tokenizers.Tokenizer) and chat template, from the files the build writes."""
    from tokenizers import Tokenizer

    with tempfile.TemporaryDirectory(prefix="onnxforge-cal-") as tmp:
        source.write_tokenizer(Path(tmp))
        tj = Path(tmp) / "tokenizer.json"
        if not tj.is_file():
            raise ConfigError("calibration needs the model's tokenizer.json (or a GGUF tokenizer); this checkpoint "
                              "has none")
        tok = Tokenizer.from_file(str(tj))
        cfg = Path(tmp) / "tokenizer_config.json"
        template = None
        if cfg.is_file():
            template = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
            if isinstance(template, list):  # named templates: the default one
                template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return tok, template if isinstance(template, str) else None


def calibration_ids(source, cal: Calibration) -> CalibrationText:
    """Token ids (samples, length): the texts tokenized one by one, joined, cut into consecutive samples."""
    tok, template = tokenizer_for(source)
    texts, where = load_texts(cal, template)
    digest = hashlib.sha256("\x1e".join(texts).encode("utf-8")).hexdigest()
    need = cal.samples * cal.length
    ids: list[int] = []
    for t in texts:
        ids.extend(tok.encode(t, add_special_tokens=False).ids)
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise RecipeError(f"the calibration text ({where}) gives {len(ids)} tokens, fewer than {cal.samples} samples "
                          f"x {cal.length} tokens = {need}; give more text, or lower calibration_samples / "
                          "calibration_length")
    arr = np.asarray(ids[:need], np.int64).reshape(cal.samples, cal.length)
    return CalibrationText(arr, where, digest, records=len(texts))
