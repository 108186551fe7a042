"""Name -> builder registry of the stage-two classifiers (like timm's ``register_model``).

    from stages.models import create_model
    net = create_model("slca", backbone="resnet18", num_classes=2)

Every registered model maps ``forward(image, sam)`` -> logits (B,K), where ``image`` is
(B,3,S,S) and ``sam`` the cached embeddings (B,256,64,64); a model that ignores one input
says so in ``uses_image`` / ``uses_sam`` so that the data loader can skip reading it.

Imports no model: ``classifier.py`` and ``sam_head.py`` register their builders with
``@register_model`` (under the function's name) and ``stages/models/__init__.py`` imports
them. Keys are Python names (``sam_head``, what model.pt records); the CLI spells them with
hyphens (``sam-head``, ``model_choices()``); both are accepted everywhere.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from stages.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register ``fn(**kwargs) -> nn.Module`` under ``fn.__name__``."""
    return MODELS.register(fn)


def canonical(name: str) -> str:
    """CLI spellings (``sam-head``) -> registry keys (``sam_head``)."""
    return MODELS.canonical(name)


def is_model(name: str) -> bool:
    return name in MODELS


def list_models(pattern: str = "*") -> list[str]:
    """Registered classifier keys (``sam_head``), sorted, matching the fnmatch ``pattern``."""
    return sorted(MODELS.names(pattern))


def model_choices() -> list[str]:
    """The registered classifiers as ``--model`` / ``--models`` spell them (``sam-head``), sorted."""
    return [n.replace("_", "-") for n in list_models()]


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model ``name`` (either spelling) with ``kwargs``; ValueError
    listing the choices for an unknown name."""
    return MODELS.create(name, **kwargs)
