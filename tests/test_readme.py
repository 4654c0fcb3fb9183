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
