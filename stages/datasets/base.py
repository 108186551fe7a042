"""The one dataset interface shared by stage one (extraction) and stage two (training).

A dataset is an ordered list of samples. Sample ``i`` of a dataset is row ``i`` of the
feature store made from it, so the order must be deterministic (readers sort what they
list). Every sample has a stable string id that does not depend on the order.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

SPLITS = ("train", "val", "test", "")  # "" = no split given; stage two assigns one


class DatasetError(ValueError):
    """Bad dataset input; the message names the file and the fix (exit code 2)."""


class BadImageError(DatasetError):
    """One image (or mask) cannot be decoded or is unusable: truncated, not an image, too
    small, over the pixel limit, NaN/inf pixels. The message names the file and the fix."""


@dataclass(frozen=True)
class Sample:
    """One row of a dataset.

    id: stable identifier, unique in the dataset (e.g. ``train/normal/img_001.png``).
    label: class index into ``Dataset.classes``, or -1 when unlabelled.
    split: one of ``SPLITS``.
    group: the patient/volume id for volumetric data ("" otherwise); slices of one
        volume share it and stage two never splits a group across train/val/test.
    index_in_group: slice position inside ``group`` (-1 for 2D data).
    """

    id: str
    label: int = -1
    split: str = ""
    group: str = ""
    index_in_group: int = -1


@dataclass
class Dataset:
    """Base class of the readers. Subclasses fill ``samples`` and implement the loaders.

    ``classes``: image-level class names (classification), may be empty.
    ``mask_classes``: pixel class names, index 0 = background; empty when there are no masks.
    ``spacing``: optional per-group voxel spacing (z, y, x) in mm, for HD95.
    """

    root: Path
    kind: str = ""
    samples: list[Sample] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    mask_classes: list[str] = field(default_factory=list)
    spacing: dict[str, tuple[float, float, float]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, i: int) -> np.ndarray:
        """Raw pixels of sample ``i``: (H,W) or (H,W,C) in the file's own dtype (uint8,
        uint16, float32, ...). C is 1, 3 or 4. No resizing or scaling happens here."""
        raise NotImplementedError

    def load_mask(self, i: int) -> np.ndarray | None:
        """(H,W) integer pixel labels of sample ``i`` (values index ``mask_classes``), or
        None when the dataset has no masks."""
        return None

    def raw_bytes(self, i: int) -> bytes:
        """The bytes the content hash is taken over: the file's bytes for file-based
        datasets, the array's bytes (plus shape and dtype) for array datasets."""
        image = np.ascontiguousarray(self.load_image(i))
        return f"{image.dtype.str}{image.shape}".encode() + image.tobytes()

    def content_hash(self, i: int) -> str:
        """sha256 (hex, first 32 chars) of ``raw_bytes(i)``: detects a changed image."""
        return hashlib.sha256(self.raw_bytes(i)).hexdigest()[:32]

    @property
    def ids(self) -> list[str]:
        return [s.id for s in self.samples]

    def signature(self) -> str:
        """sha256 over the listing (kind, ids, labels, splits, groups, class names).

        Cheap (no pixel is read): content changes are caught per sample by
        ``content_hash`` instead, which the store keeps for every sample."""
        listing = {
            "kind": self.kind,
            "classes": self.classes,
            "mask_classes": self.mask_classes,
            "samples": [[s.id, s.label, s.split, s.group, s.index_in_group] for s in self.samples],
        }
        return hashlib.sha256(json.dumps(listing, separators=(",", ":")).encode()).hexdigest()

    def check_unique_ids(self) -> None:
        seen: set[str] = set()
        for s in self.samples:
            if s.id in seen:
                raise DatasetError(f"{self.root}: duplicate sample id {s.id!r}; every sample needs a unique id")
            seen.add(s.id)
        if not self.samples:
            raise DatasetError(f"{self.root}: the dataset is empty; check --data-root and --dataset")

    def subset_indices(self, split: str) -> list[int]:
        return [i for i, s in enumerate(self.samples) if s.split == split]


def split_counts(samples: Sequence[Sample]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in samples:
        counts[s.split] = counts.get(s.split, 0) + 1
    return counts
