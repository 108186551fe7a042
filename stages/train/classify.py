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

All four model kinds are trained and scored through the same code path, so their
numbers are comparable. Defaults: AdamW (lr 1e-3, weight decay 0.05), one warmup epoch
then cosine decay per step, class-weighted cross-entropy, early stopping on validation
AUC (patience 10), flips as augmentation, bf16/fp16 autocast on GPUs, fp32 on CPU.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..datasets.base import Dataset
from ..geometry import input_geometry
from ..models import create_model
from ..models.classifier import check_hub_weights
from ..models.registry import canonical
from ..progress import progress_bar
from ..runtime import resolve_device, resolve_precision, tune_allocator
from .augment import augment, parse_augment
from .data import (
    ClassifyData,
    Prepared,
    assign_splits,
    auto_img_size,
    default_workers,
    make_loader,
    open_joined,
    subsample,
)
from .loop import (
    Amp,
    EarlyStopping,
    History,
    TrainingError,
    check_finite,
    check_resumable,
    class_weights,
    cosine_schedule,
    load_checkpoint,
    make_optimizer,
    rng_state,
    save_atomic,
    seed_everything,
    set_rng_state,
)
from .metrics import classification_metrics, write_json
from .probe import fit_probe
from .scoring import precise_bn, predict_loader, score_and_write, to_device

MODEL_KINDS = ("slca", "backbone", "probe", "sam-head")
MODEL_FORMAT = "sam-feature-pipeline/model"
HISTORY_FIELDS = ["epoch", "train_loss", "val_loss", "val_auc", "val_accuracy", "val_balanced_accuracy",
                  "val_f1_macro", "lr", "seconds"]
OUTPUT_FILES = ("model.pt", "last.pt", "metrics.json", "history.csv", "predictions.csv", "config.json",
                "confusion_test.png", "roc_test.png", "history.png", "slca_attention.png",
                "slca_gates.json")
# settings that may change between an interrupted run and its --resume
RESUME_FREE = ("resume", "overwrite", "workers", "in_memory", "device", "attention_images", "plots")


@dataclass
class ClassifyConfig:
    """Everything ``pipeline train --task classify`` takes (see its --help)."""

    store: str
    out: str
    model: str = "slca"
    backbone: str = "resnet18"
    backbone_weights: str | None = None
    pretrained: bool = False
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    dataset: str | None = None
    data_root: str | None = None
    dataset_options: dict[str, Any] = field(default_factory=dict)
    img_size: int = 0
    slca_stages: str = "all"
    slca_window: int = 8
    slca_hidden: int = 64
    slca_act: str = "gelu"
    slca_gate: str = "residual"
    slca_fuse: bool = False
    head_width: int = 64
    drop_rate: float = 0.0
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    patience: int = 10
    class_weighting: bool = True
    label_smoothing: float = 0.0
    clip_grad: float = 1.0
    precise_bn: int = 2048
    augment: str = "flip"
    train_fraction: float = 1.0
    seed: int = 0
    split_seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    probe_c: str = "0.001,0.01,0.1,1,10"
    device: str = "auto"
    precision: str = "auto"
    workers: int = -1
    in_memory: bool = False
    resume: bool = False
    overwrite: bool = False
    attention_images: int = 6
    plots: bool = True


def model_kwargs(cfg: ClassifyConfig, num_classes: int, img_size: int) -> dict[str, Any]:
    """Constructor arguments saved in model.pt (enough to rebuild the network)."""
    kind = canonical(cfg.model)
    if kind in ("slca", "backbone"):
        kw = dict(backbone=cfg.backbone, num_classes=num_classes, img_size=img_size, drop_rate=cfg.drop_rate,
                  backbone_kwargs=dict(cfg.backbone_kwargs))
        if kind == "slca":
            kw.update(stages=cfg.slca_stages, window=cfg.slca_window, hidden=cfg.slca_hidden, act=cfg.slca_act,
                      gate=cfg.slca_gate, fuse=bool(cfg.slca_fuse))
        return kw
    if kind == "sam_head":
        return dict(num_classes=num_classes, width=cfg.head_width, drop_rate=cfg.drop_rate or 0.1)
    return dict(num_classes=num_classes)


def check_init(cfg: ClassifyConfig) -> None:
    """Refuse backbone weights for models without a timm backbone, and both sources at once."""
    if not (cfg.pretrained or cfg.backbone_weights):
        return
    if canonical(cfg.model) not in ("slca", "backbone"):
        raise ValueError(f"--pretrained / --backbone-weights: --model {cfg.model} has no timm backbone; "
                         "use --model slca or backbone, or drop them")
    if cfg.pretrained and cfg.backbone_weights:
        raise ValueError(f"{cfg.backbone_weights}: --pretrained and --backbone-weights both given; keep one "
                         "(--backbone-weights PATH for a local file)")
    if cfg.pretrained and not (cfg.resume and (Path(cfg.out) / "last.pt").exists()):
        check_hub_weights(cfg.backbone)


def init_kwargs(cfg: ClassifyConfig, out: Path) -> dict[str, Any]:
    """Training-only constructor arguments: the backbone's starting weights. Deliberately not
    in ``model_kwargs``: model.pt is rebuilt with random init and then loads its own trained
    weights, so evaluate/predict never download or need the original file. A resumed run
    skips them too (last.pt replaces every weight), so it works offline."""
    if cfg.resume and (out / "last.pt").exists():
        return {}
    if cfg.backbone_weights:
        return {"pretrained": cfg.backbone_weights}
    return {"pretrained": True} if cfg.pretrained else {}




def train_epoch(net: nn.Module, loader, optimizer, scheduler, amp: Amp, criterion: nn.Module,
                device: torch.device, modes: Sequence[str], gen: torch.Generator, epoch: int,
                checkpoint: Path | None, clip: float = 0.0, advance: Callable[..., None] = lambda n=1, **k: None,
                sam_fn: Callable[[dict[str, Any]], torch.Tensor] | None = None) -> float:
    """One pass over ``loader``; returns the mean training loss. ``sam_fn(batch)`` replaces the
    cached embeddings (the benchmark uses it to recompute them with the encoder)."""
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    total, count = 0.0, 0
    for step, batch in enumerate(loader):
        image, sam, y = to_device(batch, device)
        if sam_fn is not None:
            sam = sam_fn(batch)
        image, sam = augment(image, sam, modes, gen)
        with amp.autocast():
            loss = criterion(net(image, sam).float(), y)
        check_finite(loss.detach(), epoch, step, checkpoint)
        amp.backward_step(loss, optimizer, params, clip)
        scheduler.step()
        total += float(loss.detach()) * len(y)
        count += len(y)
        advance(1, description=f"epoch {epoch + 1} loss {total / count:.4f}")
    return total / max(count, 1)


# --- the run -------------------------------------------------------------------------



def prepare(cfg: ClassifyConfig, dataset: Dataset | None = None) -> Prepared:
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


def _check_out(cfg: ClassifyConfig) -> Path:
    from cache.ownership import RUN_MARKERS, ForeignPathError, prepare_run_folder

    try:
        return prepare_run_folder(cfg.out, outputs=OUTPUT_FILES, markers=RUN_MARKERS, overwrite=cfg.overwrite,
                                  resume=cfg.resume)
    except ForeignPathError as e:
        raise TrainingError(str(e)) from None


def log(msg: str, enabled: bool = True) -> None:
    if enabled:
        print(msg, file=sys.stderr, flush=True)


def train_classifier(cfg: ClassifyConfig, dataset: Dataset | None = None, progress: bool = True) -> dict[str, Any]:
    """Train as configured and write the outputs; returns the metrics written to metrics.json.

    ``dataset`` overrides opening the store's recorded dataset (tests, notebooks). Raises
    StoreError/DatasetError/ValueError/TrainingError (one line each) on bad input."""
    tune_allocator()
    kind = canonical(cfg.model)
    if kind.replace("_", "-") not in MODEL_KINDS:
        raise ValueError(f"unknown --model {cfg.model!r}; choose one of: {', '.join(MODEL_KINDS)}")
    modes = parse_augment(cfg.augment)
    check_init(cfg)
    out = _check_out(cfg)
    write_json(dataclasses.asdict(cfg), out / "config.json")
    seed_everything(cfg.seed)
    t0 = time.perf_counter()
    prep = prepare(cfg, dataset)
    device = resolve_device(cfg.device)
    amp = Amp(device, resolve_precision(cfg.precision, device))
    init = init_kwargs(cfg, out)
    net = create_model(kind, **model_kwargs(cfg, len(prep.classes), prep.img_size), **init)
    if init:
        log(f"backbone {cfg.backbone}: pretrained weights from {cfg.backbone_weights or 'timm (Hugging Face hub)'}",
            progress)
    net.to(device)
    counts = {s: len(r) for s, r in prep.splits.items()}
    log(f"{cfg.model} on {cfg.store}: {counts['train']} train / {counts['val']} val / {counts['test']} test, "
        f"{len(prep.classes)} classes, image {prep.img_size}px, {device} {amp.precision}", progress)
    workers = default_workers(device, cfg.in_memory) if cfg.workers < 0 else cfg.workers

    def data(split: str) -> ClassifyData:
        return ClassifyData(prep.joined, prep.splits[split], prep.img_size, net.uses_image, net.uses_sam,
                            cfg.in_memory, progress)

    def loader(d: ClassifyData, shuffle: bool):
        return make_loader(d, cfg.batch_size, shuffle, cfg.seed, workers, prep.joined.store.shard_size,
                           pin=device.type == "cuda")

    val_loader = loader(data("val"), False)
    if kind == "probe":
        best = _run_probe(cfg, net, loader(data("train"), False), val_loader, prep, out, progress)
    else:
        best = _fit_torch(cfg, net, loader(data("train"), True), val_loader, prep, device, amp, modes, out,
                          progress)
    state = load_checkpoint(out / "model.pt")
    net.load_state_dict(state["state_dict"])
    parts = {"val": (prep.splits["val"], val_loader), "test": (prep.splits["test"], loader(data("test"), False))}
    metrics = score_and_write(net, parts, prep, device, amp, out, cfg.plots, cfg.attention_images)
    metrics.update(n_train=counts["train"], best_epoch=best, train_seconds=time.perf_counter() - t0)
    write_json(metrics, out / "metrics.json")
    return metrics


def _checkpoint_meta(cfg: ClassifyConfig, prep: Prepared) -> dict[str, Any]:
    st = prep.joined.store
    ids = {s: [str(st.ids[r]) for r in rows] for s, rows in prep.splits.items()}
    return {
        "format": MODEL_FORMAT, "version": 1, "task": "classify", "model": canonical(cfg.model),
        "classes": list(prep.classes), "img_size": prep.img_size, "config": dataclasses.asdict(cfg),
        "geometry": input_geometry(st.attrs.get("preprocessing")),  # padded/stretched image, for predict
        "store": {"url": st.url, "signature": st.signature, "encoder": st.attrs.get("encoder"),
                  "checkpoint_path": st.attrs.get("checkpoint_path")},
        "splits": ids,
    }


def save_model(path: Path, net: nn.Module, meta: dict[str, Any], kwargs: dict[str, Any], epoch: int,
               extra: dict[str, Any] | None = None) -> None:
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    save_atomic({**meta, "model_kwargs": kwargs, "state_dict": state, "epoch": epoch, **(extra or {})}, path)


def _run_probe(cfg, net, train_loader, val_loader, prep, out, progress) -> int:
    history = History(out / "history.csv", HISTORY_FIELDS + ["C"])
    best, c = fit_probe(cfg, net, train_loader, val_loader, prep, history, progress)
    save_model(out / "model.pt", net, _checkpoint_meta(cfg, prep), model_kwargs(cfg, len(prep.classes), prep.img_size),
               best + 1, {"monitor": {"C": c}})
    return best + 1


def _fit_torch(cfg, net, train_loader, val_loader, prep, device, amp, modes, out, progress) -> int:
    if len(train_loader) == 0:
        raise ValueError(f"{cfg.store}: too few training samples for one batch; raise --train-fraction")
    kwargs = model_kwargs(cfg, len(prep.classes), prep.img_size)
    meta = _checkpoint_meta(cfg, prep)
    y_train = prep.joined.labels[prep.splits["train"]]
    weight = class_weights(y_train, len(prep.classes)).to(device) if cfg.class_weighting else None
    criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
    eval_criterion = nn.CrossEntropyLoss(weight=weight)
    optimizer = make_optimizer(net, cfg.lr, cfg.weight_decay)
    steps = len(train_loader)
    scheduler = cosine_schedule(optimizer, cfg.epochs * steps, cfg.warmup_epochs * steps)
    early = EarlyStopping(cfg.patience)
    y_val = prep.joined.labels[prep.splits["val"]]
    monitor = "auc" if len(np.unique(y_val)) > 1 else "loss"
    if monitor == "loss":
        log("validation set holds one class: early stopping on validation loss instead of AUC", progress)
    start = 0
    last = out / "last.pt"
    if cfg.resume and last.exists():
        ck = load_checkpoint(last)
        check_resumable(ck["config"], dataclasses.asdict(cfg), [k for k in ck["config"] if k not in RESUME_FREE], last)
        if ck["store"]["signature"] != meta["store"]["signature"] or ck["splits"] != meta["splits"]:
            raise TrainingError(f"{last}: the store or its splits changed since this run started; use another --out")
        net.load_state_dict(ck["state_dict"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        amp.scaler.load_state_dict(ck["scaler"])
        early.load_state_dict(ck["early"])
        set_rng_state(ck["rng"])
        start = int(ck["epoch"])
        log(f"resuming {out} after epoch {start}" + (" (already finished)" if ck.get("finished") else ""), progress)
        if ck.get("finished"):
            return early.best_epoch + 1
    elif cfg.resume:
        log(f"--resume: {last} not found, starting a new run", progress)
    history = History(out / "history.csv", HISTORY_FIELDS, keep_epochs=start)
    for epoch in range(start, cfg.epochs):
        t = time.perf_counter()
        train_loader.batch_sampler.set_epoch(epoch)
        gen = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
        with progress_bar(f"epoch {epoch + 1}", total=steps, enabled=progress, unit="batch") as advance:
            loss = train_epoch(net, train_loader, optimizer, scheduler, amp, criterion, device, modes, gen, epoch,
                               last, cfg.clip_grad, advance)
        precise_bn(net, train_loader, device, amp, cfg.precise_bn)
        probs, val_loss = predict_loader(net, val_loader, device, amp, eval_criterion)
        vm = classification_metrics(y_val, probs, prep.classes, val_loss)
        value = vm["auc"] if monitor == "auc" else -val_loss
        improved = early.step(value, epoch)
        if improved or not (out / "model.pt").exists():
            save_model(out / "model.pt", net, meta, kwargs, epoch + 1, {"monitor": {monitor: vm[monitor]}})
        seconds = time.perf_counter() - t
        history.append({"epoch": epoch + 1, "train_loss": loss, "val_loss": val_loss, "val_auc": vm["auc"],
                        "val_accuracy": vm["accuracy"], "val_balanced_accuracy": vm["balanced_accuracy"],
                        "val_f1_macro": vm["f1_macro"], "lr": optimizer.param_groups[0]["lr"], "seconds": seconds})
        done = early.stop or epoch + 1 == cfg.epochs
        save_model(last, net, meta, kwargs, epoch + 1, {
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": amp.scaler.state_dict(), "early": early.state_dict(), "rng": rng_state(), "finished": done})
        log(f"epoch {epoch + 1}/{cfg.epochs}  loss {loss:.4f}  val loss {val_loss:.4f}  val auc {vm['auc']:.4f}  "
            f"val acc {vm['accuracy']:.4f}  {seconds:.1f}s" + ("  *" if improved else ""), progress)
        if early.stop:
            log(f"early stop: no val {monitor} improvement for {cfg.patience} epochs; best epoch "
                f"{early.best_epoch + 1}", progress)
            break
    return early.best_epoch + 1




