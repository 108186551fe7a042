"""Stage-two commands: train, evaluate, predict."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import List, Optional

import typer

from .app import app, fail, handle_errors
from .cli_extract import parse_options

TASKS = ("classify", "segment")


def _interrupted(what: str) -> None:
    fail(f"interrupted; {what}", 130)


@app.command()
@handle_errors
def train(
    from_cache: str = typer.Option(..., "--from-cache", "-s", help="Feature store made by `pipeline extract`."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: model.pt, metrics.json, history.csv, predictions.csv, PNGs."),
    task: str = typer.Option("classify", "--task", help="classify (image labels) or segment (pixel masks)."),
    model: str = typer.Option("slca", "--model", "-m", help="classify: slca (backbone + SLCA), backbone (no SLCA), probe (logistic regression on pooled SAM features), sam-head (small CNN on SAM features)."),
    backbone: str = typer.Option("resnet18", "--backbone", help="timm model for slca/backbone: resnet18/50/152, seresnext50_32x4d, legacy_senet154, swinv2_tiny_window8_256, ..."),
    backbone_weights: Optional[Path] = typer.Option(None, "--backbone-weights", help="Local timm checkpoint (.pth/.safetensors) for the backbone, read by timm's pretrained loader; default random init (nothing is downloaded)."),
    pretrained: bool = typer.Option(False, "--pretrained/--no-pretrained", help="slca/backbone: start from timm's pretrained (ImageNet) weights, downloaded once through the Hugging Face hub into its cache (HF_HOME); HF_HUB_OFFLINE=1 reads only the cache."),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Dataset reader kind (default: the one recorded in the store)."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", "-r", help="Dataset location (default: the one recorded in the store)."),
    option: Optional[List[str]] = typer.Option(None, "--option", help="Dataset reader option KEY=VALUE (repeatable)."),
    img_size: int = typer.Option(0, "--img-size", help="Backbone input side (0: median image side rounded up to 32, within 64..224; 28px MedMNIST -> 64)."),
    slca_stages: str = typer.Option("all", "--slca-stages", help="Stages gated by SLCA: all, last2, or indices/names, e.g. 'layer3,layer4' or '=-2,-1'."),
    slca_window: int = typer.Option(8, "--slca-window", help="SLCA pooling window k on the 64x64 SAM grid (8: 8x8 regions; 0: global, SE-like)."),
    slca_hidden: int = typer.Option(64, "--slca-hidden", help="SLCA bottleneck width r."),
    slca_act: str = typer.Option("gelu", "--slca-act", help="SLCA activation: gelu, relu, silu."),
    slca_gate: str = typer.Option("residual", "--slca-gate", help="residual: x*(1+(2a-1)), exactly the identity at init; mul: x*a (SE style)."),
    slca_fuse: bool = typer.Option(False, "--slca-fuse/--no-slca-fuse", help="slca: also add a linear layer on the pooled SAM embedding to the logits (measured in README, Benchmarks)."),
    sam_head_width: int = typer.Option(64, "--sam-head-width", help="Width of the sam-head CNN."),
    drop_rate: float = typer.Option(0.0, "--drop-rate", help="Dropout before the classifier (sam-head: 0 means 0.1)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Most epochs (default 30; segment: 50)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Batch size (default 32; segment: 8)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak AdamW learning rate (default 1e-3; segment: 5e-4)."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="AdamW weight decay (default 0.05; segment: 0)."),
    warmup_epochs: int = typer.Option(1, "--warmup-epochs", help="Linear warmup before the cosine decay."),
    patience: Optional[int] = typer.Option(None, "--patience", help="Early stopping: epochs without a better val AUC (0: never; default 10)."),
    class_weights: bool = typer.Option(True, "--class-weights/--no-class-weights", help="Weight the loss by inverse class frequency."),
    label_smoothing: float = typer.Option(0.0, "--label-smoothing"),
    clip_grad: float = typer.Option(1.0, "--clip-grad", help="Gradient norm clip (0: off)."),
    precise_bn: int = typer.Option(2048, "--precise-bn", help="Before each validation, re-estimate BatchNorm statistics on up to this many training samples (0: off; matters with few labels)."),
    augment: str = typer.Option("flip", "--augment", help="Comma list: none, flip, rot (flips + 90-degree turns; image and SAM grid alike), photometric (image only)."),
    train_fraction: float = typer.Option(1.0, "--train-fraction", help="Stratified, seeded fraction of the training split (data-efficiency studies)."),
    seed: int = typer.Option(0, "--seed", help="Seed of initialisation, order, augmentation and --train-fraction."),
    split_seed: int = typer.Option(0, "--split-seed", help="Seed of the split for datasets without official splits."),
    val_fraction: float = typer.Option(0.1, "--val-fraction", help="Validation share when the dataset has no val split."),
    test_fraction: float = typer.Option(0.2, "--test-fraction", help="Test share when the dataset has no test split."),
    probe_c: str = typer.Option("0.001,0.01,0.1,1,10", "--probe-c", help="probe: inverse regularisation strengths tried (best val AUC wins)."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda, cuda:1."),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16/fp16 autocast on GPU, fp32 on CPU), fp32, bf16, fp16."),
    workers: int = typer.Option(-1, "--workers", help="DataLoader processes (-1: automatic)."),
    in_memory: bool = typer.Option(False, "--in-memory", help="Load the embeddings into RAM first (2 MiB per sample); refused if they do not fit."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run in --out from its last finished epoch."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier run in --out."),
    attention_images: int = typer.Option(6, "--attention-images", help="Test images in slca_attention.png."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Write the PNG figures."),
    head: str = typer.Option("autosam", "--head", help="segment only: autosam, cnn, linear, unet."),
    labeled_volumes: int = typer.Option(0, "--labeled-volumes", help="segment only: train on the first N volumes (0: all)."),
    sam_checkpoint: Optional[str] = typer.Option(None, "--sam-checkpoint", help="segment only: SAM checkpoint whose mask decoder initialises autosam ('encoder': the store's)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or per-epoch lines."),
) -> None:
    """Stage two: train a classifier (or, with --task segment, a segmentation head) from the cache.

    Reads the embeddings from the store and the raw images through the dataset reader
    recorded in it, joined by sample id. A store that does not match its dataset, or an
    image changed since extraction, is refused.
    """
    if task not in TASKS:
        raise ValueError(f"--task {task!r}: use classify or segment")
    if task == "segment":
        if pretrained or backbone_weights:
            raise ValueError("--pretrained / --backbone-weights: only --task classify (--model slca or backbone) "
                             "has a timm backbone; drop them for segmentation heads")
        _train_segment(from_cache, out, dataset, data_root, option, head, epochs, batch_size, lr, weight_decay,
                       seed, device, precision, train_fraction, labeled_volumes, sam_checkpoint, in_memory, resume,
                       patience, workers, quiet, overwrite)
        return
    from stages.evaluate import format_metrics
    from stages.train import ClassifyConfig, train_classifier

    base = ClassifyConfig(store="", out="")
    cfg = ClassifyConfig(
        store=from_cache, out=str(out), model=model, backbone=backbone,
        backbone_weights=str(backbone_weights) if backbone_weights else None, pretrained=pretrained, dataset=dataset,
        data_root=str(data_root) if data_root else None, dataset_options=parse_options(option, "--option"),
        img_size=img_size, slca_stages=slca_stages.lstrip("="), slca_window=slca_window, slca_hidden=slca_hidden,
        slca_act=slca_act, slca_gate=slca_gate, slca_fuse=slca_fuse, head_width=sam_head_width, drop_rate=drop_rate,
        epochs=base.epochs if epochs is None else epochs, batch_size=batch_size or base.batch_size,
        lr=base.lr if lr is None else lr, weight_decay=base.weight_decay if weight_decay is None else weight_decay,
        warmup_epochs=warmup_epochs, patience=base.patience if patience is None else patience,
        class_weighting=class_weights, label_smoothing=label_smoothing, clip_grad=clip_grad,
        precise_bn=precise_bn, augment=augment,
        train_fraction=train_fraction, seed=seed, split_seed=split_seed, val_fraction=val_fraction,
        test_fraction=test_fraction, probe_c=probe_c, device=device, precision=precision, workers=workers,
        in_memory=in_memory, resume=resume, overwrite=overwrite, attention_images=attention_images, plots=plots,
    )
    check_numbers(cfg)
    try:
        metrics = train_classifier(cfg, progress=not quiet)
    except KeyboardInterrupt:
        _interrupted(f"re-run the same command with --resume to continue from the last finished epoch ({out}/last.pt)")
    print(format_metrics({k: v for k, v in metrics.items() if k in ("val", "test")}))
    print(f"wrote {out}/model.pt, metrics.json, history.csv, predictions.csv")


def check_numbers(cfg) -> None:
    """Refuse numeric training settings that cannot work (shared by train and compare)."""
    for name in ("epochs", "batch_size"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be at least 1")
    if not cfg.lr > 0:
        raise ValueError(f"--lr {cfg.lr}: must be positive")
    if cfg.patience < 0 or cfg.warmup_epochs < 0 or cfg.slca_window < 0 or cfg.precise_bn < 0:
        raise ValueError("--patience, --warmup-epochs, --slca-window and --precise-bn must be 0 or more")
    if not 0 < cfg.train_fraction <= 1:
        raise ValueError(f"--train-fraction {cfg.train_fraction}: must be in (0, 1]")
    if not (0 < cfg.val_fraction < 1 and 0 < cfg.test_fraction < 1 and cfg.val_fraction + cfg.test_fraction < 1):
        raise ValueError("--val-fraction and --test-fraction must be in (0, 1) and sum to less than 1")


def _train_segment(store, out, dataset, data_root, option, head, epochs, batch_size, lr, weight_decay, seed,
                   device, precision, train_fraction, labeled_volumes, sam_checkpoint, in_memory, resume,
                   patience, workers, quiet, overwrite=False) -> None:
    try:
        from stages.segment import SegmentConfig, train_segmentation
    except ImportError as e:
        raise ValueError(f"--task segment is not available in this install ({e})") from None
    from cache import FeatureStore

    attrs = FeatureStore(store).attrs
    kw = dict(store=store, out=str(out), head=head, seed=seed, device=device, precision=precision,
              train_fraction=train_fraction, labeled_volumes=labeled_volumes, sam_checkpoint=sam_checkpoint,
              in_memory=in_memory, resume=resume, overwrite=overwrite, progress=not quiet,
              dataset=dataset or attrs.get("dataset_kind"), data_root=str(data_root or attrs.get("dataset_root")),
              dataset_options=parse_options(option, "--option"))
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("lr", lr), ("weight_decay", weight_decay),
                        ("patience", patience)):
        if value is not None:
            kw[name] = value
    if workers >= 0:
        kw["num_workers"] = workers
    fields = {f.name for f in dataclasses.fields(SegmentConfig)}
    cfg = SegmentConfig(**{k: v for k, v in kw.items() if k in fields})
    if hasattr(cfg, "check"):
        cfg.check()
    try:
        metrics = train_segmentation(cfg)
    except KeyboardInterrupt:
        _interrupted(f"re-run the same command with --resume to continue ({out})")
    from stages.segment.evaluate import format_scores

    print(format_scores(metrics))
    print(f"wrote {out}/model.pt, metrics.json, history.csv, overlays/")


@app.command()
@handle_errors
def evaluate(
    model: Path = typer.Argument(..., help="model.pt written by `pipeline train`."),
    store: Optional[str] = typer.Option(None, "--store", "--from-cache", "-s", help="Feature store to score on (default: the training store)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for metrics.json, predictions.csv and figures (optional for classification)."),
    split: str = typer.Option("test", "--split", help="train, val, test, or all. On the training store, the training run's own split."),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Dataset reader kind (default: recorded in the store)."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", "-r", help="Dataset location (default: recorded in the store)."),
    option: Optional[List[str]] = typer.Option(None, "--option", help="Dataset reader option KEY=VALUE (repeatable)."),
    device: str = typer.Option("auto", "--device"),
    batch_size: int = typer.Option(64, "--batch-size", "-b"),
    in_memory: bool = typer.Option(False, "--in-memory", help="Load the embeddings into RAM first."),
    as_json: bool = typer.Option(False, "--json", help="Print metrics as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Re-score a saved model on a store (classification here; segmentation models are
    dispatched to the segmentation evaluator by the task recorded in model.pt)."""
    from stages.evaluate import evaluate as run, format_metrics
    from stages.train.loop import load_checkpoint

    if split not in ("train", "val", "test", "all"):
        raise ValueError(f"--split {split!r}: use train, val, test or all")
    saved = load_checkpoint(model)
    store = store or saved.get("store", {}).get("url") or saved.get("config", {}).get("store")
    if not store:
        raise ValueError(f"{model}: no training store recorded; pass --store")
    kwargs = dict(split=split, data_root=str(data_root) if data_root else None, device=device,
                  dataset_options=parse_options(option, "--option"))
    if saved.get("task") == "classify":
        kwargs.update(kind=dataset, batch_size=batch_size, in_memory=in_memory, progress=not quiet)
    else:
        kwargs.update(kind=dataset)
    metrics = run(model, store, out, **kwargs)
    if as_json:
        from stages.train.metrics import jsonable

        print(json.dumps(jsonable(metrics), indent=2, default=str))
    elif saved.get("task") == "segment":
        from stages.segment.evaluate import format_scores

        print(format_scores(metrics))
    else:
        print(format_metrics({k: v for k, v in metrics.items() if isinstance(v, dict)}))


@app.command()
@handle_errors
def predict(
    model: Path = typer.Argument(..., help="model.pt written by `pipeline train`: a classifier, or a --task segment head."),
    images: List[Path] = typer.Argument(..., help="Image files (PNG, JPEG, TIFF, BMP, .npy); segmentation also reads ACDC-style .h5 files ('image' (H,W) or (slices,H,W))."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Segmentation (required): folder, new or existing, for <stem>_mask.png (or _mask.h5 for .h5 inputs) and <stem>_overlay.png per input."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Segmentation: replace those output files of these inputs if they exist (never any other file); without it an existing one is refused."),
    fmt: str = typer.Option("table", "--format", "-f", help="table, csv or json."),
    device: str = typer.Option("auto", "--device"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Encoder weights, when the path recorded at extraction is not on this machine."),
    batch_size: int = typer.Option(8, "--batch-size", "-b"),
) -> None:
    """Run a saved model on new files end to end (encoder -> model). A classifier prints class
    probabilities; a segmentation head writes a label mask at each input's own size and an
    overlay PNG into --out, and prints per-class pixel (voxel) counts."""
    from stages.train.loop import load_checkpoint

    ckpt = str(checkpoint) if checkpoint else None
    if load_checkpoint(model).get("task") == "segment":
        from stages.segment.predict import FORMATS, format_counts, predict_segmentation

        if out is None:
            raise ValueError(f"{model}: a segmentation model writes a mask and an overlay per input; pass --out DIR")
        if fmt not in FORMATS:
            raise ValueError(f"unknown --format {fmt!r}; use one of {', '.join(FORMATS)}")
        results = predict_segmentation(model, [str(p) for p in images], out, overwrite=overwrite, device=device,
                                       checkpoint=ckpt, batch_size=batch_size)
        print(format_counts(results, fmt))
        return
    if out is not None or overwrite:
        raise ValueError(f"{model}: a classifier prints its predictions; --out and --overwrite are for "
                         "segmentation models")
    from stages.predict import format_predictions, predict_files

    classes, probs = predict_files(model, [str(p) for p in images], device=device, checkpoint=ckpt,
                                   batch_size=batch_size)
    print(format_predictions(images, classes, probs, fmt))
