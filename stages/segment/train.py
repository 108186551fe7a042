"""Training a prompt-free segmentation head on cached features (or the UNet baseline on
raw images) on ``stages.common.trainer.Trainer``: ``SegmentTrainer`` adds only Adam at a
constant learning rate, the CE + soft Dice batch step and validation by mean Dice (every
``val_every`` epochs); resume, early stopping, NaN stop, checkpoints and history are the
shared ones. Outputs in ``cfg.out``: model.pt, metrics.json, history.csv, last.pt (resume
state) and overlays/*.png."""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from stages.common.joined import store_record
from stages.common.jsonio import write_json
from stages.common.runtime import loader_workers, resolve_device, resolve_precision, tune_allocator
from stages.common.splits import carve_validation, select_training
from stages.common.trainer import Trainer, run_folder
from stages.common.training import Amp, load_checkpoint, seed_everything
from stages.models.heads import create_head
from stages.segment.config import SegmentConfig
from stages.segment.data import UNET_IMG_SIZE, Batches, SegmentData
from stages.segment.evaluate import pick_overlays, predict, save_overlays, score
from stages.segment.losses import segmentation_loss

MODEL_FORMAT = "sam-feature-pipeline/model"
HISTORY_FIELDS = ["epoch", "steps", "train_loss", "train_ce", "train_dice_loss", "val_dice", "lr", "seconds"]
# what a segmentation run writes into its folder (``--overwrite`` deletes these only)
OUTPUT_FILES = ("model.pt", "last.pt", "metrics.json", "history.csv", "overlays/")


def epoch_batches(n: int, batch_size: int, steps: int, seed: int, epoch: int) -> list[list[int]]:
    """Positions 0..n-1 in batches for one epoch, seeded by (seed, epoch) so a resumed run
    draws the same batches. steps=0: one shuffled pass (last batch may be smaller);
    steps>0: that many full batches from back-to-back shuffled passes."""
    rng = np.random.default_rng([seed, epoch])
    if steps == 0:
        perm = rng.permutation(n)
        return [perm[a:a + batch_size].tolist() for a in range(0, n, batch_size)]
    need = steps * batch_size
    stream = np.concatenate([rng.permutation(n) for _ in range(math.ceil(need / n))])[:need]
    return [stream[a:a + batch_size].tolist() for a in range(0, need, batch_size)]


def reopen_files(_: int) -> None:
    """In a forked DataLoader worker: drop file handles inherited from the parent (HDF5
    handles are not fork-safe); readers reopen them lazily."""
    ds = torch.utils.data.get_worker_info().dataset.data.dataset
    if hasattr(ds, "close"):
        ds.close()


class SegmentTrainer(Trainer):
    """CE + soft Dice on canvas targets; the best validation mean Dice is kept. The
    predictions of the best validation are kept too (``best_preds``) for the final scoring."""

    history_fields = HISTORY_FIELDS

    def __init__(self, cfg: SegmentConfig, net: nn.Module, data: SegmentData, train: list[int], val: list[int],
                 out: Path, record: dict[str, Any], amp: Amp, device: torch.device, workers: int):
        self.cfg, self.data, self.train, self.val, self.workers = cfg, data, train, val, workers
        img_size = data.img_size if net.input_kind == "features" else UNET_IMG_SIZE
        self.batches = Batches(data, net.input_kind, img_size)
        self.best_preds: dict[int, np.ndarray] | None = None
        self.val_preds: dict[int, np.ndarray] | None = None
        super().__init__(net, out, record, cfg.to_dict(), epochs=cfg.epochs, patience=cfg.patience, amp=amp,
                         device=device, resume=cfg.resume, progress=cfg.progress)

    def configure_optimizers(self):
        return torch.optim.Adam(self.net.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay), None

    def steps_per_epoch(self) -> int:
        return self.cfg.steps_per_epoch or math.ceil(len(self.train) / self.cfg.batch_size)

    def train_batches(self, epoch: int):
        cfg = self.cfg
        plan = [[self.train[p] for p in b] for b in
                epoch_batches(len(self.train), cfg.batch_size, cfg.steps_per_epoch, cfg.seed, epoch)]
        return DataLoader(self.batches, sampler=plan, batch_size=None, num_workers=self.workers,
                          worker_init_fn=reopen_files if self.workers else None)

    def train_step(self, batch, epoch):
        x, y = (t.to(self.device, non_blocking=True) for t in batch)
        with self.amp.autocast():
            logits = self.net(x)
        loss, parts = segmentation_loss(logits.float(), y)
        return loss, len(x), {"train_ce": parts["ce"], "train_dice_loss": parts["dice"]}

    def validate(self, epoch: int):
        if (epoch + 1) % self.cfg.val_every and epoch + 1 != self.cfg.epochs:
            return None
        preds = predict(self.net, self.data, self.val, self.device, self.cfg.batch_size, self.amp.autocast)
        dice = score(self.data, preds, with_hd95=False)["mean_dice"]
        self.val_preds = preds
        return dice, {"val_dice": dice}, {"dice": dice}

    def on_improved(self, epoch: int) -> None:
        self.best_preds = self.val_preds  # the final scoring reuses them

    def epoch_line(self, row) -> str:
        dice = row.get("val_dice", float("nan"))
        return (f"epoch {row['epoch']}/{self.epochs}  loss {row['train_loss']:.4f}  val dice {dice:.4f}  "
                f"{row['seconds']:.1f}s")


def build_head(cfg: SegmentConfig, data: SegmentData) -> nn.Module:
    kw = dict(cfg.head_options)
    if cfg.head == "autosam" and cfg.sam_checkpoint:
        ckpt = cfg.sam_checkpoint
        if ckpt == "encoder":
            ckpt = data.store.attrs.get("checkpoint_path")
            if not ckpt or not Path(ckpt).is_file():
                raise ValueError(f"--sam-checkpoint encoder: the checkpoint the store was extracted with ({ckpt}) "
                                 "is not on this machine; pass its path instead")
            from stages.encoders.checkpoints import file_sha256

            if file_sha256(ckpt) != data.store.attrs.get("checkpoint_sha256"):
                raise ValueError(f"--sam-checkpoint encoder: {ckpt} changed since the store was extracted; "
                                 "pass the right checkpoint path")
        kw["checkpoint"] = ckpt
    return create_head(cfg.head, data.num_classes, **kw)


def choose_splits(cfg: SegmentConfig, data: SegmentData) -> tuple[list[int], list[int], list[int], list[str]]:
    """(train, val, test, chosen training volumes): the dataset's splits, a carved val split
    when it has none, and the labelled subset of train (``--labeled-volumes`` / ``--train-fraction``)."""
    train_all = data.split_indices("train")
    if not train_all:
        train_all = data.split_indices("")
        if not train_all:
            raise ValueError(f"{cfg.data_root}: no training samples (split 'train'); check the dataset's splits")
    val = data.split_indices("val")
    if not val:
        units = [g or i for g, i in zip(data.groups, data.ids)]
        train_all, val = carve_validation(units, train_all, cfg.seed)
        print(f"note: no val split; holding out {len(val)} training samples for validation", file=sys.stderr)
    test = data.split_indices("test")
    train, volumes = select_training(data.groups, train_all, cfg.labeled_volumes, cfg.train_fraction, cfg.seed)
    return train, val, test, volumes


def model_record(cfg: SegmentConfig, data: SegmentData, model: nn.Module,
                 splits: dict[str, list[int]]) -> dict[str, Any]:
    """What model.pt and last.pt carry besides weights, config and epoch."""
    return {
        "format": MODEL_FORMAT, "version": 2, "task": "segment", "head": cfg.head,
        "head_options": dict(cfg.head_options), "num_classes": data.num_classes,
        "mask_classes": data.mask_classes, "input_kind": model.input_kind, "img_size": data.img_size,
        **store_record(data.store, {s: [int(data.rows[i]) for i in idx] for s, idx in splits.items()}),
        # the store's geometry; evaluate/predict prepare inputs the same way
        "geometry": data.geometry,
    }


def train_segmentation(cfg: SegmentConfig, data: SegmentData | None = None) -> dict[str, Any]:
    """Train ``cfg.head`` and write its outputs to ``cfg.out``; returns the metrics dict
    (also in metrics.json): val (and test) per-class Dice/IoU/HD95, the chosen training
    volumes, epochs run, seconds. ``data``: an already opened SegmentData of the same
    store and dataset, to share between runs (benchmarks); None opens it from ``cfg``."""
    t0 = time.perf_counter()
    tune_allocator()
    cfg.check()
    with run_folder(cfg.out, OUTPUT_FILES, overwrite=cfg.overwrite, resume=cfg.resume) as out:
        return _train(cfg, out, data, t0)


def _train(cfg: SegmentConfig, out: Path, data: SegmentData | None, t0: float) -> dict[str, Any]:
    """The run itself, in ``out``, which this process holds (``run_folder``)."""
    device = resolve_device(cfg.device)
    amp = Amp(device, resolve_precision(cfg.precision, device))
    if data is None:
        data = SegmentData(cfg.store, cfg.dataset, cfg.data_root, cfg.dataset_options, cfg.storage_options)
    train, val, test, volumes = choose_splits(cfg, data)
    data.verify(train + val + test)
    seed_everything(cfg.seed)
    model = build_head(cfg, data).to(device)
    if cfg.in_memory and model.input_kind == "features":
        data.load_in_memory(train + val)
    workers = loader_workers(device, cfg.in_memory) if cfg.workers < 0 else cfg.workers
    record = model_record(cfg, data, model, {"train": train, "val": val, "test": test})
    trainer = SegmentTrainer(cfg, model, data, train, val, out, record, amp, device, workers)
    best_epoch = trainer.fit()
    model.load_state_dict(load_checkpoint(out / "model.pt")["state_dict"])
    metrics: dict[str, Any] = {
        "task": "segment", "head": cfg.head, "store": cfg.store, "dataset": cfg.dataset,
        "encoder": data.store.attrs.get("encoder"), "device": str(device), "precision": amp.precision,
        "train_samples": len(train), "train_volumes": volumes, "val_samples": len(val), "test_samples": len(test),
        "epochs_run": trainer.epochs_run, "best_epoch": best_epoch, "stopped": trainer.stopped, "splits": {},
    }
    preds = trainer.best_preds
    if preds is None:
        preds = predict(model, data, val, device, cfg.batch_size, amp.autocast)
    metrics["splits"]["val"] = score(data, preds)
    metrics["overlays"] = save_overlays(data, preds, pick_overlays(data, val, cfg.overlays), out / "overlays")
    if test:
        metrics["splits"]["test"] = score(data, predict(model, data, test, device, cfg.batch_size, amp.autocast))
    metrics["seconds"] = time.perf_counter() - t0
    write_json(metrics, out / "metrics.json")
    return metrics
