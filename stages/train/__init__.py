"""Stage two training. Classification: ``ClassifyConfig`` + ``train_classifier`` (``classify``).

Generic pieces for any task live in ``loop`` (seeding, AdamW + cosine, early stopping,
class weights, AMP, NaN guard, atomic checkpoints, history CSV), ``metrics`` and
``plots``; importing ``stages.train.loop`` does not import timm or the classifiers.
"""
from __future__ import annotations

from .loop import TrainingError

_LAZY = {"ClassifyConfig", "MODEL_KINDS", "train_classifier"}


def __getattr__(name: str):
    if name in _LAZY:
        from . import classify

        return getattr(classify, name)
    raise AttributeError(f"module 'stages.train' has no attribute {name!r}")


__all__ = ["MODEL_KINDS", "ClassifyConfig", "TrainingError", "train_classifier"]
