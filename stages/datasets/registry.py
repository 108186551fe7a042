"""The dataset-reader registry: kind -> reader ``(root, **options) -> Dataset``, and
``open_dataset``, which checks the options against the reader's signature.

Imports no reader: each reader module registers itself with ``@register_dataset("kind")``
and ``stages/datasets/__init__.py`` imports them, so the registry is complete whenever
``stages.datasets`` is imported.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable

from stages.datasets.base import Dataset, DatasetError
from stages.registry import Registry

#: registration order is the order --help and error messages list them
DATASETS: Registry[Callable[..., Dataset]] = Registry("dataset kind", error=DatasetError,
                                                      choices_label="known kinds")
register_dataset = DATASETS.register


def list_datasets(pattern: str = "*") -> list[str]:
    """The registered dataset kinds as ``--dataset`` takes them."""
    return DATASETS.names(pattern)


def open_dataset(kind: str, root: str | Path, **options: object) -> Dataset:
    """Open dataset ``root`` with the reader registered as ``kind``; an unknown kind or an
    option the reader does not take raises DatasetError naming the choices."""
    builder = DATASETS.get(kind)
    params = list(inspect.signature(builder).parameters)[1:]
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise DatasetError(f"unknown option(s) {unknown} for dataset kind {kind!r}; it accepts {params}")
    mp = options.get("max_pixels")
    if mp is not None and (not isinstance(mp, int) or isinstance(mp, bool) or mp < 64):
        raise DatasetError(f"max_pixels must be an integer >= 64, got {mp!r}")
    return builder(Path(root), **options)
