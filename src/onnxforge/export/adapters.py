"""Each LoRA adapter of a build as an onnxruntime adapter file (NAME.onnx_adapter), written by onnxruntime's own
AdapterFormat: per branch the graph has (graph/lora.py), A transposed (in, r) and scale * B transposed (r, out), in
the model's activation dtype, named as the graph's inputs. `og.Adapters(model).load(file, NAME)` reads it."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import OutputError
from ..graph.lora import LoraSet
from ..quant.storage import Storage
from .output import ADAPTER_SUFFIX


def adapter_file(name: str) -> str:
    return name + ADAPTER_SUFFIX


def write_adapters(folder: Path, lora: LoraSet, io: Storage) -> list[str]:
    """Write every adapter of `lora` into `folder`; returns the file names."""
    return [_write_one(folder, adapter, lora, io) for adapter in lora.adapters]


def _write_one(folder: Path, adapter, lora: LoraSet, io: Storage) -> str:
    import onnxruntime as ort

    arrays: dict[str, np.ndarray] = {}
    for p in lora.placed:
        if p.module not in adapter.modules:
            continue  # this adapter leaves the projection alone: its inputs keep their empty default
        a, b = adapter.lora_pair(p.module, p.rows)
        arrays[f"{p.prefix}.lora_A.weight"] = np.ascontiguousarray(a.T.astype(io.np_dtype))
        arrays[f"{p.prefix}.lora_B.weight"] = np.ascontiguousarray(b.T.astype(io.np_dtype))
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({name: _ort_value(ort, arr) for name, arr in arrays.items()})  # views: arrays stay alive
    name = adapter_file(adapter.name)
    try:
        fmt.export_adapter(str(folder / name))
    except RuntimeError as e:
        raise OutputError(f"cannot write {name}: {e}") from None
    return name


def _ort_value(ort, arr: np.ndarray):
    if arr.dtype.itemsize == 2 and arr.dtype != np.float16:  # ml_dtypes.bfloat16: onnxruntime takes its bits
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(arr.view(np.uint16), 16)
    return ort.OrtValue.ortvalue_from_numpy(arr)
