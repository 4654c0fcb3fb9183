"""Hugging Face Hub IDs: `org/name[@revision]` and `org/name[@revision]:FILE.gguf`.

Only what a build reads is downloaded, through huggingface_hub, into the standard Hugging Face cache (HF_HOME,
HF_HUB_CACHE, or `-c`): config.json, generation_config.json, the safetensors index and the shards it names (or
the top-level *.safetensors), the tokenizer files and the chat template; never *.bin, never code. A GGUF repository
gives the one .gguf file named after `:`, or its only one. huggingface_hub resumes an interrupted download from
its .incomplete blob, shows a progress bar, and honours HF_TOKEN, HF_ENDPOINT and HF_HUB_OFFLINE (a cached copy
is used without the network). Each failure is one CheckpointError line.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError
from .hf import TOKENIZER_FILES

# org/name, then @revision (a branch, tag or commit; may hold '/': refs/pr/1), then :file.gguf
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[^:@\s]+))?"
                    r"(?::(?P<file>[^:\s]+))?$")
CONFIG_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class HubRef:
    repo: str
    revision: str | None = None  # None: the repository's default branch
    filename: str | None = None  # a .gguf file inside the repository

    def __str__(self) -> str:
        return self.repo + (f"@{self.revision}" if self.revision else "") + (f":{self.filename}" if self.filename else "")


def parse_hub_id(text: str) -> HubRef | None:
    """A HubRef when `text` is spelled as a Hub ID (a local path of that spelling is the caller's to prefer), else None.
    A bare name ending in .gguf or .safetensors is a missing local file, not a repository."""
    m = HUB_ID.match(str(text))
    if m is None or ".." in m.group("repo") or m.group("repo").lower().endswith((".gguf", ".safetensors")):
        return None
    if m.group("file") is not None and not m.group("file").lower().endswith(".gguf"):
        return None
    return HubRef(m.group("repo"), m.group("rev"), m.group("file"))


def download(ref: HubRef, *, token: str | bool | None = None, cache_dir: str | Path | None = None,
             progress: bool = True) -> Path:
    """The local path of what `ref` names (a snapshot folder, or the .gguf file in it), downloading what is missing."""
    hub = _hub()
    revision = ref.revision or "main"
    try:
        info = hub.HfApi(token=token).model_info(ref.repo, revision=revision)
    except Exception as e:  # noqa: BLE001 - mapped below to one line, or re-raised
        if not _unreachable(hub, e):
            raise _error(hub, ref, e, token) from None
        return _cached(hub, ref, cache_dir, e)
    names = [s.rfilename for s in info.siblings or []]
    files = choose_files(ref, names)

    def fetch(patterns: list[str]) -> Path:
        try:
            return Path(hub.snapshot_download(ref.repo, revision=revision, allow_patterns=patterns, token=token,
                                              cache_dir=cache_dir, tqdm_class=None if progress else _Silent))
        except Exception as e:  # noqa: BLE001
            raise _error(hub, ref, e, token) from None

    folder = fetch(files)
    if ref.filename or any(n.endswith(".gguf") for n in files):
        return folder / files[0]
    shards = shard_names(folder, names)
    if shards:
        folder = fetch(shards)
    return folder


def choose_files(ref: HubRef, names: list[str]) -> list[str]:
    """What a build reads of a repository holding `names`: a GGUF file, or the HF checkpoint's files (shards later)."""
    ggufs = sorted(n for n in names if n.lower().endswith(".gguf"))
    if ref.filename:
        if ref.filename not in names:
            raise CheckpointError(f"{ref.repo} has no file {ref.filename}" + (
                f"; its .gguf files: {', '.join(ggufs)}" if ggufs else "; it has no .gguf file"))
        return [ref.filename]
    top = [n for n in names if "/" not in n]
    if "config.json" in top and any(n.endswith(".safetensors") for n in top):
        return [n for n in top if n in CONFIG_FILES or n in TOKENIZER_FILES]
    if len(ggufs) == 1:
        return ggufs
    if ggufs:
        shown = ", ".join(ggufs[:20]) + (f" and {len(ggufs) - 20} more" if len(ggufs) > 20 else "")
        raise CheckpointError(f"{ref.repo} holds {len(ggufs)} .gguf files; name one as {ref.repo}:FILE.gguf "
                              f"(one of: {shown})")
    if "config.json" in top and any(n.endswith((".bin", ".pt", ".pth")) for n in top):
        raise CheckpointError(f"{ref.repo} has only pickle weights (*.bin/*.pt), which can run code when loaded, so "
                              "onnxforge never downloads or reads them; use a repository with *.safetensors weights")
    raise CheckpointError(f"{ref.repo} has neither config.json with *.safetensors weights nor a .gguf file; "
                          "it is not a checkpoint onnxforge can build")


def shard_names(folder: Path, names: list[str]) -> list[str]:
    """The shards to download: those the index names (never a stray consolidated.safetensors), else the top level's."""
    if (folder / INDEX).is_file():
        try:
            weight_map = json.loads((folder / INDEX).read_text(encoding="utf-8")).get("weight_map") or {}
        except (OSError, ValueError, AttributeError):
            return []  # HFSource names the damaged index
        return sorted({s for s in weight_map.values() if isinstance(s, str) and "/" not in s and s in names})
    return [n for n in names if "/" not in n and n.endswith(".safetensors")]


def _cached(hub, ref: HubRef, cache_dir, why: Exception) -> Path:
    """Without the network (HF_HUB_OFFLINE, or none): the cached snapshot, when it has what a build reads."""
    revision = ref.revision or "main"
    pattern = [ref.filename] if ref.filename else ["config.json"]
    try:
        folder = Path(hub.snapshot_download(ref.repo, revision=revision, allow_patterns=pattern,
                                            cache_dir=cache_dir, local_files_only=True))
    except Exception:  # noqa: BLE001
        folder = None
    offline = isinstance(why, hub.errors.OfflineModeIsEnabled)
    reason = ("HF_HUB_OFFLINE is set" if offline else
              f"the Hub ({hub.constants.ENDPOINT}) cannot be reached ({type(why).__name__}: {_first_line(why)})")
    if folder is None:
        raise CheckpointError(f"{ref} is not a local file or folder, {reason}, and it is not in the Hugging Face "
                              f"cache ({cache_dir or hub.constants.HF_HUB_CACHE}); connect (check HF_ENDPOINT and "
                              "HF_HUB_OFFLINE) or pass a local folder")
    if ref.filename:
        return folder / ref.filename
    if not (folder / "config.json").is_file():
        ggufs = sorted(p.name for p in folder.glob("*.gguf"))
        if len(ggufs) == 1:
            return folder / ggufs[0]
    shards = shard_names(folder, [p.name for p in folder.iterdir()])
    if not shards or not all((folder / s).is_file() for s in shards):
        raise CheckpointError(f"the cached copy of {ref} in {folder} is incomplete and {reason}; connect and run "
                              "again to finish the download (it resumes)")
    return folder


def _unreachable(hub, e: Exception) -> bool:
    import httpx2

    return isinstance(e, (hub.errors.OfflineModeIsEnabled, httpx2.TransportError, ConnectionError, TimeoutError))


def _error(hub, ref: HubRef, e: Exception, token) -> Exception:
    """One line for what the Hub answered."""
    errors = hub.errors
    where = hub.constants.ENDPOINT
    if isinstance(e, errors.GatedRepoError):
        if token is False or (token is None and hub.get_token() is None):
            return CheckpointError(f"{ref.repo} is a gated repository and no Hugging Face token is set: accept its "
                                   f"terms at {where}/{ref.repo}, then set HF_TOKEN (or `hf auth login`, or "
                                   "--extra_options hf_token=TOKEN)")
        return CheckpointError(f"{ref.repo} is a gated repository and the token given has no access: accept its "
                               f"terms at {where}/{ref.repo} with that account")
    if isinstance(e, errors.RevisionNotFoundError):
        return CheckpointError(f"{ref.repo} has no revision {ref.revision!r} (a branch, tag or commit) on {where}; "
                               "check the name after @")
    if isinstance(e, errors.RepositoryNotFoundError):
        return CheckpointError(f"{ref} is neither a local file or folder nor a repository on {where} (a private one "
                               "needs HF_TOKEN); check the spelling")
    if isinstance(e, errors.HfHubHTTPError) and getattr(e.response, "status_code", None) in (401, 403):
        return CheckpointError(f"{where} refused {ref.repo} ({e.response.status_code}); check HF_TOKEN")
    if isinstance(e, errors.HfHubHTTPError) or _unreachable(hub, e):
        return CheckpointError(f"downloading {ref} from {where} failed ({type(e).__name__}: {_first_line(e)}); "
                               "run again to resume, or pass a local folder")
    if isinstance(e, OSError):
        return CheckpointError(f"cannot write the Hugging Face cache for {ref}: {e.strerror or e}; set HF_HOME "
                               "(or -c) to a writable folder with room")
    return e


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def _hub():
    try:
        import huggingface_hub
        import huggingface_hub.errors  # noqa: F401
    except ImportError:  # a dependency; only a broken install lacks it
        raise CheckpointError("huggingface_hub is not installed; `pip install huggingface_hub`, or pass a local "
                              "folder") from None
    return huggingface_hub


class _Silent:  # tqdm_class for --quiet: huggingface_hub's bars, not shown
    def __new__(cls, *args, **kwargs):
        from tqdm.auto import tqdm

        kwargs["disable"] = True
        return tqdm(*args, **kwargs)
