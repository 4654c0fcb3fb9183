"""Checks of a built model folder before `inspect`, `run`, `chat`, `perplexity` or `verify` load it.

Each damaged, truncated or missing file is one RunError that names the file and the problem, instead of a
protobuf, JSON or onnxruntime traceback (or, for a truncated model.onnx.data, a silent success of `inspect`).
Nothing here reads a weight: model.onnx is parsed without its external data, whose extents are compared with
the data file's size.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import RunError
from ..sources.tokenizer_check import first_damage, genai_problem

REBUILD = "rebuild the model with `onnxforge build`"
FOUR_BIT = (21, 22, 23)  # onnx.TensorProto.UINT4, INT4, FLOAT4E2M1


def read_genai_config(model_dir, required: bool = True) -> dict | None:
    """genai_config.json as a dict (None when absent and not `required`), or a RunError naming it."""
    path = Path(model_dir) / "genai_config.json"
    if not path.is_file():
        if not required:
            return None
        raise RunError(f"{model_dir} is not a built model folder (no genai_config.json); "
                       "make one with `onnxforge build`")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise RunError(f"{path} is not valid JSON ({str(e)[:160]}); the folder is damaged: {REBUILD}") from None
    except OSError as e:
        raise RunError(f"cannot read {path}: {e.strerror}") from None
    decoder = cfg.get("model", {}).get("decoder") if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict) \
        else None
    if not isinstance(decoder, dict):
        raise RunError(f"{path} has no model.decoder section; the folder is damaged: {REBUILD}")
    return cfg


def load_onnx(model_dir, cfg: dict | None = None):
    """The decoder's ModelProto (external data not loaded), its external data checked for presence and size."""
    import onnx
    from google.protobuf.message import DecodeError

    name = ((cfg or {}).get("model", {}).get("decoder", {}).get("filename")) or "model.onnx"
    path = Path(model_dir) / name
    if not path.is_file() and _built_with(model_dir, "config_only"):
        raise RunError(f"{model_dir} was built with config_only=true: it holds genai_config.json and the tokenizer, "
                       f"no {name}; build it without config_only (or put your own {name} there) to use it")
    if not path.is_file():
        raise RunError(f"{path} does not exist: {model_dir} has no {name}; is it an onnxforge or onnxruntime-genai "
                       f"model folder? If it is, {REBUILD}")
    if path.stat().st_size == 0:
        raise RunError(f"{path} is empty; the folder is damaged: {REBUILD}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise RunError(f"{path} is not a valid ONNX model ({type(e).__name__}: {str(e)[:160]}); the file is "
                       f"damaged or truncated: {REBUILD}") from None
    if not proto.graph.node:
        raise RunError(f"{path} is not a valid ONNX model (it holds no graph); the file is damaged: {REBUILD}")
    check_external_data(path, proto.graph)
    return proto


def _extent(tensor) -> tuple[str, int, int | None]:
    """(location, offset, length or None) of an external tensor."""
    entries = {e.key: e.value for e in tensor.external_data}
    length = entries.get("length")
    return entries.get("location", ""), int(entries.get("offset") or 0), int(length) if length else None


def _raw_size(tensor) -> int | None:
    """Bytes of a tensor's raw data from its dims and type (4-bit types packed two to a byte)."""
    import numpy as np
    import onnx

    count = int(np.prod(list(tensor.dims), dtype=np.int64))
    if tensor.data_type in FOUR_BIT:
        return (count + 1) // 2
    try:
        return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return None


def check_external_data(model_path: Path, graph) -> None:
    """Every external tensor's file exists beside the model and holds offset + length bytes."""
    import onnx

    need: dict[str, tuple[int, str, int]] = {}  # file -> (bytes needed, by which tensor, tensors there)
    for t in graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location, offset, length = _extent(t)
        if not location or Path(location).name != location:
            raise RunError(f"{model_path}: tensor {t.name!r} keeps its data in {location!r}, not a file beside the "
                           f"model; the file is damaged: {REBUILD}")
        if length is None:
            length = _raw_size(t)
            if length is None:  # a type whose packing is not known here: not checked
                continue
        end, last, n = need.get(location, (0, "", 0))
        if offset + length > end:
            end, last = offset + length, t.name
        need[location] = (end, last, n + 1)
    for location, (end, tensor, n) in need.items():
        data = model_path.parent / location
        if not data.is_file():
            raise RunError(f"{data} does not exist; {model_path.name} keeps {n} tensors in it: the folder is "
                           f"incomplete: {REBUILD}")
        size = data.stat().st_size
        if size < end:
            raise RunError(f"{data} is truncated: it has {size} bytes, {model_path.name} needs {end} (tensor "
                           f"{tensor!r} ends there); the copy or the build did not finish: {REBUILD}")


def check_tokenizer_files(model_dir, need: str) -> None:
    """Damaged tokenizer files are an error; `need`: "genai" (run, chat: onnxruntime-genai must read it),
    "any" (perplexity: tokenizer.json, else genai's) or "optional" (verify: the reference's may serve)."""
    bad = first_damage(Path(model_dir))
    if bad:
        path, problem = bad
        raise RunError(f"{path} {problem}; the folder is damaged: copy the checkpoint's tokenizer files into it "
                       f"or {REBUILD}")
    path = Path(model_dir) / "tokenizer.json"
    if need == "optional" or (need == "any" and path.is_file()):
        return
    why = genai_problem(Path(model_dir))
    if why is None:
        return
    if not path.is_file():
        raise RunError(f"{path} does not exist, so the model's text cannot be tokenized; copy the checkpoint's "
                       "tokenizer files into the folder, or build from a checkpoint that has them")
    raise RunError(f"{path} {why}, so `run`/`chat` cannot use this model; `verify` and `perplexity` can")


def _built_with(model_dir, option: str) -> bool:
    """Whether build_report.json records the recipe option `option` as true."""
    try:
        report = json.loads((Path(model_dir) / "build_report.json").read_text(encoding="utf-8"))
        return report["recipe"].get(option) is True
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def check_token_io(model_dir, cfg: dict) -> None:
    """run/chat/perplexity/verify feed token ids and read logits: a decoder built without either (the anchor's
    exclude_embeds / exclude_lm_head) is one error naming the option."""
    decoder = cfg["model"]["decoder"]
    for side, key, option, instead in (("inputs", "input_ids", "exclude_embeds", "inputs_embeds"),
                                       ("outputs", "logits", "exclude_lm_head", "hidden_states")):
        if key not in (decoder.get(side) or {}):
            raise RunError(f"{model_dir} has no {key} {side[:-1]} (built with {option}=true: it "
                           f"{'takes' if side == 'inputs' else 'outputs'} {instead}), and this command "
                           f"{'feeds token ids' if side == 'inputs' else 'reads logits'}; build it without {option} "
                           "to run it here")


def check_model_folder(model_dir, tokenizer: str = "genai") -> dict:
    """genai_config.json, the decoder model and its data, and the tokenizer (see check_tokenizer_files);
    returns genai_config.json."""
    cfg = read_genai_config(model_dir)
    check_token_io(model_dir, cfg)
    load_onnx(model_dir, cfg)
    check_tokenizer_files(model_dir, tokenizer)
    return cfg
