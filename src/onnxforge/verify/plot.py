"""verify.png: per-position KL divergence and max abs logit difference, one line per prompt."""
from __future__ import annotations

from pathlib import Path

FLOOR = 1e-12  # log scales cannot show exact zeros


def plot_verify(result: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, (ax_kl, ax_diff) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    for i, p in enumerate(result["prompts"], 1):
        pos = p["per_position"]
        xs = range(len(pos["kl"]))
        label = f"#{i} ({p['prompt_tokens']} prompt tokens)"
        line, = ax_kl.plot(xs, [max(v, FLOOR) for v in pos["kl"]], marker=".", lw=1, label=label)
        ax_diff.plot(xs, [max(v, FLOOR) for v in pos["max_abs_diff"]], marker=".", lw=1, color=line.get_color())
        for ax in (ax_kl, ax_diff):  # where decoding through the KV cache starts
            ax.axvline(p["prompt_tokens"] - 0.5, color=line.get_color(), ls=":", lw=0.8)
    m = result["metrics"]
    ax_kl.set_yscale("log")
    ax_kl.set_ylabel("KL(reference || onnx)")
    ax_kl.set_title(f"{Path(result['model']).name} vs {Path(result['reference']).name}: "
                    f"mean KL {m['mean_kl']:.3g}, max |dlogit| {m['max_abs_diff']:.3g}, top-1 {100 * m['top1']:.1f}%",
                    fontsize=10)
    ax_kl.legend(fontsize=8, loc="best")
    ax_diff.set_yscale("log")
    ax_diff.set_ylabel("max |logit difference|")
    ax_diff.set_xlabel("position (dotted: first decode step through the KV cache)")
    for ax in (ax_kl, ax_diff):
        ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
