"""SLCA: Spatially Localized Channel Attention, steered by cached SAM embeddings.

After Gu et al., "Adapting a Segmentation Foundation Model for Medical Image
Classification" (arXiv 2505.06217), whose layer details are not public; this design is
ours. For one backbone stage with feature map X (B,C,H,W) and the frozen encoder's
embeddings F (B,256,64,64) of the same image::

    P = avgpool_k(F)                      (B,256,64/k,64/k)  local windows, not global
    Z = W2 * act(W1 * P + b1) + b2        (B,C,64/k,64/k)    two 1x1 convs, 256->r->C
    A = sigmoid(Z), resized to H x W      bilinear up, area down
    residual gate:        X * (1 + (2A - 1))   W2, b2 zero at init: exactly X at init
    multiplicative gate:  X * A                 (squeeze-and-excitation style)

Unlike squeeze-and-excitation, which gives one weight per channel for the whole image,
each k x k window of the SAM grid (k=8: an 8x8 grid of regions) gets its own channel
weights, so the gate can amplify channels where SAM sees structure (a lesion, an
organ boundary) and leave the rest alone. ``window=0`` pools globally (the SE-like
ablation).

The residual gate's factor 1 + (2A - 1) = 2A lies in (0, 2): SAM can amplify or damp a
channel in a region. Its last conv starts at zero, so the block is exactly the identity
at initialisation (adding SLCA cannot make the starting point worse) while every weight
of that conv still receives a gradient from the first step. (A first version scaled a
sigmoid gate by a per-channel factor initialised to zero, ``X * (1 + s * A)``; Adam moves
``s`` by ~lr per step, so after a few hundred steps on a small dataset it was still
~0.005 and SLCA had no effect.)

Defaults (``window=8, hidden=64, act="gelu", gate="residual"``): local windows as the
design asks (8x8 regions), the identity-at-init residual gate for the reason above, and a
small bottleneck (``r = 64``: ~16k + 65*C weights). The block's own ``norm``, ``spatial``
and ``add`` default to off, so model files saved before they existed rebuild unchanged;
``pipeline train`` turns ``norm`` on (and adds the sam-head branch of the classifier),
the setting chosen by validation AUC on three real datasets (README, Benchmarks,
"Classification: SLCA on three development sets").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GATES = ("residual", "mul")
ACTS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


class SLCA(nn.Module):
    """Gate one stage's features (B,C,H,W) or (B,H,W,C) with SAM embeddings (B,256,G,G).

    Args:
        out_chs: C, the channels of the gated stage.
        in_chs: channels of the SAM embeddings (256).
        window: k, the pooling window on the SAM grid (0: global pooling).
        hidden: r, the bottleneck width.
        act: "gelu", "relu" or "silu".
        gate: "residual" (x * 2a = x * (1 + (2a - 1)), identity at init) or "mul" (x * a).
        norm: standardise each SAM channel (BatchNorm over batch and windows) before the
            bottleneck; LiteMedSAM's embeddings are small (std ~0.1), so unnormalised they
            move the gate little.
        spatial: also a spatial map per window, one factor 2*sigmoid(s) shared by all
            channels, multiplied into the channel gate (where, not only which channels).
        add: also add the bottleneck projected to C channels to the stage (fusion: SAM
            features enter the stage, not only re-weight it).
    Both extra 1x1 convs start at zero, so the block stays the identity at initialisation.
    """

    def __init__(self, out_chs: int, in_chs: int = 256, window: int = 8, hidden: int = 64,
                 act: str = "gelu", gate: str = "residual", norm: bool = False, spatial: bool = False,
                 add: bool = False):
        super().__init__()
        if gate not in GATES:
            raise ValueError(f"unknown SLCA gate {gate!r}; use one of {', '.join(GATES)}")
        if act not in ACTS:
            raise ValueError(f"unknown SLCA activation {act!r}; use one of {', '.join(ACTS)}")
        if window < 0 or hidden < 1:
            raise ValueError(f"SLCA window must be >= 0 and hidden >= 1 (got window={window}, hidden={hidden})")
        self.window, self.gate = window, gate
        self.norm = nn.BatchNorm2d(in_chs) if norm else nn.Identity()
        self.fc1 = nn.Conv2d(in_chs, hidden, 1)
        self.act = ACTS[act]()
        self.fc2 = _zero_conv(hidden, out_chs) if gate == "residual" else nn.Conv2d(hidden, out_chs, 1)
        self.spatial = _zero_conv(hidden, 1) if spatial else None
        self.inject = _zero_conv(hidden, out_chs) if add else None

    def pool(self, sam: torch.Tensor) -> torch.Tensor:
        """(B,256,G,G) -> (B,256,ceil(G/k),ceil(G/k)); (B,256,1,1) for window 0."""
        if self.window == 0:
            return sam.mean(dim=(2, 3), keepdim=True)
        if self.window == 1:
            return sam
        return F.avg_pool2d(sam, self.window, self.window, ceil_mode=True, count_include_pad=False)

    def bottleneck(self, sam: torch.Tensor) -> torch.Tensor:
        """The bottleneck per window: (B,256,G,G) -> (B,r,g,g)."""
        return self.act(self.fc1(self.norm(self.pool(sam))))

    def attention(self, sam: torch.Tensor) -> torch.Tensor:
        """Channel attention per window: (B,256,G,G) -> (B,C,g,g) in (0,1)."""
        return self._channel(self.bottleneck(sam))

    def _channel(self, h: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc2(h))

    def factor(self, h: torch.Tensor) -> torch.Tensor:
        """Bottleneck (B,r,g,g) -> the multiplicative factor on the window grid (B,C,g,g)."""
        a = self._channel(h)
        a = 2 * a if self.gate == "residual" else a
        return a if self.spatial is None else a * (2 * torch.sigmoid(self.spatial(h)))

    def gate_map(self, sam: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The multiplicative factor applied to the stage: (B,C,H,W)."""
        return _resize(self.factor(self.bottleneck(sam)), size)

    def forward(self, x: torch.Tensor, sam: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        """x (B,C,H,W), or (B,H,W,C) when ``channels_last`` (Swin token maps) -> same shape."""
        size = tuple(x.shape[1:3] if channels_last else x.shape[2:4])
        h = self.bottleneck(sam.to(x.dtype))
        g = _resize(self.factor(h), size).to(x.dtype)
        shift = None if self.inject is None else _resize(self.inject(h), size).to(x.dtype)
        if channels_last:
            g = g.permute(0, 2, 3, 1)
            shift = None if shift is None else shift.permute(0, 2, 3, 1)
        return x * g if shift is None else x * g + shift


def _zero_conv(in_chs: int, out_chs: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_chs, out_chs, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def _resize(a: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B,C,g,g) -> (B,C,H,W): bilinear when enlarging, area averaging when shrinking."""
    if tuple(a.shape[2:]) == tuple(size):
        return a
    if a.shape[2] >= size[0] and a.shape[3] >= size[1]:
        return F.adaptive_avg_pool2d(a, size)
    return F.interpolate(a, size=size, mode="bilinear", align_corners=False)
