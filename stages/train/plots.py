"""PNG figures of a training run (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn import metrics as skm  # noqa: E402


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
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


def plot_attention(images: np.ndarray, maps: Mapping[str, np.ndarray], titles: Sequence[str],
                   path: str | Path) -> Path:
    """One row per image: the image, then its SLCA gate (channel mean) per stage overlaid.

    images (N,H,W) or (N,H,W,3) in [0,1]; maps: stage -> (N,g,g), upsampled for display."""
    n, stages = len(images), list(maps)
    fig, axes = plt.subplots(n, 1 + len(stages), figsize=(2.2 * (1 + len(stages)), 2.3 * n), squeeze=False)
    for i in range(n):
        img = images[i]
        h, w = img.shape[:2]
        axes[i, 0].imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
        axes[i, 0].set_title(titles[i], fontsize=7)
        for j, s in enumerate(stages):
            m = maps[s][i]
            ax = axes[i, 1 + j]
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
            ax.imshow(m, cmap="jet", alpha=0.45, extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation="bilinear")
            if i == 0:
                ax.set_title(f"SLCA {s}\n[{m.min():.3f}, {m.max():.3f}]", fontsize=7)
            else:
                ax.set_title(f"[{m.min():.3f}, {m.max():.3f}]", fontsize=7)
    for ax in axes.ravel():
        ax.axis("off")
    fig.suptitle("SLCA gate (channel mean; colour scaled per map)", fontsize=8)
    return _save(fig, path)
