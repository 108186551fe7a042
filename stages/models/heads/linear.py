"""Linear head, the minimal one: SAM's x4 transposed-conv upscaling (256 -> 64 -> 32
channels, 64x64 -> 256x256) and a 1x1 classifier; no spatial mixing beyond the 2x2
transposed kernels, so it measures how linearly decodable the cached features are.
"""
from __future__ import annotations

import torch
from segment_anything.modeling.common import LayerNorm2d
from torch import nn

from cache.schema import EMBED_SHAPE
from stages.models.heads.registry import register_head


class LinearHead(nn.Module):
    """(B,in_chans,64,64) embeddings -> (B,num_classes,256,256) logits."""

    input_kind = "features"

    def __init__(self, num_classes: int, in_chans: int = EMBED_SHAPE[0]) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.upscaling = nn.Sequential(
            nn.ConvTranspose2d(in_chans, in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(in_chans // 4),
            nn.GELU(),
            nn.ConvTranspose2d(in_chans // 4, in_chans // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.classifier = nn.Conv2d(in_chans // 8, num_classes, 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.upscaling(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B,256,64,64) -> logits (B,num_classes,256,256)."""
        return self.forward_head(self.forward_features(x))


@register_head
def linear(num_classes: int, **kwargs) -> LinearHead:
    return LinearHead(num_classes, **kwargs)
