"""Prompt-free segmentation heads, registered by name and created like timm models.

Every head maps its input to per-class logits on the 256x256 canvas:

- feature heads (``autosam``, ``cnn``, ``linear``): cached encoder embeddings
  (B,256,64,64) -> (B,C,256,256);
- ``unet``: the from-scratch baseline on raw images prepared to the same canvas,
  (B,3,256,256) -> (B,C,256,256).

A head says which input it takes in ``head.input_kind`` ("features" or "image").
Cropping the canvas to the image and resizing to its size is done by the caller
(``stages.segment.data.logits_to_raw``).

    from stages.models.heads import create_head
    head = create_head("autosam", num_classes=4)
"""
from __future__ import annotations

from typing import Callable

from torch import nn

HEADS: dict[str, Callable[..., nn.Module]] = {}


def register_head(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register a builder ``fn(num_classes, **kw) -> nn.Module`` under its name."""
    HEADS[fn.__name__] = fn
    return fn


def list_heads() -> list[str]:
    return sorted(HEADS)


def create_head(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build the head ``name`` predicting ``num_classes`` classes (background included)."""
    if name not in HEADS:
        raise ValueError(f"unknown segmentation head {name!r}; choose one of: {', '.join(list_heads())}")
    if num_classes < 2:
        raise ValueError(f"a segmentation head needs at least 2 classes (background + one), got {num_classes}")
    return HEADS[name](num_classes, **kwargs)


# registration happens on import
from . import autosam, cnn, linear, unet  # noqa: E402,F401

__all__ = ["HEADS", "create_head", "list_heads", "register_head"]
