"""Generated bad inputs run through `onnxforge build`'s command line in this process, one fresh folder each.

A kind (safetensors, gguf, config, tokenizer, toml, cli) writes its input into a fresh case folder that
also holds a user's files (notes.txt, a folder `mine` of them, an empty folder, two recipe files), and
gives the argv. `run_case` runs `onnxforge.cli.main(argv)` there (the case folder is the current
folder) under an alarm and sorts the result into one of COLUMNS:

built / refused: a complete build (rc 0; model.onnx loads in onnxruntime), or rc 2 with an `error:`
line (`onnxforge: error: ...` or argparse's usage error). Bad: `traceback` (any exception out of main
or a traceback on stderr), `hang` (the alarm), `unclear` (another rc, or rc 2 without an error line),
`partial` (a `.OUT.*` folder left, an output left after a failure, or an incomplete build),
`input_changed` (a byte of the case folder other than the output changed: the checkpoint, the
user's files), `accepted` (a build from an input the generator knows is invalid, e.g. a string where
a TOML boolean belongs, `--workers -1`, a corrupt tokenizer.json; the reason is kept).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import traceback
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import fuzzlib
from fuzzlib import Hang

BAD = ("traceback", "hang", "unclear", "partial", "input_changed", "accepted")
COLUMNS = ("cases", "built", "refused", *BAD)
OUTPUT_FILES = {"model.onnx", "model.onnx.data", "genai_config.json", "build_report.json"}


# ----------------------------------------------------------------------------- counting


@dataclass
class Counts:
    table: dict = field(default_factory=lambda: defaultdict(Counter))  # kind -> column -> n
    failures: dict = field(default_factory=lambda: defaultdict(list))  # kind -> [(column, repro, detail)]
    keep: int = 20  # failures kept per kind and column

    def add(self, kind: str, column: str, repro: str = "", detail: str = "") -> None:
        self.table[kind]["cases"] += 1
        self.table[kind][column] += 1
        if column in BAD and sum(1 for c, _, _ in self.failures[kind] if c == column) < self.keep:
            self.failures[kind].append((column, repro, detail))

    def bad(self) -> int:
        return sum(row[c] for row in self.table.values() for c in BAD)

    def merge(self, other: dict) -> None:
        for kind, row in other["table"].items():
            self.table[kind].update(row)
        for kind, rows in other["failures"].items():
            self.failures[kind].extend(tuple(r) for r in rows)

    def to_dict(self) -> dict:
        return {"table": {k: dict(v) for k, v in self.table.items()}, "failures": dict(self.failures)}

    def format_table(self) -> str:
        rows = [("kind", *COLUMNS)] + [(k, *(str(self.table[k][c]) for c in COLUMNS)) for k in self.table]
        rows.append(("total", *(str(sum(self.table[k][c] for k in self.table)) for c in COLUMNS)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                         for r in rows)

    def format_failures(self, per_column: int = 3) -> str:
        lines = []
        for kind, rows in self.failures.items():
            shown = Counter()
            for column, repro, detail in rows:
                if shown[column] < per_column:
                    shown[column] += 1
                    lines.append(f"{kind} {column}: {repro}\n    -> {detail[:300]}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- one case


def tree_digest(root: Path, exclude: frozenset[str] = frozenset()) -> dict[str, str]:
    """Path -> SHA-256 (or link target, or 'dir') of everything under `root`, top-level names in
    `exclude` (and their `.NAME.*` temporaries) left out."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        if rel == Path("."):
            dirnames[:] = [d for d in dirnames if not _excluded(d, exclude)]
            filenames = [f for f in filenames if not _excluded(f, exclude)]
        for d in dirnames:
            p = Path(dirpath) / d
            out[str(rel / d)] = f"link:{os.readlink(p)}" if p.is_symlink() else "dir"
        for f in filenames:
            p = Path(dirpath) / f
            out[str(rel / f)] = f"link:{os.readlink(p)}" if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _excluded(name: str, exclude: frozenset[str]) -> bool:
    return name in exclude or any(name.startswith(f".{e}.") for e in exclude)


def user_files(case: Path) -> None:
    """What a user has beside the checkpoint: each case checks none of it changes."""
    (case / "notes.txt").write_text("my notes\n")
    (case / "mine").mkdir()
    (case / "mine" / "keep.txt").write_text("mine\n")
    (case / "empty").mkdir()
    (case / "good.toml").write_text('precision = "int4"\nblock_size = 64\n')
    (case / "bad.toml").write_text("precision = \n")


# output targets (relative to the case folder) whose replacement is not harmful to the user's files
FREE_TARGETS = {"out": "out", "empty": "empty", "out/sub": "out"}


@dataclass
class Case:
    kind: str
    argv: list[str]
    repro: str
    invalid: list[str] = field(default_factory=list)  # why the input must be refused, where the generator knows
    target: str = "out"
    expect_tokenizer_warning: bool = False


def call_main(argv: list[str], seconds: int) -> tuple[object, str]:
    """(rc, or the exception main raised; what it wrote to stdout and stderr)."""
    from onnxforge.cli import main

    def on_alarm(signum, frame):
        raise Hang("a case ran past its time limit")

    buf = io.StringIO()
    old_handler = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(buf):
            try:
                rc = main(argv)
            except SystemExit as e:
                rc = e.code
    except (Hang, Exception, KeyboardInterrupt) as e:  # noqa: BLE001 -- every exception is a finding
        rc = e
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old_handler)
    return rc, buf.getvalue()


def classify(case: Case, rc: object, text: str, folder: Path) -> tuple[str, str]:
    target = folder / case.target
    if isinstance(rc, Hang):
        return "hang", "ran past its time limit"
    if isinstance(rc, BaseException):
        where = traceback.extract_tb(rc.__traceback__)[-1] if rc.__traceback__ else None
        at = f" at {Path(where.filename).name}:{where.lineno} in {where.name}" if where else ""
        return "traceback", "".join(traceback.format_exception_only(type(rc), rc)).strip()[:300] + at
    if "Traceback (most recent call last)" in text:
        return "traceback", text[-600:]
    leftovers = sorted(p.name for p in target.parent.glob(f".{target.name}.*"))
    if leftovers:
        return "partial", f"left {leftovers} (rc {rc})"
    if rc == 0:
        problem = incomplete(target)
        if problem:
            return "partial", problem
        if case.invalid:
            return "accepted", "built although: " + "; ".join(case.invalid)
        if case.expect_tokenizer_warning and not tokenizer_warned(target):
            return "accepted", "built without tokenizer.json and without a warning in build_report.json"
        return "built", ""
    if rc == 2 and "error:" in text:
        if case.target in FREE_TARGETS and target.exists() and not (case.target == "empty" and not any(target.iterdir())):
            return "partial", f"output left after: {text.strip()[-300:]}"
        return "refused", text.strip().splitlines()[-1] if text.strip() else ""
    return "unclear", f"rc {rc!r}: {text.strip()[-300:]}"


def incomplete(target: Path) -> str:
    if config_only(target):  # extra option config_only=true: genai_config.json and the tokenizer, no model
        left = {"genai_config.json", "build_report.json"} - {p.name for p in target.iterdir()}
        return f"rc 0 but the config_only build {target.name} lacks {sorted(left)}" if left else ""
    if not target.is_dir() or not OUTPUT_FILES <= {p.name for p in target.iterdir()}:
        return f"rc 0 but {target.name} lacks {sorted(OUTPUT_FILES - {p.name for p in target.iterdir()}) if target.is_dir() else 'everything'}"
    import onnxruntime as ort

    try:
        ort.InferenceSession(str(target / "model.onnx"), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        return f"rc 0 but model.onnx does not load: {str(e)[:200]}"
    return ""


def config_only(target: Path) -> bool:
    try:
        return json.loads((target / "build_report.json").read_text())["recipe"].get("config_only") is True
    except (OSError, ValueError, KeyError):
        return False


def tokenizer_warned(target: Path) -> bool:
    report = json.loads((target / "build_report.json").read_text())
    return "tokenizer" in json.dumps(report.get("warnings", [])).lower()


def run_case(counts: Counts, case: Case, folder: Path, seconds: int = fuzzlib.CASE_SECONDS) -> str:
    """Run `case` in `folder` (already holding its input and the user's files); count it, remove the folder."""
    exclude = frozenset({FREE_TARGETS[case.target]}) if case.target in FREE_TARGETS else frozenset()
    before = tree_digest(folder, exclude)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        rc, text = call_main(case.argv, seconds)
    finally:
        os.chdir(cwd)
    column, detail = classify(case, rc, text, folder)
    changed = _changes(before, tree_digest(folder, exclude)) if folder.exists() else ["the whole case folder is gone"]
    if changed:
        column, detail = "input_changed", f"changed: {changed[:5]} ({column}: {detail[:200]})"
    counts.add(case.kind, column, case.repro, detail)
    shutil.rmtree(folder, ignore_errors=True)
    for p in folder.parent.glob(f".{folder.name}.*"):  # a `-o .` build's temporaries
        shutil.rmtree(p, ignore_errors=True)
    return column


def _changes(before: dict, after: dict) -> list[str]:
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
