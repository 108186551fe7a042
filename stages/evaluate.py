"""Re-score a saved model (``model.pt`` of ``pipeline train``) on a feature store.

Classification models are scored here; segmentation models (``task: segment`` in
model.pt) go to ``stages.segment.evaluate_segmentation``. The store must hold
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

from cache import FeatureStore, SignatureMismatchError, StoreError

from .datasets.base import Dataset
from .geometry import saved_geometry
from .models import create_model
from .runtime import resolve_device, resolve_precision
from .train.classify import MODEL_FORMAT
from .train.data import ClassifyData, Prepared, default_workers, make_loader, open_joined
from .train.loop import Amp, load_checkpoint
from .train.metrics import write_json
from .train.scoring import score_and_write

ENCODER_KEYS = ("encoder", "checkpoint_sha256", "img_size", "preprocessing")


def load_classifier(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """model.pt -> (network in eval mode on ``device``, the saved dict)."""
    saved = load_checkpoint(path)
    if saved.get("format") != MODEL_FORMAT or saved.get("task") != "classify":
        raise ValueError(f"{path}: not a classification model.pt written by `pipeline train`")
    net = create_model(saved["model"], **saved["model_kwargs"])
    net.load_state_dict(saved["state_dict"])
    return net.to(device).eval(), saved


def check_encoder(saved: dict[str, Any], store: FeatureStore, model_path: str | Path) -> None:
    """Refuse a store whose embeddings come from another encoder/checkpoint/preprocessing."""
    want, have = saved["store"]["signature"], store.signature
    diff = [k for k in ENCODER_KEYS if want.get(k) != have.get(k)]
    if diff:
        raise SignatureMismatchError(
            f"{store.url}: embeddings made differently from the store {model_path} was trained on ({', '.join(diff)} "
            f"differ: trained with {want.get('encoder')!r}, store has {have.get('encoder')!r}); extract the dataset "
            "with the training encoder")


def evaluate_classifier(model_path: str | Path, store: str, out: str | Path | None = None, split: str = "test",
                        dataset: Dataset | None = None, kind: str | None = None, data_root: str | None = None,
                        dataset_options: dict[str, Any] | None = None, device: str = "auto",
                        precision: str = "auto", batch_size: int = 64, workers: int = -1,
                        in_memory: bool = False, plots: bool = True, progress: bool = True) -> dict[str, Any]:
    """Score ``model_path`` on ``split`` of ``store``; returns {split: metrics}. With ``out``,
    writes metrics.json, predictions.csv and the figures there."""
    dev = resolve_device(device)
    net, saved = load_classifier(model_path, dev)
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
    w = default_workers(dev, in_memory) if workers < 0 else workers
    loader = make_loader(data, batch_size, False, 0, w, fs.shard_size, pin=dev.type == "cuda")
    prep = Prepared(joined, {split: rows}, classes, img_size)
    target = Path(out) if out else None
    if target:
        target.mkdir(parents=True, exist_ok=True)
        metrics = score_and_write(net, {split: (rows, loader)}, prep, dev, amp, target, plots)
        write_json({**metrics, "model": str(model_path), "store": str(store)}, target / "metrics.json")
    else:
        from .train.scoring import predict_loader
        from .train.metrics import classification_metrics

        probs, _ = predict_loader(net, loader, dev, amp)
        metrics = {split: classification_metrics(fs.labels[rows], probs, classes)}
    return metrics


def _rows(saved: dict[str, Any], store: FeatureStore, usable: np.ndarray, split: str) -> np.ndarray:
    """Store rows of ``split``: the training assignment on the training store, else the store's own."""
    if split == "all":
        return usable
    same = saved["store"]["signature"].get("dataset_signature") == store.signature.get("dataset_signature")
    if same and split in saved.get("splits", {}):
        rows = store.index(saved["splits"][split])
        return np.intersect1d(rows, usable)
    return usable[np.asarray([str(s) for s in store.splits[usable]]) == split]


def evaluate(model_path: str | Path, store: str, out: str | Path | None = None, **kwargs: Any) -> dict[str, Any]:
    """Dispatch on the task recorded in model.pt (classify here, segment to stages.segment)."""
    saved = load_checkpoint(model_path)
    task = saved.get("task")
    if task == "segment":
        from .segment import evaluate_segmentation

        fs = FeatureStore(store)
        trained = saved.get("config", {})
        data_root = kwargs.get("data_root") or fs.attrs.get("dataset_root") or trained.get("data_root")
        kind = kwargs.get("kind") or fs.attrs.get("dataset_kind") or trained.get("dataset")
        if not data_root or not kind:
            raise ValueError(f"{store}: records no dataset; pass --dataset KIND --data-root PATH")
        if out is None:
            raise ValueError("evaluating a segmentation model needs --out DIR for its metrics and overlays")
        split = kwargs.get("split", "test")
        return evaluate_segmentation(model_path, store, data_root, kind, out, device=kwargs.get("device", "auto"),
                                     splits=(split,) if split != "all" else ("train", "val", "test"),
                                     dataset_options=kwargs.get("dataset_options"))
    if task != "classify":
        raise StoreError(f"{model_path}: unknown task {task!r}; not a model.pt written by `pipeline train`")
    return evaluate_classifier(model_path, store, out, **kwargs)


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
