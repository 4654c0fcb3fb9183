"""llama.cpp beside our models, on the same GGUF: perplexity on the same token ids and windows, and
prefill / decode speed on the same random prompt, through llama-cpp-python (`pip install
llama-cpp-python`, which compiles llama.cpp). Each measurement runs in a child process
(`python bench/llamacpp.py SPEC_JSON`), so a crash inside llama.cpp costs only its figures.
Used by bench/decode.py and bench/prequant.py.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


class LlamaCpp:
    """llama.cpp on the same GGUF through llama-cpp-python, each measurement in a child process, so a crash
    inside llama.cpp costs only its figures. llama.cpp's extra buffer types (weights repacked for AMX or its
    own CPU kernels) are tried first; if the child dies, it runs again without them (llama.cpp's
    `--no-repack`) and `note` says so."""

    def __init__(self, model: Path, threads: int):
        import importlib.util

        self.model, self.threads = model, threads
        self.extra_bufts: bool | None = True  # None: llama.cpp is out (not installed or fails both ways)
        self.notes: list[str] = []
        if importlib.util.find_spec("llama_cpp") is None:
            self.extra_bufts = None
            self.notes.append("llama.cpp skipped: llama-cpp-python is not installed")

    def run(self, task: str, **kw) -> dict | None:
        import subprocess

        failures = []
        while self.extra_bufts is not None:
            spec = dict(task=task, model=str(self.model), threads=self.threads, extra_bufts=self.extra_bufts, **kw)
            proc = subprocess.run([sys.executable, __file__, json.dumps(spec)],
                                  capture_output=True, text=True)
            if proc.returncode == 0:
                return json.loads(proc.stdout.strip().splitlines()[-1])
            rc = proc.returncode
            tail = (proc.stderr.strip().splitlines() or [""])[-1]
            failures.append((f"died of signal {-rc}" if rc < 0 else f"exited with {rc}")
                            + (f" ({tail})" if tail and rc > 0 else ""))
            if self.extra_bufts:
                self.extra_bufts = False
                self.notes.append("llama.cpp without its extra buffer types (`--no-repack`): with them the "
                                  f"llama-cpp-python child process {failures[-1]}")
            else:
                self.extra_bufts = None
                self.notes.append(f"llama.cpp failed ({task}): " + "; ".join(failures))
        return None


def child(spec: dict) -> None:
    """One llama.cpp measurement (in its own process): prints one JSON line."""
    import statistics

    import llama_cpp
    import llama_cpp.llama_cpp as lib
    import numpy as np

    if not spec["extra_bufts"]:  # Llama() has no argument for it: change the defaults it starts from
        default_params = lib.llama_model_default_params

        def no_extra_bufts():
            params = default_params()
            params.use_extra_bufts = False
            return params

        lib.llama_model_default_params = no_extra_bufts
    threads = dict(n_threads=spec["threads"], n_threads_batch=spec["threads"], verbose=False)

    if spec["task"] == "perplexity":  # the same ids and windows as ours, every position's logits
        from onnxforge.verify.perplexity import perplexity

        window = spec["window"]
        llm = llama_cpp.Llama(model_path=spec["model"], n_ctx=window, n_batch=window, n_ubatch=window,
                              logits_all=True, **threads)

        def logits(ids: np.ndarray) -> np.ndarray:
            llm.reset()
            llm.eval(ids.tolist())
            return np.array(llm.scores[:len(ids)])

        ids = json.loads(Path(spec["ids"]).read_text())
        print(json.dumps({"ppl": perplexity(ids, logits, window, window).ppl}))
        return

    prefill, decode = spec["prefill"], spec["decode"]
    llm = llama_cpp.Llama(model_path=spec["model"], n_ctx=prefill + decode + 8, n_batch=prefill, logits_all=False,
                          **threads)
    n_vocab = llm.n_vocab()
    ids = np.random.default_rng(0).integers(3, n_vocab, prefill).tolist()

    def next_token() -> int:  # greedy on the last position's logits (Llama.scores is not filled without logits_all)
        return int(np.argmax(np.ctypeslib.as_array(lib.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))))

    def once() -> tuple[float, float]:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        token = next_token()
        t1 = time.perf_counter()
        for _ in range(decode):
            llm.eval([token])
            token = next_token()
        t2 = time.perf_counter()
        return t1 - t0, decode / (t2 - t1)

    once()
    runs = [once() for _ in range(spec["reps"])]
    print(json.dumps({"prefill_s": statistics.median(r[0] for r in runs),
                      "decode_tok_s": statistics.median(r[1] for r in runs)}))


if __name__ == "__main__":
    child(json.loads(sys.argv[1]))
