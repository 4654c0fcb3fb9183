"""A Hugging Face checkpoint folder: config.json, safetensors shards, tokenizer files."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, ConfigError
from .base import NativeBlocks
from .safetensors_file import SafetensorsFile

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "consolidated.00.pth")


def read_json(path: Path, what: str) -> dict:
    """Parse a JSON object file, or raise ConfigError naming the file and the fix."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); fix or re-download the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


class HFSource:
    """A lazily opened Hugging Face folder; tensors are read one at a time."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path} is not a folder with a Hugging Face checkpoint")
        self.config = read_json(self.path / "config.json", "config.json")
        gen = self.path / "generation_config.json"
        self.generation_config = read_json(gen, "generation_config.json") if gen.is_file() else None
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}
        self._open_shards()

    def _shard_names(self) -> list[str]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_json(index, "model.safetensors.index.json").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index} has no weight_map; re-download the checkpoint")
            return sorted(set(weight_map.values()))
        shards = sorted(p.name for p in self.path.glob("*.safetensors"))
        if shards:
            return shards
        pickled = [n for n in PICKLE_FILES if (self.path / n).exists()]
        if pickled:
            raise CheckpointError(
                f"{self.path} holds only {pickled[0]} (a pickle file, which can run code when loaded, so "
                "onnxforge never reads it). Convert it to safetensors first, in an environment you trust: "
                "`python -c \"from transformers import AutoModelForCausalLM as M; "
                f"M.from_pretrained('{self.path}').save_pretrained('OUT', safe_serialization=True)\"`"
            )
        raise CheckpointError(f"no *.safetensors weights in {self.path}")

    def _open_shards(self) -> None:
        for shard in self._shard_names():
            if Path(shard).name != shard:
                raise CheckpointError(f"shard name {shard!r} in the index is not a plain file name")
            f = self._files[shard] = SafetensorsFile(self.path / shard)
            for name in f.tensors:
                if name in self._where:
                    raise CheckpointError(f"tensor {name!r} appears in both {self._where[name]} and {shard}")
                self._where[name] = shard

    def tensor_names(self) -> list[str]:
        return list(self._where)

    def has(self, name: str) -> bool:
        return name in self._where

    def _info(self, name: str):
        shard = self._where.get(name)
        if shard is None:
            raise CheckpointError(
                f"tensor {name!r} is missing from the checkpoint in {self.path}; "
                "the download may be incomplete, or the config does not match the weights"
            )
        return self._files[shard], self._files[shard].tensors[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info(name)[1].shape

    def read(self, name: str) -> np.ndarray:
        f, _ = self._info(name)
        return f.read(name)

    def native_blocks(self, name: str, bits: int, block_size: int) -> NativeBlocks | None:
        return None

    def write_tokenizer(self, out_dir: Path) -> list[str]:
        written = []
        for fname in TOKENIZER_FILES:
            src = self.path / fname
            if not src.is_file():
                continue
            if src.is_symlink() and not _inside(src.resolve(), self.path.resolve()):
                raise CheckpointError(f"{src} is a link that points out of the checkpoint folder; copy the real file in")
            shutil.copyfile(src, out_dir / fname)
            written.append(fname)
        return written

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps(self.config, sort_keys=True).encode())
        for shard, f in sorted(self._files.items()):
            h.update(shard.encode())
            h.update(f.header_bytes)
            h.update(str(f.file_size).encode())
        return h.hexdigest()

    def close(self) -> None:
        for f in self._files.values():
            f.close()


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False
