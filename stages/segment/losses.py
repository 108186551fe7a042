"""Training loss: cross-entropy + soft Dice over the foreground classes (background
excluded from the Dice term), on the 256x256 canvas with padding pixels ignored."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from stages.segment.data import IGNORE


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE,
                   eps: float = 1e-5) -> torch.Tensor:
    """logits (B,C,H,W), target (B,H,W) int64 -> 1 - mean over classes 1..C-1 of the soft
    Dice, sums taken over the whole batch (a class absent from the batch then pushes its
    probabilities towards 0 instead of giving 0/0)."""
    c = logits.shape[1]
    valid = (target != ignore_index).unsqueeze(1).to(logits.dtype)  # (B,1,H,W)
    probs = logits.softmax(dim=1) * valid
    onehot = F.one_hot(torch.where(target == ignore_index, 0, target), c).permute(0, 3, 1, 2).to(logits.dtype)
    onehot = onehot * valid
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)[1:]
    denom = probs.sum(dims)[1:] + onehot.sum(dims)[1:]
    return 1 - ((2 * inter + eps) / (denom + eps)).mean()


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """CE + soft Dice -> (loss, {"ce": ..., "dice": ...})."""
    ce = F.cross_entropy(logits, target, ignore_index=IGNORE)
    dice = soft_dice_loss(logits, target)
    return ce + dice, {"ce": float(ce.detach()), "dice": float(dice.detach())}
