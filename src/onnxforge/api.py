"""The Python API: `build(...)` mirrors `onnxforge build`."""
from __future__ import annotations

import hashlib
import os
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import onnx_ir as ir

from . import __version__
from .adapters import open_adapters
from .archs.registry import architecture_for
from .errors import ConfigError, OutputError, RecipeError
from .export.genai_config import genai_config
from .export.output import claim_output, staged_folder
from .export.report import BuildReport, peak_rss_bytes
from .export.writer import WeightWriter
from .graph.builder import GraphBuilder
from .graph.decoder import Decoder
from .quant.native import has_native, native_lookup
from .quant.recipe import Recipe
from .quant.pool import processes
from .quant.templates import apply_template, template_for
from .sources.base import Source
from .sources.open import open_source
from .sources.tokenizer_check import check_tokenizer, write_tokenizer_files
from .sources.tracking import TrackingSource, report_unused


def build(
    model: str | Path | Source,
    output: str | Path,
    precision: str | None = None,
    provider: str | None = None,
    *,
    recipe: Recipe | None = None,
    overwrite: bool = False,
    workers: int | None = None,
    progress: bool | Callable[[int, int], None] = False,
    max_length: int | None = None,
    strict: bool = False,
    adapters: Sequence[str | Path] = (),
    merge_adapter: str | Path | None = None,
    hf_token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    calibration=None,
) -> BuildReport:
    """Build `model` (HF folder or .gguf, or an object implementing the Source protocol of
    onnxforge.sources.base, e.g. a synthetic checkpoint) into an onnxruntime-genai folder at `output`.

    Give `precision`/`provider` or a `recipe` that holds them (both, when they disagree, is an error). Precision
    "source" (the default) keeps
    pre-quantized weights (GGUF blocks, GPTQ/AWQ/...) exactly as stored, and is fp32 for a float checkpoint. Returns the build report.
    Checkpoint tensors the build never reads are a warning in the report, or with `strict` an error
    that leaves nothing written (those the family declares as ignored get a note instead).
    `adapters`: PEFT LoRA folders built as branches switched at run time (one NAME.onnx_adapter file each);
    `merge_adapter`: one folded into the weights before they are stored.
    `model` may be a Hub ID, org/name[@revision][:FILE.gguf] (a local path of that spelling wins): what a build reads
    is downloaded into the Hugging Face cache (`cache_dir`, default HF_HOME's) with `hf_token` (False: none; None:
    HF_TOKEN or the stored login).
    `calibration`: an onnxforge.calibrate.data.Calibration (text file, samples, length) for the calibrated methods
    (gptq, awq, awq+gptq); None with one of them: the offline default text.
    """
    start = time.perf_counter()
    recipe = _recipe_for(recipe, precision, provider)
    _check_values(recipe, workers, max_length, overwrite=overwrite, strict=strict)  # before the source is opened
    calibration = _calibration_for(recipe, calibration)
    if strict and recipe.config_only:
        raise RecipeError("config_only=true reads no weight, so strict (every checkpoint tensor is read) cannot "
                          "hold; drop one of them")
    model = _resolve(model, hf_token, cache_dir, bool(progress))
    # the output is checked against the input and the user's files, and locked, before the source is opened
    release_output = claim_output(Path(output), model, overwrite)
    calibrated = None  # the calibration's result; its folder of blocks is removed at the end
    try:
        lora = open_adapters(adapters, merge_adapter, recipe.config_only)  # their configs and headers: no weight
        # records what the build reads; a merged adapter's weights read merged
        source = TrackingSource(lora.open_source(lambda: open_source(model, recipe.drop_activation_quant)))
    except BaseException:
        release_output()
        raise
    try:
        # a damaged tokenizer file fails before any weight is read; the checked files are what the build writes
        tokenizer_warnings, tokenizer_files = check_tokenizer(source)
        arch = architecture_for(source.config)
        spec = with_latent_cache(arch.make_spec(source.config), recipe)
        if recipe.precision == "source" and not has_native(source):
            recipe = replace(recipe, precision="fp32")
        recipe.check_quantizes()  # again: "source" may have become fp32
        _check_context(spec, max_length)
        _check_runtime_limits(spec, recipe)
        names = arch.resolver(source)
        recipe = apply_template(recipe, template_for(arch.model_type).name).bind(spec, native_lookup(source, spec, names))
        if recipe.config_only:
            return _config_only(Path(output), overwrite, source, arch, spec, recipe, max_length, tokenizer_warnings,
                                tokenizer_files, start)
        # the input's hash streams every byte: it runs beside the build (hashlib releases the GIL)
        fingerprint = ThreadPoolExecutor(1, thread_name_prefix="onnxforge-hash")
        input_sha256 = fingerprint.submit(source.fingerprint)
        fingerprint.shutdown(wait=False)
        if calibration is not None:  # every check that needs no weight first: the graph, the user's patterns
            from .calibrate.forward import check_supported
            from .calibrate.run import CalibratedSource, calibrate

            check_supported(spec, recipe.method)
            Decoder(GraphBuilder(), spec, names, source, recipe, lora=lora.lora_set()).build()
            recipe.check_patterns()
            calibrated = calibrate(source, spec, names, recipe, calibration, progress=_layer_progress(progress))
        builder = GraphBuilder()
        emitter = Decoder(builder, spec, names, source if calibrated is None else CalibratedSource(source, calibrated),
                          recipe, lora=lora.lora_set())
        emitter.build()
        recipe.check_patterns()  # every user pattern matched a weight: before any weight is read
        _check_qdq(builder, recipe)  # likewise
        lora.check_planned(builder)  # every adapter module has a branch or a weight to merge into: likewise
        report = BuildReport(
            output=str(Path(output)),
            architecture=arch.name,
            model_type=arch.model_type,
            precision=recipe.precision,
            provider=recipe.provider,
            recipe=recipe.describe(),
            input_sha256="",  # set when the hash running beside the build is done
            recipe_sha256=hashlib.sha256(json.dumps(recipe.describe(), sort_keys=True).encode()).hexdigest(),
            shared_embeddings=emitter.shared,
            weight_format=_weight_format(builder),
        )
        report.notes.extend(emitter.notes)
        if calibrated is not None:
            report.notes.extend(calibrated.notes())
            report.recipe["calibration"] = {**calibrated.text.describe(), "act_order": calibrated.act_order,
                                            "seconds": round(calibrated.seconds, 1),
                                            **({"experts": calibrated.experts} if calibrated.experts else {})}
        report.notes.extend(lora.notes())
        report.notes.extend(_ignored_note(arch, source))
        report.warnings.extend(_no_exact_form_warning(builder))
        report.warnings.extend(_dropped_activations_warning(source, recipe))
        report.warnings.extend(tokenizer_warnings)
        with staged_folder(Path(output), overwrite) as tmp:
            writer = WeightWriter(tmp, workers=workers)
            with processes(min(writer.workers, os.cpu_count() or 1)):  # default / k_quant / hqq slices go to worker processes
                writer.run(builder, _progress_callback(progress, builder))
            report_unused(report, source, arch, strict, emitter.left_out)  # after the writer: its jobs read the weights
            report.notes.extend(_as_stored_note(builder, recipe))  # after the writer: it measured the closest forms
            report.input_sha256 = input_sha256.result()
            model_ir = builder.to_model("onnxforge", __version__)
            try:
                ir.save(model_ir, tmp / "model.onnx")
                lora.write(tmp, emitter.io)
            except OSError as e:
                raise OutputError(f"cannot write model.onnx: {e.strerror}") from None
            write_tokenizer_files(tmp, tokenizer_files)
            _write_genai_config(tmp, spec, arch, source, recipe, max_length, report.notes,
                                {node.op_type for node in model_ir.graph})
            report.groups = [{"label": g.label, "storage": g.storage, "bytes": g.nbytes, "sources": list(g.sources),
                              "initializers": list(g.initializers), **_max_difference(builder, g.label)}
                             for g in writer.groups]
            _write_report(tmp, report, start)
        return report
    finally:
        if calibrated is not None:
            import shutil

            shutil.rmtree(calibrated.folder, ignore_errors=True)
        source.close()
        lora.close()
        release_output()  # after the rename: the lock covers the whole build


def _calibration_for(recipe: Recipe, calibration):
    """The calibration a build runs (None: none); options for a build that calibrates nothing are refused."""
    from .calibrate.data import Calibration
    from .calibrate.run import wants_calibration

    if calibration is not None and not isinstance(calibration, Calibration):
        raise RecipeError(f"calibration must be an onnxforge.calibrate.data.Calibration, got {type(calibration).__name__}")
    if not wants_calibration(recipe) or recipe.config_only:
        if calibration is not None:
            raise RecipeError(f"calibration data is for the calibrated methods (gptq, awq, awq+gptq), but this build "
                              f"uses method {recipe.method}: add --method gptq (or awq, awq+gptq), or drop the "
                              "calibration options")
        return None
    from .calibrate.run import uses_gptq

    if calibration is not None and calibration.act_order and not uses_gptq(recipe):
        raise RecipeError(f"act_order orders GPTQ's columns, but method {recipe.method} runs no GPTQ: use method gptq "
                          "or awq+gptq, or drop act_order")
    return calibration or Calibration()


def _layer_progress(progress):
    if progress is not True:
        return None
    from tqdm import tqdm

    bar = tqdm(desc="calibrating layers", leave=False)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update


def _resolve(model, hf_token, cache_dir, progress: bool):
    """The names `-m` takes: an alias (smollm2-135m) becomes the file its package ships, a Hub ID its snapshot in
    the Hugging Face cache; hf_token/cache_dir with a model that is not a Hub ID are refused, not ignored."""
    from .sources.aliases import resolve_model
    from .sources.hub import parse_hub_id

    hub = isinstance(model, str) and not Path(model).exists() and parse_hub_id(model) is not None
    if not hub and (hf_token not in (None, False) or cache_dir is not None):
        raise RecipeError(f"hf_token/cache_dir are for a Hub ID (org/name[@revision]); {model} is not one: drop them")
    return resolve_model(model, hf_token=hf_token, cache_dir=cache_dir, progress=progress) if isinstance(model, str) \
        else model


def _write_report(folder: Path, report: BuildReport, start: float) -> None:
    """The report's time, memory and file sizes, then build_report.json itself (the last file a build writes)."""
    report.seconds = time.perf_counter() - start
    report.peak_rss = peak_rss_bytes()
    report.files = {p.name: p.stat().st_size for p in sorted(folder.iterdir())}
    _write_json(folder / "build_report.json", report.to_json())
    report.files["build_report.json"] = (folder / "build_report.json").stat().st_size


def _write_genai_config(folder: Path, spec, arch, source, recipe: Recipe, max_length: int | None,
                        notes: list[str], op_types: set[str] | None = None) -> None:
    """`op_types`: the built graph's (None for config_only), for CUDA graph capture's default."""
    cuda_graph = recipe.enable_cuda_graph
    if recipe.provider == "cuda" and cuda_graph is not False:
        from .export.graph_capture import cuda_graph_default, forced_note

        capturable, why = cuda_graph_default(spec, recipe.io.dtype, op_types)
        notes.append(why if cuda_graph is None else forced_note(capturable, why))
    cuda_graph = bool(cuda_graph)
    # -e cuda at fp32: GroupQueryAttention has no fp32 CUDA kernel and runs on the CPU provider, so a shared
    # max_length KV buffer would be copied to the host and back whole every step; the anchor writes false there too
    fp32_cuda = recipe.provider == "cuda" and recipe.io.dtype == "fp32"
    share = not fp32_cuda
    if fp32_cuda:
        # onnxruntime's CUDA MatMuls default to TF32 (a 10-bit mantissa): measured on an H200, a tiny Gemma 2's fp32
        # build then missed transformers by 2.6e-2 and greedy decoding left its path at the first token (0/20);
        # with use_tf32 0 it is 1e-5 and 20/20 (bench/gpu_probe.py, bench/RESULTS.md "CUDA check")
        notes.append("use_tf32 0: an fp32 build computes in fp32 on CUDA (onnxruntime's default TF32 MatMuls round "
                     "to a 10-bit mantissa); set it to 1 in genai_config.json to trade that for speed")
    if not share:
        notes.append("past_present_share_buffer false: at fp32 on CUDA GroupQueryAttention runs on the CPU provider "
                     "(no fp32 CUDA kernel), so the KV cache grows with the sequence instead of a max_length buffer "
                     "copied each step (as the anchor writes for fp32 CUDA); -p fp16, bf16 or int4 run it on the GPU")
    config = genai_config(spec, arch.model_type, source.generation_config, provider=recipe.provider,
                          max_length=max_length, tokenizer_dir=folder, notes=notes,
                          embeds_input=recipe.exclude_embeds, logits_output=not recipe.exclude_lm_head,
                          graph_capture={"enable_cuda_graph": cuda_graph, "enable_dml_graph": recipe.enable_dml_graph},
                          share_buffer=share, tf32=not fp32_cuda)
    _write_json(folder / "genai_config.json", config)


def _config_only(output: Path, overwrite: bool, source, arch, spec, recipe: Recipe, max_length: int | None,
                 warnings: list[str], tokenizer_files: dict[str, bytes], start: float) -> BuildReport:
    """config_only (the anchor's option): genai_config.json, the tokenizer and build_report.json (which marks the
    folder as a build), no model and no weight read; the input is not hashed (that would read every weight)."""
    describe = recipe.describe()
    report = BuildReport(output=str(output), architecture=arch.name, model_type=arch.model_type,
                         precision=recipe.precision, provider=recipe.provider, recipe=describe, input_sha256="",
                         recipe_sha256=hashlib.sha256(json.dumps(describe, sort_keys=True).encode()).hexdigest())
    report.notes.append("config_only: genai_config.json and the tokenizer only, no model.onnx and no weight read "
                        "(input_sha256 is left empty)")
    report.warnings.extend(warnings)
    with staged_folder(output, overwrite) as tmp:
        write_tokenizer_files(tmp, tokenizer_files)
        _write_genai_config(tmp, spec, arch, source, recipe, max_length, report.notes)
        _write_report(tmp, report, start)
    return report


def _recipe_for(recipe: Recipe | None, precision: str | None, provider: str | None) -> Recipe:
    """The recipe, or one made of `precision`/`provider`; both given and disagreeing is an error, not a silent pick."""
    if recipe is None:
        return Recipe(precision="source" if precision is None else precision,
                      provider="cpu" if provider is None else provider)
    for what, given, held in (("precision", precision, getattr(recipe, "precision", None)),
                              ("provider", provider, getattr(recipe, "provider", None))):
        if given is not None and given != held:
            raise RecipeError(f"{what}={given!r} contradicts the recipe's {what} {held!r}; give one of them "
                              f"(drop {what}=, or make a Recipe with {what}={given!r})")
    return recipe


def _check_values(recipe: Recipe, workers: object, max_length: object, **flags: object) -> None:
    """The checks `onnxforge build`'s flags make, for the Python API too (RecipeError, one line each)."""
    if not isinstance(recipe, Recipe):
        raise RecipeError(f"recipe must be an onnxforge.quant.recipe.Recipe, got {type(recipe).__name__}")
    for key, value in flags.items():  # overwrite="false" must not mean True
        if not isinstance(value, bool):
            raise RecipeError(f"{key} must be True or False, got {value!r}")
    for key, value in (("workers", workers), ("max_length", max_length)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{key} must be an integer, got {value!r}")
        if value < 1:
            raise RecipeError(f"{key} must be at least 1, got {value}" +
                              (" (None: the cores, up to 4)" if key == "workers" else " (None: the context length)"))
    recipe.check_quantizes()


def _check_context(spec, max_length: int | None) -> None:
    if max_length is not None and max_length > spec.context_length:
        raise RecipeError(f"max length {max_length} is above the model's context length ({spec.context_length}), "
                          "which onnxruntime-genai refuses to generate with; choose at most that, or leave it out")


def _write_json(path: Path, data: dict) -> None:
    try:
        path.write_text(json.dumps(data, indent=4) + "\n", encoding="utf-8")
    except OSError as e:
        raise OutputError(f"cannot write {path.name}: {e.strerror}") from None


def _ignored_note(arch, source) -> list[str]:
    """What the family leaves unread on purpose (a multimodal wrapper's vision tower), said in the report."""
    import fnmatch

    unread = [n for n in source.tensor_names() if any(fnmatch.fnmatchcase(n, g) for g in arch.ignored)]
    if not unread:
        return []
    groups = sorted({g for g in arch.ignored if any(fnmatch.fnmatchcase(n, g) for n in unread)})
    return [f"{len(unread)} checkpoint tensors left unread on purpose ({', '.join(groups)}): "
            f"not part of the {arch.name} text decoder"]


def _as_stored_note(builder: GraphBuilder, recipe: Recipe) -> list[str]:
    """Say, group by group, what happened to pre-quantized weights: carried over exactly ("no value changed" only
    when every one was), in a closest form (by how much they differ), or re-quantized; and how they compute."""
    exact = [j for j in builder.jobs if "(exact " in j.storage]
    closest = [j for j in builder.jobs if "(closest " in j.storage]
    changed = [j for j in builder.jobs if "(re-quantized " in j.storage or "(dequantized " in j.storage]
    if not exact and not closest:
        return []
    level = recipe.accuracy
    how = ("int8 activations per block, as llama.cpp's own quantized dot products do" if level == 4 else
           "fp32 activations" if level in (0, 1) else f"accuracy_level {level}")
    compute = (f"MatMulNBits computes at accuracy_level {level} ({how})"
               f"{'; --extra_options int4_accuracy_level=0 computes in fp32' if level == 4 else ''}")
    if recipe.use_qdq:
        compute = f"DequantizeLinear + MatMul compute in {recipe.io.dtype} (use_qdq)"
    if any("QMoE" in j.storage and j.storage.startswith("int8") for j in exact + closest):
        compute += ("; 8-bit QMoE experts compute with int8 activations at every accuracy level (onnxruntime's CPU "
                    "kernel; --extra_options moe_experts=fp32 runs the experts through the float MoE op, exactly)")
    if not closest and not changed:
        return [f"pre-quantized weights are carried over exactly (no value changed); {compute}"]
    parts = [f"{len(exact)} pre-quantized weight group{'s' if len(exact) != 1 else ''} carried over exactly"]
    if closest:
        worst = max((j.max_difference or 0.0) for j in closest)
        kinds = sorted({re.search(r"\(closest (\S+)", j.storage).group(1) for j in closest})
        parts.append(f"{len(closest)} in the closest QMoE form of {'/'.join(kinds)} (QMoE has no per-block minimum: "
                     f"max |difference| from the file's values {worst:.3g}, per group in build_report.json "
                     "max_difference)")
    if changed:
        parts.append(f"{len(changed)} re-quantized or dequantized (see their storage)")
    return ["; ".join(parts) + f"; {compute}"]


def _check_qdq(builder: GraphBuilder, recipe: Recipe) -> None:
    """use_qdq writes every quantized weight as DequantizeLinear; a mixture of experts' quantized experts (QMoE) have
    no QDQ form, so such a build is refused (the graph is made, no weight is read), never written half QDQ."""
    if not recipe.use_qdq:
        return
    qmoe = [n.name for n in builder.nodes if n.op_type == "QMoE"]
    if qmoe:
        raise RecipeError(f"use_qdq=true: this model's mixture-of-experts experts are quantized (QMoE, {qmoe[0]}), and "
                          "QMoE has no QDQ form; add --extra_options moe_experts=fp32 (or fp16) to keep the experts "
                          "float, or drop use_qdq")
    left = sorted({n.op_type for n in builder.nodes if n.op_type in ("MatMulNBits", "GatherBlockQuantized")})
    if left:  # a quantized weight that did not go through Emitter.matmul / the embedding: a bug, never written
        raise AssertionError(f"use_qdq build still has {', '.join(left)}")


def _weight_format(builder: GraphBuilder) -> str:
    """How quantized weights are written: "QDQ" (DequantizeLinear), "MatMulNBits" (the contrib ops), "float"."""
    ops = {n.op_type for n in builder.nodes}
    if "DequantizeLinear" in ops:
        return "QDQ"
    if ops & {"MatMulNBits", "GatherBlockQuantized", "QMoE"}:
        return "MatMulNBits"
    return "float"


def _max_difference(builder: GraphBuilder, label: str) -> dict:
    """{"max_difference": max |written - checkpoint|} for a group of carried-over values, else {}."""
    job = next((j for j in builder.jobs if j.label == label and j.max_difference is not None), None)
    return {} if job is None else {"max_difference": job.max_difference}


def _no_exact_form_warning(builder: GraphBuilder) -> list[str]:
    """Pre-quantized weights that had to be re-quantized (an act-order GPTQ, a GGUF codebook type): their
    values are no longer the checkpoint's, which the report must say as a warning, not only in a storage label."""
    changed: dict[str, int] = {}
    for job in builder.jobs:
        if "no exact" in job.storage and "(re-quantized " in job.storage:
            changed[job.storage] = changed.get(job.storage, 0) + 1
    return [f"{n} weight group{'s' if n > 1 else ''} stored as {storage}: the checkpoint's quantized values have no "
            "exact form in onnxruntime's ops, so they were re-quantized and differ from the file's; -p fp32 or "
            "-p fp16 keeps the checkpoint's values exactly (dequantized)" for storage, n in changed.items()]


def _dropped_activations_warning(source, recipe: Recipe) -> list[str]:
    """drop_activation_quant: the activation quantization the checkpoint was tuned with, left out, as a warning;
    the option on a checkpoint without any is refused (an option is never accepted and ignored)."""
    if not recipe.drop_activation_quant:
        return []
    dropped = getattr(getattr(source, "scheme", None), "dropped", ())
    if not dropped:
        raise ConfigError("drop_activation_quant=true, but the checkpoint has no quantized activations to drop "
                          "(its quantization_config has none); remove the option")
    return [f"the checkpoint was tuned with quantized activations ({'; '.join(dropped)}); drop_activation_quant=true "
            "built its weights alone (weight-only), so the model computes with other activations than it was tuned "
            "with: check it with `onnxforge verify` before use"]


def with_latent_cache(spec, recipe: Recipe):
    """The spec with latent attention's compressed cache where the recipe asks for it (mla_cache=latent): GQA over
    one shared kv head of kv_lora_rank + qk_rope_head_dim (graph/mla.py); refused for a model without it."""
    if recipe.mla_cache != "latent":
        return spec
    if spec.mla is None:
        raise RecipeError("mla_cache=latent sets what a latent-attention layer caches, but this model has no latent "
                          "attention (DeepSeek-V3, Kimi-K2); drop the option")
    m = spec.mla
    return replace(spec, mla=replace(m, latent_cache=True),
                   attention=replace(spec.attention, head_dim=m.kv_lora_rank + m.rope_dim, num_kv_heads=1))


def _check_runtime_limits(spec, recipe: Recipe) -> None:
    from .runs_on import check_attention_shape, check_runs_on

    if recipe.moe_experts and not any(layer.moe for layer in spec.layers):  # never accepted and ignored
        raise RecipeError(f"moe_experts={recipe.moe_experts} sets how a mixture of experts' experts are stored, but "
                          "this model has no experts; drop the option")
    check_runs_on(recipe)  # a precision (or int8 placement) the provider has no kernels for
    check_attention_shape(spec, recipe.provider)  # a head size no provider's attention runs


def _progress_callback(progress, builder: GraphBuilder):
    if not progress:
        return None
    total = sum(j.nbytes for j in builder.jobs)
    if callable(progress):
        done = [0]

        def report(n: int) -> None:
            done[0] += n
            progress(done[0], total)

        return report
    from tqdm import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, desc="writing weights", leave=False)

    def update(n: int) -> None:
        bar.update(n)
        if bar.n >= total:
            bar.close()

    return update
