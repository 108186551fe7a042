"""Small UNet trained from scratch on the raw images: the baseline that measures what
the cached SAM features are worth. It takes the image prepared like LiteMedSAM's input
(long side resized to 256, min-max to [0,1], zero padding bottom/right), so its logits
live on the same 256x256 canvas as the feature heads'.
"""
from __future__ import annotations

import torch
from torch import nn

from stages.models.heads.registry import register_head
from stages.models.heads.cnn import conv_bn


def double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(conv_bn(cin, cout), conv_bn(cout, cout))


class UNet(nn.Module):
    """(B,in_chans,S,S) image -> (B,num_classes,S,S) logits; S divisible by 2**(depth-1).

    base: channels of the first level, doubled at each of the ``depth`` levels."""

    input_kind = "image"

    def __init__(self, num_classes: int, in_chans: int = 3, base: int = 16, depth: int = 4) -> None:
        super().__init__()
        self.num_classes = num_classes
        chans = [base * 2 ** i for i in range(depth)]
        self.down = nn.ModuleList([double_conv(in_chans, chans[0])] +
                                  [double_conv(a, b) for a, b in zip(chans[:-1], chans[1:])])
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList([nn.ConvTranspose2d(b, a, 2, stride=2) for a, b in zip(chans[:-1], chans[1:])])
        self.fuse = nn.ModuleList([double_conv(2 * a, a) for a in chans[:-1]])
        self.classifier = nn.Conv2d(chans[0], num_classes, 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B,in_chans,S,S) -> (B,base,S,S)."""
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for up, fuse in zip(reversed(self.up), reversed(self.fuse)):
            x = fuse(torch.cat([skips.pop(), up(x)], dim=1))
        return x

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B,3,256,256) -> logits (B,num_classes,256,256)."""
        return self.forward_head(self.forward_features(x))


@register_head
def unet(num_classes: int, **kwargs) -> UNet:
    return UNet(num_classes, **kwargs)
