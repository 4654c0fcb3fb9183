"""Diagnose the two CUDA rows bench/gpu.py left wrong (issue 28): Gemma 2 fp32 (onnxruntime logits right, genai greedy
0/20) and Mixtral bf16 (1.5 off). Prints, per case: onnxruntime-CUDA and genai-CUDA logits against transformers fp32 on
the build's stored weights (prompt + decode, and teacher-forced along transformers' greedy path), the greedy tokens of
genai-CUDA, genai-CPU and transformers, and for bf16 transformers itself in bf16 on the GPU (the rounding yardstick).

    python3 bench/gpu_probe.py
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import gpu  # noqa: E402

EP = os.environ.get("PROBE_EP", "cuda")  # cpu: a dry run of this script on a machine without a GPU


def main() -> int:
    import torch
    from conftest import genai_greedy, prompt_and_decode, reference_greedy, reference_logits
    from tiny import make_model

    configs = gpu.tiny_configs()
    cases = [a.split(":") for a in sys.argv[1:]] or [("gemma2", "fp32"), ("mixtral", "bf16"), ("mixtral", "fp16")]
    for name, prec in cases:
        work = Path("/tmp/probe") / name
        cfg = configs[name]
        print(f"== {name} {prec}: {json.dumps({k: v for k, v in cfg.items() if not isinstance(v, dict)})[:600]}")
        model = make_model(name, work / "hf", **cfg)
        prompt, decode = prompt_and_decode(0)
        ref = gpu.Reference(model, prompt + decode, prompt_and_decode(1)[0])
        out = work / prec
        import onnxforge
        onnxforge.build(work / "hf", out, prec, EP, overwrite=True)
        ref_logits, ref_greedy = ref.stored(out)
        first = len(prompt) - 1
        g = gpu.genai_last_logits(out, prompt, decode)
        print("genai-cuda last-position |d| per step:", np.round(np.abs(g - ref_logits[first:]).max(-1), 5).tolist())
        if prec != "bf16":
            o = gpu.ort_logits(out, prompt, decode)
            print("ort-cuda |d| max:", float(np.abs(o - ref_logits).max()),
                  "last-position per step:", np.round(np.abs(o - ref_logits)[first:].max(-1), 5).tolist())
        gp = ref.g_prompt
        tf = gpu.genai_last_logits(out, gp, ref_greedy[:-1])
        import copy

        from onnxforge.verify.stored import load_stored_weights
        m2 = copy.deepcopy(model)
        load_stored_weights(m2, out)
        ref_tf = reference_logits(m2, gp + ref_greedy[:-1])[len(gp) - 1:]
        print("genai-cuda teacher-forced on the greedy path |d| per step:",
              np.round(np.abs(tf - ref_tf).max(-1), 4).tolist())
        print("  argmax genai:", tf.argmax(-1).tolist())
        print("  argmax ref:  ", ref_tf.argmax(-1).tolist())
        srt = np.sort(ref_tf, -1)
        print("  ref top1-top2 margin:", np.round(srt[:, -1] - srt[:, -2], 4).tolist())
        toks = genai_greedy(out, gp)
        print("greedy genai-cuda:", toks)
        print("greedy reference: ", ref_greedy)
        cpu = work / f"{prec}-cpu"
        shutil.rmtree(cpu, ignore_errors=True)
        shutil.copytree(out, cpu)
        c = json.loads((cpu / "genai_config.json").read_text())
        c["model"]["decoder"]["session_options"]["provider_options"] = []
        (cpu / "genai_config.json").write_text(json.dumps(c, indent=1))
        try:
            print("greedy genai-cpu: ", genai_greedy(cpu, gp))
        except Exception as err:  # noqa: BLE001
            print("genai-cpu failed:", str(err).splitlines()[0])
        if EP == "cuda":
            notf = work / f"{prec}-notf32"
            shutil.rmtree(notf, ignore_errors=True)
            shutil.copytree(out, notf)
            c2 = json.loads((notf / "genai_config.json").read_text())
            c2["model"]["decoder"]["session_options"]["provider_options"][0]["cuda"]["use_tf32"] = "0"
            (notf / "genai_config.json").write_text(json.dumps(c2, indent=1))
            try:
                tf2 = gpu.genai_last_logits(notf, gp, ref_greedy[:-1])
                print("genai-cuda use_tf32=0 teacher-forced |d| per step:",
                      np.round(np.abs(tf2 - ref_tf).max(-1), 6).tolist())
                print("greedy genai-cuda use_tf32=0:", genai_greedy(notf, gp))
            except Exception as err:  # noqa: BLE001
                print("genai use_tf32=0 failed:", str(err).splitlines()[0])
        print("genai_config search/decoder:", json.dumps(c["search"]), json.dumps(
            {k: v for k, v in c["model"]["decoder"].items() if k not in ("inputs", "outputs", "session_options")}))
        if prec in ("bf16", "fp16"):
            dt = torch.bfloat16 if prec == "bf16" else torch.float16
            dev = "cuda" if torch.cuda.is_available() else "cpu"
            mb = copy.deepcopy(m2).to(dev, dt)
            with torch.no_grad():
                lb = mb(torch.tensor([prompt + decode], device=dev)).logits[0].float().cpu().numpy()
            print(f"transformers {prec} on cuda vs fp32 (stored weights): max |d| {np.abs(lb - ref_logits).max():.3g}; "
                  f"ours vs transformers-{prec}: {np.abs(g - lb[first:]).max():.3g}")
            mb.generation_config.pad_token_id = 0
            print(f"greedy transformers-{prec}:", reference_greedy(mb.cpu().float(), gp) if False else
                  mb.generate(torch.tensor([gp], device=dev), max_new_tokens=20, min_new_tokens=20,
                              do_sample=False)[0, len(gp):].tolist())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
