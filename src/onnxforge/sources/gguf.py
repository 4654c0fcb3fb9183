"""GGUF checkpoints (llama.cpp) presented in Hugging Face terms.

`GGUFSource` reads a `.gguf` file through `gguf.GGUFReader` (memory-mapped; nothing is loaded up
front) and speaks like a transformers checkpoint: `config` is the config.json dict transformers
would build, tensor names/shapes are the state-dict ones, `read()` dequantizes one tensor on the
fly with `gguf.quants.dequantize`, and Q/K rows that llama.cpp's converter permuted for its rotary
layout are put back (as transformers' `LlamaTensorProcessor` does). Weights of the linear block types
(Q4_0 ... Q8_0, Q2_K ... Q6_K) are handed over exactly as MatMulNBits blocks (`native_blocks`,
gguf_blocks.py); codebook and ternary types are dequantized.
"""
from __future__ import annotations

import fnmatch
import hashlib
import importlib.metadata
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, GGUFValueType
from gguf.constants import GGML_QUANT_SIZES
from gguf.gguf_reader import ReaderTensor
from gguf.quants import dequantize

from ..errors import CheckpointError, ConfigError, OnnxForgeError, OutputError, UnsupportedArchitectureError
from .base import NativeBlocks, NativeFormat
from .gguf_blocks import Transcoded, block_form, split_blocks, transcode
from .gguf_maps import (AUXILIARY_TENSORS, FAMILIES, UNFAITHFUL, GGUFFamily, View, compile_tensor_map,
                        hf_tensor_name, permuted_heads)
from .gguf_tokenizer import build_tokenizer

GGUF_MAGIC = b"GGUF"

SUPPORTED_TYPES: frozenset[QT] = frozenset({
    QT.F32, QT.F16, QT.BF16,
    QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0,
    QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K,
    QT.IQ4_NL, QT.IQ4_XS, QT.IQ3_S, QT.IQ3_XXS, QT.IQ2_S, QT.IQ2_XS, QT.IQ2_XXS, QT.IQ1_S, QT.IQ1_M,
    QT.TQ1_0, QT.TQ2_0,
    QT.MXFP4,  # gpt-oss's experts (E8M0 scale + 16 bytes of E2M1 per 32 values), dequantized by gguf-py
})

# Bytes of each tensor's data folded into the fingerprint (besides the whole header).
_FINGERPRINT_SAMPLE = 4096

_LONGROPE_TENSORS = ("rope_factors_long.weight", "rope_factors_short.weight")

# Metadata arrays longer than this are read on demand (vocabularies), not kept in `_meta`.
_MAX_EAGER_ARRAY = 1024


class GGUFSource:
    """A GGUF file as a `Source`: HF config, HF tensor names, float32 reads, MatMulNBits blocks."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._reader: GGUFReader | None = _open_reader(self.path)
        try:
            self._meta = _metadata(self._reader)
            self._arch = str(self._meta.get("general.architecture", ""))
            self._family = _family(self._arch, self.path)
            self._tensors = self._map_tensors()
            self._views: dict[str, View] = {}
            self.config = self._build_config()
            self._apply_views()
            self.generation_config = self._build_generation_config()
        except OnnxForgeError:
            self.close()
            raise
        except Exception as err:  # malformed metadata values must not surface as raw errors
            self.close()
            raise CheckpointError(f"{self.path} has malformed GGUF metadata ({err!r}); re-convert the file.") from err

    # ----------------------------------------------------------------- Source protocol

    def tensor_names(self) -> list[str]:
        """HF state-dict names of the weights in the file (no `lm_head.weight` when tied)."""
        return list(self._tensors)

    def has(self, name: str) -> bool:
        """Whether the file holds the HF tensor `name`."""
        return name in self._tensors

    def shape(self, name: str) -> tuple[int, ...]:
        """HF shape of `name` ((out, in) for Linear weights; GGUF stores the dims reversed)."""
        return self._shape(name, self._tensor(name))

    # Linear weights with one output row: llama.cpp's quantizer writes them 1-D (ggml_n_dims drops a trailing 1),
    # the converter (and transformers) 2-D
    _ONE_ROW = ("*.mlp.shared_expert_gate.weight",)

    def _shape(self, name: str, tensor: ReaderTensor) -> tuple[int, ...]:
        view = self._views.get(name)
        if view is not None:
            return self._view_shape(view, _hf_shape(tensor))
        shape = _hf_shape(tensor)
        if len(shape) == 1 and any(fnmatch.fnmatchcase(name, p) for p in self._ONE_ROW):
            return (1, *shape)
        return shape

    def read(self, name: str) -> np.ndarray:
        """`name` as a float32 array in HF layout, dequantized and Q/K-unpermuted."""
        tensor = self._tensor(name)
        try:
            view = self._views.get(name)
            if view is not None:
                return self._read_view(view, tensor)
            values = _dequantize(tensor.data, tensor.tensor_type).reshape(self._shape(name, tensor))
            offset = self._family.offset(name)
            if offset:  # e.g. Gemma's converter stores norm weights + 1; HF stores them as they are
                values = values - np.float32(offset)
            perm = self._row_permutation(name, values.shape[0])
            return np.ascontiguousarray(values[perm] if perm is not None else values)
        except OnnxForgeError:
            raise
        except Exception as err:  # a raw numpy/gguf error must not escape
            raise CheckpointError(
                f"cannot read tensor {tensor.name!r} ({name}, {tensor.tensor_type.name}) from {self.path}: {err}. "
                "The file may be corrupt: re-download or re-convert it."
            ) from err

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """`read(name)[start:stop]` for a 2-D tensor, dequantizing only those rows of the memory map (a
        70B model's 1-billion-value lm_head never exists whole in float32). GGUF stores each row's blocks
        together, so a row slice is a byte slice; Q/K rows permuted for llama.cpp's rotary are gathered."""
        tensor = self._tensor(name)
        shape = _hf_shape(tensor)
        view = self._views.get(name)
        if len(shape) != 2 or (view is not None and (view.cols is not None or view.value or view.shape or view.parts)):
            return self.read(name)[start:stop]
        try:
            perm = self._row_permutation(name, shape[0])
            rows = perm[start:stop] if perm is not None else slice(start, stop)
            values = _dequantize(tensor.data[rows], tensor.tensor_type).reshape(-1, shape[1])
            offset = self._family.offset(name)
            return np.ascontiguousarray(values - np.float32(offset) if offset else values)
        except OnnxForgeError:
            raise
        except Exception as err:  # a raw numpy/gguf error must not escape
            raise CheckpointError(
                f"cannot read rows {start}:{stop} of tensor {tensor.name!r} ({name}, {tensor.tensor_type.name}) "
                f"from {self.path}: {err}. The file may be corrupt: re-download or re-convert it."
            ) from err

    def read_slice(self, name: str, index: int, *, raw: bool = False) -> np.ndarray:
        """`name[index]` along its first axis (one expert of a stacked `*_exps` tensor), dequantizing only
        its rows; a tensor whose rows are permuted or offset is read whole."""
        tensor = self._tensor(name)
        shape = _hf_shape(tensor)
        if (len(shape) < 3 or self._row_permutation(name, shape[0]) is not None or self._family.offset(name)
                or name in self._views):
            return self.read(name)[index]
        try:
            return np.ascontiguousarray(_dequantize(tensor.data[index], tensor.tensor_type).reshape(shape[1:]))
        except Exception as err:  # a raw numpy/gguf error must not escape
            raise CheckpointError(f"cannot read expert {index} of {tensor.name!r} ({name}) from {self.path}: {err}. "
                                  "The file may be corrupt: re-download or re-convert it.") from err

    def stored_format(self, name: str) -> str:
        """The tensor's GGUF type name ("Q4_K", "F16", ...)."""
        return self._tensor(name).tensor_type.name

    def mxfp4_blocks(self, name: str, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Expert `index` of an MXFP4 tensor as a Hugging Face GPT-OSS checkpoint stores it: codes (N, K/32, 16),
        value 2k in the low nibble of byte k and 2k + 1 in the high one, and the E8M0 scales (N, K/32).
        ggml's block is the scale byte, then 16 bytes holding value j low and j + 16 high (the converter's
        repacking, undone: the same codes and scales)."""
        tensor = self._tensor(name)
        if tensor.tensor_type != QT.MXFP4 or len(tensor.shape) != 3:
            raise CheckpointError(f"{tensor.name!r} ({name}) is {tensor.tensor_type.name}, not stacked MXFP4 experts")
        n = _hf_shape(tensor)[1]
        raw = np.asarray(tensor.data[index], dtype=np.uint8).reshape(n, -1, 17)
        qs = raw[..., 1:]
        values = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # (N, K/32, 32) in order
        return np.ascontiguousarray(values[..., 0::2] | (values[..., 1::2] << 4)), np.ascontiguousarray(raw[..., 0])

    def native_format(self, name: str) -> NativeFormat | None:
        """How `name` maps onto MatMulNBits without changing a value (None for float tensors;
        bits 0 for quantized types that have no such form: codebooks, ternary)."""
        tensor = self._tensor(name)
        kind = tensor.tensor_type
        view = self._views.get(name)
        if view is not None and view.parts:  # joined from several tensors: dequantized (float where all are)
            kinds = {self._stored[p.source].tensor_type for p in view.parts}
            return None if kinds <= {QT.F32, QT.F16, QT.BF16} else NativeFormat(
                "/".join(sorted(k.name for k in kinds)), 0, 0, False, False)
        if kind in (QT.F32, QT.F16, QT.BF16):
            return None
        form = block_form(kind)
        if (form is None or len(tensor.shape) not in (2, 3) or (len(tensor.shape) == 3 and not self._plain_slices(name))
                or (view is not None and (view.value or view.shape
                                          or _block_order(view.cols, form.block_size) is False))):
            # values changed, or columns moved within blocks: dequantized
            return NativeFormat(kind.name, 0, 0, False, False)
        # stacked experts (3-D): the same blocks, one expert at a time (read_expert_blocks), for QMoE
        return NativeFormat(kind.name, form.bits, self._block_size(name, form.block_size), form.zero_points,
                            form.offsets, form.code_bits)

    def _plain_slices(self, name: str) -> bool:
        """Whether expert slices of a stacked tensor are its stored rows as they are (no permutation, no offset)."""
        shape = self.shape(name)
        return (self._row_permutation(name, shape[0]) is None and not self._family.offset(name)
                and name not in self._views)

    def read_expert_blocks(self, name: str, index: int) -> NativeBlocks | None:
        """Expert `index` of a stacked block-quantized tensor (E, N, K) as the exact arrays of its own block
        form (gguf_blocks.py: codes against the default zero point, scales, offsets for types with a
        minimum), reading only that expert's bytes; None where the type has no such form."""
        fmt = self.native_format(name)
        tensor = self._tensor(name)
        if fmt is None or not fmt.bits or len(tensor.shape) != 3:
            return None
        kind = tensor.tensor_type
        _, n_rows, n_cols = _hf_shape(tensor)
        try:
            elements, _ = GGML_QUANT_SIZES[kind]
            raw = np.asarray(tensor.data[index], dtype=np.uint8).reshape(n_rows, n_cols // elements, -1)
            t = transcode(raw, kind)
        except OnnxForgeError:
            raise
        except Exception as err:  # a raw numpy error must not escape
            raise CheckpointError(f"cannot repack expert {index} of {tensor.name!r} ({name}, {kind.name}) from "
                                  f"{self.path}: {err}. The file may be corrupt: re-download or re-convert it.") from err
        return NativeBlocks(t.data, t.scales, t.zero_points, fmt.bits, fmt.block_size, kind.name, t.offsets)

    # The lm_head's blocks are split to 16 (the same weight, each scale twice): at accuracy_level 4
    # MatMulNBits quantizes the activations to int8 per block, and the logits are where that error
    # shows most. Measured on SmolLM2's Q8_0 head: perplexity +0.31% -> +0.27% of fp32 (llama.cpp
    # +0.25%) for about 2% of decode speed (bench/prequant.py).
    HEAD_BLOCK = 16

    def _block_size(self, name: str, block_size: int) -> int:
        head = "lm_head.weight" if "lm_head.weight" in self._tensors else "model.embed_tokens.weight"
        return min(block_size, self.HEAD_BLOCK) if name == head else block_size

    def native_blocks(self, name: str, bits: int, block_size: int) -> NativeBlocks | None:
        """The exact MatMulNBits arrays of a block-quantized weight whose native form is (bits,
        block_size) (see gguf_blocks.py), rows un-permuted like `read()`; None otherwise."""
        fmt = self.native_format(name)
        if fmt is None or (fmt.bits, fmt.block_size) != (bits, block_size) or len(self._tensor(name).shape) != 2:
            return None  # stacked experts: read_expert_blocks
        tensor = self._tensor(name)
        kind = tensor.tensor_type
        n_rows, n_cols = _hf_shape(tensor)
        try:
            elements, _ = GGML_QUANT_SIZES[kind]
            raw = np.asarray(tensor.data, dtype=np.uint8).reshape(n_rows, n_cols // elements, -1)
            perm = self._row_permutation(name, n_rows)
            if perm is not None:
                raw = raw[perm]
            form = block_form(kind)
            t = transcode(raw, kind)
            view = self._views.get(name)
            blocks = _block_order(view.cols, form.block_size) if view is not None else None
            if blocks is not None:  # columns moved in whole blocks of the op's form (a K type's sub-blocks): they move
                t = Transcoded(np.ascontiguousarray(t.data[:, blocks]), np.ascontiguousarray(t.scales[:, blocks]),
                               t.zero_points,  # the default zero point in every block: unmoved
                               None if t.offsets is None else np.ascontiguousarray(t.offsets[:, blocks]))
            t = split_blocks(t, form.bits, form.block_size, block_size)
        except OnnxForgeError:
            raise
        except Exception as err:  # a raw numpy error must not escape
            raise CheckpointError(
                f"cannot repack {tensor.name!r} ({name}, {kind.name}) from {self.path}: {err}."
            ) from err
        return NativeBlocks(t.data, t.scales, t.zero_points, bits, block_size, kind.name, t.offsets)

    def write_tokenizer(self, out_dir: Path) -> list[str]:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json; return their names."""
        meta = {key: self._field(key) for key in self._field_names() if key.startswith("tokenizer.")}
        try:
            tokenizer, config, special = build_tokenizer(meta, self.config.get("max_position_embeddings"))
        except OnnxForgeError:
            raise
        except Exception as err:  # a tokenizers error on odd metadata must not escape raw
            raise CheckpointError(f"cannot build a tokenizer from the metadata of {self.path}: {err}.") from err
        out = Path(out_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
            tokenizer.save(str(out / "tokenizer.json"))
            (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
            (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")
        except OSError as err:
            raise OutputError(f"cannot write the tokenizer files into {out}: {err}.") from err
        return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]

    def fingerprint(self) -> str:
        """SHA-256 of the whole header (metadata + tensor infos), the file size and the first
        4 KiB of every tensor's data. Cheap on multi-GB files, and any re-conversion or requantization
        changes it; an edit deep inside one tensor that leaves its first 4 KiB alone does not."""
        reader = self._open()
        digest = hashlib.sha256(b"onnxforge-gguf-fingerprint-v1")
        digest.update(bytes(reader.data[: reader.data_offset]))
        digest.update(str(self.path.stat().st_size).encode())
        for tensor in reader.tensors:
            digest.update(bytes(reader.data[tensor.data_offset : tensor.data_offset + _FINGERPRINT_SAMPLE]))
        return digest.hexdigest()

    def close(self) -> None:
        """Drop the memory map (reads after this raise CheckpointError)."""
        self._reader = None

    def __enter__(self) -> GGUFSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- tensors

    def _open(self) -> GGUFReader:
        if self._reader is None:
            raise CheckpointError(f"{self.path} was closed; open it again with open_gguf().")
        return self._reader

    def _tensor(self, name: str) -> ReaderTensor:
        self._open()
        tensor = self._tensors.get(name)
        if tensor is None:
            raise CheckpointError(f"tensor {name!r} is not in {self.path} (it has {len(self._tensors)} tensors).")
        return tensor

    def _map_tensors(self) -> dict[str, ReaderTensor]:
        """HF name -> GGUF tensor, refusing tensors the family table cannot name or types we cannot read."""
        compiled = compile_tensor_map(self._family)
        mapped: dict[str, ReaderTensor] = {}
        first_mtp = self._layer_count()
        for tensor in self._open().tensors:
            if tensor.name in AUXILIARY_TENSORS:
                continue
            block = re.match(r"blk\.(\d+)\.", tensor.name)
            if block is not None and int(block[1]) >= first_mtp:  # a multi-token-prediction layer: not built
                continue
            hf_name = hf_tensor_name(tensor.name, compiled)
            if hf_name is None:
                raise CheckpointError(
                    f"tensor {tensor.name!r} in {self.path} has no Hugging Face name for GGUF architecture "
                    f"{self._arch!r}; this variant of the architecture is not supported yet."
                )
            if tensor.tensor_type not in SUPPORTED_TYPES:
                raise CheckpointError(
                    f"tensor {tensor.name!r} in {self.path} has type {tensor.tensor_type.name}, which onnxforge "
                    f"cannot dequantize (supported: {', '.join(sorted(t.name for t in SUPPORTED_TYPES))}). "
                    "Requantize the model with llama-quantize to one of those, or convert from the HF folder."
                )
            mapped[hf_name] = tensor
        if "model.embed_tokens.weight" not in mapped:
            raise CheckpointError(f"{self.path} has no token_embd.weight tensor; it is not a complete model.")
        return mapped

    def _apply_views(self) -> None:
        """The family's views (gguf_maps.View): each HF name read through one; a GGUF tensor split into
        several HF ones is listed under those names only."""
        if self._family.views is None:
            return
        stored = {name: _hf_shape(t) for name, t in self._tensors.items()}
        views = {name: v for name, v in self._family.views(self.config, stored).items() if v.source in self._tensors}
        sources = {p.source for v in views.values() for p in (v, *v.parts)}
        tensors = {name: t for name, t in self._tensors.items() if name not in sources or name in views}
        for name, view in views.items():
            tensor = self._tensors[view.source]
            shape = _hf_shape(tensor)
            if view.parts:  # joined row-wise: the parts' rows must hold the gather and the HF shape
                missing = [p.source for p in view.parts if p.source not in self._tensors]
                if missing:
                    raise CheckpointError(f"{self.path} lacks {', '.join(missing)}, part of {name}; the file is "
                                          "incomplete: re-convert it.")
                size = sum(int(np.prod(stored[p.source])) for p in view.parts)
                width = view.shape[-1] if view.shape else shape[-1]
                rows = size // width if size % width == 0 else -1
                if view.shape is None or rows < 0 or (view.rows is not None and int(view.rows.max()) >= rows) or \
                        int(np.prod(view.shape)) != (len(view.rows) if view.rows is not None else rows) * width:
                    raise CheckpointError(f"tensor {tensor.name!r} and its partners in {self.path} do not hold {name} "
                                          f"of shape {view.shape}; the file is inconsistent: re-convert it.")
                tensors[name] = tensor
                continue
            for index, axis in ((view.rows, 0), (view.cols, len(shape) - 1)):
                if index is not None and (len(shape) < axis + 1 or index.size and int(index.max()) >= shape[axis]):
                    raise CheckpointError(f"tensor {tensor.name!r} in {self.path} has shape {shape}, too small for "
                                          f"{name} as config says; the file is inconsistent: re-convert it.")
            target = self._view_shape(view, shape)
            if view.shape is not None and int(np.prod(target)) != int(np.prod(self._view_shape(
                    View(view.source, view.rows, view.cols), shape))):
                raise CheckpointError(f"tensor {tensor.name!r} in {self.path} has shape {shape}, which does not hold "
                                      f"{name} of shape {view.shape}; the file is inconsistent: re-convert it.")
            tensors[name] = tensor
        self._stored, self._tensors, self._views = self._tensors, tensors, views

    @staticmethod
    def _view_shape(view: View, stored: tuple[int, ...]) -> tuple[int, ...]:
        if view.shape is not None:
            return view.shape
        shape = list(stored)
        if view.rows is not None:
            shape[0] = len(view.rows)
        if view.cols is not None:
            shape[-1] = len(view.cols)
        return tuple(shape)

    def _read_view(self, view: View, tensor: ReaderTensor) -> np.ndarray:
        if view.parts:
            values = np.concatenate([self._read_view(p, self._stored[p.source]) for p in view.parts])
            values = values[view.rows] if view.rows is not None else values
            return np.ascontiguousarray(values.reshape(view.shape))
        values = _dequantize(tensor.data, tensor.tensor_type).reshape(_hf_shape(tensor))
        if view.rows is not None:
            values = values[view.rows]
        if view.cols is not None:
            values = values[..., view.cols]
        if view.shape is not None:
            values = values.reshape(view.shape)
        if view.value is not None:
            values = view.value(values).astype(np.float32)
        offset = self._family.offset(view.source)
        return np.ascontiguousarray(values - np.float32(offset) if offset else values)

    def _row_permutation(self, name: str, n_rows: int) -> np.ndarray | None:
        """Row gather undoing llama.cpp's Q/K rotary permutation (or a view's rows) for `name`, or None."""
        view = self._views.get(name)
        if view is not None:
            return view.rows
        if not self._family.permute_qk:
            return None
        heads = permuted_heads(name, self.config["num_attention_heads"], self.config["num_key_value_heads"])
        if heads is None:
            return None
        if n_rows % (2 * heads):
            raise CheckpointError(
                f"{name} has {n_rows} rows, not a multiple of 2 x {heads} heads; the file is inconsistent."
            )
        return np.arange(n_rows).reshape(heads, n_rows // heads // 2, 2).swapaxes(1, 2).reshape(n_rows)

    # ----------------------------------------------------------------- metadata

    def _field_names(self) -> list[str]:
        return list(self._open().fields)

    def _field(self, key: str) -> Any:
        """A metadata value (arrays as lists), or None."""
        field = self._open().fields.get(key)
        return None if field is None else field.contents()

    def _key(self, suffix: str, default: Any = ...) -> Any:
        """`{arch}.{suffix}` metadata; a missing required key is a ConfigError."""
        key = f"{self._arch}.{suffix}"
        if key in self._meta:
            return self._meta[key]
        if default is ...:
            raise ConfigError(
                f"{self.path} lacks GGUF metadata {key!r}; the file was not written by a llama.cpp converter."
            )
        return default

    def _build_config(self) -> dict:
        """The config.json dict transformers derives for this file (plus architectures/torch_dtype)."""
        heads = int(self._key("attention.head_count"))
        kv = self._key("attention.head_count_kv", heads)
        if self._family.kv_per_layer and isinstance(kv, list) and kv:  # per layer: the family's hook reads the list
            kv = kv[0]
        kv_heads = _single_value(kv, "attention.head_count_kv", zeros=self._family.kv_zero_layers)
        ffn = self._key("feed_forward_length")
        if self._family.kv_per_layer and isinstance(ffn, list) and ffn:  # per layer: the family's hook reads the list
            ffn = ffn[0]
        hidden = int(self._key("embedding_length"))
        # llama.cpp's own default (n_embd / n_head): converters write key_length only where config.json
        # has a head_dim, and rope.dimension_count is the rotary part (partial rotary: phi2, Phi-4-mini)
        head_dim = int(self._key("attention.key_length", hidden // heads))
        rope_dim = int(self._key("rope.dimension_count", head_dim))
        if self._key("attention.kv_lora_rank", None) is not None:
            # latent attention (deepseek2): key_length is the latent's width, not a head's; head_dim is the rotary's
            # (as DeepseekV3Config has it), the heads' sizes come from the family's hook
            head_dim = rope_dim
        if not 0 < rope_dim <= head_dim:
            raise ConfigError(f"{self.path}: rotary dimension {rope_dim} must be between 1 and head_dim {head_dim}.")
        theta = float(self._key("rope.freq_base", 10000.0))
        scaling = self._rope_scaling(theta, head_dim)
        config: dict[str, Any] = {
            "architectures": [self._family.architecture],
            "model_type": self._family.model_type,
            "vocab_size": _hf_shape(self._tensors["model.embed_tokens.weight"])[0],
            "hidden_size": hidden,
            "intermediate_size": int(ffn),
            "num_hidden_layers": self._layer_count(),
            "num_attention_heads": heads,
            "num_key_value_heads": int(kv_heads),
            "head_dim": head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": int(self._key("context_length", 2048)),
            "rms_norm_eps": float(self._key("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": theta,
            "rope_scaling": scaling,
            "rope_parameters": {"rope_type": "default", "rope_theta": theta, **(scaling or {})},
            "attention_bias": "model.layers.0.self_attn.q_proj.bias" in self._tensors,
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "torch_dtype": self._float_dtype(),
            **self._family.config_extra,
        }
        partial = getattr(self, "_partial_rotary", None)
        if partial is not None:
            config["partial_rotary_factor"] = 2 * partial / head_dim
        if rope_dim != head_dim:
            from ..archs.registry import load_families

            arch = load_families().get(self._family.architecture)
            if arch is not None and not arch.partial_rotary:  # its graph (as transformers') rotates whole heads
                raise ConfigError(f"{self.path}: rope.dimension_count {rope_dim} is below head_dim {head_dim}: llama.cpp "
                                  f"rotates only that part of each head, which the {arch.name} graph cannot (it rotates "
                                  "whole heads, as transformers does); this file cannot be built faithfully")
            config["partial_rotary_factor"] = rope_dim / head_dim
        for suffix, hf_key in self._family.config_keys.items():
            value = self._key(suffix, None)
            if value is not None:
                config[hf_key] = value
        window = self._key("attention.sliding_window", None)
        if window is not None:
            config["sliding_window"] = int(window)
        elif self._family.model_type in ("qwen2", "qwen3"):
            config["sliding_window"] = None
        config.update(self._token_ids())
        for hf_key, pattern in self._family.tensor_flags.items():  # a config flag the file says by a tensor's presence
            config[hf_key] = any(fnmatch.fnmatchcase(name, pattern) for name in self._tensors)
        for hf_key, (name, axis) in self._family.shape_keys.items():  # a config size the file says by a tensor's shape
            if name in self._tensors:
                config[hf_key] = _hf_shape(self._tensors[name])[axis]
        if self._family.config_hook is not None:
            config.update(self._family.config_hook(config, self._key))
        if self._family.tensor_hook is not None:
            config.update(self._family.tensor_hook(config, frozenset(self._tensors)))
        return config

    def _layer_count(self) -> int:
        """block_count less the multi-token-prediction layers the converter appends (nextn_predict_layers)."""
        blocks, mtp = int(self._key("block_count")), int(self._key("nextn_predict_layers", 0))
        if not 0 <= mtp < blocks:
            raise ConfigError(f"{self.path}: nextn_predict_layers {mtp} must be below block_count {blocks}")
        return blocks - mtp

    def _token_ids(self) -> dict[str, int]:
        names = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
                 "pad_token_id": "padding_token_id", "unk_token_id": "unknown_token_id"}
        return {hf: int(self._meta[f"tokenizer.ggml.{key}"]) for hf, key in names.items()
                if f"tokenizer.ggml.{key}" in self._meta}

    def _float_dtype(self) -> str:
        """The float type the file's unquantized weights are stored in (float32 if only F32/quantized)."""
        kinds = {t.tensor_type for t in self._tensors.values()}
        return "bfloat16" if QT.BF16 in kinds else "float16" if QT.F16 in kinds else "float32"

    def _rope_scaling(self, theta: float, head_dim: int) -> dict | None:
        """HF rope_scaling from GGUF rope.scaling.* keys or a llama3 `rope_freqs.weight`, or None."""
        kind = self._key("rope.scaling.type", None)
        factor = self._key("rope.scaling.factor", None)
        if kind is None and self._key("rope.scale_linear", None):
            kind, factor = "linear", self._key("rope.scale_linear")
        if kind == "linear" and factor:
            return {"rope_type": "linear", "factor": float(factor)}
        if kind == "yarn" and factor:
            scaling = {"rope_type": "yarn", "factor": float(factor)}
            original = self._key("rope.scaling.original_context_length", None)
            if original:
                scaling["original_max_position_embeddings"] = int(original)
            for suffix, hf_key in (("attn_factor", "attention_factor"), ("beta_fast", "beta_fast"),
                                   ("beta_slow", "beta_slow")):  # the converter copies them from rope_scaling
                value = self._key(f"rope.scaling.yarn_{suffix}", None)
                if value is not None:
                    scaling[hf_key] = float(value)
            return scaling
        if kind not in (None, "none"):
            raise ConfigError(
                f"{self.path}: rope scaling type {kind!r} is not supported (supported: linear, yarn, llama3)."
            )
        longrope = self._longrope()
        if longrope is not None:
            return longrope
        freqs = next((t for t in self._open().tensors if t.name == "rope_freqs.weight"), None)
        if freqs is None:
            return None
        if self._family.rope_freqs == "proportional":  # Gemma 4: 1 for each rotated pair, 1e30 for the rest
            self._partial_rotary = _proportional(_dequantize(freqs.data, freqs.tensor_type).reshape(-1), self.path)
            return None
        scaling = _llama3_rope_scaling(_dequantize(freqs.data, freqs.tensor_type).reshape(-1), theta, head_dim)
        if scaling is None:
            raise ConfigError(
                f"{self.path}: rope_freqs.weight does not match llama3 rope scaling with any standard parameters; "
                "convert from the HF folder, whose config.json states the rope scaling."
            )
        return scaling

    def _longrope(self) -> dict | None:
        """LongRoPE from llama.cpp's `rope_factors_long/short.weight` (Phi-3 128k, Phi-3.5, Phi-4-mini)."""
        factors = {t.name: t for t in self._open().tensors if t.name in _LONGROPE_TENSORS}
        if not factors:
            return None
        if len(factors) != 2:
            raise CheckpointError(f"{self.path} has only one of {' and '.join(_LONGROPE_TENSORS)}; the file is "
                                  "incomplete: re-convert it.")
        long, short = (_dequantize(t.data, t.tensor_type).reshape(-1).tolist()
                       for t in (factors[name] for name in _LONGROPE_TENSORS))
        scaling: dict[str, Any] = {"rope_type": "longrope", "long_factor": long, "short_factor": short}
        original = self._key("rope.scaling.original_context_length", None)
        if original:
            scaling["original_max_position_embeddings"] = int(original)
        attn_factor = self._key("rope.scaling.attn_factor", None)
        if attn_factor is not None:
            scaling["attention_factor"] = float(attn_factor)
        return scaling

    def _build_generation_config(self) -> dict | None:
        """bos/eos/pad ids; eos lists end-of-turn ids (eot/eom) too, like HF generation_config.json."""
        ids = self._token_ids()
        eos = [ids["eos_token_id"]] if "eos_token_id" in ids else []
        for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
            if key in self._meta and int(self._meta[key]) not in eos:
                eos.append(int(self._meta[key]))
        generation: dict[str, Any] = {k: v for k, v in ids.items() if k in ("bos_token_id", "pad_token_id")}
        if eos:
            generation["eos_token_id"] = eos[0] if len(eos) == 1 else eos
        return generation or None



def open_gguf(path: Path | str) -> GGUFSource:
    """Open a `.gguf` file as a Source."""
    return GGUFSource(Path(path))


# --------------------------------------------------------------------- helpers


# GGUF metadata value types: fixed sizes; 8 = string (u64 length + bytes), 9 = array (u32 type, u64 count, items)
_FIXED_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def _check_header_counts(path: Path, size: int) -> None:
    """Walk the metadata once and check every count and length against the bytes that remain.

    The `gguf` reader trusts its length fields and, given a lying array count, loops (and allocates)
    for as long as the count says. This walk only bounds counts; parsing stays with the reader.
    """
    import mmap
    import struct

    def fail(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: {what}; the file is truncated or corrupt: re-download or re-convert it.")

    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if size < 24:
            raise fail("the header is shorter than 24 bytes")
        _version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        pos = 24
        if n_tensors > size // 24 or n_kv > size // 12:
            raise fail(f"it claims {n_tensors} tensors and {n_kv} metadata entries, more than the file can hold")

        def need(n: int) -> None:
            if n < 0 or pos + n > size:
                raise fail(f"a length field at byte {pos} points past the end of the file")

        def string() -> None:
            nonlocal pos
            need(8)
            (n,) = struct.unpack_from("<Q", buf, pos)
            pos += 8
            need(n)
            pos += n

        def value(kind: int, depth: int = 0) -> None:
            nonlocal pos
            if kind in _FIXED_SIZES:
                need(_FIXED_SIZES[kind])
                pos += _FIXED_SIZES[kind]
            elif kind == _STRING:
                string()
            elif kind == _ARRAY and depth < 4:
                need(12)
                item, count = struct.unpack_from("<IQ", buf, pos)
                pos += 12
                if item in _FIXED_SIZES:
                    need(count * _FIXED_SIZES[item])
                    pos += count * _FIXED_SIZES[item]
                    return
                need(count * 8)  # every string or nested array takes at least 8 bytes
                for _ in range(count):
                    value(item, depth + 1)
            else:
                raise fail(f"unknown metadata value type {kind} at byte {pos}")

        for _ in range(n_kv):
            string()
            need(4)
            (kind,) = struct.unpack_from("<I", buf, pos)
            pos += 4
            value(kind)


def _open_reader(path: Path) -> GGUFReader:
    """A GGUFReader over `path`, with every failure turned into a CheckpointError that says why."""
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist or is not a file; pass the path of a .gguf file.")
    size = path.stat().st_size
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise CheckpointError(
            f"{path} is not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r}); pass a .gguf file "
            "written by llama.cpp, or a Hugging Face model folder."
        )
    _check_header_counts(path, size)
    try:
        reader = GGUFReader(path)
    except Exception as err:  # the reader raises bare ValueError/IndexError on cut or garbled files
        if "GGMLQuantizationType" in str(err):
            raise CheckpointError(
                f"{path} uses an unknown tensor type ({err}): it was written by a llama.cpp newer than the "
                f"installed gguf {_gguf_version()}. Upgrade the gguf package, or requantize to a common type."
            ) from err
        raise CheckpointError(
            f"{path} ({size} bytes) could not be parsed as GGUF ({err}); the file is truncated or corrupt: "
            "re-download or re-convert it."
        ) from err
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            raise CheckpointError(
                f"{path} is truncated: tensor {tensor.name!r} ends at byte {end} but the file has {size} bytes; "
                "re-download or re-convert it."
            )
    return reader


def _gguf_version() -> str:
    try:
        return importlib.metadata.version("gguf")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - gguf imported from a source tree
        return "(unknown version)"


def _metadata(reader: GGUFReader) -> dict[str, Any]:
    """Scalar (and short array) metadata values; vocabularies stay in the file until asked for."""
    meta = {}
    for key, field in reader.fields.items():
        if field.types and field.types[0] == GGUFValueType.ARRAY and len(field.data) > _MAX_EAGER_ARRAY:
            continue
        meta[key] = field.contents()
    return meta


def _family(arch: str, path: Path) -> GGUFFamily:
    if arch in UNFAITHFUL:
        raise ConfigError(f"{path} is a GGUF of architecture {arch!r}, which onnxforge does not build: "
                          f"{UNFAITHFUL[arch]}. Convert from the Hugging Face folder instead.")
    family = FAMILIES.get(arch)
    if family is None:
        raise UnsupportedArchitectureError(
            f"{path} is a GGUF of architecture {arch!r}, which onnxforge cannot build (supported GGUF "
            f"architectures: {', '.join(sorted(FAMILIES))}); convert from the Hugging Face folder if its "
            "architecture is supported there."
        )
    return family


def _single_value(value: Any, key: str, zeros: bool = False) -> int:
    """A per-layer list metadata value that must be uniform, as one int; `zeros`: a 0 marks a layer without the
    thing counted (head_count_kv of a hybrid's conv or recurrent layers) and is passed over."""
    if isinstance(value, list):
        if zeros and any(value):
            value = [v for v in value if v]
        if len(set(value)) != 1:
            raise ConfigError(f"GGUF metadata {key} varies per layer ({sorted(set(value))}); not supported.")
        return int(value[0])
    return int(value)


def _block_order(cols: np.ndarray | None, block: int) -> np.ndarray | bool | None:
    """The order of whole column blocks a column gather amounts to; None for no gather, False when the gather
    moves columns within a block (then no stored block survives as it is)."""
    if cols is None:
        return None
    if cols.size % block:
        return False
    runs = cols.reshape(-1, block)
    if np.any(runs[:, 0] % block) or np.any(runs - runs[:, :1] != np.arange(block)):
        return False
    return runs[:, 0] // block


def _hf_shape(tensor: ReaderTensor) -> tuple[int, ...]:
    """GGUF lists dims fastest-first (ne0 = in_features); HF/numpy order is the reverse."""
    return tuple(int(d) for d in reversed(tensor.shape))


def _dequantize(data: np.ndarray, qtype: QT) -> np.ndarray:
    """Stored values (a whole tensor's, or some of its rows) as a fresh float32 array (never a view of the
    memory map)."""
    if qtype == QT.F32:
        return np.array(data, dtype=np.float32)
    return np.asarray(dequantize(data, qtype), dtype=np.float32)


def _proportional(freqs: np.ndarray, path: Path) -> int:
    """How many leading pairs a proportional rotary's rope_freqs rotates (factor 1; the rest 1e30: unrotated)."""
    rotated = freqs == 1.0
    count = int(rotated.sum())
    if not np.all(rotated[:count]) or not np.all(freqs[count:] >= 1e29):
        raise ConfigError(f"{path}: rope_freqs.weight is not a proportional rotary's (ones, then 1e30s); re-convert it")
    return count


def _llama3_factors(inv_freq: np.ndarray, factor: float, low: float, high: float, original: int) -> np.ndarray:
    """llama.cpp's rope_freqs for llama3 scaling (convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors)."""
    wavelen = 2 * np.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, mid))


def _llama3_rope_scaling(freqs: np.ndarray, theta: float, head_dim: int) -> dict | None:
    """Recover llama3 rope_scaling parameters from rope_freqs by checking the published defaults."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    factor = float(np.round(freqs.max(), 4))
    for original in (8192, 4096, 2048, 16384, 32768, 65536, 131072):
        for low in (1.0, 2.0, 0.5):
            for high in (4.0, 8.0, 2.0):
                if high > low and np.allclose(_llama3_factors(inv_freq, factor, low, high, original), freqs, rtol=1e-5):
                    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                            "high_freq_factor": high, "original_max_position_embeddings": original}
    return None
