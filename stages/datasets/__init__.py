"""Dataset readers: ``open_dataset(kind, root, **options)`` over the ``DATASETS`` registry
(``stages.datasets.registry``; each reader registers itself there).

Every reader takes ``root`` plus keyword options (all accept ``max_pixels``, the
per-image decompression-bomb limit) and returns a ``Dataset`` with deterministic order,
unique stable ids, and DatasetError (one line naming the path and the fix) on bad input.
"""
from __future__ import annotations

from stages.datasets.base import BadImageError, Dataset, DatasetError, Sample

# importing the readers registers them; this order is the registry's (and --help's)
from stages.datasets import imagefolder, manifest, medmnist, acdc, synthetic  # noqa: F401,I001
from stages.datasets.registry import DATASETS, list_datasets, open_dataset, register_dataset
from stages.datasets.synthetic import make_synthetic

__all__ = ["DATASETS", "BadImageError", "Dataset", "DatasetError", "Sample", "list_datasets", "make_synthetic",
           "open_dataset", "register_dataset"]
