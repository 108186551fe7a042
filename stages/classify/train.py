"""Stage two, classification: train ``slca`` / ``backbone`` / ``sam-head`` / ``probe`` from
a feature store and its raw images, and write the run's outputs to one folder.

Outputs (``ClassifyConfig.out``)::

    model.pt         best weights + model kwargs + full config + store signature + split ids
    last.pt          resume state after the last finished epoch (optimizer, schedule, RNG, ...)
    metrics.json     {"val": {...}, "test": {...}, ...} flat numeric metrics (dvc metrics)
    history.csv      one row per epoch (dvc plots)
    predictions.csv  id, split, label, pred, prob_<class>... for val and test
    config.json      the configuration, for people
    confusion_test.png  roc_test.png  history.png  slca_attention.png, slca_gates.json (slca only)
    prior.csv        slca with --slca-prior: the probe fit (one row per C) whose logits it adds
    blend.csv        slca with --slca-prior-blend: validation metrics per prior weight tried

All four model kinds are trained and scored through the same code path, so their
numbers are comparable. The torch models train on ``stages.common.trainer.Trainer``
(``ClassifyTrainer`` adds only the batch step, precise BN and validation); the probe is
a scikit-learn fit. Defaults: AdamW (lr 1e-3, weight decay 0.05), one warmup epoch then
cosine decay per step, class-weighted cross-entropy, early stopping on validation AUC
(patience 10), flips as augmentation, bf16/fp16 autocast on GPUs, fp32 on CPU.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from stages.classify.augment import augment, mixed_loss, mixup, parse_augment
from stages.classify.config import ClassifyConfig, check_init, init_kwargs, model_kwargs
from stages.classify.data import ClassifyData, Prepared, auto_img_size, make_loader
from stages.classify.metrics import classification_metrics
from stages.common.jsonio import write_json
from stages.classify.probe import BLEND_WEIGHTS, choose_prior_weight, fit_probe, out_of_fold_logits
from stages.classify.scoring import predict_loader, score_and_write, to_device
from stages.common.joined import open_joined, store_record
from stages.common.runtime import loader_workers, resolve_device, resolve_precision, tune_allocator
from stages.common.splits import assign_splits, subsample
from stages.common.trainer import Trainer, log, run_folder
from stages.common.training import (
    Amp,
    History,
    class_weights,
    cosine_schedule,
    load_checkpoint,
    make_optimizer,
    precise_bn,
    save_atomic,
    seed_everything,
)
from stages.datasets.base import Dataset
from stages.models import create_model
from stages.models.registry import canonical

MODEL_FORMAT = "sam-feature-pipeline/model"
HISTORY_FIELDS = ["epoch", "train_loss", "val_loss", "val_auc", "val_accuracy", "val_balanced_accuracy",
                  "val_f1_macro", "lr", "seconds"]
OUTPUT_FILES = ("model.pt", "last.pt", "metrics.json", "history.csv", "predictions.csv", "config.json",
                "confusion_test.png", "roc_test.png", "history.png", "slca_attention.png",
                "slca_gates.json", "prior.csv", "blend.csv")


class ClassifyTrainer(Trainer):
    """Class-weighted cross-entropy on (image, SAM embedding) batches, precise BN after each
    epoch, early stopping on validation AUC (validation loss when val holds one class).
    ``sam_fn(batch)`` replaces the cached embeddings (the benchmark recomputes them)."""

    history_fields = HISTORY_FIELDS

    def __init__(self, cfg: ClassifyConfig, net: nn.Module, prep: Prepared, train_loader, val_loader,
                 out: Path, record: dict[str, Any], amp: Amp, device: torch.device, progress: bool = True,
                 sam_fn: Callable[[dict[str, Any]], torch.Tensor] | None = None):
        self.cfg, self.prep, self.train_loader, self.val_loader = cfg, prep, train_loader, val_loader
        self.modes, self.sam_fn = parse_augment(cfg.augment), sam_fn
        y_train = prep.joined.labels[prep.splits["train"]]
        weight = class_weights(y_train, len(prep.classes)).to(device) if cfg.class_weighting else None
        self.criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
        self.eval_criterion = nn.CrossEntropyLoss(weight=weight)
        self.y_val = prep.joined.labels[prep.splits["val"]]
        self.monitor = "auc" if len(np.unique(self.y_val)) > 1 else "loss"
        if self.monitor == "loss":
            log("validation set holds one class: early stopping on validation loss instead of AUC", progress)
        self.gen = torch.Generator()
        self.oof: torch.Tensor | None = None  # out-of-fold prior logits per training position
        # losses added to the task's, by what slca's forward(aux=True) returns: the distilled
        # SAM features (--slca-distill), the sam-head branch's own logits (--slca-branch-sup)
        # and the image part's (--slca-image-sup); --slca-independent drops the summed loss
        slca = canonical(cfg.model) == "slca"
        self.aux = {k: w for k, w in (("distill", cfg.slca_distill), ("branch", cfg.slca_branch_sup),
                                      ("image", cfg.slca_image_sup))
                    if w and slca and (k == "image" or getattr(net, k, None) is not None)}
        self.sum_loss = not (slca and cfg.slca_independent)
        super().__init__(net, out, record, dataclasses.asdict(cfg), epochs=cfg.epochs, patience=cfg.patience,
                         amp=amp, device=device, resume=cfg.resume, clip=cfg.clip_grad, progress=progress)

    def configure_optimizers(self):
        mult = {"slca.": self.cfg.slca_lr_mult} if self.cfg.slca_lr_mult != 1 else None
        optimizer = make_optimizer(self.net, self.cfg.lr, self.cfg.weight_decay, mult)
        steps = len(self.train_loader)
        return optimizer, cosine_schedule(optimizer, self.cfg.epochs * steps, self.cfg.warmup_epochs * steps)

    def steps_per_epoch(self) -> int:
        return len(self.train_loader)

    def train_batches(self, epoch: int):
        self.train_loader.batch_sampler.set_epoch(epoch)
        self.gen = torch.Generator().manual_seed(self.cfg.seed * 100003 + epoch)  # augmentation draws
        return self.train_loader

    def train_step(self, batch, epoch):
        image, sam, y = to_device(batch, self.device)
        if self.sam_fn is not None:
            sam = self.sam_fn(batch)
        image, sam = augment(image, sam, self.modes, self.gen)
        prior = None if self.oof is None else self.oof[batch["pos"]].to(self.device)
        mix = None
        if self.cfg.mixup > 0:
            image, sam, prior, perm, lam = mixup(image, sam, prior, self.cfg.mixup, self.gen)
            mix = (perm, lam)
        extra = {} if prior is None else {"prior": prior}

        def task_loss(z: torch.Tensor) -> torch.Tensor:
            return mixed_loss(self.criterion, z.float(), y, mix)

        with self.amp.autocast():
            if not self.aux:
                return task_loss(self.net(image, sam, **extra)), len(y), {}
            logits, aux = self.net(image, sam, aux=True, **extra)
            loss = task_loss(logits) if self.sum_loss else 0.0
            if "distill" in self.aux:
                loss = loss + self.aux["distill"] * aux["distill"]
            for part in ("branch", "image"):  # deep supervision: a part must classify on its own too
                if part in self.aux:
                    loss = loss + self.aux[part] * task_loss(aux[part])
            return loss, len(y), {}

    def after_epoch(self, epoch: int) -> None:
        def forward(batch) -> int:
            image, sam, _ = to_device(batch, self.device)
            self.net(image, sam)
            return len(batch["label"])

        precise_bn(self.net, self.train_loader, forward, self.amp, self.cfg.precise_bn)

    def validate(self, epoch: int):
        probs, val_loss = predict_loader(self.net, self.val_loader, self.device, self.amp, self.eval_criterion)
        vm = classification_metrics(self.y_val, probs, self.prep.classes, val_loss)
        value = vm["auc"] if self.monitor == "auc" else -val_loss
        fields = {"val_loss": val_loss, "val_auc": vm["auc"], "val_accuracy": vm["accuracy"],
                  "val_balanced_accuracy": vm["balanced_accuracy"], "val_f1_macro": vm["f1_macro"]}
        return value, fields, {self.monitor: vm[self.monitor]}

    def epoch_line(self, row) -> str:
        return (f"epoch {row['epoch']}/{self.epochs}  loss {row['train_loss']:.4f}  val loss {row['val_loss']:.4f}  "
                f"val auc {row['val_auc']:.4f}  val acc {row['val_accuracy']:.4f}  {row['seconds']:.1f}s")


def prepare(cfg: ClassifyConfig, dataset: Dataset | None = None) -> Prepared:
    """The joined store/dataset, its splits (train subsampled to ``train_fraction``) and image size."""
    joined = open_joined(cfg.store, dataset, cfg.dataset, cfg.data_root, cfg.dataset_options)
    st = joined.store
    splits = assign_splits(joined.rows, st.labels, st.splits, st.groups, cfg.split_seed, cfg.val_fraction,
                           cfg.test_fraction)
    splits["train"] = subsample(splits["train"], st.labels, st.groups, cfg.train_fraction, cfg.seed)
    classes = joined.classes
    if len(classes) < 2:
        raise ValueError(f"{cfg.store}: classification needs at least 2 classes, the store has {classes}")
    empty = [s for s in ("val", "test") if len(splits[s]) == 0]
    if empty:
        raise ValueError(f"{cfg.store}: no {' or '.join(empty)} samples after splitting; the dataset is too small "
                         "(give it val/test splits or more samples per class)")
    img_size = cfg.img_size or auto_img_size(st.heights[joined.rows], st.widths[joined.rows])
    return Prepared(joined, splits, classes, img_size)


def model_record(cfg: ClassifyConfig, prep: Prepared) -> dict[str, Any]:
    """What model.pt and last.pt carry besides weights, config and epoch."""
    st = prep.joined.store
    return {
        "format": MODEL_FORMAT, "version": 2, "task": "classify", "model": canonical(cfg.model),
        "classes": list(prep.classes), "img_size": prep.img_size,
        "model_kwargs": model_kwargs(cfg, len(prep.classes), prep.img_size),
        **store_record(st, {s: rows for s, rows in prep.splits.items()}),
    }


def train_classifier(cfg: ClassifyConfig, dataset: Dataset | None = None, progress: bool = True) -> dict[str, Any]:
    """Train as configured and write the outputs; returns the metrics written to metrics.json.

    ``dataset`` overrides opening the store's recorded dataset (tests, notebooks). Raises
    StoreError/DatasetError/ValueError/TrainingError (one line each) on bad input."""
    tune_allocator()
    cfg.check()
    check_init(cfg)
    with run_folder(cfg.out, OUTPUT_FILES, overwrite=cfg.overwrite, resume=cfg.resume) as out:
        return _train(cfg, out, dataset, progress)


def _train(cfg: ClassifyConfig, out: Path, dataset: Dataset | None, progress: bool) -> dict[str, Any]:
    """The run itself, in ``out``, which this process holds (``run_folder``)."""
    write_json(dataclasses.asdict(cfg), out / "config.json")
    seed_everything(cfg.seed)
    t0 = time.perf_counter()
    prep = prepare(cfg, dataset)
    device = resolve_device(cfg.device)
    amp = Amp(device, resolve_precision(cfg.precision, device))
    net = _build(cfg, prep, out, device, amp, progress)
    workers = loader_workers(device, cfg.in_memory) if cfg.workers < 0 else cfg.workers

    def loader(split: str, shuffle: bool, uses_image: bool = net.uses_image):
        data = ClassifyData(prep.joined, prep.splits[split], prep.img_size, uses_image, net.uses_sam,
                            cfg.in_memory, progress)
        return make_loader(data, cfg.batch_size, shuffle, cfg.seed, workers, prep.joined.store.shard_size,
                           pin=device.type == "cuda")

    val_loader = loader("val", False)
    record = model_record(cfg, prep)
    if canonical(cfg.model) == "probe":
        best = _fit_probe(cfg, net, loader("train", False), val_loader, prep, out, record, progress)
    else:
        train_loader = loader("train", True)
        if len(train_loader) == 0:
            raise ValueError(f"{cfg.store}: too few training samples for one batch; raise --train-fraction")
        trainer = ClassifyTrainer(cfg, net, prep, train_loader, val_loader, out, record, amp, device, progress)
        if getattr(net, "prior", None) is not None:
            trainer.oof = _fit_prior(cfg, net.prior, loader("train", False, False), loader("val", False, False),
                                     prep, out, progress)
        best = trainer.fit()
    saved = load_checkpoint(out / "model.pt")
    net.load_state_dict(saved["state_dict"])
    blend = {}
    if cfg.slca_prior_blend and getattr(net, "prior", None) is not None:
        blend["prior_weight"] = _blend_prior(net, saved, val_loader, prep, out, device, amp, progress)
    parts = {"val": (prep.splits["val"], val_loader), "test": (prep.splits["test"], loader("test", False))}
    metrics = score_and_write(net, parts, prep, device, amp, out, cfg.plots, cfg.attention_images)
    metrics.update(n_train=len(prep.splits["train"]), best_epoch=best, train_seconds=time.perf_counter() - t0,
                   **blend)
    write_json(metrics, out / "metrics.json")
    return metrics


def _build(cfg: ClassifyConfig, prep: Prepared, out: Path, device: torch.device, amp: Amp,
           progress: bool) -> nn.Module:
    """The network on ``device``, from its initial weights (seeded before), with a log line."""
    init = init_kwargs(cfg, out)
    net = create_model(canonical(cfg.model), **model_kwargs(cfg, len(prep.classes), prep.img_size), **init)
    if init:
        log(f"backbone {cfg.backbone}: pretrained weights from {cfg.backbone_weights or 'timm (Hugging Face hub)'}",
            progress)
    counts = {s: len(r) for s, r in prep.splits.items()}
    log(f"{cfg.model} on {cfg.store}: {counts['train']} train / {counts['val']} val / {counts['test']} test, "
        f"{len(prep.classes)} classes, image {prep.img_size}px, {device} {amp.precision}", progress)
    return net.to(device)


def _fit_prior(cfg: ClassifyConfig, prior: nn.Module, train_loader, val_loader, prep: Prepared, out: Path,
               progress: bool) -> torch.Tensor | None:
    """Fit slca's prior (the probe, C on validation) before training, and its out-of-fold
    logits on the training images (None with ``--slca-prior-folds 0``). Deterministic, so a
    resumed run refits the same prior (last.pt then restores the same values)."""
    log("slca prior: fitting the probe on the pooled SAM features first", progress)
    fit = fit_probe(cfg, prior, train_loader, val_loader, prep, History(out / "prior.csv", HISTORY_FIELDS + ["C"]),
                    progress)
    if cfg.slca_prior_folds < 2 or cfg.slca_prior_blend:  # blending trains without the prior
        return None
    oof = out_of_fold_logits(cfg, fit, len(prep.classes), cfg.slca_prior_folds, progress)
    return None if oof is None else torch.from_numpy(oof)


def _blend_prior(net: nn.Module, saved: dict[str, Any], val_loader, prep: Prepared, out: Path,
                 device: torch.device, amp: Amp, progress: bool) -> float:
    """Choose the prior's weight on validation for a network trained without it, and write it
    into model.pt's model_kwargs (``saved``, as loaded), so evaluate and predict rebuild the blend."""
    y_val = prep.joined.labels[prep.splits["val"]]
    history = History(out / "blend.csv", ["epoch", "prior_weight", "val_loss", "val_auc", "val_accuracy",
                                          "val_balanced_accuracy", "val_f1_macro"])
    w = choose_prior_weight(net, val_loader, y_val, prep.classes, device, amp, history)
    saved["model_kwargs"]["prior_weight"] = w
    save_atomic(saved, out / "model.pt")
    log(f"slca prior: blended in at weight {w:g} (best validation AUC of {len(BLEND_WEIGHTS)} weights)", progress)
    return w


def _fit_probe(cfg: ClassifyConfig, net: nn.Module, train_loader, val_loader, prep: Prepared, out: Path,
               record: dict[str, Any], progress: bool) -> int:
    """The probe has no epochs: one fit per C, the best on validation AUC saved as model.pt."""
    history = History(out / "history.csv", HISTORY_FIELDS + ["C"])
    fit = fit_probe(cfg, net, train_loader, val_loader, prep, history, progress)
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    save_atomic({**record, "config": dataclasses.asdict(cfg), "state_dict": state, "epoch": fit.index + 1,
                 "monitor": {"C": fit.c}}, out / "model.pt")
    return fit.index + 1
