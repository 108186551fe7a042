"""The ``probe`` model's fit (scikit-learn logistic regression on pooled SAM embeddings), and
slca's use of it as a prior: its out-of-fold logits (stacking) or its weight (blending)."""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from cache.schema import EMBED_SHAPE
from stages.classify.data import Prepared
from stages.classify.metrics import classification_metrics
from stages.classify.scoring import iter_logits
from stages.common.training import History
from stages.models.sam_head import LinearProbe


def pooled_features(loader) -> np.ndarray:
    """Spatially averaged embeddings (N,256) float64, in dataset position order."""
    n = len(loader.dataset)
    out = np.zeros((n, EMBED_SHAPE[0]), np.float64)
    for batch in loader:
        out[batch["pos"].numpy()] = batch["sam"].float().mean(dim=(2, 3)).numpy()
    return out


@dataclass
class ProbeFit:
    """What the probe's fit chose and the training data it saw: ``index``/``c`` the best C
    (on validation) and ``x``/``y`` the standardised pooled training features (N,256) and
    their labels (N,), so that the out-of-fold prior reuses them instead of a second pass."""

    index: int
    c: float
    x: np.ndarray
    y: np.ndarray


def _logreg(cfg, c: float):
    """The probe's classifier at inverse regularisation ``c`` (one definition for every fit)."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=5000, class_weight="balanced" if cfg.class_weighting else None)


def fit_probe(cfg, net: LinearProbe, train_loader, val_loader, prep: Prepared, history: History,
              progress: bool = True) -> ProbeFit:
    """Logistic regression on pooled embeddings; C chosen on validation AUC (one history
    row per C). The fit is copied into ``net``."""
    from sklearn.metrics import log_loss
    from sklearn.preprocessing import StandardScaler

    cs = [float(c) for c in str(cfg.probe_c).split(",") if c.strip()]
    if not cs or min(cs) <= 0:
        raise ValueError(f"--probe-c {cfg.probe_c!r}: give positive inverse regularisation strengths, e.g. 0.01,0.1,1")
    labels = prep.joined.labels
    y_tr, y_va = labels[prep.splits["train"]], labels[prep.splits["val"]]
    if len(np.unique(y_tr)) < 2:
        raise ValueError(f"{cfg.store}: the training subset holds one class; raise --train-fraction")
    x_tr, x_va = pooled_features(train_loader), pooled_features(val_loader)
    scaler = StandardScaler().fit(x_tr)
    x_tr, x_va = scaler.transform(x_tr), scaler.transform(x_va)
    k = len(prep.classes)
    best, best_fit, best_i = (-math.inf, -math.inf), None, 0
    for i, c in enumerate(cs):
        t = time.perf_counter()
        lr = _logreg(cfg, c).fit(x_tr, y_tr)
        full = np.zeros((len(x_va), k))
        full[:, lr.classes_] = lr.predict_proba(x_va)
        vm = classification_metrics(y_va, full, prep.classes, log_loss(y_va, full, labels=list(range(k))))
        p_tr = np.zeros((len(x_tr), k))
        p_tr[:, lr.classes_] = lr.predict_proba(x_tr)
        value = (vm["auc"] if math.isfinite(vm["auc"]) else -math.inf, -vm["loss"])  # ties: lower val loss
        history.append({"epoch": i + 1, "train_loss": log_loss(y_tr, p_tr, labels=list(range(k))),
                        "val_loss": vm["loss"], "val_auc": vm["auc"], "val_accuracy": vm["accuracy"],
                        "val_balanced_accuracy": vm["balanced_accuracy"], "val_f1_macro": vm["f1_macro"],
                        "C": c, "seconds": time.perf_counter() - t})
        if progress:
            print(f"probe C={c:g}  val auc {vm['auc']:.4f}  val acc {vm['accuracy']:.4f}", file=sys.stderr)
        if value > best:
            best, best_fit, best_i = value, lr, i
    if len(best_fit.classes_) != k:
        raise ValueError(f"{cfg.store}: the training subset lacks some classes; raise --train-fraction")
    net.set_from_sklearn(scaler, best_fit)
    return ProbeFit(best_i, cs[best_i], x_tr, y_tr)


def out_of_fold_logits(cfg, fit: ProbeFit, n_classes: int, folds: int, progress: bool = True) -> np.ndarray | None:
    """The fitted probe's logits for each training sample from a fit that did not see it:
    (N_train, K) float32 in dataset position order, from ``folds`` stratified folds at the C
    chosen on validation, on ``fit``'s features (standardised with the full training split's
    scaler, as the probe inside the model is).

    Stacking's rule: a model trained on top of another's predictions must see them as they
    are on unseen data; the in-sample logits of a probe fitted to the same images are
    over-confident, so the network on top would learn too little. None when a class has
    fewer than 2 training images (then no fold split exists; the in-sample prior is used)."""
    from sklearn.model_selection import StratifiedKFold

    x, y = fit.x, fit.y
    counts = np.bincount(y, minlength=n_classes)
    k = int(min(folds, counts[counts > 0].min()))
    if k < 2:
        if progress:
            print("slca prior: a class has one training image; no out-of-fold logits", file=sys.stderr)
        return None
    out = np.zeros((len(y), n_classes), np.float32)
    split = StratifiedKFold(n_splits=k, shuffle=True, random_state=cfg.seed)
    for fit_rows, held in split.split(x, y):
        z = _logreg(cfg, fit.c).fit(x[fit_rows], y[fit_rows]).decision_function(x[held])
        if n_classes == 2:  # LinearProbe's binary logits: [0, z]; every fold keeps every class
            out[held, 1] = z
        else:
            out[held] = z
    return out


# the prior weights tried by --slca-prior-blend (0: the network alone; 1: equal to stacking's)
BLEND_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)


@torch.no_grad()
def choose_prior_weight(net, loader, y: np.ndarray, classes: list[str], device, amp, history: History) -> float:
    """The weight w of the prior's logits in ``net(x) + w * prior(x)`` with the best AUC on
    ``loader`` (validation; ties: lower loss, then the smaller w), for a network trained
    without its prior. One history row per w; sets ``net.prior_weight`` to the choice."""
    from sklearn.metrics import log_loss

    net.prior_weight = 0.0
    n = len(loader.dataset)
    own = prior = None
    for pos, z, _, sam in iter_logits(net, loader, device, amp):
        zp = net.prior(None, sam).float()
        if own is None:
            own, prior = torch.zeros(n, z.shape[1]), torch.zeros(n, z.shape[1])
        own[pos], prior[pos] = z.cpu(), zp.cpu()
    k = len(classes)
    best, choice = (-math.inf, -math.inf), 0.0
    for i, w in enumerate(BLEND_WEIGHTS):
        probs = torch.softmax((own + w * prior).double(), dim=1).numpy()
        vm = classification_metrics(y, probs, classes, log_loss(y, probs, labels=list(range(k))))
        history.append({"epoch": i + 1, "val_loss": vm["loss"], "val_auc": vm["auc"], "val_accuracy": vm["accuracy"],
                        "val_balanced_accuracy": vm["balanced_accuracy"], "val_f1_macro": vm["f1_macro"],
                        "prior_weight": w})
        value = (vm["auc"] if math.isfinite(vm["auc"]) else -math.inf, -vm["loss"])
        if value > best:
            best, choice = value, w
    net.prior_weight = choice
    return choice
