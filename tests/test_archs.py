"""The decoder is made of parts that families declare: shared code asks no question about the family,
a family file is short data, and what a provider cannot run is refused before the build."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from tiny import write_random_llama

import onnxforge
from onnxforge.archs.registry import FAMILY_MODULES, load_families
from onnxforge.errors import ConfigError

SRC = Path(onnxforge.__file__).parent


def test_shared_graph_code_never_tests_the_family():
    """No model type or architecture name appears as a string literal in the graph code or the spec."""
    names = {a.model_type for a in load_families().values()} | set(load_families())
    code = {p: p.read_text() for p in [*sorted((SRC / "graph").glob("*.py")), SRC / "spec.py"]}
    for path, text in code.items():
        literals = set(re.findall(r"""["']([A-Za-z0-9_.]+)["']""", text))
        assert not literals & names, f"{path.name} names a family: {sorted(literals & names)}"
        assert not re.search(r"(model_type|architecture)\s*(==|!=|in\b)", text), f"{path.name} branches on the family"


@pytest.mark.parametrize("module", FAMILY_MODULES)
def test_family_files_are_short_data(module):
    lines = [ln for ln in (SRC / "archs" / f"{module}.py").read_text().splitlines() if ln.strip()]
    per_family = len(lines) / max(1, sum(1 for ln in lines if "register(Architecture(" in ln))
    assert per_family <= 60, f"archs/{module}.py: {per_family:.0f} lines per family"


def test_head_size_no_provider_can_run_is_refused_before_the_build(tmp_path):
    folder = write_random_llama(tmp_path / "ckpt", hidden=48, heads=4, kv_heads=2)  # head_dim 12
    with pytest.raises(ConfigError, match="multiple of 8"):
        onnxforge.build(folder, tmp_path / "out", "fp32")
    assert not (tmp_path / "out").exists()
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["hidden_size"] // cfg["num_attention_heads"] == 12
