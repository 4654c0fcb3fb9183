"""Every field of a `quantization_config` is read: a table per format says what each key is.

- READ: the scheme parser in prequant.py reads it and refuses the values it cannot carry over.
- INERT: how the checkpoint was made (calibration settings, names, backends, module lists that the
  stored tensors themselves show); it cannot change what the stored values mean.
- OFF: a feature onnxforge does not reproduce (activation or KV-cache quantization, per-module
  overrides, rotations, sparsity); it must be absent, null, false or empty.
- a tuple: the values onnxforge carries over.
A key in no table is unknown: with a value other than null/false/empty it is refused, since onnxforge
cannot promise what it changes. Each refusal is one ConfigError naming the field and its value.
"""
from __future__ import annotations

import json

from ..errors import ConfigError

READ, INERT, OFF = "read", "inert", "off"
ACTIVATIONS = "activations"  # OFF, with the message that says what the checkpoint was tuned with

# how a GPTQ-style quantizer was run (transformers' GPTQConfig / AwqConfig.to_dict(), gptqmodel, AutoGPTQ)
CALIBRATION = ("damp_percent", "damp_auto_increment", "true_sequential", "act_group_aware", "static_groups",
               "model_name_or_path", "model_file_base_name", "meta", "quantizer", "tokenizer", "dataset",
               "model_seqlen", "use_exllama", "exllama_config", "max_input_length", "cache_block_outputs",
               "modules_in_block_to_quantize", "batch_size", "pad_token_id", "use_cuda_fp16",
               "module_name_preceding_first_block", "block_name_to_quantize", "backend", "mse", "lm_head",
               "modules_to_not_convert")
GPTQ = {
    **dict.fromkeys(("quant_method", "bits", "group_size", "sym", "checkpoint_format"), READ),
    "format": ("gptq", "gptq_v2"), "pack_dtype": ("int32",),
    **dict.fromkeys((*CALIBRATION, "desc_act"), INERT),  # act order: the g_idx tensors say it (prequant._act_order)
    "dynamic": OFF, "rotation": OFF,
}
AWQ = {
    **dict.fromkeys(("quant_method", "bits", "w_bit", "group_size", "q_group_size", "zero_point", "version"), READ),
    "format": ("gemm",), "sym": INERT,  # transformers 5 writes sym beside zero_point; the qzeros decide
    **dict.fromkeys((*CALIBRATION, "do_fuse", "fuse_max_seq_len", "modules_to_fuse"), INERT),
    "desc_act": OFF,  # AWQ's gemm layout has no g_idx to carry an activation order
}
CT = {
    **dict.fromkeys(("quant_method", "format", "config_groups"), READ),
    "quantization_status": ("compressed",),
    **dict.fromkeys(("ignore", "global_compression_ratio", "version", "provider"), INERT),
    **dict.fromkeys(("kv_cache_scheme", "sparsity_config", "transform_config", "moe_sparsity_config"), OFF),
}
CT_GROUP = {"weights": READ, "targets": INERT, "format": ("pack-quantized",),
            "input_activations": ACTIVATIONS, "output_activations": ACTIVATIONS}
CT_WEIGHTS = {
    **dict.fromkeys(("num_bits", "type", "symmetric", "group_size", "strategy"), READ),
    **dict.fromkeys(("actorder", "observer", "observer_kwargs", "scale_dtype", "zp_dtype"), INERT),
    **dict.fromkeys(("dynamic", "block_structure"), OFF),
}
QUARK = {
    **dict.fromkeys(("quant_method", "global_quant_config", "layer_quant_config", "layer_type_quant_config",
                     "export"), READ),
    **dict.fromkeys(("exclude", "quant_mode", "version", "kv_cache_group", "min_kv_scale"), INERT),
    **dict.fromkeys(("softmax_quant_spec", "kv_cache_quant_config", "kv_cache_post_rope", "pre_quant_opt_config"),
                    OFF),
    "algo_config": READ,
}
QUARK_GLOBAL = {"weight": READ, "input_tensors": ACTIVATIONS, "output_tensors": ACTIVATIONS, "bias": OFF,
                "target_device": INERT}
QUARK_WEIGHT = {
    **dict.fromkeys(("dtype", "qscheme", "group_size", "symmetric"), READ), "ch_axis": (1,),
    **dict.fromkeys(("round_method", "scale_type", "observer_cls", "scale_format", "scale_calculation_mode"), INERT),
    **dict.fromkeys(("is_dynamic", "mx_element_dtype"), OFF),
}
QUARK_EXPORT = {"pack_method": ("reorder", "order"), "weight_format": ("real_quantized",),
                **dict.fromkeys(("kv_cache_group", "min_kv_scale", "weight_merge_groups"), INERT)}
QUARK_ALGOS = ("awq", "gptq", "smooth_quant", "smoothquant")  # folded into the stored weights before export


def _empty(value) -> bool:
    return value is None or value is False or value in ("", [], {})


def _show(value) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def check_fields(q: dict, table: dict, where: str, path, dropped: list[str] | None = None) -> None:
    """Refuse, with one ConfigError naming `quantization_config.{where}{key}` and its value, every field of `q`
    that `table` does not let through. Quantized activations are listed in `dropped` instead when it is given
    (the build's explicit opt-in, `drop_activation_quant`)."""
    for key, value in q.items():
        rule = table.get(key)
        field = f"{path}/config.json: quantization_config.{where}{key} = {_show(value)}"
        if rule in (READ, INERT) or (rule in (OFF, ACTIVATIONS, None) and _empty(value)):
            continue
        if rule == ACTIVATIONS and dropped is not None:
            dropped.append(f"quantization_config.{where}{key} = {_show(value)}")
            continue
        if rule == ACTIVATIONS:
            raise ConfigError(
                f"{field}: the checkpoint was tuned with quantized activations, which onnxforge does not reproduce "
                "(MatMulNBits takes float activations, or int8 per block at accuracy_level 4, not this scheme); "
                "carrying its weights over as weight-only would compute something it was not tuned for. Build from "
                "the original float checkpoint, or from a weight-only (W4A16 / W8A16) export; "
                "`--extra_options drop_activation_quant=true` builds its weights alone, with a warning")
        if isinstance(rule, tuple):
            if (value.lower() if isinstance(value, str) else value) in rule:
                continue
            raise ConfigError(f"{field}: onnxforge carries over only {', '.join(map(repr, rule))} here; build from "
                              "the original float checkpoint instead")
        what = "a feature onnxforge does not reproduce" if rule == OFF else "a field onnxforge does not know"
        raise ConfigError(f"{field}: {what}, so the build could not compute what the checkpoint means. Build from "
                          "the original float checkpoint instead")


def check_compressed_tensors(q: dict, path, dropped: list[str] | None = None) -> None:
    check_fields(q, CT, "", path)
    for name, group in (q.get("config_groups") or {}).items():
        if isinstance(group, dict):
            check_fields(group, CT_GROUP, f"config_groups.{name}.", path, dropped)
            if isinstance(group.get("weights"), dict):
                check_fields(group["weights"], CT_WEIGHTS, f"config_groups.{name}.weights.", path)


def check_quark(q: dict, path, dropped: list[str] | None = None) -> None:
    check_fields(q, QUARK, "", path)
    g = q.get("global_quant_config") or {}
    check_fields(g, QUARK_GLOBAL, "global_quant_config.", path, dropped)
    if isinstance(g.get("weight"), dict):
        check_fields(g["weight"], QUARK_WEIGHT, "global_quant_config.weight.", path)
    check_fields(q.get("export") or {}, QUARK_EXPORT, "export.", path)
    for i, algo in enumerate(q.get("algo_config") or []):
        name = str(algo.get("name", "") if isinstance(algo, dict) else algo).lower()
        if name not in QUARK_ALGOS:
            raise ConfigError(f"{path}/config.json: quantization_config.algo_config[{i}] = {_show(algo)}: the "
                              f"algorithm {name!r} may change the model beyond its stored weights (onnxforge carries "
                              f"over {', '.join(QUARK_ALGOS)}); build from the original float checkpoint instead")


CHECKS = {"gptq": lambda q, path, dropped=None: check_fields(q, GPTQ, "", path),
          "awq": lambda q, path, dropped=None: check_fields(q, AWQ, "", path),
          "compressed-tensors": check_compressed_tensors, "quark": check_quark}
