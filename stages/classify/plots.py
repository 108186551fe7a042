"""PNG figures of a training run (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

from cache.ownership import PNG_TEXT  # noqa: E402


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata=PNG_TEXT)
    plt.close(fig)
    return path


def plot_confusion(cm: np.ndarray, classes: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Confusion matrix (rows true, columns predicted), counts and row fractions."""
    k = len(classes)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * k, 1.0 + 0.9 * k))
    frac = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{cm[i, j]}\n{frac[i, j]:.0%}", ha="center", va="center",
                    color="white" if frac[i, j] > 0.5 else "black", fontsize=8)
    short = [str(c)[:14] for c in classes]
    ax.set_xticks(range(k), short, rotation=45, ha="right")
    ax.set_yticks(range(k), short)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return _save(fig, path)


def plot_roc(y: np.ndarray, prob: np.ndarray, classes: Sequence[str], path: str | Path, title: str = "") -> Path:
    """ROC curve per class (one-vs-rest; class 1 only for binary problems)."""
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    which = [1] if len(classes) == 2 else range(len(classes))
    for c in which:
        pos = np.asarray(y) == c
        if pos.all() or not pos.any():
            continue
        fpr, tpr, _ = skm.roc_curve(pos, prob[:, c])
        ax.plot(fpr, tpr, label=f"{str(classes[c])[:20]} (AUC {skm.auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=7)
    return _save(fig, path)


def plot_history(rows: Sequence[Mapping[str, str]], path: str | Path) -> Path:
    """Training/validation loss and validation AUC/accuracy per epoch."""
    def col(name: str) -> np.ndarray:
        return np.asarray([float(r[name]) if r.get(name) not in (None, "") else np.nan for r in rows])

    ep = col("epoch")
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    a.plot(ep, col("train_loss"), label="train")
    a.plot(ep, col("val_loss"), label="val")
    a.set_xlabel("epoch")
    a.set_ylabel("loss")
    a.legend()
    for name in ("val_auc", "val_accuracy", "val_balanced_accuracy"):
        b.plot(ep, col(name), label=name[4:])
    b.set_xlabel("epoch")
    b.set_ylim(0, 1.02)
    b.legend()
    return _save(fig, path)


def gate_stats(gates: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per stage, over gates (N,C,g,g): range, mean and std of every factor, the spread
    over channels (std across C, averaged over samples and windows) and the largest
    departure from the identity, max |gate - 1|."""
    out = {}
    for stage, g in gates.items():
        g = np.asarray(g, np.float64)
        out[stage] = {"min": float(g.min()), "max": float(g.max()), "mean": float(g.mean()),
                      "std": float(g.std()), "channel_std": float(g.std(axis=1).mean()),
                      "max_abs_dev": float(np.abs(g - 1).max()), "n": int(g.shape[0])}
    return out


def plot_attention(images: np.ndarray, gates: Mapping[str, np.ndarray], titles: Sequence[str],
                   path: str | Path) -> Path:
    """One row per image: the image, then per stage its SLCA gate's channel mean as a
    departure from the identity, (gate - 1) in %, on one symmetric colour scale per stage
    (so a +-2% effect reads +-2%, not as a full colour range); each panel names the range
    of the factor over channels and windows and its spread over channels. A last row holds
    each stage's histogram of every factor of the shown images.

    images (N,H,W) or (N,H,W,3) in [0,1]; gates: stage -> (N,C,g,g), upsampled for display."""
    n, stages = len(images), list(gates)
    fig, axes = plt.subplots(n + 1, 1 + len(stages), figsize=(2.4 * (1 + len(stages)), 2.3 * (n + 1) + 0.6),
                             squeeze=False, layout="constrained")
    for j, s in enumerate(stages):
        g = np.asarray(gates[s], np.float64)
        dev = (g.mean(axis=1) - 1) * 100
        lim = max(float(np.abs(dev).max()), 1e-3)
        for i in range(n):
            img = images[i]
            h, w = img.shape[:2]
            ax = axes[i, 1 + j]
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
            im = ax.imshow(dev[i], cmap="coolwarm", vmin=-lim, vmax=lim, alpha=0.55,
                           extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation="bilinear")
            head = f"SLCA {s}\n" if i == 0 else ""
            ax.set_title(f"{head}[{g[i].min():.3f}, {g[i].max():.3f}] sd_c {g[i].std(axis=0).mean():.3f}",
                         fontsize=6)
        bar = fig.colorbar(im, ax=axes[:n, 1 + j].tolist(), location="bottom", shrink=0.9, aspect=18)
        bar.set_label("channel mean: gate - 1 (%)", fontsize=6)
        bar.ax.tick_params(labelsize=6)
        hx = axes[n, 1 + j]
        hx.hist(g.ravel(), bins=60, color="0.35", log=True)
        hx.axvline(1.0, color="r", lw=0.8)
        hx.set_title(f"{s}: every factor", fontsize=7)
        hx.tick_params(labelsize=6)
    for i in range(n):
        axes[i, 0].imshow(images[i], cmap="gray" if images[i].ndim == 2 else None, vmin=0, vmax=1)
        axes[i, 0].set_title(titles[i], fontsize=7)
    for ax in [*axes[:n].ravel(), axes[n, 0]]:
        ax.axis("off")
    fig.suptitle("SLCA gate per stage (1 = identity); [range over channels and windows], "
                 "sd_c = spread over channels", fontsize=8)
    return _save(fig, path)
