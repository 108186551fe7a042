"""`pipeline train`: stage two, a classifier or (--task segment) a segmentation head from the cache.

Both tasks take the same names for the settings they share (--epochs, --lr, --workers,
--resume, ...); an option that belongs to the other task is refused rather than ignored.
Every value is validated by the task's config (``ClassifyConfig.check``,
``SegmentConfig.check``), so `pipeline compare` and Python callers get the same checks.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from . import options as opt
from .app import app, fail, handle_errors
from .options import parse_options

TASKS = ("classify", "segment")
HELP = """Stage two: train a classifier (or, with --task segment, a segmentation head) from the cache.

Reads the embeddings from the store and the raw images through the dataset reader
recorded in it, joined by sample id. A store that does not match its dataset, or an
image changed since extraction, is refused.
"""
# options of one task only (parameter names); the rest mean the same for both
CLASSIFY_ONLY = ("model", "backbone", "backbone_weights", "pretrained", "img_size", "slca_stages", "slca_window",
                 "slca_hidden", "slca_act", "slca_gate", "slca_fuse", "slca_norm", "slca_branch", "slca_spatial",
                 "slca_add", "slca_prior", "slca_prior_folds", "slca_prior_blend", "slca_distill", "slca_branch_sup",
                 "slca_branch_detach", "slca_image_sup", "slca_independent", "slca_lr_mult",
                 "sam_head_width", "drop_rate", "warmup_epochs",
                 "class_weights", "label_smoothing", "clip_grad", "precise_bn", "augment", "mixup", "split_seed",
                 "val_fraction", "test_fraction", "probe_c", "attention_images", "plots")
SEGMENT_ONLY = ("head", "labeled_volumes", "sam_checkpoint")
# parameter name -> config field, where they differ
RENAMED = {"from_cache": "store", "option": "dataset_options", "sam_head_width": "head_width",
           "class_weights": "class_weighting"}
Mixup = Annotated[float, typer.Option(
    "--mixup", help="Mixup's Beta alpha (e.g. 0.2): pairs of training samples blended, image, SAM grid and label "
                    "alike (0: off).")]
# the two loss options share one signature line (the signature stays within the size rule)
SlcaImageSup = Annotated[float, typer.Option(
    "--slca-image-sup", help="slca: weight of a cross-entropy on the image part's own logits (the SLCA-steered "
    "backbone, without the branch and prior), so it also classifies alone (deep supervision; 0: off).")]
SlcaIndependent = Annotated[bool, typer.Option(
    "--slca-independent/--no-slca-independent", help="slca: no loss on the summed logits; each part learns from "
    "its own only (--slca-image-sup, --slca-branch-sup), so the sum is an ensemble of two classifiers.")]


@app.command(help=HELP)
@handle_errors
def train(
    ctx: typer.Context, from_cache: opt.FromCache,
    out: Annotated[Path, opt.out("Run folder: model.pt, metrics.json, history.csv, predictions.csv, PNGs.")],
    task: str = typer.Option("classify", "--task", help="classify (image labels) or segment (pixel masks)."),
    model: str = typer.Option("slca", "--model", "-m", help="classify: slca (backbone + SLCA), backbone (no SLCA), probe (logistic regression on pooled SAM features), sam-head (small CNN on SAM features)."),
    backbone: Annotated[str, opt.backbone("timm model for slca/backbone: resnet18/50/152, seresnext50_32x4d, legacy_senet154, swinv2_tiny_window8_256, ...")] = "resnet18",
    backbone_weights: Annotated[Optional[Path], opt.backbone_weights("Local timm checkpoint (.pth/.safetensors) for the backbone, read by timm's pretrained loader; default random init (nothing is downloaded).")] = None,
    pretrained: bool = typer.Option(False, "--pretrained/--no-pretrained", help="slca/backbone: start from timm's pretrained (ImageNet) weights, downloaded once through the Hugging Face hub into its cache (HF_HOME); HF_HUB_OFFLINE=1 reads only the cache."),
    dataset: opt.StoreDataset = None, data_root: opt.StoreDataRoot = None,
    option: opt.DatasetOption = None,
    img_size: Annotated[int, opt.img_size("Backbone input side in px (0: automatic, the median image side rounded up to 32 within 64..224; 64 measured best, see README).")] = 64,
    slca_stages: str = typer.Option("all", "--slca-stages", help="Stages gated by SLCA: all, last2, or indices/names, e.g. 'layer3,layer4' or '=-2,-1'."),
    slca_window: int = typer.Option(8, "--slca-window", help="SLCA pooling window k on the 64x64 SAM grid (8: 8x8 regions; 0: global, SE-like)."),
    slca_hidden: int = typer.Option(64, "--slca-hidden", help="SLCA bottleneck width r."),
    slca_act: str = typer.Option("gelu", "--slca-act", help="SLCA activation: gelu, relu, silu."),
    slca_gate: str = typer.Option("residual", "--slca-gate", help="residual: x*(1+(2a-1)), exactly the identity at init; mul: x*a (SE style)."),
    slca_fuse: bool = typer.Option(False, "--slca-fuse/--no-slca-fuse", help="slca: also add a linear layer on the pooled SAM embedding to the logits (measured in README, Benchmarks)."),
    slca_norm: bool = typer.Option(True, "--slca-norm/--no-slca-norm", help="slca: standardise each SAM channel (BatchNorm) before the SLCA bottleneck."),
    slca_branch: bool = typer.Option(True, "--slca-branch/--no-slca-branch", help="slca: also add the logits of a sam-head CNN on the SAM grid (late fusion)."),
    slca_spatial: bool = typer.Option(False, "--slca-spatial/--no-slca-spatial", help="slca: also a spatial map per SAM window, multiplied into the channel gate."),
    slca_add: bool = typer.Option(False, "--slca-add/--no-slca-add", help="slca: also add projected SAM features to each gated stage (fusion)."),
    slca_prior: bool = typer.Option(True, "--slca-prior/--no-slca-prior", help="slca: fit the probe first and hold it frozen as a prior; --slca-prior-blend says how its logits join the network's."),
    slca_prior_folds: int = typer.Option(5, "--slca-prior-folds", help="slca prior, with --no-slca-prior-blend: train on the probe's out-of-fold logits from this many stratified folds (0: its in-sample logits)."),
    slca_prior_blend: bool = typer.Option(True, "--slca-prior-blend/--no-slca-prior-blend", help="slca prior: train the network without it, then add the prior's logits at the weight (0-2) best on validation AUC (late fusion); --no-slca-prior-blend stacks on its out-of-fold logits instead."),
    slca_distill: float = typer.Option(0.0, "--slca-distill", help="slca: weight of an auxiliary loss in which the last SLCA stage predicts the cached SAM features (0: off)."),
    slca_branch_sup: float = typer.Option(1.0, "--slca-branch-sup", help="slca: weight of a second cross-entropy on the sam-head branch's own logits, so the branch also classifies alone (deep supervision; 0: off)."),
    slca_branch_detach: bool = typer.Option(False, "--slca-branch-detach/--no-slca-branch-detach", help="slca: the branch learns from its own loss only (no gradient from the summed logits), so the image part learns what it misses."),
    slca_image_sup: SlcaImageSup = 1.0, slca_independent: SlcaIndependent = False,
    slca_lr_mult: float = typer.Option(1.0, "--slca-lr-mult", help="slca: learning-rate factor of the SLCA blocks."),
    sam_head_width: int = typer.Option(64, "--sam-head-width", help="Width of the sam-head CNN."),
    drop_rate: float = typer.Option(0.0, "--drop-rate", help="Dropout before the classifier (sam-head: 0 means 0.1)."),
    epochs: Annotated[Optional[int], opt.epochs("Most epochs (default 30; segment: 50).")] = None,
    batch_size: Annotated[Optional[int], opt.batch_size("Batch size (default 32; segment: 8).")] = None,
    lr: Annotated[Optional[float], opt.lr("Peak AdamW learning rate (default 1e-3; segment: 5e-4).")] = None,
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="AdamW weight decay (default 0.05; segment: 0)."),
    warmup_epochs: int = typer.Option(1, "--warmup-epochs", help="Linear warmup before the cosine decay."),
    patience: Annotated[Optional[int], opt.patience("Early stopping: epochs without a better val AUC (0: never; default 10).")] = None,
    class_weights: bool = typer.Option(True, "--class-weights/--no-class-weights", help="Weight the loss by inverse class frequency."),
    label_smoothing: float = typer.Option(0.0, "--label-smoothing"), mixup: Mixup = 0.0,
    clip_grad: float = typer.Option(1.0, "--clip-grad", help="Gradient norm clip (0: off)."),
    precise_bn: int = typer.Option(2048, "--precise-bn", help="Before each validation, re-estimate BatchNorm statistics on up to this many training samples (0: off; matters with few labels)."),
    augment: str = typer.Option("flip", "--augment", help="Comma (or +) list: none, flip, rot (flips and 90-degree turns; image and SAM grid alike), photometric (image only)."),
    train_fraction: float = typer.Option(1.0, "--train-fraction", help="Stratified, seeded fraction of the training split (data-efficiency studies)."),
    seed: Annotated[int, opt.seed("Seed of initialisation, order, augmentation and --train-fraction.")] = 0,
    split_seed: int = typer.Option(0, "--split-seed", help="Seed of the split for datasets without official splits."),
    val_fraction: float = typer.Option(0.1, "--val-fraction", help="Validation share when the dataset has no val split."),
    test_fraction: float = typer.Option(0.2, "--test-fraction", help="Test share when the dataset has no test split."),
    probe_c: str = typer.Option("0.001,0.01,0.1,1,10", "--probe-c", help="probe: inverse regularisation strengths tried (best val AUC wins)."),
    device: opt.Device = "auto", precision: opt.Precision = "auto",
    workers: opt.Workers = -1, in_memory: opt.InMemory = False,
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run in --out from its last finished epoch."),
    overwrite: Annotated[bool, opt.overwrite("Replace an earlier run in --out.")] = False,
    attention_images: int = typer.Option(6, "--attention-images", help="Test images in slca_attention.png."),
    plots: Annotated[bool, opt.plots("Write the PNG figures.")] = True,
    head: str = typer.Option("autosam", "--head", help="segment only: autosam, cnn, linear, unet."),
    labeled_volumes: int = typer.Option(0, "--labeled-volumes", help="segment only: train on the first N volumes (0: all)."),
    sam_checkpoint: Optional[str] = typer.Option(None, "--sam-checkpoint", help="segment only: SAM checkpoint whose mask decoder initialises autosam ('encoder': the store's)."),
    quiet: Annotated[bool, opt.quiet("No progress bars or per-epoch lines.")] = False,
) -> None:
    run_train(ctx)


def run_train(ctx: typer.Context) -> None:
    """Build the task's config from the options given on the command line and train."""
    params = dict(ctx.params)
    task, quiet, out = params.pop("task"), params.pop("quiet"), params["out"]
    if task not in TASKS:
        raise ValueError(f"--task {task!r}: use classify or segment")
    given = {k for k in params if _given(ctx, k)}
    wrong = sorted(given & set(SEGMENT_ONLY if task == "classify" else CLASSIFY_ONLY))
    if wrong:
        flags = ", ".join("--" + k.replace("_", "-") for k in wrong)
        raise ValueError(f"{flags}: not an option of --task {task}; drop it (`pipeline train --help` says which "
                         "options belong to which task)")
    fields = config_fields(params, given | {"from_cache", "out"}, task)
    try:
        if task == "segment":
            _train_segment(fields, quiet)
        else:
            _train_classify(fields, quiet)
    except KeyboardInterrupt:
        fail(f"interrupted; re-run the same command with --resume to continue from the last finished epoch "
             f"({out}/last.pt)", 130)


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether ``name`` was set by the user (command line or environment), not defaulted.
    By enum name: typer may carry its own copy of click's ``ParameterSource``."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def config_fields(params: dict[str, Any], given: set[str], task: str) -> dict[str, Any]:
    """Config fields from the options given (defaults stay the config's own, per task)."""
    fields: dict[str, Any] = {}
    for name in given:
        value = params[name]
        if name == "option":
            value = parse_options(value, "--option")
        elif name == "slca_stages":
            value = value.lstrip("=")
        elif isinstance(value, Path) or name in ("out", "data_root"):
            value = str(value)
        fields[RENAMED.get(name, name)] = value
    return fields


def _train_classify(fields: dict[str, Any], quiet: bool) -> None:
    from stages.classify.config import ClassifyConfig
    from stages.classify.evaluate import format_metrics
    from stages.classify.train import train_classifier

    metrics = train_classifier(ClassifyConfig(**fields), progress=not quiet)
    print(format_metrics({k: v for k, v in metrics.items() if k in ("val", "test")}))
    print(f"wrote {fields['out']}/model.pt, metrics.json, history.csv, predictions.csv")


def _train_segment(fields: dict[str, Any], quiet: bool) -> None:
    from cache import FeatureStore
    from stages.segment.config import SegmentConfig
    from stages.segment.evaluate import format_scores
    from stages.segment.train import train_segmentation

    attrs = FeatureStore(fields["store"]).attrs
    fields.setdefault("dataset", attrs.get("dataset_kind"))
    fields.setdefault("data_root", str(attrs.get("dataset_root")))
    metrics = train_segmentation(SegmentConfig(**fields, progress=not quiet))
    print(format_scores(metrics))
    print(f"wrote {fields['out']}/model.pt, metrics.json, history.csv, overlays/")
