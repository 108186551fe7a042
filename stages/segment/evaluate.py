"""Prediction, scoring and overlay pictures of a segmentation head; ``evaluate_segmentation``
re-scores a saved ``model.pt`` on a store + dataset (``pipeline evaluate``)."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from cache import FeatureStore, SignatureMismatchError
from cache.ownership import PNG_TEXT
from stages.common.geometry import PAD, saved_geometry
from stages.common.joined import check_encoder
from stages.common.jsonio import write_json
from stages.common.runtime import resolve_device
from stages.common.trainer import evaluation_folder
from stages.common.training import load_checkpoint
from stages.models.heads import create_head
from stages.segment.data import UNET_IMG_SIZE, SegmentData, logits_to_raw
from stages.segment.metrics import evaluate_predictions



def head_img_size(model: nn.Module, store_img_size: int) -> int:
    """The canvas the head's input covers: the store's encoder input, or 256 for the UNet."""
    return store_img_size if getattr(model, "input_kind", "features") == "features" else UNET_IMG_SIZE


@torch.inference_mode()
def head_labels(model: nn.Module, x: torch.Tensor, sizes: Sequence[tuple[int, int]], img_size: int,
                autocast=None, geometry: str = PAD) -> list[np.ndarray]:
    """Run the head on a batch ``x`` (embeddings, or UNet images) and turn its 256x256 canvas
    logits into (H,W) uint8 argmax label maps at each image's own size ``sizes[k]``
    (``logits_to_raw``: crop the valid region, resize bilinear, then argmax). The one code
    path from logits to labels: evaluation, training's validation and ``pipeline predict``.
    ``geometry``: the store's (``stages.geometry``), padded or stretched."""
    model.eval()
    if autocast is not None:
        with autocast():
            logits = model(x).float()
    else:
        logits = model(x)
    return [logits_to_raw(logits[k:k + 1], tuple(size), img_size, geometry).argmax(1)[0].to(torch.uint8).cpu().numpy()
            for k, size in enumerate(sizes)]


@torch.inference_mode()
def predict(model: nn.Module, data: SegmentData, indices: Sequence[int], device: torch.device,
            batch_size: int = 8, autocast=None) -> dict[int, np.ndarray]:
    """Label maps in each image's own geometry: {index: (H,W) uint8 argmax}."""
    kind = getattr(model, "input_kind", "features")
    img_size = head_img_size(model, data.img_size)
    out: dict[int, np.ndarray] = {}
    idx = list(indices)
    for a in range(0, len(idx), batch_size):
        chunk = sorted(idx[a:a + batch_size])
        sizes = [(data.item(i).height, data.item(i).width) for i in chunk]
        labels = head_labels(model, data.inputs(chunk, kind).to(device), sizes, img_size, autocast, data.geometry)
        out.update(zip(chunk, labels))
    return out


def score(data: SegmentData, preds: dict[int, np.ndarray], with_hd95: bool = True) -> dict[str, Any]:
    """Metrics of predictions (3D per volume for volumetric data, 2D per image otherwise)."""
    gts = {i: data.mask(i) for i in preds}
    volumetric = all(data.groups[i] != "" and data.slices[i] >= 0 for i in preds)
    res = evaluate_predictions(
        preds, gts, data.num_classes, data.mask_classes,
        groups=data.groups if volumetric else None, slices=data.slices if volumetric else None,
        spacing=data.dataset.spacing, with_hd95=with_hd95)
    if res["mode"] == "2d":  # name the cases by sample id
        res["per_case"] = {data.ids[int(k)]: v for k, v in res["per_case"].items()}
    res["spacing"] = "mm" if volumetric and all(g in data.dataset.spacing for g in set(data.groups[list(preds)])) \
        else "pixels"
    return res


def pick_overlays(data: SegmentData, indices: Sequence[int], limit: int) -> list[int]:
    """Samples worth a picture: per volume (first ``limit`` volumes) the slice with the most
    labelled foreground; for 2D data the first ``limit`` samples with foreground (else any)."""
    if limit <= 0 or not indices:
        return []
    if all(data.groups[i] for i in indices):
        by_vol: dict[str, list[int]] = {}
        for i in indices:
            by_vol.setdefault(data.groups[i], []).append(i)
        picks = []
        for vol in sorted(by_vol)[:limit]:
            picks.append(max(by_vol[vol], key=lambda i: (int((data.mask(i) > 0).sum()), -i)))
        return picks
    with_fg = [i for i in indices if (data.mask(i) > 0).any()]
    return (with_fg + [i for i in indices if i not in set(with_fg)])[:limit]


def class_colormap(num_classes: int):
    """Matplotlib colormap of label maps: background transparent, class c in tab10 colour
    c-1 at 55% opacity (the same colours in every overlay the project draws)."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    colors = plt.get_cmap("tab10").colors
    return ListedColormap([(0, 0, 0, 0)] + [(*colors[(c - 1) % 10], 0.55) for c in range(1, num_classes)])


def display_image(image: np.ndarray) -> np.ndarray:
    """Raw pixels -> float (H,W) or (H,W,3) min-max scaled to [0,1] for a picture."""
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 3:
        img = img[..., :3] if img.shape[2] >= 3 else img[..., 0]
    lo, hi = float(img.min()), float(img.max())
    return (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)


def save_overlays(data: SegmentData, preds: dict[int, np.ndarray], indices: Sequence[int], folder: Path) -> list[str]:
    """One PNG per sample: image | ground truth | prediction (classes coloured over the image)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    cmap = class_colormap(data.num_classes)
    written = []
    for i in indices:
        img = display_image(data.image(i))
        gt = data.mask(i)
        fig, axes = plt.subplots(1, 3, figsize=(9, 3.3))
        for ax, title, lab in zip(axes, ("image", "ground truth", "prediction"), (None, gt, preds[i])):
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
            if lab is not None:
                ax.imshow(lab, cmap=cmap, vmin=0, vmax=data.num_classes - 1, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        fig.suptitle(data.ids[i], fontsize=9)
        fig.tight_layout()
        path = folder / (data.ids[i].replace("/", "__").replace("\\", "__") + ".png")
        fig.savefig(path, dpi=80, metadata=PNG_TEXT)
        plt.close(fig)
        written.append(str(path))
    return written


def load_model(path: str | Path, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """A ``model.pt`` written by ``train_segmentation`` -> (head on device, eval mode; saved dict)."""
    saved = load_checkpoint(path)
    if saved.get("task") != "segment":
        raise ValueError(f"{path}: a {saved.get('task')!r} model, not a segmentation one; "
                         "use the model.pt of a `pipeline train --task segment` run")
    model = create_head(saved["head"], saved["num_classes"], **saved.get("head_options", {}))
    model.load_state_dict(saved["state_dict"])
    return model.to(device).eval(), saved


def check_store(saved: dict[str, Any], data: SegmentData, model_path: str | Path) -> None:
    """The store must hold embeddings of the same encoder and preprocessing as at training,
    and the dataset the same mask classes."""
    if saved["mask_classes"] != data.mask_classes:
        raise SignatureMismatchError(f"{model_path}: trained on mask classes {saved['mask_classes']}, the dataset has "
                                     f"{data.mask_classes}; evaluate on a dataset with the same classes")
    if saved.get("input_kind") != "features":
        return  # the UNet reads raw images; the store only lists the samples
    check_encoder(saved, data.store, model_path)


def evaluate_segmentation(model_path: str | Path, store: str, data_root: str, dataset: str, out: str | Path,
                          device: str = "auto", splits: Sequence[str] = ("val", "test"), batch_size: int = 8,
                          overlays: int = 6, dataset_options: dict[str, Any] | None = None,
                          storage_options: dict[str, Any] | None = None,
                          keep_predictions: bool = False) -> dict[str, Any]:
    """Score a saved segmentation model on the given splits of a store + dataset (splits
    without samples are skipped; all samples when the dataset names no splits at all);
    writes ``out/metrics.json`` and overlays. Returns {"splits": {split: metrics}, ...};
    ``keep_predictions`` adds "predictions": {split: {sample id: (H,W) uint8 labels}}, the
    label maps that were scored (not written to metrics.json)."""
    t0 = time.perf_counter()
    dev = resolve_device(device)
    model, saved = load_model(model_path, dev)
    data = SegmentData(store, dataset, data_root, dataset_options, storage_options)
    check_store(saved, data, model_path)
    # the training geometry (equal to the store's for embedding heads, by check_store); the
    # UNet may be scored on any store of the dataset and must see its images as it was trained
    data.geometry = saved_geometry(saved)
    out = Path(out)
    chosen = {s: data.split_indices(s) for s in splits}
    chosen = {s: v for s, v in chosen.items() if v}
    if not chosen:
        named = sorted({str(s) for s in data.splits if s})
        if named:
            raise ValueError(f"{data_root}: no samples in split(s) {', '.join(splits)}; the dataset has "
                             f"{', '.join(named)}: pass one of those (--split)")
        every = [i for i in range(len(data.ids)) if data.ok[i]]
        if not every:
            raise ValueError(f"{data_root}: no usable samples to evaluate")
        print(f"note: the dataset has no splits; evaluating all {len(every)} samples", file=sys.stderr)
        chosen = {"all": every}
    result: dict[str, Any] = {"task": "segment", "model": str(model_path), "head": saved["head"],
                              "store": store, "dataset": dataset, "data_root": str(data_root), "splits": {}}
    kept: dict[str, dict[str, np.ndarray]] = {}
    for split, idx in chosen.items():
        data.verify(idx)
        preds = predict(model, data, idx, dev, batch_size)
        result["splits"][split] = score(data, preds)
        if keep_predictions:
            kept[split] = {data.ids[i]: p for i, p in preds.items()}
        if split == next(iter(chosen)):
            picks = pick_overlays(data, idx, overlays)
            result["overlays"] = save_overlays(data, preds, picks, out / "overlays")
    result["seconds"] = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    write_json(result, out / "metrics.json")
    if keep_predictions:
        result["predictions"] = kept
    return result


def format_scores(result: dict[str, Any]) -> str:
    """{"splits": {split: score()}} -> a text table for stdout: per split, Dice, IoU and
    HD95 of every foreground class and their mean (the whole record is in metrics.json)."""
    lines = [f"{'split':<8}{'class':<14}{'Dice':>8}{'IoU':>8}{'HD95':>9}"]
    for split, m in result.get("splits", {}).items():
        rows = [(c, m["dice"][c], m["iou"][c], m["hd95"][c]) for c in m["dice"]]
        rows.append(("mean", m["mean_dice"], m["mean_iou"], m["mean_hd95"]))
        for name, dice, iou, hd in rows:
            hd_text = "-" if hd is None or hd != hd else f"{hd:.2f}"
            lines.append(f"{split:<8}{name:<14}{dice:>8.4f}{iou:>8.4f}{hd_text:>9}")
        lines.append(f"{'':<8}({m.get('mode', '2d')}, {m.get('cases', '?')} cases)")
    return "\n".join(lines)


def evaluate_saved(model_path: str | Path, store: str, out: str | Path | None, split: str = "test",
                   kind: str | None = None, data_root: str | None = None, device: str = "auto",
                   dataset_options: dict[str, Any] | None = None, overwrite: bool = False) -> dict[str, Any]:
    """``pipeline evaluate`` of a segmentation model.pt: the dataset from the options, else
    the store's record, else the training config; ``split`` "all" scores every split. ``out``
    must be new, empty, or (with ``overwrite``) an earlier evaluation (``evaluation_folder``)."""
    fs = FeatureStore(store)
    trained = load_checkpoint(model_path).get("config", {})
    data_root = data_root or fs.attrs.get("dataset_root") or trained.get("data_root")
    kind = kind or fs.attrs.get("dataset_kind") or trained.get("dataset")
    if not data_root or not kind:
        raise ValueError(f"{store}: records no dataset; pass --dataset KIND --data-root PATH")
    if out is None:
        raise ValueError("evaluating a segmentation model needs --out DIR for its metrics and overlays")
    evaluation_folder(out, ("metrics.json", "overlays/"), overwrite)
    return evaluate_segmentation(model_path, store, data_root, kind, out, device=device,
                                 splits=(split,) if split != "all" else ("train", "val", "test"),
                                 dataset_options=dataset_options)
