"""Name -> builder registry of the stage-two classifiers (like timm's ``register_model``).

    from stages.models import create_model
    net = create_model("slca", backbone="resnet18", num_classes=2)

Every registered model maps ``forward(image, sam)`` -> logits (B,K), where ``image`` is
(B,3,S,S) and ``sam`` the cached embeddings (B,256,64,64); a model that ignores one input
says so in ``uses_image`` / ``uses_sam`` so that the data loader can skip reading it.
"""
from __future__ import annotations

import fnmatch
from typing import Callable

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register ``fn(**kwargs) -> nn.Module`` under ``fn.__name__``."""
    _MODELS[fn.__name__] = fn
    return fn


def canonical(name: str) -> str:
    """CLI spellings (``sam-head``) -> registry keys (``sam_head``)."""
    return name.replace("-", "_")


def is_model(name: str) -> bool:
    return canonical(name) in _MODELS


def list_models(pattern: str = "*") -> list[str]:
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model ``name`` with ``kwargs``."""
    key = canonical(name)
    if key not in _MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    return _MODELS[key](**kwargs)
