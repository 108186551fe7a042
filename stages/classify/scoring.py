"""Scoring a classifier over a loader, and writing a run's predictions and figures."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from stages.classify.augment import View, transform
from stages.classify.data import IMAGE_MEAN, IMAGE_STD, Prepared, prepare_image
from stages.classify.metrics import classification_metrics, confusion, safe_name
from stages.common.geometry import input_geometry
from stages.common.training import Amp


def to_device(batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    nb = device.type == "cuda"
    image = batch["image"].to(device, non_blocking=nb) if batch["image"] is not None else None
    sam = batch["sam"].to(device, non_blocking=nb).float() if batch["sam"] is not None else None
    return image, sam, batch["label"].to(device, non_blocking=nb)


def view_logits(net: nn.Module, image: torch.Tensor | None, sam: torch.Tensor | None,
                views: Sequence[View] = ()) -> torch.Tensor:
    """(B,K) float32 logits of ``net``; with ``views`` (``augment.tta_views``), their mean over
    those symmetries applied to the image and the SAM grid together (test-time augmentation).
    Logits, not probabilities, are averaged, so a blended prior adds to the mean as it adds
    to each view (the pooled prior is the same for every view)."""
    if not views:
        return net(image, sam).float()
    return torch.stack([net(transform(image, v), transform(sam, v)).float() for v in views]).mean(0)


@torch.no_grad()
def iter_logits(net: nn.Module, loader, device: torch.device, amp: Amp, views: Sequence[View] = ()):
    """Per batch of ``loader``, in eval mode: (positions (B,), float32 logits (B,K), labels (B,),
    SAM input or None), the one forward loop of scoring, validation and blending."""
    net.eval()
    for batch in loader:
        image, sam, y = to_device(batch, device)
        with amp.autocast():
            logits = view_logits(net, image, sam, views)  # float32 already
        yield batch["pos"], logits, y, sam


def predict_loader(net: nn.Module, loader, device: torch.device, amp: Amp,
                   criterion: nn.Module | None = None, views: Sequence[View] = ()) -> tuple[np.ndarray, float]:
    """Class probabilities (N,K) in dataset position order, and the mean loss; ``views``:
    test-time augmentation (``view_logits``)."""
    n = len(loader.dataset)
    probs: np.ndarray | None = None
    total, count = 0.0, 0
    for pos, logits, y, _ in iter_logits(net, loader, device, amp, views):
        if criterion is not None:
            total += float(criterion(logits, y)) * len(y)
            count += len(y)
        p = torch.softmax(logits, dim=1).cpu().numpy()
        if probs is None:
            probs = np.zeros((n, p.shape[1]), np.float64)
        probs[pos.numpy()] = p
    return probs, (total / count if count else float("nan"))


def score_and_write(net: nn.Module, parts: dict[str, tuple[np.ndarray, Any]], prep: Prepared, device, amp: Amp,
                    out: Path, plots: bool = True, attention_images: int = 6,
                    views: Sequence[View] = ()) -> dict[str, Any]:
    """Score each split (``views``: test-time augmentation), write predictions.csv and the
    figures; returns {split: metrics}."""
    st, classes = prep.joined.store, prep.classes
    metrics: dict[str, Any] = {}
    rows_out = []
    results = {}
    for split, (rows, ldr) in parts.items():
        probs, _ = predict_loader(net, ldr, device, amp, views=views)
        y = st.labels[rows]
        metrics[split] = classification_metrics(y, probs, classes)
        results[split] = (rows, y, probs)
        for r, yy, p in zip(rows, y, probs):
            rows_out.append([str(st.ids[r]), split, int(yy), classes[int(yy)], int(p.argmax()), classes[int(p.argmax())],
                             *[f"{v:.6f}" for v in p]])
    with open(out / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "split", "label", "label_name", "pred", "pred_name",
                    *[f"prob_{safe_name(c)}" for c in classes]])
        w.writerows(rows_out)
    split = "test" if "test" in results else next(iter(results), None)
    if getattr(net, "stage_names", None) and split and len(results[split][0]):
        # always, plots or not: how far the SAM features moved the backbone is a result
        write_gate_stats(net, st, results[split][0], device, out / "slca_gates.json")
    if plots:
        write_plots(net, results, prep, device, out, attention_images)
    return metrics


def write_plots(net, results, prep: Prepared, device, out: Path, attention_images: int) -> None:
    from stages.classify import plots

    classes = prep.classes
    split = "test" if "test" in results else next(iter(results))
    rows, y, probs = results[split]
    if len(rows):
        plots.plot_confusion(confusion(y, probs, len(classes)), classes, out / f"confusion_{split}.png",
                             f"{split} confusion")
        plots.plot_roc(y, probs, classes, out / f"roc_{split}.png", f"{split} ROC")
    if (out / "history.csv").exists():
        with open(out / "history.csv", newline="") as f:
            hist = list(csv.DictReader(f))
        if hist:
            plots.plot_history(hist, out / "history.png")
    if getattr(net, "stage_names", None) and attention_images > 0 and len(rows):
        pick = _spread(y, attention_images)
        sel = rows[pick]
        st, ds = prep.joined.store, prep.joined.dataset
        geometry = input_geometry(st.attrs.get("preprocessing"))
        images = torch.stack([prepare_image(ds.load_image(int(r)), prep.img_size, geometry) for r in sel])
        sam = torch.from_numpy(st.read(sel, np.float32)).to(device)
        gates = {k: v.float().cpu().numpy() for k, v in net.eval().gates(sam).items()}
        shown = (images * IMAGE_STD + IMAGE_MEAN).clamp(0, 1)
        shown = shown[:, 0].numpy() if torch.equal(shown[:, 0], shown[:, 1]) else shown.permute(0, 2, 3, 1).numpy()
        titles = [f"{st.ids[r]}\n{classes[y[i]]} -> {classes[int(probs[i].argmax())]} "
                  f"({probs[i].max():.2f})" for r, i in zip(sel, pick)]
        plots.plot_attention(shown, gates, titles, out / "slca_attention.png")


def write_gate_stats(net, store, rows: np.ndarray, device, path: Path, limit: int = 256) -> dict[str, Any]:
    """Per-stage statistics of the SLCA gates (``plots.gate_stats``) over up to ``limit``
    evaluated samples, as JSON beside slca_attention.png: how far the SAM features move
    the backbone, in numbers."""
    import json

    from stages.classify import plots

    parts: dict[str, list[np.ndarray]] = {}
    for k in range(0, min(len(rows), limit), 32):
        sam = torch.from_numpy(store.read(rows[k:min(k + 32, limit)], np.float32)).to(device)
        for stage, g in net.eval().gates(sam).items():
            parts.setdefault(stage, []).append(g.float().cpu().numpy())
    stats = plots.gate_stats({s: np.concatenate(v) for s, v in parts.items()})
    path.write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def _spread(y: np.ndarray, n: int) -> np.ndarray:
    """Up to ``n`` positions, classes taken in turn (first samples of each class)."""
    by = [list(np.flatnonzero(y == c)) for c in np.unique(y)]
    pick: list[int] = []
    while len(pick) < n and any(by):
        for b in by:
            if b and len(pick) < n:
                pick.append(b.pop(0))
    return np.asarray(sorted(pick), dtype=np.int64)
