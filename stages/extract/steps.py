"""The steps every stage-one run takes, whether on one machine (``local.py``) or on a dask
cluster (``distributed.py``): build the encoder (``make_encoder``), open the store with the
run's signature and provenance (``open_store``), then ``fill_store``: check the images
already stored are unchanged (``verify_hashes``), encode the pending shards in batches that
never cross a shard (``shard_batches``: an interrupted and resumed run computes every shard
from the same batches as an uninterrupted one, and stores the same bytes), record the
failed samples, commit and write the failures report. Only how the pending shards get
encoded differs between the two runs; it is the ``encode`` callback of ``fill_store``.
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from cache import StoreError, StoreWriter
from stages.common.runtime import package_versions
from stages.datasets import DatasetError
from stages.datasets.base import Dataset
from stages.encoders import build_encoder
from stages.encoders.base import Encoder
from stages.extract.config import ExtractConfig, listing_of
from stages.extract.failures import write_failures_report

#: encode(pending shards, samples in them) -> {sample id: error} of the samples skipped as bad
EncodeShards = Callable[[list[tuple[int, int]], int], dict[str, str]]


@dataclass(frozen=True)
class Filled:
    """What ``fill_store`` did: samples encoded now, samples failed (now or earlier), the
    failures report's path (None without failures)."""

    encoded: int
    failed: int
    report: str | None


def shard_batches(shards: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Batches of sample indices that never cross a shard boundary."""
    return [list(range(s, min(s + batch_size, b))) for a, b in shards for s in range(a, b, batch_size)]


def make_encoder(cfg: ExtractConfig, device: torch.device | str, batch_size: int = 1) -> Encoder:
    """The encoder ``cfg`` asks for (the single-process and the dask paths build it alike);
    with ``cfg.compile`` its net is compiled for batches of ``batch_size``."""
    encoder = build_encoder(cfg.encoder, cfg.checkpoint, device=device, fast=cfg.fast, resize=cfg.resize)
    if cfg.compile:
        from stages.encoders.fast import CompiledNet

        encoder.net = CompiledNet(encoder.net, batch_size, torch.device(device).type)
    return encoder


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` torch intra-op threads (0: leave as is), restored afterwards. On CPU
    the thread count is part of what makes a store reproducible: oneDNN splits some
    convolution reductions per thread, so float32 results can differ in the last bit."""
    old = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def changed_samples(dataset: Dataset, writer: StoreWriter, failed_too: bool = False) -> list[int]:
    """Done samples whose image bytes no longer match the content hash stored at
    extraction (with ``failed_too``, also failed samples whose file changed since)."""
    done = np.flatnonzero(writer.done)
    if len(done) == 0:
        return []
    stored = writer.group["hash"][:]
    failed = writer.group["failed"][:]
    out = []
    for i in done:
        if failed[i] and not failed_too:
            continue
        try:
            now = dataset.content_hash(int(i))
        except (OSError, DatasetError):
            if failed[i]:
                continue  # still unreadable
            raise
        if now != stored[i]:
            out.append(int(i))
    return out


def verify_hashes(dataset: Dataset, writer: StoreWriter, refresh: bool = False) -> list[int]:
    """On resume or re-run: a sample already in the store whose image changed since is
    refused, or with ``refresh`` the shards holding such samples (and failed samples whose
    file changed) are marked not done, and the store not complete, so that they are
    re-encoded whole (same batches as a fresh run) and the other shards stay untouched.
    Returns the changed sample indices."""
    changed = changed_samples(dataset, writer, failed_too=refresh)
    if changed and not refresh:
        i = changed[0]
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        raise StoreError(f"{writer.url}: image {dataset.samples[i].id!r}{more} changed since it was extracted; "
                         "re-run with --refresh-changed to re-encode just those, or --overwrite to start over")
    if changed:
        size = writer.shard_size
        starts = sorted({i - i % size for i in changed})
        # not complete first: a refresh killed half-way must not leave a complete-looking store
        writer.group.attrs.update({"complete": False})
        for a in starts:
            b = min(a + size, writer.n)
            writer.group["done"][a:b] = False
            writer.done[a:b] = False
        print(f"{writer.url}: {len(changed)} changed image(s); re-encoding {len(starts)} shard(s)", file=sys.stderr)
    return changed


def open_store(cfg: ExtractConfig, dataset: Dataset, signature: dict[str, Any], checkpoint_path: str,
               device: str) -> StoreWriter:
    """``cfg.out`` opened for writing (created, resumed, or refused when made differently)
    with the dataset's listing and the run's provenance."""
    return StoreWriter.open(
        cfg.out,
        signature=signature,
        listing=listing_of(dataset),
        classes=dataset.classes,
        mask_classes=dataset.mask_classes,
        shard_size=cfg.shard_size,
        compression=cfg.compression,
        overwrite=cfg.overwrite,
        provenance={
            "dataset_root": str(Path(cfg.data_root).resolve()),
            "checkpoint_path": checkpoint_path,
            "device": device,
            "fast_kernels": cfg.fast,
            "versions": package_versions(),
        },
        storage_options=cfg.storage_options,
    )


def fill_store(cfg: ExtractConfig, dataset: Dataset, writer: StoreWriter, encode: EncodeShards) -> Filled:
    """Check, encode, record, commit (see the module docstring); closes ``writer``. A
    sample that failed in an earlier run and is not retried keeps that run's error."""
    with writer:
        verify_hashes(dataset, writer, refresh=cfg.refresh_changed)
        shards = writer.pending()
        todo = sum(b - a for a, b in shards)
        errors = {f["id"]: f["error"] for f in writer.group.attrs.get("failures", [])}
        if todo:
            errors.update(encode(shards, todo))
        failed_rows = np.flatnonzero(writer.group["failed"][:])
        failures = [{"id": dataset.samples[i].id, "error": errors.get(dataset.samples[i].id, "failed in an earlier run")}
                    for i in failed_rows]
        writer.commit({"failures": failures})
        report = write_failures_report(cfg.out, failed_rows, failures, cfg.storage_options)
    return Filled(encoded=todo, failed=len(failures), report=report)
