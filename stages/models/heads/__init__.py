"""Prompt-free segmentation heads, registered by name (``stages.models.heads.registry``)
and created like timm models.

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

# importing the heads registers them in stages.models.heads.registry
from stages.models.heads import autosam, cnn, linear, unet  # noqa: F401
from stages.models.heads.registry import HEADS, create_head, list_heads, register_head

__all__ = ["HEADS", "create_head", "list_heads", "register_head"]
