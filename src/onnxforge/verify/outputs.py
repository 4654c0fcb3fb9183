"""verify.json and verify.png, written after the results are complete.

A file that cannot be written (a read-only folder, a full disk) does not lose the results: the failure is
recorded in result["write_error"], `onnxforge verify` prints its table and verdict first, then that one line,
and exits 2 (the verdict stays in the printed table; the files it promised are missing).
"""
from __future__ import annotations

import json
from pathlib import Path


def write_outputs(result: dict, out_dir: Path, *, write: bool = True, plot: bool = True) -> None:
    """Write verify.json (`write`) and verify.png (`plot`); sets json_path, plot_path, plot_note, write_error."""
    failed = []
    if write:
        path = Path(out_dir) / "verify.json"
        try:
            path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
            result["json_path"] = str(path)
        except OSError as e:
            failed.append(f"{path} ({e.strerror or e})")
    if plot:
        from .plot import plot_verify

        path = Path(out_dir) / "verify.png"
        try:
            plot_verify(result, path)
            result["plot_path"] = str(path)
        except ImportError:  # matplotlib is optional
            result["plot_note"] = "no verify.png: matplotlib is not installed (pip install matplotlib)"
        except OSError as e:
            failed.append(f"{path} ({e.strerror or e})")
    if failed:
        result["write_error"] = (f"the results above are complete, but {' and '.join(failed)} could not be written; "
                                 "make the model folder writable (or free some space) and run verify again")
