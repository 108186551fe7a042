"""Re-score a saved model (``model.pt`` of ``pipeline train``) on a feature store.

Classification models are scored here; segmentation models (``task: segment`` in
model.pt) by ``stages.segment.evaluate``. The store must hold
embeddings of the same encoder, checkpoint and preprocessing as the training store.
On the training store itself the saved split assignment is reused, so ``test`` is the
same test set as at training; on another store the store's own split column is used
(``--split all`` scores every labelled sample).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cache import FeatureStore, SignatureMismatchError
from stages.classify.augment import View, parse_augment, tta_views
from stages.classify.data import ClassifyData, Prepared, make_loader
from stages.common.jsonio import write_json
from stages.classify.scoring import score_and_write
from stages.classify.train import MODEL_FORMAT
from stages.common.geometry import saved_geometry
from stages.common.joined import check_encoder, open_joined
from stages.common.runtime import loader_workers, resolve_device, resolve_precision
from stages.common.trainer import evaluation_folder
from stages.common.training import Amp, load_checkpoint
from stages.datasets.base import Dataset
from stages.models import create_model

# what `pipeline evaluate --out` writes for a classifier (``scoring.score_and_write``)
OUTPUTS = ("metrics.json", "predictions.csv", *(f"{kind}_{split}.png" for kind in ("confusion", "roc")
                                                 for split in ("train", "val", "test", "all")),
           "slca_gates.json", "slca_attention.png")


def load_classifier(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """model.pt -> (network in eval mode on ``device``, the saved dict)."""
    saved = load_checkpoint(path)
    if saved.get("format") != MODEL_FORMAT or saved.get("task") != "classify":
        raise ValueError(f"{path}: not a classification model.pt written by `pipeline train`")
    net = create_model(saved["model"], **saved["model_kwargs"])
    net.load_state_dict(saved["state_dict"])
    return net.to(device).eval(), saved


def evaluate_classifier(model_path: str | Path, store: str, out: str | Path | None = None, split: str = "test",
                        dataset: Dataset | None = None, kind: str | None = None, data_root: str | None = None,
                        dataset_options: dict[str, Any] | None = None, device: str = "auto",
                        precision: str = "auto", batch_size: int = 64, workers: int = -1,
                        in_memory: bool = False, plots: bool = True, progress: bool = True,
                        tta: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Score ``model_path`` on ``split`` of ``store``; returns {split: metrics}. With ``out``
    (new, empty, or with ``overwrite`` an earlier evaluation: ``evaluation_folder``), writes
    metrics.json, predictions.csv and the figures there. ``tta``: average the logits over
    the symmetries the model was trained on (``saved_views``)."""
    dev = resolve_device(device)
    net, saved = load_classifier(model_path, dev)
    views = saved_views(saved) if tta else ()
    target = evaluation_folder(out, OUTPUTS, overwrite) if out else None
    fs = FeatureStore(store)
    check_encoder(saved, fs, model_path)
    classes = list(saved["classes"])
    if fs.classes and list(fs.classes) != classes:
        raise SignatureMismatchError(f"{store}: classes {fs.classes} differ from the model's {classes}; "
                                     "evaluate on a store of the same classes")
    joined = open_joined(fs, dataset, kind, data_root, dataset_options)
    rows = _rows(saved, joined.store, joined.rows, split)
    if len(rows) == 0:
        raise ValueError(f"{store}: no labelled samples in split {split!r}; use --split all (or train/val/test)")
    img_size = int(saved["img_size"])
    amp = Amp(dev, resolve_precision(precision, dev))
    data = ClassifyData(joined, rows, img_size, net.uses_image, net.uses_sam, in_memory, progress,
                        geometry=saved_geometry(saved))
    w = loader_workers(dev, in_memory) if workers < 0 else workers
    loader = make_loader(data, batch_size, False, 0, w, fs.shard_size, pin=dev.type == "cuda")
    prep = Prepared(joined, {split: rows}, classes, img_size)
    if target:
        metrics = score_and_write(net, {split: (rows, loader)}, prep, dev, amp, target, plots, views=views)
        write_json({**metrics, "model": str(model_path), "store": str(store), "tta": tta}, target / "metrics.json")
    else:
        from stages.classify.metrics import classification_metrics
        from stages.classify.scoring import predict_loader

        probs, _ = predict_loader(net, loader, dev, amp, views=views)
        metrics = {split: classification_metrics(fs.labels[rows], probs, classes)}
    return metrics


def saved_views(saved: dict[str, Any]) -> tuple[View, ...]:
    """The test-time augmentation views of a saved model: the symmetries of its ``--augment``."""
    return tta_views(parse_augment(saved.get("config", {}).get("augment", "flip")))


def _rows(saved: dict[str, Any], store: FeatureStore, usable: np.ndarray, split: str) -> np.ndarray:
    """Store rows of ``split``: the training assignment on the training store, else the store's own."""
    if split == "all":
        return usable
    same = saved["store"]["signature"].get("dataset_signature") == store.signature.get("dataset_signature")
    if same and split in saved.get("splits", {}):
        rows = store.index(saved["splits"][split])
        return np.intersect1d(rows, usable)
    return usable[np.asarray([str(s) for s in store.splits[usable]]) == split]


def format_metrics(metrics: dict[str, Any]) -> str:
    """{split: {name: value}} -> an aligned text table for stdout."""
    splits = [s for s, v in metrics.items() if isinstance(v, dict)]
    names = [k for k in metrics[splits[0]]] if splits else []
    lines = [f"{'metric':<28}" + "".join(f"{s:>12}" for s in splits)]
    for n in names:
        vals = [metrics[s].get(n) for s in splits]
        cells = "".join(f"{v:>12.4f}" if isinstance(v, float) else f"{v!s:>12}" for v in vals)
        lines.append(f"{n:<28}{cells}")
    return "\n".join(lines)
