"""Configuration of a classification run (``pipeline train --task classify``): the settings,
their validation, and the constructor arguments of the network they describe."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.common.training import check_schedule
from stages.models.classifier import check_hub_weights
from stages.models.registry import canonical, list_models

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
    # backbone input side in px; 0: automatic (the median image side rounded up to 32, within
    # 64..224). 64 by measurement: 128 px scored lower validation AUC than 64 for slca and
    # backbone on chest_xray and blood_pbc with 10% labels (3 of 4), 224 px no better at 100%,
    # and every figure in the README is at 64 px (README, "Why these defaults")
    img_size: int = 64
    slca_stages: str = "all"
    slca_window: int = 8
    slca_hidden: int = 64
    slca_act: str = "gelu"
    slca_gate: str = "residual"
    slca_fuse: bool = False
    # the measured defaults (README, Benchmarks): SAM channels standardised before the
    # bottleneck, plus the sam-head branch trained to classify on its own too, plus the probe
    # as a frozen prior blended in after training (validation AUC over three sets); all
    # False / 0 is the SLCA of the first release
    slca_norm: bool = True
    slca_branch: bool = True
    slca_spatial: bool = False
    slca_add: bool = False
    slca_prior: bool = True
    slca_prior_folds: int = 5
    # train without the prior, then add it at the weight that is best on validation (False:
    # stacking on its out-of-fold logits); without the prior there is nothing to blend
    slca_prior_blend: bool = True
    slca_distill: float = 0.0
    slca_branch_sup: float = 1.0
    slca_branch_detach: bool = False
    # the image part classifies alone too, as the branch does (validation AUC over three
    # sets, level within noise: README, sixth round)
    slca_image_sup: float = 1.0
    slca_independent: bool = False
    slca_lr_mult: float = 1.0
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
    mixup: float = 0.0  # Beta(alpha, alpha) of mixup on image, SAM grid and label; 0: off
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

    def check(self) -> None:
        """Refuse settings that cannot work with a one-line ValueError naming the option."""
        if not is_model_kind(self.model):
            raise ValueError(f"unknown --model {self.model!r}; choose one of: {', '.join(model_kinds())}")
        check_schedule(self.epochs, self.batch_size, self.lr)
        if self.slca_prior_folds < 0 or self.slca_prior_folds == 1:
            raise ValueError(f"--slca-prior-folds {self.slca_prior_folds}: use 0 (in-sample probe logits) or 2 or more")
        for name in ("slca_distill", "slca_branch_sup", "slca_image_sup"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: give a loss weight of 0 (off) or more")
        if self.slca_branch_detach and not (self.slca_branch and self.slca_branch_sup > 0):
            raise ValueError("--slca-branch-detach: the branch would learn nothing; it needs --slca-branch and "
                             "--slca-branch-sup above 0 (its own loss)")
        parts_learn = self.slca_image_sup > 0 and (self.slca_branch_sup > 0 or not self.slca_branch)
        if self.slca_independent and not parts_learn:
            raise ValueError("--slca-independent: a part would learn nothing; it needs --slca-image-sup above 0 "
                             "and, with --slca-branch, --slca-branch-sup above 0 (each part's own loss)")
        if not self.slca_lr_mult > 0:
            raise ValueError(f"--slca-lr-mult {self.slca_lr_mult}: must be positive")
        if self.patience < 0 or self.warmup_epochs < 0 or self.slca_window < 0 or self.precise_bn < 0:
            raise ValueError("--patience, --warmup-epochs, --slca-window and --precise-bn must be 0 or more")
        if self.mixup < 0:
            raise ValueError(f"--mixup {self.mixup}: must be 0 (off) or a positive Beta alpha, e.g. 0.2")
        if not 0 < self.train_fraction <= 1:
            raise ValueError(f"--train-fraction {self.train_fraction}: must be in (0, 1]")
        if not (0 < self.val_fraction < 1 and 0 < self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1):
            raise ValueError("--val-fraction and --test-fraction must be in (0, 1) and sum to less than 1")


# what a run made before an option existed did, where that differs from today's default:
# a config.json without the key means this (comparisons must not reuse such a run as if it
# had been trained with the new default)
BEFORE_OPTION = {"slca_norm": False, "slca_branch": False, "slca_spatial": False, "slca_add": False,
                 "slca_prior": False, "slca_prior_folds": 0, "slca_prior_blend": False, "slca_distill": 0.0,
                 "slca_branch_sup": 0.0, "slca_branch_detach": False, "slca_image_sup": 0.0,
                 "slca_independent": False}


def moot(cfg: dict[str, Any]) -> set[str]:
    """Settings of a run (``ClassifyConfig`` as a dict) that its other settings make without
    effect: how the prior joins the network when there is no prior, the stacking folds
    when the prior is blended in after training, and the branch's own loss (and whether it is
    the branch's only one) without a branch."""
    out = set() if cfg.get("slca_branch", True) else {"slca_branch_sup", "slca_branch_detach"}
    if not cfg.get("slca_prior"):
        return out | {"slca_prior_blend", "slca_prior_folds"}
    return out | ({"slca_prior_folds"} if cfg.get("slca_prior_blend") else set())


def model_kinds() -> list[str]:
    """The registered classifiers in CLI spelling (``sam-head``)."""
    return [n.replace("_", "-") for n in list_models()]


def is_model_kind(name: str) -> bool:
    return canonical(name) in list_models()



def model_kwargs(cfg: ClassifyConfig, num_classes: int, img_size: int) -> dict[str, Any]:
    """Constructor arguments saved in model.pt (enough to rebuild the network)."""
    kind = canonical(cfg.model)
    if kind in ("slca", "backbone"):
        kw = dict(backbone=cfg.backbone, num_classes=num_classes, img_size=img_size, drop_rate=cfg.drop_rate,
                  backbone_kwargs=dict(cfg.backbone_kwargs))
        if kind == "slca":
            kw.update(stages=cfg.slca_stages, window=cfg.slca_window, hidden=cfg.slca_hidden, act=cfg.slca_act,
                      gate=cfg.slca_gate, fuse=bool(cfg.slca_fuse), norm=bool(cfg.slca_norm),
                      branch=bool(cfg.slca_branch), branch_detach=bool(cfg.slca_branch_detach),
                      spatial=bool(cfg.slca_spatial), add=bool(cfg.slca_add),
                      prior=bool(cfg.slca_prior), distill=cfg.slca_distill > 0)
            if cfg.slca_prior and cfg.slca_prior_blend:
                kw["prior_weight"] = 0.0  # while training; the weight chosen on validation replaces it
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
