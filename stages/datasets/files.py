"""A dataset of image files (and optional mask files): shared by imagefolder, csv, synthetic."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stages.datasets.base import BadImageError, Dataset
from stages.datasets.imageio import MAX_PIXELS, image_shape, read_image, read_mask

SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


@dataclass
class FileDataset(Dataset):
    """Samples backed by files. ``paths[i]`` is the image of sample ``i``; ``masks[i]`` its
    mask files (several are merged by union; only for binary ``mask_classes``), or ``masks``
    is empty when the dataset has no masks.

    Masks: with two ``mask_classes`` (background + one foreground) any non-zero pixel is
    foreground (so 0/255 masks work); with more, mask values are class indices and a value
    >= len(mask_classes) is a BadImageError."""

    paths: list[Path] = field(default_factory=list)
    masks: list[tuple[Path, ...]] = field(default_factory=list)
    max_pixels: int = MAX_PIXELS

    def load_image(self, i: int) -> np.ndarray:
        return read_image(self.paths[i], self.max_pixels)

    def load_mask(self, i: int) -> np.ndarray | None:
        """(H,W) uint8 labels (int32 with more than 256 mask classes), or None."""
        if not self.masks:
            return None
        shape = image_shape(self.paths[i], self.max_pixels)
        binary = len(self.mask_classes) == 2
        merged: np.ndarray | None = None
        for p in self.masks[i]:
            m = read_mask(p, self.max_pixels)
            if m.shape != shape:
                raise BadImageError(
                    f"{p}: mask is {m.shape[1]}x{m.shape[0]} but its image {self.paths[i].name} is "
                    f"{shape[1]}x{shape[0]}; masks must have the image's size")
            if binary:
                m = m > 0
                merged = m if merged is None else merged | m
            else:
                if m.size and int(m.max()) >= len(self.mask_classes):
                    raise BadImageError(
                        f"{p}: mask value {int(m.max())} but only {len(self.mask_classes)} mask classes "
                        f"{self.mask_classes}; pass the full mask_classes list or fix the mask")
                merged = m
        assert merged is not None  # every listed sample has >= 1 mask file
        return merged.astype(np.uint8 if len(self.mask_classes) <= 256 else np.int32)

    def raw_bytes(self, i: int) -> bytes:
        return self.paths[i].read_bytes()


def natural_classes(names: set[str]) -> list[str]:
    """Sorted class names; numerically when all are integers ("2" before "10")."""
    if names and all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)
