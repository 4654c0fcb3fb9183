"""The README's commands run as written: the set-up lines name real files, the main job works."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def code_block_after(heading: str) -> list[str]:
    section = README.split(heading, 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]


def test_setup_commands_are_the_ci_commands():
    install, test = code_block_after("# onnxforge")[:2]
    ci = (ROOT / ".ci" / "run").read_text()
    assert install in ci.replace("python -m pip", "pip") and test in ci


def test_main_job_runs_as_written(tmp_path, smollm2_path):
    lines = code_block_after("## The main job")
    assert lines[0].startswith("onnxforge build --demo")
    bin_dir = Path(sys.executable).parent
    for line in lines:
        argv = shlex.split(line)
        argv[0] = str(bin_dir / argv[0]) if (bin_dir / argv[0]).exists() else argv[0]
        stdin = "Name one colour.\n/exit\n" if argv[1] == "chat" else None
        proc = subprocess.run(argv, cwd=tmp_path, input=stdin, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{line}\n{proc.stderr[-2000:]}"
        if argv[1] == "run":
            assert len(proc.stdout.strip()) > 10, proc.stdout
        if argv[1] == "chat":
            assert proc.stdout.strip(), proc.stdout
    assert (tmp_path / "smollm2-int4" / "model.onnx").is_file()


def code_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def test_python_blocks_run_as_written(tmp_path, smollm2_path):
    """Every Python block of the README runs unchanged in a fresh folder (the API snippet builds the demo)."""
    blocks = code_blocks("python")
    assert blocks, "the README has a Python API example"
    for block in blocks:
        proc = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, f"{block}\n{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr


def test_toml_blocks_are_valid_recipes():
    from onnxforge.quant.options import recipe_from_mapping
    from onnxforge.quant.recipe import Recipe
    import tomllib

    blocks = code_blocks("toml")
    assert blocks
    for block in blocks:
        recipe = recipe_from_mapping(tomllib.loads(block), Recipe())
        assert recipe.rules or recipe.precision != "fp32"


def test_command_lines_parse_with_the_real_parser():
    """Every `onnxforge ...` line in a bash block parses with the CLI's own parser (placeholders such as
    HF_DIR are filled with a path; lines showing a choice of values, {a,b} or [optional], are skipped)."""
    from onnxforge.cli import build_parser

    parser = build_parser()
    checked = 0
    for block in code_blocks("bash"):
        for line in block.splitlines():
            line = line.split("  #", 1)[0].strip()
            if not line.startswith("onnxforge "):
                continue
            if "{" in line or "[" in line:
                continue
            argv = [re.sub(r"\b[A-Z][A-Z0-9_]{2,}\b", "some/path", a) for a in shlex.split(line)[1:]]
            parser.parse_args(argv)  # argparse exits 2 on a flag the CLI does not have
            checked += 1
    assert checked >= 5
