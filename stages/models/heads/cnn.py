"""CNN head: 1x1 projection, 3x3 conv blocks, two x2 transposed-conv upsamplings
(64 -> 128 -> 256) and a 1x1 classifier; a lighter version of AutoSAM's ``SegDecoderCNN``
(whose 256-channel 3x3 convs cost ~12 GMAC per image, too slow on a CPU).
"""
from __future__ import annotations

import torch
from torch import nn

from cache.schema import EMBED_SHAPE
from stages.models.heads.registry import register_head


def conv_bn(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class CnnHead(nn.Module):
    """(B,in_chans,64,64) embeddings -> (B,num_classes,256,256) logits.

    widths: channels at 64x64, 128x128 and 256x256; depth: 3x3 conv blocks at 64x64."""

    input_kind = "features"

    def __init__(self, num_classes: int, in_chans: int = EMBED_SHAPE[0], widths: tuple[int, int, int] = (128, 64, 32),
                 depth: int = 2) -> None:
        super().__init__()
        w0, w1, w2 = widths
        self.num_classes = num_classes
        self.proj = conv_bn(in_chans, w0, 1)
        self.blocks = nn.Sequential(*[conv_bn(w0, w0) for _ in range(depth)])
        self.up1 = nn.Sequential(nn.ConvTranspose2d(w0, w1, 2, stride=2), conv_bn(w1, w1))
        self.up2 = nn.Sequential(nn.ConvTranspose2d(w1, w2, 2, stride=2), conv_bn(w2, w2))
        self.classifier = nn.Conv2d(w2, num_classes, 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B,in_chans,h,w) -> (B,w2,4h,4w)."""
        return self.up2(self.up1(self.blocks(self.proj(x))))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B,256,64,64) -> logits (B,num_classes,256,256)."""
        return self.forward_head(self.forward_features(x))


@register_head
def cnn(num_classes: int, **kwargs) -> CnnHead:
    return CnnHead(num_classes, **kwargs)
