"""Classification metrics, all computed with scikit-learn.

``classification_metrics(y, prob, classes)`` returns a flat dict (numbers only, so that
``dvc metrics show`` lists every entry): accuracy, balanced_accuracy, auc (macro
one-vs-rest; for two classes the ROC AUC of class 1), f1_macro, and
``precision_<class>`` / ``recall_<class>`` per class. Metrics undefined on the given
labels (AUC with one class present) are NaN, written as null in JSON.
"""
from __future__ import annotations

import re
import warnings
from typing import Sequence

import numpy as np
from sklearn import metrics as skm


def safe_name(name: str) -> str:
    """Class name -> a metric-key-friendly token (``normal, benign`` -> ``normal_benign``)."""
    return re.sub(r"[^0-9A-Za-z]+", "_", str(name)).strip("_") or "class"


def auc_score(y: np.ndarray, prob: np.ndarray) -> float:
    """Macro one-vs-rest ROC AUC over the classes present in ``y``; NaN if fewer than 2."""
    k = prob.shape[1]
    present = np.unique(y)
    if len(present) < 2:
        return float("nan")
    if k == 2:
        return float(skm.roc_auc_score(y, prob[:, 1]))
    scores = [skm.roc_auc_score(y == c, prob[:, c]) for c in present]
    return float(np.mean(scores))


def classification_metrics(y: Sequence[int], prob: np.ndarray, classes: Sequence[str],
                           loss: float | None = None) -> dict[str, float]:
    """y (N,) int labels, prob (N,K) class probabilities -> flat metric dict."""
    with warnings.catch_warnings():  # classes absent from y are expected on small splits
        warnings.simplefilter("ignore", UserWarning)
        return _metrics(np.asarray(y, dtype=np.int64), np.asarray(prob, dtype=np.float64), classes, loss)


def _metrics(y: np.ndarray, prob: np.ndarray, classes: Sequence[str], loss: float | None) -> dict[str, float]:
    labels = list(range(len(classes)))
    pred = prob.argmax(axis=1)
    out: dict[str, float] = {
        "n": int(len(y)),
        "accuracy": float(skm.accuracy_score(y, pred)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y, pred)) if len(y) else float("nan"),
        "auc": auc_score(y, prob),
        "f1_macro": float(skm.f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
    }
    if loss is not None:
        out["loss"] = float(loss)
    p, r, _, _ = skm.precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    for c, name in enumerate(classes):
        out[f"precision_{safe_name(name)}"] = float(p[c])
        out[f"recall_{safe_name(name)}"] = float(r[c])
    return out


def confusion(y: Sequence[int], prob: np.ndarray, num_classes: int) -> np.ndarray:
    return skm.confusion_matrix(np.asarray(y), np.asarray(prob).argmax(1), labels=list(range(num_classes)))
