"""A Hugging Face checkpoint folder: config.json, safetensors shards, tokenizer files."""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, ConfigError, OutputError
from .base import NativeBlocks
from .safetensors_file import DTYPES, SafetensorsFile

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
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
SCALED_DTYPES = ("F8_E4M3", "F8_E5M2")  # floats that mean nothing without their scales (and a rule to apply them)
MAX_JSON_BYTES = 64 << 20  # config and index files are kilobytes; a huge one is damaged, not read whole
HASH_CHUNK = 16 << 20  # the input fingerprint streams the shards in 16 MB reads
GENERATION_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def read_json(path: Path, what: str) -> dict:
    """Parse a JSON object file, or raise ConfigError naming the file and the fix."""
    if not path.exists():
        raise ConfigError(f"{what} not found: {path}")
    if not path.is_file():  # a folder, a FIFO (reading one would block forever), a device
        raise ConfigError(f"{path} is not a regular file; replace it with the checkpoint's {what}")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise ConfigError(f"{path} is {path.stat().st_size} bytes, far too large for {what}; the file is damaged")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); fix or re-download the file") from None
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def _check_generation_config(gen: dict, path: Path) -> dict:
    """Values copied into genai_config.json must be what its reader accepts (no NaN, ids are ints)."""

    from ..spec import token_ids

    gen = dict(gen)
    for key in GENERATION_TOKEN_KEYS:
        if key in gen:
            gen[key] = token_ids(gen[key], key, str(path))
    for key, v in gen.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{path}: {key} must be a finite number, got {v!r}")
    return gen


class HFSource:
    """A lazily opened Hugging Face folder; tensors are read one at a time."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path} is not a folder with a Hugging Face checkpoint")
        self.config = read_json(self.path / "config.json", "config.json")
        gen = self.path / "generation_config.json"
        self.generation_config = (_check_generation_config(read_json(gen, "generation_config.json"), gen)
                                  if gen.exists() else None)
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}
        self._open_shards()
        if not self.config.get("quantization_config"):  # with one, sources/prequant.py judges the dtypes
            try:
                refuse_scaled_tensors(self, "config.json has no quantization_config saying how to apply them")
            except BaseException:
                self.close()
                raise

    def _shard_names(self) -> list[str]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_json(index, "model.safetensors.index.json").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index} has no weight_map; re-download the checkpoint")
            for shard in weight_map.values():
                if not isinstance(shard, str) or shard in ("", ".", "..") or Path(shard).name != shard:
                    raise CheckpointError(
                        f"shard name {shard!r} in {index.name} is not a plain file name in the checkpoint folder; "
                        "the index is damaged or malicious"
                    )
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
        f, info = self._info(name)
        if info.dtype not in _FLOAT_NP:
            raise CheckpointError(
                f"tensor {name!r} in {f.path.name} is stored as {info.dtype}, not as floats; this looks like a "
                "pre-quantized checkpoint (bitsandbytes, GPTQ, AWQ...). Build from the original float checkpoint."
            )
        return f.read(name)

    def read_slice(self, name: str, index: int, *, raw: bool = False) -> np.ndarray:
        """`tensor[index]` along the first axis (one expert of a stacked tensor), reading only its bytes;
        `raw` allows integer tensors (MXFP4 blocks and scales)."""
        f, info = self._info(name)
        if not raw and info.dtype not in _FLOAT_NP:
            self.read(name)  # raises, naming the pre-quantized checkpoint
        return f.read_slice(name, index)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """`tensor[start:stop]` along the first axis, reading only those bytes (a large weight in slices)."""
        f, info = self._info(name)
        if info.dtype not in _FLOAT_NP:
            self.read(name)  # raises, naming the pre-quantized checkpoint
        return f.read_rows(name, start, stop)

    def native_blocks(self, name: str, bits: int, block_size: int) -> NativeBlocks | None:
        return None

    def _tokenizer_files(self) -> list[tuple[str, Path]]:
        """(name, path) of the tokenizer files present; a link out of the checkpoint is an error.

        The names are a fixed list (never taken from the checkpoint's own files), and the copies land
        directly in the output folder. A link may point into the folder, or, for a Hugging Face hub
        cache snapshot (`models--X/snapshots/REV/f -> ../../blobs/SHA`), into the same repo's blobs.
        """
        found = []
        folder = self.path.resolve()
        allowed = [folder]
        if folder.parent.name == "snapshots":
            allowed.append(folder.parent.parent / "blobs")
        for fname in TOKENIZER_FILES:
            src = self.path / fname
            if not (src.is_symlink() or src.exists()):
                continue
            if src.is_symlink() and not any(_inside(src.resolve(), a) for a in allowed):
                raise CheckpointError(
                    f"{src} is a link that points out of the checkpoint folder (to {src.resolve()}); onnxforge "
                    "copies tokenizer files into the output and will not follow it: copy the real file in"
                )
            if src.is_file():
                found.append((fname, src))
        return found

    def write_tokenizer(self, out_dir: Path) -> list[str]:
        written = []
        for fname, src in self._tokenizer_files():
            try:
                shutil.copyfile(src, out_dir / fname)
            except OSError as e:
                raise OutputError(f"cannot copy {fname} into {out_dir}: {e.strerror}") from None
            written.append(fname)
        return written

    def fingerprint(self) -> str:
        """SHA-256 of config.json, generation_config.json, the tokenizer files and every shard's
        bytes (header and tensor data, streamed in 16 MB reads)."""
        h = hashlib.sha256(b"onnxforge-hf-fingerprint-v2")
        h.update(json.dumps(self.config, sort_keys=True).encode())
        h.update(json.dumps(self.generation_config, sort_keys=True).encode())
        for fname, src in self._tokenizer_files():
            h.update(f"\0{fname}\0{src.stat().st_size}\0".encode())
            with open(src, "rb") as fh:
                for chunk in iter(lambda: fh.read(HASH_CHUNK), b""):
                    h.update(chunk)
        for shard, f in sorted(self._files.items()):
            h.update(f"\0{shard}\0{f.file_size}\0".encode())
            f.hash_into(h, HASH_CHUNK)
        return h.hexdigest()

    def close(self) -> None:
        for f in self._files.values():
            f.close()


_FLOAT_NP = tuple(DTYPES[k] for k in FLOAT_DTYPES)
_SCALED_NP = tuple(DTYPES[k] for k in SCALED_DTYPES)
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def needs_scales(name: str, shape: tuple[int, ...], dtype: np.dtype) -> bool:
    """FP8 tensors, and integer weight matrices: stored values that need scales to mean a weight."""
    return dtype in _SCALED_NP or (dtype.kind in "iu" and name.endswith(".weight") and len(shape) >= 2)


def refuse_scaled_tensors(source: "HFSource", why: str, skip: frozenset[str] | set[str] = frozenset()) -> None:
    """Raise CheckpointError, before any weight is read, naming the first tensor stored in a form that needs
    scales (FP8, integer weights; those in `skip` are accounted for) and what is missing (`why`), with any
    scale tensors found beside it."""
    found = [(n, f, f.tensors[n]) for n, f in ((n, source._files[s]) for n, s in source._where.items())
             if n not in skip and needs_scales(n, f.tensors[n].shape, f.tensors[n].dtype)]
    if not found:
        return
    name, f, info = found[0]
    module = name.rsplit(".", 1)[0] + "."
    beside = [n for n in source._where if n.startswith(module) and n != name and n.count(".") == name.count(".")
              and not n.endswith(".bias")]
    more = f" (and {len(found) - 1} more tensors like it)" if len(found) > 1 else ""
    scales = (f"; the checkpoint has {', '.join(beside[:3])} beside it" if beside else
              "; the checkpoint has no scale tensor beside it")
    stored = f"{info.dtype} (safetensors {_DTYPE_NAMES.get(info.dtype)})"
    raise CheckpointError(
        f"tensor {name!r} in {f.path.name} is stored as {stored}{more}, a pre-quantized form that needs "
        f"scales: {why}{scales}. Reading it as plain values would build a wrong model; build from the original "
        "float (bf16/fp16/fp32) checkpoint instead")


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False
