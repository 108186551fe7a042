"""Training a prompt-free segmentation head on cached features (or the UNet baseline on
raw images): Adam, CE + soft Dice, early stopping on the validation Dice, NaN guard,
resume. Outputs in ``cfg.out``: model.pt, metrics.json, history.csv, last.pt
(resume state) and overlays/*.png."""
from __future__ import annotations

import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from cache.ownership import RUN_MARKERS, prepare_run_folder

from ..models.heads import create_head
from ..progress import progress_bar
from ..runtime import resolve_device, resolve_precision, tune_allocator
from ..train.loop import (
    Amp,
    EarlyStopping,
    History,
    check_finite,
    check_resumable,
    load_checkpoint,
    rng_state,
    save_atomic,
    seed_everything,
    set_rng_state,
)
from .config import RESUME_KEYS, SegmentConfig
from .data import UNET_IMG_SIZE, Batches, SegmentData, carve_validation, select_training
from .evaluate import pick_overlays, predict, save_overlays, score
from .losses import segmentation_loss

HISTORY_FIELDS = ["epoch", "steps", "train_loss", "train_ce", "train_dice_loss", "val_dice", "lr", "seconds"]


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


def _reopen_files(_: int) -> None:
    """In a forked DataLoader worker: drop file handles inherited from the parent (HDF5
    handles are not fork-safe); readers reopen them lazily."""
    ds = torch.utils.data.get_worker_info().dataset.data.dataset
    if hasattr(ds, "close"):
        ds.close()


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


def _splits(cfg: SegmentConfig, data: SegmentData) -> tuple[list[int], list[int], list[int], list[str]]:
    train_all = data.split_indices("train")
    if not train_all:
        unsplit = data.split_indices("")
        if not unsplit:
            raise ValueError(f"{cfg.data_root}: no training samples (split 'train'); check the dataset's splits")
        train_all = unsplit
    val = data.split_indices("val")
    if not val:
        train_all, val = carve_validation(data, train_all, cfg.seed)
        print(f"note: no val split; holding out {len(val)} training samples for validation", file=sys.stderr)
    test = data.split_indices("test")
    train, volumes = select_training(data, train_all, cfg.labeled_volumes, cfg.train_fraction, cfg.seed)
    return train, val, test, volumes


def _model_record(cfg: SegmentConfig, data: SegmentData, model: nn.Module, state: dict, epoch: int,
                  val_dice: float) -> dict[str, Any]:
    return {
        "task": "segment",
        "head": cfg.head,
        "head_options": dict(cfg.head_options),
        "num_classes": data.num_classes,
        "mask_classes": data.mask_classes,
        "input_kind": model.input_kind,
        "img_size": data.img_size,
        "geometry": data.geometry,  # padded or stretched input (stages.geometry), for evaluate/predict
        "store_signature": data.store.signature,
        # how `pipeline predict` rebuilds the store's encoder: its weights and kernels
        "checkpoint_path": data.store.attrs.get("checkpoint_path"),
        "fast_kernels": bool(data.store.attrs.get("fast_kernels", False)),
        "config": cfg.to_dict(),
        "epoch": epoch,
        "val_mean_dice": val_dice,
        "state_dict": state,
    }


# what a segmentation run writes into its folder (``--overwrite`` deletes these only)
OUTPUT_FILES = ("model.pt", "last.pt", "metrics.json", "history.csv", "overlays/")


def train_segmentation(cfg: SegmentConfig, data: SegmentData | None = None) -> dict[str, Any]:
    """Train ``cfg.head`` and write its outputs to ``cfg.out``; returns the metrics dict
    (also in metrics.json): val (and test) per-class Dice/IoU/HD95, the chosen training
    volumes, epochs run, seconds. ``data``: an already opened SegmentData of the same
    store and dataset, to share between runs (benchmarks); None opens it from ``cfg``."""
    t0 = time.perf_counter()
    tune_allocator()
    cfg.check()
    out = prepare_run_folder(cfg.out, outputs=OUTPUT_FILES, markers=RUN_MARKERS, overwrite=cfg.overwrite,
                             resume=cfg.resume)  # before any work: refuse a folder that is not ours
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    amp = Amp(device, precision)
    if data is None:
        data = SegmentData(cfg.store, cfg.dataset, cfg.data_root, cfg.dataset_options, cfg.storage_options)
    train, val, test, volumes = _splits(cfg, data)
    data.verify(train + val + test)
    seed_everything(cfg.seed)
    model = build_head(cfg, data).to(device)
    kind = model.input_kind
    img_size = data.img_size if kind == "features" else UNET_IMG_SIZE
    if cfg.in_memory and kind == "features":
        data.load_in_memory(train + val)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    early = EarlyStopping(cfg.patience)
    ckpt_path, model_path = out / "last.pt", out / "model.pt"

    start, best_state, best_dice, best_preds = 0, None, float("nan"), None
    if cfg.resume and ckpt_path.is_file():
        ck = load_checkpoint(ckpt_path)
        check_resumable(ck["config"], cfg.to_dict(), RESUME_KEYS, ckpt_path)
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        early.load_state_dict(ck["early"])
        best_state, best_dice = ck["best_state"], ck["best_dice"]
        start = int(ck["epoch"]) + 1
        set_rng_state(ck["rng"])
        print(f"resuming {ckpt_path} after epoch {start}", file=sys.stderr)
    elif cfg.resume:
        print(f"note: --resume but no {ckpt_path}; starting from scratch", file=sys.stderr)
    history = History(out / "history.csv", HISTORY_FIELDS, keep_epochs=start)

    loader_ds = Batches(data, kind, img_size)
    steps = cfg.steps_per_epoch or math.ceil(len(train) / cfg.batch_size)
    stopped = ""
    epoch = start - 1
    with progress_bar(f"train {cfg.head}", total=max(cfg.epochs - start, 0) * steps, enabled=cfg.progress,
                      unit="step") as advance:
        for epoch in range(start, cfg.epochs):
            if early.stop:
                stopped = f"early stopping: no better val Dice for {cfg.patience} validations"
                epoch -= 1
                break
            te = time.perf_counter()
            model.train()
            plan = [[train[p] for p in b] for b in
                    epoch_batches(len(train), cfg.batch_size, cfg.steps_per_epoch, cfg.seed, epoch)]
            loader = DataLoader(loader_ds, sampler=plan, batch_size=None, num_workers=cfg.num_workers,
                                worker_init_fn=_reopen_files if cfg.num_workers else None)
            sums = {"loss": 0.0, "ce": 0.0, "dice": 0.0}
            for step, (x, y) in enumerate(loader):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with amp.autocast():
                    logits = model(x)
                loss, parts = segmentation_loss(logits.float(), y)
                check_finite(loss, epoch, step, ckpt_path)
                amp.backward_step(loss, optimizer, list(model.parameters()))
                sums["loss"] += float(loss.detach())
                sums["ce"] += parts["ce"]
                sums["dice"] += parts["dice"]
                advance(1)
            row = {"epoch": epoch + 1, "steps": len(plan), "train_loss": sums["loss"] / len(plan),
                   "train_ce": sums["ce"] / len(plan), "train_dice_loss": sums["dice"] / len(plan),
                   "lr": optimizer.param_groups[0]["lr"], "val_dice": float("nan")}
            if (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs:
                preds = predict(model, data, val, device, cfg.batch_size, amp.autocast)
                res = score(data, preds, with_hd95=False)
                row["val_dice"] = res["mean_dice"]
                if early.step(res["mean_dice"], epoch):
                    best_state, best_dice = copy.deepcopy(model.state_dict()), res["mean_dice"]
                    best_preds = preds  # the final scoring reuses them
                    save_atomic(_model_record(cfg, data, model, best_state, epoch + 1, best_dice), model_path)
            row["seconds"] = time.perf_counter() - te
            history.append(row)
            save_atomic({"config": cfg.to_dict(), "epoch": epoch, "model": model.state_dict(),
                         "optimizer": optimizer.state_dict(), "early": early.state_dict(), "best_state": best_state,
                         "best_dice": best_dice, "rng": rng_state()}, ckpt_path)
    if best_state is None:  # never validated (cannot happen with epochs >= 1) or resumed a finished run
        best_state = copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    best_epoch = early.best_epoch + 1 if early.best_epoch >= 0 else epoch + 1
    save_atomic(_model_record(cfg, data, model, best_state, best_epoch, best_dice), model_path)

    metrics: dict[str, Any] = {
        "task": "segment", "head": cfg.head, "store": cfg.store, "dataset": cfg.dataset,
        "encoder": data.store.attrs.get("encoder"), "device": str(device), "precision": precision,
        "train_samples": len(train), "train_volumes": volumes, "val_samples": len(val), "test_samples": len(test),
        "epochs_run": epoch + 1, "best_epoch": best_epoch, "stopped": stopped or "epochs done",
        "splits": {},
    }
    preds = best_preds if best_preds is not None else predict(model, data, val, device, cfg.batch_size, amp.autocast)
    metrics["splits"]["val"] = score(data, preds)
    metrics["overlays"] = save_overlays(data, preds, pick_overlays(data, val, cfg.overlays), out / "overlays")
    if test:
        metrics["splits"]["test"] = score(data, predict(model, data, test, device, cfg.batch_size, amp.autocast))
    metrics["seconds"] = time.perf_counter() - t0
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
