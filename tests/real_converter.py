"""llama.cpp's own HF -> GGUF converter (convert_hf_to_gguf.py), run as a subprocess for tests.

The llama-cpp-python 0.3.36 sdist (the version the `producers` extra installs) vendors llama.cpp with
`convert_hf_to_gguf.py`, its `conversion/` package and `gguf-py`. It is fetched once with pip
(`pip download --no-binary llama-cpp-python --no-deps`, ~77 MB, a few seconds; `--no-binary :all:` would
build cmake from source for the metadata step) into the onnxforge cache, and only those three parts are
extracted. The converter runs with its own gguf-py first on the path: the vendored package says version
0.19.0 like the installed one but is newer (constants, tensor_mapping and the writer differ), and the
converter imports names only it has.

The tokenizer: convert_hf_to_gguf.py hashes a BPE tokenizer's encoding of a fixed text
(`get_vocab_base_pre`) and refuses one it does not know ("BPE pre-tokenizer was not recognized - update
get_vocab_base_pre()"); no option of the converter passes the check, and every known hash belongs to a
real tokenizer of 30k+ tokens. So:
- llama-architecture models (Mixtral) get a SentencePiece `tokenizer.model` (trained here by
  sentencepiece, which the converter itself imports for that path): `_set_vocab_sentencepiece`, no hash;
- models whose converter class only takes a BPE tokenizer.json (Qwen2-MoE, Qwen3-MoE: `_set_vocab_gpt2`)
  keep tests/tiny.py's byte-level BPE, whose pre-tokenizer is GPT-2's, and `pre="gpt-2"` does what the
  converter's error message asks (add the tokenizer's hash to get_vocab_base_pre): a two-line wrapper maps
  only an unrecognised hash to that name, then runs the unchanged script (runpy). Every tensor, every
  other key and the vocabulary itself are the converter's own.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from contextlib import contextmanager
from pathlib import Path

VERSION = "0.3.36"
PREFIX = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
TIMEOUT_S = 300
_FAILED: list[str] = []

WRAPPER = """\
import os, runpy, sys
script = sys.argv.pop(1)
sys.path[:0] = [os.path.dirname(script), os.path.join(os.path.dirname(script), "gguf-py")]
pre = os.environ.get("ONNXFORGE_TEST_TOKENIZER_PRE")
if pre:
    from conversion.base import TextModel
    known = TextModel.get_vocab_base_pre
    def get_vocab_base_pre(self, tokenizer):
        try:
            return known(self, tokenizer)
        except NotImplementedError:  # "update get_vocab_base_pre()": the test tokenizer's hash -> pre
            return pre
    TextModel.get_vocab_base_pre = get_vocab_base_pre
runpy.run_path(script, run_name="__main__")
"""


def cache_root() -> Path:
    return Path(os.environ.get("ONNXFORGE_CACHE") or Path.home() / ".cache" / "onnxforge")


@contextmanager
def _lock(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+b") as handle:  # pytest -n 2: one worker fetches, the other waits
        try:
            import fcntl
            fcntl.flock(handle, fcntl.LOCK_EX)
        except ImportError:
            pass
        yield


def converter_dir(log=print) -> Path | None:
    """The extracted llama.cpp folder (convert_hf_to_gguf.py, conversion/, gguf-py/), fetched once;
    None when the sdist cannot be downloaded (no network)."""
    if _FAILED:  # tried once in this process: no network
        return None
    root = cache_root() / f"llama-cpp-python-{VERSION}-sdist"
    done = root / "llama.cpp"
    with _lock(root):
        if (done / "convert_hf_to_gguf.py").is_file():
            return done
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-binary", "llama-cpp-python", "--no-deps",
                   "--disable-pip-version-check", "-q", "--timeout", "30", "--retries", "2", f"llama-cpp-python=={VERSION}", "-d", tmp]
            try:
                subprocess.run(cmd, check=True, capture_output=True, timeout=TIMEOUT_S)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
                log(f"could not download the llama-cpp-python {VERSION} sdist: {e}")
                _FAILED.append(str(e))
                return None
            sdist = next(Path(tmp).glob("*.tar.gz"))
            _extract(sdist, Path(tmp) / "llama.cpp")
            os.replace(Path(tmp) / "llama.cpp", done)  # whole or absent
    return done


def _extract(sdist: Path, target: Path) -> None:
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            if not m.name.startswith(PREFIX) or not (m.isfile() or m.isdir()):
                continue
            rel = m.name[len(PREFIX):]
            if rel and any(rel == p or rel.startswith(p) for p in PARTS) and ".." not in Path(rel).parts:
                m.name = rel
                members.append(m)
        tar.extractall(target, members=members, filter="data")  # "data": nothing outside target, no links


def real_convert(hf_folder: Path, out_gguf: Path, outtype: str = "f32", pre: str | None = None,
                 extra: tuple[str, ...] = ()) -> Path:
    """Run llama.cpp's convert_hf_to_gguf.py on `hf_folder`; `pre` names the pre-tokenizer for a BPE
    tokenizer whose hash the converter does not know (see the module doc); `extra`: more converter options
    (`--no-mtp` for a Qwen3.5 / Qwen3-Next checkpoint without MTP layers). Skips the calling test when
    the sdist cannot be fetched."""
    import pytest

    folder = converter_dir()
    if folder is None:
        pytest.skip(f"llama.cpp's converter (the llama-cpp-python {VERSION} sdist) could not be downloaded")
    env = {**os.environ, "PYTHONPATH": str(folder / "gguf-py"), "NO_LOCAL_GGUF": "1"}
    if pre:
        env["ONNXFORGE_TEST_TOKENIZER_PRE"] = pre
    cmd = [sys.executable, "-c", WRAPPER, str(folder / "convert_hf_to_gguf.py"), str(hf_folder),
           "--outfile", str(out_gguf), "--outtype", outtype, *extra]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    if run.returncode != 0:
        raise AssertionError(f"convert_hf_to_gguf.py failed ({run.returncode}):\n{run.stderr[-3000:]}")
    return out_gguf


def sentencepiece_tokenizer(folder: Path, vocab_size: int) -> None:
    """Replace tests/tiny.py's tokenizer files in `folder` by a SentencePiece BPE model (byte fallback)
    trained on the same text: what the converter reads for llama-architecture models without a hash."""
    import io

    import pytest
    from tiny import TEXT

    spm = pytest.importorskip("sentencepiece", reason="llama.cpp's converter reads tokenizer.model with it")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT.split(". ")), model_writer=model,
                                   vocab_size=vocab_size, model_type="bpe", byte_fallback=True, minloglevel=2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink(missing_ok=True)
    (folder / "tokenizer.model").write_bytes(model.getvalue())

