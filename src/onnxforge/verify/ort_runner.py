"""Run an onnxforge/onnxruntime-genai style model step by step in plain onnxruntime (no torch)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import RunError
from ..sources.tokenizer_check import first_line

ORT_TO_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def _built_for(model_dir) -> tuple[str | None, str | None]:
    """(precision, provider) from build_report.json, or (None, None)."""
    try:
        report = json.loads((Path(model_dir) / "build_report.json").read_text())
        return report.get("precision"), report.get("provider")
    except (OSError, ValueError, AttributeError):
        return None, None


def cannot_load(model_dir, runtime: str, err: Exception) -> RunError:
    """One line: what failed, why (the runtime's first line), and what to do."""
    first = first_line(err)
    precision, provider = _built_for(model_dir)
    if precision == "bf16" or provider not in (None, "cpu"):
        from ..runs_on import precisions_on

        fix = (f"it was built with -p {precision} -e {provider}, which this machine's CPU provider cannot run: "
               f"rebuild it with -e cpu -p {'/'.join(p for p in precisions_on('cpu') if p != 'source')} to run it here")
    else:
        fix = "the folder may be incomplete or damaged: rebuild it with `onnxforge build`"
    return RunError(f"{runtime} cannot load the model in {model_dir} ({first}); {fix}")


def load_genai_model(model_dir):
    """onnxruntime_genai.Model of a built folder, or one RunError saying why not."""
    import onnxruntime_genai as og

    try:
        return og.Model(str(model_dir))
    except Exception as err:  # noqa: BLE001 - genai raises plain RuntimeErrors
        raise cannot_load(model_dir, "onnxruntime-genai", err) from None


class OrtDecoder:
    """Feeds input_ids/attention_mask and carries the model's states (the KV cache, a conv layer's state, ...)
    between calls: every past input genai_config.json names, from its present output."""

    def __init__(self, model_dir: str | Path, threads: int = 0, providers: tuple[str, ...] = ("CPUExecutionProvider",)):
        import onnxruntime as ort

        self.dir = Path(model_dir)
        cfg = json.loads((self.dir / "genai_config.json").read_text())["model"]["decoder"]
        from .folder import check_token_io

        check_token_io(self.dir, {"model": {"decoder": cfg}})  # token ids in, logits out: else one RunError
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(self.dir / cfg["filename"]), opts,
                                                providers=list(providers))
        except Exception as err:  # noqa: BLE001 - onnxruntime's own exception types
            raise cannot_load(self.dir, "onnxruntime", err) from None
        self.layers = cfg["num_hidden_layers"]
        self.kv_heads = cfg["num_key_value_heads"]
        self.head_size = cfg["head_size"]
        logits = next(o for o in self.session.get_outputs() if o.name == "logits")
        self.pruned = logits.shape[1] == 1  # built with prune_lm_head: the last position's logits only
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.pairs = [(cfg["inputs"][k] % i, cfg["outputs"]["present" + k[len("past"):]] % i)
                      for k in cfg["inputs"] if k.startswith("past_") and k.endswith("_names")
                      for i in range(self.layers) if cfg["inputs"][k] % i in inputs]
        self.state_inputs = [inputs[p] for p, _ in self.pairs]
        self.reset()

    def reset(self, batch: int = 1) -> None:
        self.past = {i.name: np.zeros(self._start_shape(i, batch), dtype=ORT_TO_NP[i.type]) for i in self.state_inputs}
        self.length = 0

    def _start_shape(self, value, batch: int) -> list[int]:
        """A state as it starts: a growing one (the KV cache) empty, a fixed one (a conv state) zeros."""
        if "past_sequence_length" in value.shape:  # (batch, kv heads, 0, head size): the layer's own sizes where the
            # input has them (Gemma 4's layers differ), else genai_config's (a symbolic head size)
            heads, size = (d if isinstance(d, int) else default for d, default in
                           zip((value.shape[1], value.shape[3]), (self.kv_heads, self.head_size)))
            return [batch, heads, 0, size]
        return [batch if d == "batch_size" else d for d in value.shape]

    def carry(self, outs: dict) -> None:
        for past, present in self.pairs:
            self.past[past] = outs[present]

    def step(self, ids: np.ndarray) -> np.ndarray:
        """ids (batch, seq) int64 -> logits (batch, seq, vocab) float32; extends the cache."""
        ids = np.asarray(ids, dtype=np.int64).reshape(ids.shape[0] if np.ndim(ids) == 2 else 1, -1)
        total = self.length + ids.shape[1]
        feeds = {"input_ids": ids, "attention_mask": np.ones((ids.shape[0], total), dtype=np.int64), **self.past}
        names = [o.name for o in self.session.get_outputs()]
        outs = dict(zip(names, self.session.run(names, feeds)))
        self.carry(outs)
        self.length = total
        return outs["logits"].astype(np.float32)

    def window_logits(self, ids: np.ndarray) -> np.ndarray:
        """Logits (seq, vocab) of every position of `ids` from an empty cache; a pruned model one token per step."""
        self.reset()
        ids = np.asarray(ids).reshape(1, -1)
        if not self.pruned:
            return self.step(ids)[0]
        return np.concatenate([self.step(ids[:, i:i + 1])[0] for i in range(ids.shape[1])])

    def logits_for(self, prompt: list[int], decode: list[int]) -> list[np.ndarray]:
        """Prefill `prompt` then feed `decode` one token at a time; returns per-step logits (seq, vocab)."""
        self.reset()
        out = [self.step(np.array([prompt]))[0]]
        for t in decode:
            out.append(self.step(np.array([[t]]))[0])
        return out

    def greedy(self, prompt: list[int], new_tokens: int) -> list[int]:
        self.reset()
        logits = self.step(np.array([prompt]))[0, -1]
        out = []
        for _ in range(new_tokens):
            tok = int(np.argmax(logits))
            out.append(tok)
            logits = self.step(np.array([[tok]]))[0, -1]
        return out
