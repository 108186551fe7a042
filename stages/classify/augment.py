"""Batch augmentation that keeps the image and the SAM embedding grid aligned: flips and
90-degree rotations are applied to both (they share a field of view, see
``data.prepare_image``); photometric changes touch the image only; mixup blends pairs of
samples, image, SAM grid and labels with one weight; ``tta_views`` lists the symmetries a
model was trained on, for test-time augmentation."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from stages.classify.data import IMAGE_MEAN, IMAGE_STD

AUGMENTS = ("none", "flip", "rot", "photometric")


def parse_augment(spec: str) -> tuple[str, ...]:
    """``"flip,photometric"`` (or ``"flip+photometric"``, the spelling a ``pipeline compare``
    model variant can hold, whose list is comma-separated) -> ("flip", "photometric");
    refuses unknown names."""
    parts = tuple(p.strip() for p in spec.replace("+", ",").split(",") if p.strip()) or ("none",)
    bad = [p for p in parts if p not in AUGMENTS]
    if bad:
        raise ValueError(f"unknown --augment {', '.join(bad)}; use a comma list of {', '.join(AUGMENTS)}")
    return tuple(p for p in parts if p != "none")


def augment(image: torch.Tensor | None, sam: torch.Tensor | None, modes: Sequence[str],
            gen: torch.Generator) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Random per-sample augmentation of a batch, (B,3,S,S) and (B,256,64,64).

    ``flip``: horizontal and vertical flips; ``rot``: flips and 90-degree rotations (the 8
    symmetries of the square); both applied identically to the image and the SAM grid.
    ``photometric``: contrast/brightness jitter of the image only. Parameters come from
    ``gen`` (CPU), so a seeded generator makes the epoch reproducible."""
    ref = image if image is not None else sam
    if ref is None or not modes:
        return image, sam
    b = ref.shape[0]
    if "flip" in modes or "rot" in modes:
        hf = torch.rand(b, generator=gen) < 0.5
        vf = torch.rand(b, generator=gen) < 0.5
        k = torch.randint(0, 4, (b,), generator=gen) if "rot" in modes else torch.zeros(b, dtype=torch.long)

        def geo(x: torch.Tensor, i: int) -> torch.Tensor:
            return transform(x, (bool(hf[i]), bool(vf[i]), int(k[i])))

        if image is not None:
            image = torch.stack([geo(image[i], i) for i in range(b)])
        if sam is not None:
            sam = torch.stack([geo(sam[i], i) for i in range(b)])
    if "photometric" in modes and image is not None:
        c = (0.8 + 0.4 * torch.rand(b, 1, 1, 1, generator=gen)).to(image)
        d = (0.2 * torch.rand(b, 1, 1, 1, generator=gen) - 0.1).to(image)
        mean, std = IMAGE_MEAN.to(image), IMAGE_STD.to(image)
        raw = image * std + mean
        m = raw.mean(dim=(1, 2, 3), keepdim=True)
        image = (((raw - m) * c + m + d).clamp(0, 1) - mean) / std
    return image, sam


View = tuple[bool, bool, int]  # (horizontal flip, vertical flip, quarter turns), applied in that order


def transform(x: torch.Tensor | None, view: View) -> torch.Tensor | None:
    """One symmetry of the square on the last two axes of ``x`` (None stays None)."""
    if x is None:
        return None
    hf, vf, k = view
    if hf:
        x = x.flip(-1)
    if vf:
        x = x.flip(-2)
    return torch.rot90(x, k, dims=(-2, -1)) if k else x


def tta_views(modes: Sequence[str]) -> tuple[View, ...]:
    """The symmetries test-time augmentation averages over: those the model was trained on
    (``--augment``): the 4 flips (identity, horizontal, vertical, both) for ``flip``, the 8
    symmetries of the square for ``rot``. A model trained on neither never saw a flipped
    input, so averaging over flips would score it on views it never learnt: refused."""
    if "rot" in modes:
        return tuple((h, False, k) for h in (False, True) for k in range(4))
    if "flip" in modes:
        return tuple((h, v, 0) for h in (False, True) for v in (False, True))
    raise ValueError("--tta: this model was trained without flips or rotations (--augment); test-time "
                     "augmentation averages over the symmetries a model was trained on, so leave --tta off")


def mixup(image: torch.Tensor | None, sam: torch.Tensor | None, prior: torch.Tensor | None, alpha: float,
          gen: torch.Generator) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None,
                                         torch.Tensor, float]:
    """Mixup (Zhang et al. 2018) of a batch: ``lam`` ~ Beta(alpha, alpha) and a random pairing
    ``perm``; the image, the SAM grid and the stacked prior logits (when given) all become
    ``lam * x + (1 - lam) * x[perm]``, and the loss ``lam * CE(y) + (1 - lam) * CE(y[perm])``
    (``mixed_loss``). The SAM grid is mixed as features (the encoder is never run again), as
    manifold mixup mixes hidden features. Draws come from ``gen``, so an epoch is reproducible.
    Returns (image, sam, prior, perm, lam)."""
    ref = image if image is not None else sam
    b = ref.shape[0]
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=gen))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    perm = torch.randperm(b, generator=gen).to(ref.device)

    def mix(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else lam * x + (1 - lam) * x[perm]

    return mix(image), mix(sam), mix(prior), perm, lam


def mixed_loss(criterion, logits: torch.Tensor, y: torch.Tensor, mix: tuple[torch.Tensor, float] | None):
    """``criterion(logits, y)``, or with ``mix = (perm, lam)`` its mixup form."""
    if mix is None:
        return criterion(logits, y)
    perm, lam = mix
    return lam * criterion(logits, y) + (1 - lam) * criterion(logits, y[perm])
