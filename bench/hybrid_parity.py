"""fp32 parity of onnxforge and the anchor (onnxruntime-genai 0.18's builder, CPU) on the tiny state-carrying
hybrids of tests/test_family_hybrid.py, test_family_lfm2_moe.py, test_family_granite_hybrid.py and the Qwen3.5
MoE of test_family_qwen_next.py (issue 25 item 1): max |logits - transformers| over a prefill of 16 tokens and 24
cached decode steps (onnxruntime CPU, every carried state fed back), and onnxruntime-genai's 20 greedy tokens equal to transformers'. One line per
model; the anchor's cell says why where its builder cannot build it.

    python bench/hybrid_parity.py [--work DIR] [--only lfm2,granite_hybrid_moe,...]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def models() -> dict:
    import test_family_granite_hybrid as G
    import test_family_hybrid as H
    import test_family_lfm2_moe as M
    import test_family_qwen_next as Q
    import tiny

    def qwen35_moe(folder):  # seed 1, as the test's (its Qwen3_5MoeTextConfig tiny model)
        cls, params = Q.FAMILIES["qwen3_5_moe"]
        params = dict(params)
        return Q.make_hybrid(folder, cls, params.pop("seed"), **params)

    def qwen35_moe_published(folder):  # the same text decoder as published (the form the anchor's builder takes)
        import torch
        import transformers

        params = dict(Q.FAMILIES["qwen3_5_moe"][1])
        seed = params.pop("seed")
        text = dict(params, vocab_size=tiny.VOCAB, max_position_embeddings=256, bos_token_id=1, eos_token_id=0,
                    pad_token_id=0)
        vision = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64, patch_size=4,
                      num_position_embeddings=16)
        config = transformers.Qwen3_5MoeConfig(text_config=text, vision_config=vision, image_token_id=300,
                                               video_token_id=301, vision_start_token_id=302, vision_end_token_id=303)
        torch.manual_seed(seed)
        model = transformers.Qwen3_5MoeForConditionalGeneration(config).eval()
        tiny.spread_weights(model)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name and ".linear_attn.norm." not in name and "visual" not in name:
                    p.sub_(1.0)
        model.save_pretrained(folder)
        tiny.tokenizer_files(folder)
        return model

    return {"lfm2": lambda f: tiny.make_model("lfm2", f, **H.LFM2), "lfm2_moe": M.make,
            "granite_hybrid_moe": G.make,
            "granite_hybrid_dense": lambda f: G.make(f, num_local_experts=0, position_embedding_type="rope"),
            "granite_hybrid_attention_only": lambda f: G.make(f, num_local_experts=0, layer_types=["attention"] * 4),
            "granite_hybrid_attention_rope": lambda f: G.make(f, num_local_experts=0, layer_types=["attention"] * 4,
                                                               position_embedding_type="rope"),
            "qwen3_5_moe": qwen35_moe, "qwen3_5_moe_published": qwen35_moe_published}


def main() -> None:
    import onnxforge
    from newer_parity import anchor, cell

    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--only", default=None, help="comma-separated model names")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="hybrid-parity-"))
    rng = np.random.default_rng(7)
    prompt, decode = rng.integers(2, 320, 16).tolist(), rng.integers(2, 320, 24).tolist()
    g_prompt = np.random.default_rng(1).integers(2, 320, 16).tolist()
    for name, make in models().items():
        if args.only and name not in args.only.split(","):
            continue
        folder = work / name / "hf"
        folder.mkdir(parents=True, exist_ok=True)
        model = make(folder)
        ours = work / name / "ours"
        onnxforge.build(folder, ours, "fp32", overwrite=True)
        row = {"onnxforge": cell(ours, model, prompt, decode, g_prompt)}
        why = anchor(folder, work / name / "anchor", work / name / "cache")
        try:
            row["anchor"] = why or cell(work / name / "anchor", model, prompt, decode, g_prompt)
        except Exception as err:  # noqa: BLE001 - a build that does not run is a cell of the table
            row["anchor"] = "built, does not run: " + str(err).strip().splitlines()[0][:160]
        print(f"{name}: onnxforge {row['onnxforge']}; anchor {row['anchor']}", flush=True)


if __name__ == "__main__":
    main()
