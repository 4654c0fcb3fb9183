"""fp32 parity of onnxforge and the anchor (onnxruntime-genai 0.18's builder, CPU) on the tiny models of
tests/test_family_newer.py (issue 25 item 3): max |logits - transformers| over a prefill of 16 tokens and 24
cached decode steps (onnxruntime CPU), and onnxruntime-genai's 20 greedy tokens equal to transformers'.
One line per family; the anchor's cell says why where its builder cannot build the family.

    python bench/newer_parity.py [--work DIR] [--families seed_oss,hunyuan,...]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def make(name: str, folder: Path):
    import test_family_newer as T
    import tiny

    if name == "glm4_moe":
        return T.make_glm(folder)
    if name in T.VL:
        return T._make_vl(name, folder)
    model = tiny.make_model(name, folder, **T.CONFIGS[name])
    if name == "internlm3":
        T._published_internlm3(folder)
    return model


def anchor(folder: Path, out: Path, cache: Path) -> str:
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(folder), "-o", str(out), "-p", "fp32",
           "-e", "cpu", "-c", str(cache)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode or not (out / "genai_config.json").is_file():
        lines = (done.stderr or done.stdout or f"rc {done.returncode}").strip().splitlines()
        return "cannot build: " + (lines[-1] if lines else "")
    return ""


def decoder(out: Path):
    """OrtDecoder, feeding position_ids where the graph takes them (the anchor's rotary outside GQA)."""
    from onnxforge.verify.ort_runner import OrtDecoder

    class WithPositions(OrtDecoder):
        def step(self, ids):
            pos = next((i for i in self.session.get_inputs() if i.name == "position_ids"), None)
            if pos is None:
                return super().step(ids)
            ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
            total = self.length + ids.shape[1]
            positions = np.arange(self.length, total, dtype=np.int64)[None]
            if len(pos.shape) == 3:  # mrope (Qwen3-VL): (3, batch, seq), equal on the three axes for text
                positions = np.repeat(positions[None], 3, axis=0)
            feeds = {"input_ids": ids, "attention_mask": np.ones((1, total), dtype=np.int64),
                     "position_ids": positions, **self.past}
            names = [o.name for o in self.session.get_outputs()]
            outs = dict(zip(names, self.session.run(names, feeds)))
            self.carry(outs)
            self.length = total
            return outs["logits"].astype(np.float32)

    return WithPositions(out)


def cell(out: Path, model, prompt, decode, g_prompt) -> str:
    from conftest import genai_greedy, reference_greedy, reference_logits

    got = np.concatenate(decoder(out).logits_for(prompt, decode), axis=0)
    diff = np.abs(got - reference_logits(model, prompt + decode)).max()
    same = sum(a == b for a, b in zip(genai_greedy(out, g_prompt), reference_greedy(model, g_prompt)))
    return f"{diff:.1e}, greedy {same}/20"


def main() -> None:
    import onnxforge

    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--families", default="glm4_moe,seed_oss,internlm3,hunyuan,exaone4,qwen3_vl,mistral3")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="newer-parity-"))
    rng = np.random.default_rng(7)
    prompt, decode = rng.integers(2, 320, 16).tolist(), rng.integers(2, 320, 24).tolist()
    g_prompt = np.random.default_rng(1).integers(2, 320, 16).tolist()
    for name in args.families.split(","):
        folder = work / name / "hf"
        folder.mkdir(parents=True, exist_ok=True)
        model = make(name, folder)
        ours = work / name / "ours"
        onnxforge.build(folder, ours, "fp32", overwrite=True)
        row = {"onnxforge": cell(ours, model, prompt, decode, g_prompt)}
        theirs = work / name / "anchor"
        why = anchor(folder, theirs, work / name / "cache")
        try:
            row["anchor"] = why or cell(theirs, model, prompt, decode, g_prompt)
        except Exception as err:  # noqa: BLE001 - a build that does not run is a cell of the table
            row["anchor"] = "built, does not run: " + str(err).strip().splitlines()[0][:160]
        arch = __import__("json").loads((folder / "config.json").read_text())["architectures"][0]
        print(f"{arch}: onnxforge {row['onnxforge']}; anchor {row['anchor']}", flush=True)


if __name__ == "__main__":
    main()
