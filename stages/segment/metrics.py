"""Segmentation metrics: per-class Dice, IoU and HD95, in 2D per image or in 3D per volume.

Conventions (also in the README):

- Classes: background (class 0) is not scored; classes 1..C-1 are, each one-vs-rest.
- Volumes (ACDC protocol): the slice predictions of one volume (``group``) are stacked in
  slice order (``index_in_group``) into a (D,H,W) array, the labels likewise, and the
  metrics are computed once per volume in 3D, then averaged over volumes. Missing slices
  are not padded: the stack holds the slices that exist, in order.
- HD95 (as ``medpy.metric.binary.hd95``): surface voxels are the voxels of a mask that a
  one-voxel erosion (face connectivity) removes; the distances from each surface voxel of
  one mask to the nearest surface voxel of the other, in both directions, are pooled and
  their 95th percentile is taken. Distances use the voxel spacing (z, y, x mm) when the
  dataset knows it, else pixels (unit spacing, also across slices).
- Empty masks: prediction and label both empty -> Dice 1, IoU 1, HD95 0. Exactly one empty
  -> Dice 0, IoU 0 and HD95 = the diagonal of the image/volume in spacing units (the
  largest distance possible), so a missed or hallucinated structure is penalised rather
  than dropped from the mean; such cases are counted per class in ``hd95_empty``.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage


def dice_iou(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two boolean masks of one shape (both empty -> 1, 1)."""
    p, g = pred.astype(bool), gt.astype(bool)
    inter = int(np.logical_and(p, g).sum())
    sp, sg = int(p.sum()), int(g.sum())
    if sp + sg == 0:
        return 1.0, 1.0
    return 2.0 * inter / (sp + sg), inter / (sp + sg - inter)


def surface(mask: np.ndarray) -> np.ndarray:
    """Boolean surface of a boolean mask: voxels a one-step face-connected erosion removes."""
    footprint = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=footprint, iterations=1)


def diagonal(shape: Sequence[int], spacing: Sequence[float] | None = None) -> float:
    sp = spacing or [1.0] * len(shape)
    return math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, sp)))


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """95th percentile symmetric surface distance of two boolean masks (2D or 3D), in the
    units of ``spacing`` (one number per axis; None = pixels). Empty cases: see module."""
    p, g = pred.astype(bool), gt.astype(bool)
    if spacing is not None and len(spacing) != p.ndim:
        raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} values for a {p.ndim}D mask")
    if not p.any() and not g.any():
        return 0.0
    if not p.any() or not g.any():
        return diagonal(p.shape, spacing)
    sp, sg = surface(p), surface(g)
    # distance of every voxel to the nearest surface voxel of the other mask
    to_g = ndimage.distance_transform_edt(~sg, sampling=spacing)
    to_p = ndimage.distance_transform_edt(~sp, sampling=spacing)
    d = np.concatenate([to_g[sp], to_p[sg]])
    return float(np.percentile(d, 95))


def case_metrics(pred: np.ndarray, gt: np.ndarray, num_classes: int, spacing: Sequence[float] | None = None,
                 with_hd95: bool = True) -> dict[str, list[float]]:
    """Metrics of one image or volume: integer label arrays of one shape ->
    {"dice": [...], "iou": [...], "hd95": [...], "empty": [...]} with one value per
    foreground class 1..C-1 (``empty`` is 1 where exactly one of pred/gt is empty)."""
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and label {gt.shape} differ in shape")
    out: dict[str, list[float]] = {"dice": [], "iou": [], "hd95": [], "empty": []}
    for c in range(1, num_classes):
        p, g = pred == c, gt == c
        d, j = dice_iou(p, g)
        out["dice"].append(d)
        out["iou"].append(j)
        out["hd95"].append(hd95(p, g, spacing) if with_hd95 else float("nan"))
        out["empty"].append(float(p.any() != g.any()))
    return out


def stack_volumes(items: Iterable[tuple[str, int, np.ndarray]]) -> dict[str, np.ndarray]:
    """(group, slice index, (H,W) array) triples -> {group: (D,H,W)} stacked in slice order.
    Slices of one volume must share one shape and have distinct indices."""
    by_group: dict[str, list[tuple[int, np.ndarray]]] = {}
    for group, k, a in items:
        by_group.setdefault(group, []).append((int(k), a))
    out = {}
    for group, sl in by_group.items():
        sl.sort(key=lambda t: t[0])
        ks = [k for k, _ in sl]
        if len(set(ks)) != len(ks):
            raise ValueError(f"volume {group!r}: slice index repeated in {ks}")
        shapes = {a.shape for _, a in sl}
        if len(shapes) != 1:
            raise ValueError(f"volume {group!r}: slices have different shapes {sorted(shapes)}")
        out[group] = np.stack([a for _, a in sl])
    return out


def summarize(cases: Sequence[Mapping[str, list[float]]], class_names: Sequence[str]) -> dict:
    """Average per-case metrics over cases -> {"dice": {class: mean}, "iou": ..., "hd95": ...,
    "mean_dice", "mean_iou", "mean_hd95", "cases", "hd95_empty": {class: count}}."""
    names = list(class_names[1:])
    out: dict = {"cases": len(cases)}
    for key in ("dice", "iou", "hd95"):
        arr = np.array([c[key] for c in cases], dtype=np.float64).reshape(len(cases), len(names))
        means = arr.mean(axis=0) if len(cases) else np.full(len(names), np.nan)
        out[key] = {n: float(m) for n, m in zip(names, means)}
        out[f"mean_{key}"] = float(means.mean()) if len(names) else float("nan")
    empty = np.array([c["empty"] for c in cases], dtype=np.float64).reshape(len(cases), len(names))
    out["hd95_empty"] = {n: int(v) for n, v in zip(names, empty.sum(axis=0))}
    return out


def evaluate_predictions(preds: Mapping[int, np.ndarray], gts: Mapping[int, np.ndarray], num_classes: int,
                         class_names: Sequence[str], groups: Sequence[str] | None = None,
                         slices: Sequence[int] | None = None,
                         spacing: Mapping[str, Sequence[float]] | None = None,
                         with_hd95: bool = True) -> dict:
    """Score predictions keyed by sample index. With ``groups``/``slices`` (indexed by the
    same keys; every key in a non-empty group) the scoring is 3D per volume, else 2D per
    image. Returns ``summarize``'s dict plus "mode" ("3d" or "2d") and "per_case"."""
    keys = sorted(preds)
    spacing = spacing or {}
    if groups is not None and slices is not None and keys and all(groups[k] for k in keys):
        p3 = stack_volumes((groups[k], slices[k], preds[k]) for k in keys)
        g3 = stack_volumes((groups[k], slices[k], gts[k]) for k in keys)
        cases = {v: case_metrics(p3[v], g3[v], num_classes, spacing.get(v), with_hd95) for v in sorted(p3)}
        mode = "3d"
    else:
        cases = {k: case_metrics(preds[k], gts[k], num_classes, None, with_hd95) for k in keys}
        mode = "2d"
    out = summarize(list(cases.values()), class_names)
    out["mode"] = mode
    out["per_case"] = {str(k): {"dice": v["dice"], "hd95": v["hd95"]} for k, v in cases.items()}
    return out
