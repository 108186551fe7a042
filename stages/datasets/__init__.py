"""Dataset readers: ``open_dataset(kind, root, **options)`` over the ``DATASETS`` registry.

Every reader takes ``root`` plus keyword options (all accept ``max_pixels``, the
per-image decompression-bomb limit) and returns a ``Dataset`` with deterministic order,
unique stable ids, and DatasetError (one line naming the path and the fix) on bad input.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable

from .acdc import open_acdc
from .base import BadImageError, Dataset, DatasetError, Sample
from .imagefolder import open_imagefolder
from .manifest import open_csv
from .medmnist import open_medmnist
from .synthetic import make_synthetic, open_synthetic

DATASETS: dict[str, Callable[..., Dataset]] = {
    "imagefolder": open_imagefolder,
    "csv": open_csv,
    "medmnist": open_medmnist,
    "acdc-h5": open_acdc,
    "synthetic": open_synthetic,
}


def open_dataset(kind: str, root: str | Path, **options: object) -> Dataset:
    """Open dataset ``root`` with the reader registered as ``kind``."""
    if kind not in DATASETS:
        raise DatasetError(f"unknown dataset kind {kind!r}; known kinds: {', '.join(DATASETS)}")
    builder = DATASETS[kind]
    params = list(inspect.signature(builder).parameters)[1:]
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise DatasetError(f"unknown option(s) {unknown} for dataset kind {kind!r}; it accepts {params}")
    mp = options.get("max_pixels")
    if mp is not None and (not isinstance(mp, int) or isinstance(mp, bool) or mp < 64):
        raise DatasetError(f"max_pixels must be an integer >= 64, got {mp!r}")
    return builder(Path(root), **options)


__all__ = ["DATASETS", "BadImageError", "Dataset", "DatasetError", "Sample", "make_synthetic", "open_dataset"]
