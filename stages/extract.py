"""Stage one: run a frozen SAM-family encoder once per image and fill a feature store.

Work is cut along the store's shards: a shard's samples are decoded and preprocessed in
DataLoader workers, encoded in batches that never cross a shard boundary (so an
interrupted and resumed run computes every shard from exactly the same batches as an
uninterrupted one, and stores the same bytes), and handed to writer threads that write
the shard and then mark its samples done while the encoder goes on with the next one
(that machinery, and what it does to keep a GPU fed, is in ``stages/hostpath.py``).
"""
from __future__ import annotations

import contextlib
import errno
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from cache import Listing, StoreError, StoreWriter, make_signature
from cache.schema import DEFAULT_COMPRESSION, DEFAULT_SHARD

from .datasets import DatasetError, open_dataset
from .datasets.base import Dataset
from .encoders import build_encoder
from .encoders.base import Encoder
# the decode -> encode -> write machinery; re-exported here for stages.distributed and tests
from .hostpath import (  # noqa: F401
    _collate,
    _Prepared,
    _ShardWriter,
    default_batch_size,
    default_workers,
    encode_batches,
    forward_resilient,
    make_loader,
    prepared,
    run_shards,
    stream_plan,
)
from .runtime import amp_dtype_for, package_versions, resolve_device, resolve_precision, tune_allocator


@dataclass
class ExtractConfig:
    """Everything ``pipeline extract`` takes (see its --help for each field)."""

    dataset: str
    data_root: str
    out: str
    encoder: str = "litemedsam"
    checkpoint: str | None = None
    device: str = "auto"
    batch_size: int = 0  # 0: 1 on CPU (parallel streams instead), 32 on GPU
    workers: int = -1  # -1: automatic
    dtype: str = "float16"
    precision: str = "auto"
    shard_size: int = DEFAULT_SHARD
    compression: str = DEFAULT_COMPRESSION  # of the embeddings: none (fastest reads) or lz4 (~11% smaller)
    overwrite: bool = False
    skip_bad: bool = False
    dataset_options: dict[str, Any] = field(default_factory=dict)
    storage_options: dict[str, Any] | None = None
    # scale: threads, dask (stages/distributed.py), CPU streams, kernels
    threads: int = 0  # torch intra-op threads per process; 0: torch's default (all cores; dask: cores/worker)
    scheduler: str | None = None  # dask scheduler address: run on that cluster
    dask_workers: int = 0  # > 0: run on a local dask cluster of this many worker processes
    streams: int = 0  # batches encoded at once by as many threads (0: one per core on CPU, 1 on GPU)
    fast: bool = True  # the encoders' fused kernels (SDPA, folded BatchNorm): equal within float16 rounding
    compile: bool = False  # torch.compile the encoder (worth it on GPU for long runs; minutes to compile)
    # reliability
    refresh_changed: bool = False  # re-encode the shards of samples whose image changed, instead of refusing


@dataclass
class ExtractResult:
    out: str
    total: int
    encoded: int
    failed: int
    seconds: float
    encoder: str
    device: str
    report: str | None = None  # CSV listing the failed samples, beside the store
    compile_seconds: float = 0.0  # --compile: time spent compiling (part of ``seconds``)

    @property
    def images_per_s(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else float("nan")

    def summary(self) -> str:
        if self.encoded == 0:
            return f"{self.out}: complete, {self.total} samples already extracted, nothing to do"
        fail = f", {self.failed} failed" if self.failed else ""
        if self.failed and self.report:
            fail += f" (listed in {self.report})"
        compiled = f", {self.compile_seconds:.0f} s of it compiling" if self.compile_seconds else ""
        return (f"{self.out}: {self.encoded} of {self.total} samples encoded{fail} with {self.encoder} "
                f"on {self.device} in {self.seconds:.1f} s{compiled} ({self.images_per_s:.2f} img/s)")


def shard_batches(shards: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Batches of sample indices that never cross a shard boundary."""
    return [list(range(s, min(s + batch_size, b))) for a, b in shards for s in range(a, b, batch_size)]


def listing_of(dataset: Dataset) -> Listing:
    s = dataset.samples
    return Listing(ids=[x.id for x in s], labels=[x.label for x in s], splits=[x.split for x in s],
                   groups=[x.group for x in s], slices=[x.index_in_group for x in s])


def store_signature(encoder: Encoder, dataset: Dataset, precision: str, dtype: str) -> dict[str, Any]:
    e = encoder.signature()
    return make_signature(encoder=e["encoder"], checkpoint_sha256=e["checkpoint_sha256"], img_size=e["img_size"],
                          preprocessing=e["preprocessing"], precision=precision, dataset_kind=dataset.kind,
                          dataset_signature=dataset.signature(), dtype=dtype)


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


def make_encoder(cfg: ExtractConfig, device: torch.device | str, batch_size: int = 1) -> Encoder:
    """The encoder ``cfg`` asks for (the single-process and the dask paths build it alike);
    with ``cfg.compile`` its net is compiled for batches of ``batch_size``."""
    encoder = build_encoder(cfg.encoder, cfg.checkpoint, device=device, fast=cfg.fast)
    if cfg.compile:
        from .encoders.fast import CompiledNet

        encoder.net = CompiledNet(encoder.net, batch_size, torch.device(device).type)
    return encoder


def warm_up(encoder: Encoder, batch_size: int, device: torch.device, amp: torch.dtype | None) -> float:
    """Compile a ``--compile`` encoder now, on this thread (not racing in the first
    streams); returns the seconds it took (0 when there is nothing to compile)."""
    from .encoders.fast import CompiledNet

    net = encoder.net
    if not isinstance(net, CompiledNet) or net.state != "new":
        return 0.0
    encoder.forward(torch.zeros(batch_size, 3, encoder.img_size, encoder.img_size, device=device), amp_dtype=amp)
    return net.compile_seconds


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


def extract(cfg: ExtractConfig, progress: bool = True) -> ExtractResult:
    """Run stage one as configured; returns counts and timing. Raises DatasetError,
    EncoderError or StoreError (one line each) on bad input, and StoreError on a full disk."""
    with loud_disk_full(cfg.out):
        if cfg.scheduler or cfg.dask_workers > 0:
            from .distributed import extract_distributed

            return extract_distributed(cfg, progress=progress)
        tune_allocator()
        with torch_threads(cfg.threads):
            return _extract(cfg, progress)


# --- disk full, failure report ---------------------------------------------------

DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def disk_full_error(e: OSError, url: str, what: str) -> StoreError | None:
    """A one-line StoreError for an out-of-space OSError (None for other errors)."""
    if getattr(e, "errno", None) not in DISK_FULL:
        return None
    err = StoreError(f"{url}: disk full while {what} ({e.strerror or e}); finished shards are kept, "
                     "free space and re-run the same command to resume")
    err.__cause__ = e
    return err


@contextlib.contextmanager
def loud_disk_full(url: str) -> Iterator[None]:
    """Turn an out-of-space OSError anywhere in a run into ``disk_full_error``."""
    try:
        yield
    except OSError as e:
        err = disk_full_error(e, url, "writing the store")
        if err is None:
            raise
        raise err from e


def failures_report_path(url: str | os.PathLike) -> str:
    """``<store>.failures.csv`` beside the store (outside it: DVC hashes the store)."""
    from cache import io as store_io

    if store_io.is_remote(url):
        return str(url).rstrip("/") + ".failures.csv"
    return str(store_io.local_path(url)).rstrip("/") + ".failures.csv"


FAILURES_HEADER = "row,id,error"


def _is_failures_report(fs, fpath: str) -> bool:
    try:
        with fs.open(fpath, "rb") as fh:
            return fh.readline().decode("utf-8", "replace").strip() == FAILURES_HEADER
    except (OSError, IsADirectoryError):
        return False


def write_failures_report(url: str | os.PathLike, store_rows: Sequence[int], failures: Sequence[dict[str, str]],
                          storage_options: dict[str, Any] | None = None) -> str | None:
    """Write the failed samples (row, id, error) as CSV beside the store and return its
    path; with no failures remove a stale report and return None."""
    import csv
    import io as _io

    import fsspec

    path = failures_report_path(url)
    fs, fpath = fsspec.core.url_to_fs(path, **(storage_options or {}))
    if fs.exists(fpath) and not _is_failures_report(fs, fpath):
        # a file of the user's that happens to have our name: never replaced or deleted
        print(f"note: {path}: exists and is not a failures report of this project; left as it is", file=sys.stderr)
        return None
    if not failures:
        if fs.exists(fpath):
            fs.rm_file(fpath)  # our own stale report (header checked above)
        return None
    text = _io.StringIO()
    w = csv.writer(text)
    w.writerow(["row", "id", "error"])
    for row, f in zip(store_rows, failures):
        w.writerow([int(row), f["id"], f["error"]])
    with fs.open(fpath, "w") as fh:
        fh.write(text.getvalue())
    return path


def _extract(cfg: ExtractConfig, progress: bool) -> ExtractResult:
    t0 = time.perf_counter()
    dataset = open_dataset(cfg.dataset, cfg.data_root, **cfg.dataset_options)
    device = resolve_device(cfg.device)
    batch_size = cfg.batch_size or default_batch_size(device)
    encoder = make_encoder(cfg, device, batch_size)
    precision = resolve_precision(cfg.precision, device)
    amp = amp_dtype_for(precision)
    workers = default_workers(device) if cfg.workers < 0 else cfg.workers
    streams, stream_threads = stream_plan(cfg.streams or (1 if cfg.compile else 0), device)

    writer = StoreWriter.open(
        cfg.out,
        signature=store_signature(encoder, dataset, precision, cfg.dtype),
        listing=listing_of(dataset),
        classes=dataset.classes,
        mask_classes=dataset.mask_classes,
        shard_size=cfg.shard_size,
        compression=cfg.compression,
        overwrite=cfg.overwrite,
        provenance={
            "dataset_root": str(Path(cfg.data_root).resolve()),
            "checkpoint_path": encoder.checkpoint_path,
            "device": str(device),
            "fast_kernels": cfg.fast,
            "versions": package_versions(),
        },
        storage_options=cfg.storage_options,
    )
    with writer:
        verify_hashes(dataset, writer, refresh=cfg.refresh_changed)
        shards = writer.pending()
        todo = sum(b - a for a, b in shards)
        errors = {f["id"]: f["error"] for f in writer.group.attrs.get("failures", [])}
        compile_s = 0.0
        if todo:
            loader = make_loader(prepared(encoder, dataset, cfg.skip_bad, device), shard_batches(shards, batch_size),
                                 workers, device)
            with torch_threads(stream_threads):  # CPU streams: one single-threaded stream per core
                compile_s = warm_up(encoder, batch_size, device, amp)
                errors.update(run_shards(encoder, loader, writer, shards, device, amp, todo, progress, dataset,
                                         streams))
        failed_rows = np.flatnonzero(writer.group["failed"][:])
        failures = [{"id": dataset.samples[i].id, "error": errors.get(dataset.samples[i].id, "failed in an earlier run")}
                    for i in failed_rows]
        writer.commit({"failures": failures})
        report = write_failures_report(cfg.out, failed_rows, failures, cfg.storage_options)
    seconds = time.perf_counter() - t0
    return ExtractResult(out=cfg.out, total=len(dataset), encoded=todo, failed=len(failures), seconds=seconds,
                         encoder=cfg.encoder, device=str(device), report=report, compile_seconds=compile_s)
