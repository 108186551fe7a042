"""compare.png: test AUC against the labelled fraction, one line per model (matplotlib Agg)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cache.ownership import PNG_TEXT  # noqa: E402


def plot_compare(summary: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Mean test AUC over seeds with sample-std error bars; log x axis when the fractions span 10x."""
    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    draw_compare(ax, summary)
    ax.set_title("mean ± sample std over seeds")
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata=PNG_TEXT)
    plt.close(fig)
    return path


def draw_compare(ax, summary: Sequence[dict[str, Any]]) -> None:
    """``plot_compare``'s lines on one matplotlib axes (a panel of a larger figure)."""
    models = list(dict.fromkeys(row["model"] for row in summary))
    fractions = sorted({row["fraction"] for row in summary})
    for i, model in enumerate(models):
        rows = sorted((r for r in summary if r["model"] == model and r["auc"]["mean"] is not None),
                      key=lambda r: r["fraction"])
        if not rows:
            continue
        # a small horizontal offset per model keeps overlapping error bars readable
        x = [r["fraction"] * (1 + 0.02 * (i - (len(models) - 1) / 2)) for r in rows]
        ax.errorbar(x, [r["auc"]["mean"] for r in rows], yerr=[r["auc"]["std"] or 0.0 for r in rows],
                    marker="o", capsize=3, label=model)
    if len(fractions) == 1:  # otherwise the per-model offsets alone would set the x range
        ax.set_xlim(fractions[0] * 0.7, fractions[0] * 1.3)
    elif fractions and fractions[-1] / fractions[0] >= 10:
        ax.set_xscale("log")
        ax.minorticks_off()
    ax.set_xticks(fractions)
    ax.set_xticklabels([f"{f:g}" for f in fractions])
    ax.set_xlabel("labelled fraction of the training split")
    ax.set_ylabel("test AUC (macro one-vs-rest)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
