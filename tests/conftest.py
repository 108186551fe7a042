"""Session fixtures: a tiny phantom dataset and a real store extracted from it."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny_sam.py

os.environ.setdefault("MPLBACKEND", "Agg")


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``cuda`` run only where torch sees a GPU; elsewhere they are skipped
    with a reason that says so (``-ra`` lists it), never failed or silently dropped."""
    cuda_items = [item for item in items if item.get_closest_marker("cuda")]
    if not cuda_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is false on this machine "
                                   "(run benchmarks/gpu_check.sh on one)")
    for item in cuda_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """12 phantom images of 64x64 (4 per class), with masks and splits."""
    from stages.datasets import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("data") / "synthetic", n_per_class=4, size=64, seed=0)


@pytest.fixture(scope="session")
def synthetic_store(synthetic_root, tmp_path_factory) -> Path:
    """A complete litemedsam store of ``synthetic_root`` (real encoder, real weights)."""
    from stages.extract import ExtractConfig, extract

    out = tmp_path_factory.mktemp("stores") / "synthetic.zarr"
    extract(ExtractConfig(dataset="synthetic", data_root=str(synthetic_root), out=str(out), shard_size=4,
                          batch_size=4, workers=0), progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_sam_checkpoint(tmp_path_factory) -> Path:
    from tiny_sam import make_tiny_sam_checkpoint

    return make_tiny_sam_checkpoint(tmp_path_factory.mktemp("ckpt") / "sam_tiny.pth")
