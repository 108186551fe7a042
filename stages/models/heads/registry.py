"""Name -> builder registry of the prompt-free segmentation heads.

Imports no head: ``autosam.py``, ``cnn.py``, ``linear.py`` and ``unet.py`` register their
builders here with ``@register_head`` (under the function's name) and
``stages/models/heads/__init__.py`` imports them; a head module never imports the package
``__init__`` back, so registration cannot form an import cycle.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from stages.registry import Registry

HEADS: Registry[Callable[..., nn.Module]] = Registry("segmentation head")


def register_head(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register a builder ``fn(num_classes, **kw) -> nn.Module`` under its name."""
    return HEADS.register(fn)


def list_heads(pattern: str = "*") -> list[str]:
    """The registered head names as ``--head`` takes them, sorted."""
    return sorted(HEADS.names(pattern))


def create_head(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build the head ``name`` predicting ``num_classes`` classes (background included)."""
    builder = HEADS.get(name)
    if num_classes < 2:
        raise ValueError(f"a segmentation head needs at least 2 classes (background + one), got {num_classes}")
    return builder(num_classes, **kwargs)
