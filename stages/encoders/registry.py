"""The encoder registry (like segment-anything's ``sam_model_registry``): name -> builder
``(checkpoint=None, device="cpu", fast=False, resize="exact") -> Encoder``.

Imports no encoder implementation: ``litemedsam.py``, ``sam.py`` and ``sam2.py`` register
their builders here with ``@register_encoder(...)`` and ``stages/encoders/__init__.py``
imports them, so the registry is complete whenever ``stages.encoders`` is imported.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from stages.encoders.base import Encoder, EncoderError
from stages.registry import Registry

DEFAULT_ENCODER = "litemedsam"

#: registration order is the order --help and error messages list them
ENCODERS: Registry[Callable[..., Encoder]] = Registry("encoder", error=EncoderError)
register_encoder = ENCODERS.register


def list_encoders(pattern: str = "*") -> list[str]:
    """The registered encoder names as ``--encoder`` takes them (the default first)."""
    return ENCODERS.names(pattern)


def build_encoder(name: str, checkpoint: str | Path | None = None, device: str | torch.device = "cpu",
                  fast: bool = False, resize: str = "exact") -> Encoder:
    """A frozen, eval-mode encoder on ``device``. ``fast`` switches to fused attention
    kernels (results within float16 rounding of the default, not bit-identical);
    ``resize`` "fast" (SAM ViT encoders only; others refuse it) resizes with torch's uint8
    kernel instead of the reference's PIL, a different preprocessing, recorded as such.
    Raises EncoderError listing the choices for an unknown ``name``."""
    return ENCODERS.create(name, checkpoint=checkpoint, device=device, fast=fast, resize=resize)
