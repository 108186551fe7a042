"""Tiny random-weight SAM checkpoints for tests, saved exactly like the official files
(``torch.save(sam.state_dict())`` of a whole ``Sam``)."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)


def make_tiny_sam(embed_dim: int = 64, depth: int = 2, global_attn: tuple[int, ...] = (1,), num_heads: int = 2,
                  seed: int = 0) -> Sam:
    """A whole eval-mode ``Sam`` with a small ViT (img_size 1024, patch 16, window 14,
    out_chans 256) and the real prompt encoder / mask decoder sizes; all weights random
    (including SAM's zero-initialised positions, so they matter in comparisons)."""
    torch.manual_seed(seed)
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=depth, embed_dim=embed_dim, img_size=1024, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=num_heads, patch_size=16,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=tuple(global_attn), window_size=14,
            out_chans=256,
        ),
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(64, 64),
                                     input_image_size=(1024, 1024), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    with torch.no_grad():
        for name, p in sam.image_encoder.named_parameters():
            p.add_(torch.randn_like(p) * (0.5 if "rel_pos" in name or "pos_embed" in name else 0.02))
    return sam.eval()


def make_tiny_sam_checkpoint(path: str | Path, embed_dim: int = 64, depth: int = 2,
                             global_attn: tuple[int, ...] = (1,), seed: int = 0, num_heads: int = 2) -> Path:
    """Write a tiny whole-SAM state dict to ``path`` and return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(make_tiny_sam(embed_dim, depth, global_attn, num_heads, seed).state_dict(), path)
    return path
