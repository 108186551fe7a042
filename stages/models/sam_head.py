"""Classifiers on the SAM embeddings alone: a small CNN (``sam_head``) and a linear probe
on pooled embeddings (``probe``, fitted by scikit-learn's LogisticRegression and held as
a module so that it is saved, evaluated and used for prediction like the others)."""
from __future__ import annotations

import torch
from torch import nn

from cache.schema import EMBED_SHAPE
from stages.models.registry import register_model

SAM_CHANNELS = EMBED_SHAPE[0]


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.GELU())


class SAMHead(nn.Module):
    """Small CNN on the embeddings: (B,256,64,64) -> (B,K).

    1x1 conv 256->w, two stride-2 3x3 convs (64 -> 32 -> 16 grid, w -> 2w), global
    average pooling, dropout, linear. ~0.3M weights at w=64."""

    uses_image, uses_sam = False, True

    def __init__(self, num_classes: int = 2, width: int = 64, drop_rate: float = 0.1, in_chs: int = SAM_CHANNELS):
        super().__init__()
        self.stem = _conv_bn(in_chs, width, 1)
        self.blocks = nn.Sequential(_conv_bn(width, 2 * width, 3, 2), _conv_bn(2 * width, 2 * width, 3, 2))
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward_features(self, image: torch.Tensor | None, sam: torch.Tensor) -> torch.Tensor:
        """(B,256,64,64) -> (B,2w,16,16); ``image`` is ignored."""
        return self.blocks(self.stem(sam))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(x.mean(dim=(2, 3)))
        return x if pre_logits else self.fc(x)

    def forward(self, image: torch.Tensor | None, sam: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(image, sam))


class LinearProbe(nn.Module):
    """Logistic regression on globally averaged, standardised embeddings: (B,256,G,G) -> (B,K).

    Binary problems keep scikit-learn's single weight row as logits ``[0, z]`` (the same
    softmax probabilities as its sigmoid); K > 2 uses the multinomial rows directly."""

    uses_image, uses_sam = False, True

    def __init__(self, num_classes: int = 2, in_chs: int = SAM_CHANNELS):
        super().__init__()
        rows = 1 if num_classes == 2 else num_classes
        self.num_classes = num_classes
        self.register_buffer("mean", torch.zeros(in_chs))
        self.register_buffer("std", torch.ones(in_chs))
        self.fc = nn.Linear(in_chs, rows)

    @staticmethod
    def pool(sam: torch.Tensor) -> torch.Tensor:
        """(B,256,G,G) -> (B,256) spatial mean."""
        return sam.float().mean(dim=(2, 3))

    def forward_features(self, image: torch.Tensor | None, sam: torch.Tensor) -> torch.Tensor:
        return (self.pool(sam) - self.mean) / self.std

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if pre_logits:
            return x
        z = self.fc(x)
        return torch.cat([torch.zeros_like(z), z], dim=1) if self.num_classes == 2 else z

    def forward(self, image: torch.Tensor | None, sam: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(image, sam))

    @torch.no_grad()
    def set_from_sklearn(self, scaler, logreg) -> None:
        """Copy a fitted StandardScaler + LogisticRegression into this module."""
        self.mean.copy_(torch.as_tensor(scaler.mean_, dtype=torch.float32))
        self.std.copy_(torch.as_tensor(scaler.scale_, dtype=torch.float32))
        self.fc.weight.copy_(torch.as_tensor(logreg.coef_, dtype=torch.float32))
        self.fc.bias.copy_(torch.as_tensor(logreg.intercept_, dtype=torch.float32))


@register_model
def sam_head(num_classes: int = 2, width: int = 64, drop_rate: float = 0.1, **_) -> SAMHead:
    """Small CNN on the SAM embeddings alone (backbone options are ignored)."""
    return SAMHead(num_classes, width, drop_rate)


@register_model
def probe(num_classes: int = 2, **_) -> LinearProbe:
    """Linear probe on pooled SAM embeddings (weights come from scikit-learn)."""
    return LinearProbe(num_classes)
