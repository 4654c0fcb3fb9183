"""A strict, minimal reader of one safetensors file.

Tensors are read with positioned reads (`os.pread`) into fresh buffers rather than through a
memory map: pages of a map count towards the process's resident set for as long as the map
lives, while a read leaves them in the page cache only. The header is validated up front so a
lying length field, an offset past the end, overlapping ranges or an unknown dtype end in a
`CheckpointError` that names the file and the tensor, never in a crash or a huge allocation.
"""
from __future__ import annotations

import json
import os
import stat
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from ..errors import CheckpointError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    nbytes: int


class SafetensorsFile:
    """One .safetensors file: a validated header and positioned reads."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        try:  # O_NONBLOCK: opening a FIFO must not wait for a writer (regular files ignore the flag)
            self._fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as e:
            raise CheckpointError(f"cannot open {self.path}: {e.strerror}") from None
        try:
            st = os.fstat(self._fd)
            if not stat.S_ISREG(st.st_mode):
                raise CheckpointError(f"{self.path} is not a regular file (a folder, pipe or device); "
                                      "replace it with the safetensors file")
            self.file_size = st.st_size
            self.header_bytes, self.tensors, self.metadata = self._parse_header()
        except BaseException:
            os.close(self._fd)
            self._fd = -1  # else __del__ closes the number again, by then another file's
            raise

    def _fail(self, what: str) -> CheckpointError:
        return CheckpointError(
            f"{self.path.name}: {what}. The file is damaged or truncated: download or copy it again."
        )

    def _parse_header(self) -> tuple[bytes, dict[str, TensorInfo], dict[str, str]]:
        head = os.pread(self._fd, 8, 0)
        if len(head) < 8:
            raise self._fail("file is shorter than the 8-byte safetensors header length")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > MAX_HEADER_BYTES or 8 + n > self.file_size:
            raise self._fail(f"header length {n} does not fit the file ({self.file_size} bytes)")
        raw = os.pread(self._fd, n, 8)
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as e:
            raise self._fail(f"header is not valid UTF-8 JSON ({e})") from None
        if not isinstance(header, dict):
            raise self._fail("header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise self._fail("__metadata__ is not an object")
        data_start = 8 + n
        tensors = {name: self._tensor_info(name, entry, data_start) for name, entry in header.items()}
        _check_no_overlap(tensors, self._fail)
        return raw, tensors, metadata

    def _tensor_info(self, name: str, entry: object, data_start: int) -> TensorInfo:
        if not isinstance(entry, dict):
            raise self._fail(f"entry of tensor {name!r} is not an object")
        dtype = DTYPES.get(entry["dtype"]) if isinstance(entry.get("dtype"), str) else None
        if dtype is None:
            raise self._fail(f"tensor {name!r} has unsupported dtype {entry.get('dtype')!r}")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not _int_list(shape) or any(d < 0 for d in shape):
            raise self._fail(f"tensor {name!r} has an invalid shape {shape!r}")
        if not _int_list(offsets) or len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1]:
            raise self._fail(f"tensor {name!r} has invalid data_offsets {offsets!r}")
        count = 1
        for d in shape:
            count *= d
        nbytes = count * dtype.itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise self._fail(
                f"tensor {name!r}: shape {shape} of {entry['dtype']} needs {nbytes} bytes "
                f"but its data_offsets span {offsets[1] - offsets[0]}"
            )
        start = data_start + offsets[0]
        if start + nbytes > self.file_size:
            raise self._fail(f"tensor {name!r} ends at byte {start + nbytes}, past the end of the file ({self.file_size})")
        return TensorInfo(name, dtype, tuple(shape), start, nbytes)

    def read(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        buf = bytearray(info.nbytes)
        view, done = memoryview(buf), 0
        while done < info.nbytes:
            got = os.preadv(self._fd, [view[done:]], info.start + done)
            if got <= 0:
                raise self._fail(f"tensor {name!r} could not be read completely")
            done += got
        return np.frombuffer(buf, dtype=info.dtype).reshape(info.shape)

    def read_slice(self, name: str, index: int) -> np.ndarray:
        """`tensor[index]` along the first axis, reading only its bytes (one expert of a stacked tensor)."""
        info = self.tensors[name]
        if not info.shape or not 0 <= index < info.shape[0]:
            raise IndexError(f"{name}: index {index} is outside its first axis {info.shape[:1]}")
        return self.read_rows(name, index, index + 1).reshape(info.shape[1:])

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """`tensor[start:stop]` along the first axis, reading only those bytes (a slice of a large weight)."""
        info = self.tensors[name]
        if not info.shape or not 0 <= start <= stop <= info.shape[0]:
            raise IndexError(f"{name}: rows {start}:{stop} are outside its first axis {info.shape[:1]}")
        row = info.nbytes // info.shape[0] if info.shape[0] else 0
        size = (stop - start) * row
        buf = bytearray(size)
        view, done = memoryview(buf), 0
        while done < size:
            got = os.preadv(self._fd, [view[done:]], info.start + start * row + done)
            if got <= 0:
                raise self._fail(f"tensor {name!r} could not be read completely")
            done += got
        return np.frombuffer(buf, dtype=info.dtype).reshape((stop - start, *info.shape[1:]))

    def hash_into(self, digest, chunk: int = 16 << 20) -> None:
        """Feed the whole file (header and tensor data) to `digest`, `chunk` bytes per read."""
        offset = 0
        while offset < self.file_size:
            with self._lock:
                if self._fd < 0:
                    raise CheckpointError(f"{self.path} was closed while it was being hashed")
                data = os.pread(self._fd, min(chunk, self.file_size - offset), offset)
            if not data:
                raise self._fail(f"file ends at byte {offset}, before its size {self.file_size}")
            digest.update(data)
            offset += len(data)

    def close(self) -> None:
        with self._lock:  # not while hash_into (which may run in another thread) reads
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


def _int_list(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _check_no_overlap(tensors: dict[str, TensorInfo], fail) -> None:
    spans = sorted((t.start, t.start + t.nbytes, t.name) for t in tensors.values() if t.nbytes)
    for (s0, e0, n0), (s1, _e1, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise fail(f"tensors {n0!r} and {n1!r} overlap")
