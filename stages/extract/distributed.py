"""Stage one on a dask.distributed cluster (``pipeline extract --scheduler ADDR`` or
``--dask-workers N``).

The coordinator (the ``pipeline extract`` process) opens, checks and commits the store
with the steps the local run takes (``steps.py``: it holds the store's lock and is the
only writer of the per-sample arrays); only encoding differs: it cuts the pending
shards into partitions of whole shards and submits one task per partition. A task
builds the dataset and the encoder once per worker process (cached), encodes its shards
with exactly the batches of the single-process path (``shard_batches``: batches never
cross a shard), writes each finished shard straight into the store (``write_shard``: a
whole-shard write, atomic per shard file) and returns the shards' per-sample results.
The coordinator marks those samples done as partitions finish and commits at the end,
so the store is the one a single process would make, and an interrupted run resumes
from the partitions that finished.

Requirements: every worker reaches the dataset, the checkpoint and the store at the
same paths (a shared filesystem or an object store); ``memory://`` stores cannot be
shared between processes. GPU workers must declare a ``GPU`` resource
(``dask worker ADDR --nthreads 1 --resources GPU=1``), one per GPU.

Reproducibility: same encoder, checkpoint, precision, kernels (``--fast``) and batches
give the same bytes on the same hardware. On CPU the torch thread count per stream
matters too (oneDNN splits some convolution reductions per thread: LiteMedSAM's TinyViT
differs in the last float32 bit between 1 and 2 threads, SAM's ViT does not). By
default both paths run CPU streams of one torch thread each (``hostpath.stream_plan``;
a worker gets its host's cores divided by the dask threads there), so their stores
match; an explicit ``--threads``/``--streams`` that gives a stream several threads
breaks that equality (not the store's validity).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from cache import StoreError, StoreWriter, write_shard
from cache import io as store_io
from cache.schema import EMBED_SHAPE, SIGNATURE_KEYS
from stages.common.runtime import amp_dtype_for, tune_allocator
from stages.datasets import DatasetError, open_dataset
from stages.datasets.base import Dataset
from stages.encoders.base import Encoder
from stages.extract.config import ExtractConfig, ExtractResult, store_signature
from stages.extract.hostpath import (
    PreparedDataset,
    collate_prepared,
    decode_workers,
    default_batch_size,
    encode_batches,
    stream_plan,
)
from stages.extract.steps import fill_store, make_encoder, open_store, shard_batches, torch_threads

# Fields of ExtractConfig that do not change which encoder a worker builds.
_NOT_ENCODER = {"dataset", "data_root", "out", "batch_size", "workers", "dtype", "precision", "shard_size",
                "overwrite", "skip_bad", "dataset_options", "storage_options", "threads", "scheduler",
                "dask_workers", "device", "streams", "refresh_changed"}


@dataclass(frozen=True)
class ShardResult:
    """What a worker reports for one shard it wrote: rows start..start+len(heights)."""

    start: int
    heights: list[int]
    widths: list[int]
    hashes: list[str]
    failed: list[bool]
    errors: dict[str, str]  # sample id -> why it was skipped (--skip-bad)


@dataclass(frozen=True)
class Plan:
    """Everything a partition task needs besides its shards (pickled to the workers)."""

    cfg: ExtractConfig  # paths made absolute
    device: str  # "cpu" or "cuda"
    precision: str
    batch_size: int
    threads: dict[str, int]  # worker address -> torch threads (CPU)
    dataset_signature: str
    signature: dict[str, Any]  # the store's signature; a task refuses a store made differently
    created: str  # the store's creation stamp; a task refuses a store re-created since


# ---------------------------------------------------------------------------------------
# worker side

_CACHE: dict[str, Any] = {}


def _cached(key: tuple, build: Callable[[], Any]) -> Any:
    k = json.dumps(key, sort_keys=True, default=str)
    if k not in _CACHE:
        _CACHE[k] = build()
    return _CACHE[k]


def _worker_device(device: str) -> torch.device:
    """``cuda`` -> this worker's GPU: workers of a LocalCluster are named 0..N-1 and share
    the machine's GPUs round robin; a dask-cuda worker sees one GPU only."""
    if device != "cuda":
        return torch.device(device)
    if not torch.cuda.is_available():
        raise RuntimeError("this dask worker has no usable CUDA device but the run asked for cuda; "
                           "start GPU workers only on GPU machines, or pass --device cpu")
    index = 0
    with contextlib.suppress(ValueError, ImportError):
        from distributed import get_worker

        index = int(get_worker().name) % torch.cuda.device_count()
    return torch.device("cuda", index)


def _worker_address() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return ""


def encode_shards(encoder: Encoder, loader: DataLoader, shards: Sequence[tuple[int, int]], device: torch.device,
                  amp: torch.dtype | None, dataset: Dataset, streams: int = 1
                  ) -> Iterator[tuple[int, np.ndarray, ShardResult]]:
    """Assemble the loader's shard-aligned batches into whole shards:
    yields (start, embeddings (S,256,64,64) float32, results) per shard, in order."""
    bounds = dict(shards)
    buf = None
    for idx, emb, h, w, hashes, errors in encode_batches(encoder, loader, device, amp, streams):
        if buf is None:
            start = idx[0]
            buf = {"start": start, "emb": np.empty((bounds[start] - start, *EMBED_SHAPE), np.float32),
                   "h": [], "w": [], "hash": [], "failed": [], "errors": {}, "filled": 0}
        k = buf["filled"]
        buf["emb"][k:k + len(idx)] = emb
        for j, (i, err) in enumerate(zip(idx, errors)):
            if err:
                buf["emb"][k + j] = 0
                buf["errors"][dataset.samples[i].id] = err
        buf["filled"] += len(idx)
        buf["h"] += [int(x) for x in h]
        buf["w"] += [int(x) for x in w]
        buf["hash"] += list(hashes)
        buf["failed"] += [bool(e) for e in errors]
        if buf["filled"] == len(buf["emb"]):
            yield buf["start"], buf["emb"], ShardResult(buf["start"], buf["h"], buf["w"], buf["hash"],
                                                        buf["failed"], buf["errors"])
            buf = None


def encode_partition(plan: Plan, shards: list[tuple[int, int]]) -> list[ShardResult]:
    """Task body, on a worker: encode ``shards``, write them into the store, report them."""
    tune_allocator()
    cfg = plan.cfg
    device = _worker_device(plan.device)
    threads = plan.threads.get(_worker_address(), cfg.threads) if device.type == "cpu" else cfg.threads
    with torch_threads(threads):
        streams, stream_threads = stream_plan(cfg.streams or (1 if cfg.compile else 0), device)
    with torch_threads(stream_threads):
        dataset = _cached(("dataset", cfg.dataset, cfg.data_root, cfg.dataset_options),
                          lambda: open_dataset(cfg.dataset, cfg.data_root, **cfg.dataset_options))
        if dataset.signature() != plan.dataset_signature:
            raise DatasetError(f"{cfg.data_root}: this dask worker ({_worker_address()}) sees another dataset "
                               "than the coordinator; give all workers the same files at the same path")
        enc_key = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_ENCODER}
        encoder = _cached(("encoder", enc_key, str(device)), lambda: make_encoder(cfg, device, plan.batch_size))
        group = store_io.open_group(cfg.out, "r+", cfg.storage_options)
        attrs = dict(group.attrs)
        if attrs.get("created") != plan.created or any(attrs.get(k) != plan.signature.get(k) for k in SIGNATURE_KEYS):
            raise StoreError(f"{cfg.out}: the store was replaced while this task waited; not writing into it")
        workers = decode_workers(device) if cfg.workers < 0 else cfg.workers
        if workers and multiprocessing.current_process().daemon:
            workers = 0  # daemonic dask workers cannot have children: decode in this process
        loader = DataLoader(
            PreparedDataset(dataset, encoder.prepare, encoder.img_size, cfg.skip_bad),
            batch_sampler=shard_batches(shards, plan.batch_size),
            num_workers=workers,
            collate_fn=collate_prepared,
            pin_memory=device.type == "cuda",
            prefetch_factor=4 if workers else None,
        )
        out = []
        for start, emb, result in encode_shards(encoder, loader, shards, device, amp_dtype_for(plan.precision),
                                                dataset, streams):
            write_shard(group, start, emb)
            out.append(result)
        return out


def _probe() -> dict[str, Any]:
    """Run on every worker: what it has."""
    cuda = torch.cuda.is_available()
    return {"cuda": cuda, "bf16": bool(cuda and torch.cuda.is_bf16_supported()), "cores": os.cpu_count() or 1}


# ---------------------------------------------------------------------------------------
# coordinator side

def partitions(shards: Sequence[tuple[int, int]], per: int) -> list[list[tuple[int, int]]]:
    """Consecutive groups of ``per`` whole shards."""
    return [list(shards[i:i + per]) for i in range(0, len(shards), per)]


def partition_size(n_shards: int, n_workers: int, device: str) -> int:
    """Shards per task: about 4 tasks per worker for balance and resume granularity, at most
    4 shards on CPU (minutes each) and 16 on GPU (where each task's loader start-up counts)."""
    cap = 16 if device == "cuda" else 4
    return max(1, min(cap, math.ceil(n_shards / max(1, 4 * n_workers))))


def _absolute(cfg: ExtractConfig) -> ExtractConfig:
    """Workers may run elsewhere (another cwd): make local paths absolute."""
    out = cfg.out if store_io.is_remote(cfg.out) else str(store_io.local_path(cfg.out).resolve())
    ckpt = str(Path(cfg.checkpoint).resolve()) if cfg.checkpoint else None
    return dataclasses.replace(cfg, out=out, data_root=str(Path(cfg.data_root).resolve()), checkpoint=ckpt)


@contextlib.contextmanager
def connect(cfg: ExtractConfig, client=None) -> Iterator[Any]:
    """A dask Client: the one given, one connected to ``cfg.scheduler``, or one on a new
    LocalCluster of ``cfg.dask_workers`` processes (1 thread each; a GPU resource each when
    the device is CUDA), closed on exit."""
    if client is not None:
        yield client
        return
    from distributed import Client, LocalCluster

    if cfg.scheduler:
        try:
            c = Client(cfg.scheduler, timeout="30s")
        except (OSError, TimeoutError) as e:
            raise ValueError(f"--scheduler {cfg.scheduler}: cannot reach a dask scheduler there ({e}); "
                             "start one with `dask scheduler` or use --dask-workers N") from None
        with c:
            yield c
        return
    import dask

    from stages.common.runtime import resolve_device

    gpu = resolve_device(cfg.device).type == "cuda"
    # non-daemonic workers may start DataLoader processes (worth it when a GPU waits for images)
    with dask.config.set({"distributed.worker.daemon": not gpu}):
        cluster = LocalCluster(n_workers=cfg.dask_workers, threads_per_worker=1, processes=True,
                               dashboard_address=":0", resources={"GPU": 1} if gpu else None,
                               silence_logs=logging.ERROR)
    with cluster, Client(cluster) as c:
        yield c


def _resolve_on_cluster(cfg: ExtractConfig, client) -> tuple[str, str, dict[str, int]]:
    """(device, precision, torch threads per worker address) from what the workers have."""
    client.wait_for_workers(1, timeout=120)
    probe = client.run(_probe)
    info = client.scheduler_info(n_workers=-1)["workers"] if _takes_n_workers(client) else \
        client.scheduler_info()["workers"]
    if cfg.device == "auto":
        device = "cuda" if all(p["cuda"] for p in probe.values()) else "cpu"
    else:
        device = torch.device(cfg.device).type
    if device == "cuda":
        if not all(p["cuda"] for p in probe.values()):
            raise ValueError("--device cuda: some dask workers have no CUDA device; start GPU workers only, "
                             "or use --device cpu")
        if not any(w.get("resources", {}).get("GPU", 0) >= 1 for w in info.values()):
            raise ValueError("no dask worker declares a GPU resource, so GPU tasks would wait forever; "
                             "start workers with `dask worker ADDR --nthreads 1 --resources GPU=1`")
    if cfg.precision != "auto":
        precision = cfg.precision
    elif device == "cuda":
        precision = "bf16" if all(p["bf16"] for p in probe.values()) else "fp16"
    else:
        precision = "fp32"
    # torch threads of a CPU worker: its host's cores shared by the dask threads on that host
    per_host: dict[str, int] = {}
    for addr, w in info.items():
        per_host[w["host"]] = per_host.get(w["host"], 0) + int(w.get("nthreads", 1))
    threads = {addr: cfg.threads or max(1, probe[addr]["cores"] // per_host[w["host"]])
               for addr, w in info.items() if addr in probe}
    return device, precision, threads


def _takes_n_workers(client) -> bool:
    import inspect

    return "n_workers" in inspect.signature(client.scheduler_info).parameters


def extract_distributed(cfg: ExtractConfig, progress: bool = True, *, client=None,
                        on_partition: Callable[[int, int], None] | None = None) -> ExtractResult:
    """Stage one on a dask cluster (see the module docstring); same store as ``extract``.

    client: an existing ``distributed.Client`` (else from cfg.scheduler / cfg.dask_workers).
    on_partition(done, total): called after each finished partition is marked done;
    an exception raised there stops the run like Ctrl-C (finished partitions are kept)."""
    t0 = time.perf_counter()
    if str(cfg.out).startswith("memory://"):
        raise StoreError(f"{cfg.out}: a memory:// store lives in one process, dask workers cannot write it; "
                         "use a folder or an object store URL")
    cfg = _absolute(cfg)
    dataset = open_dataset(cfg.dataset, cfg.data_root, **cfg.dataset_options)
    with connect(cfg, client) as client:
        device, precision, threads = _resolve_on_cluster(cfg, client)
        encoder = make_encoder(cfg, "cpu")  # here only for its signature and checkpoint path
        signature = store_signature(encoder, dataset, precision, cfg.dtype)
        batch_size = cfg.batch_size or default_batch_size(torch.device(device))
        writer = open_store(cfg, dataset, signature, encoder.checkpoint_path, device)
        del encoder

        def encode(shards: list[tuple[int, int]], todo: int) -> dict[str, str]:
            plan = Plan(cfg=cfg, device=device, precision=precision, batch_size=batch_size, threads=threads,
                        dataset_signature=dataset.signature(), signature=signature,
                        created=str(writer.group.attrs.get("created")))
            parts = partitions(shards, partition_size(len(shards), len(threads), device))
            return _run(client, plan, parts, writer, todo, progress, on_partition)

        filled = fill_store(cfg, dataset, writer, encode)
    return ExtractResult(out=cfg.out, total=len(dataset), encoded=filled.encoded, failed=filled.failed,
                         seconds=time.perf_counter() - t0, encoder=cfg.encoder, device=f"dask ({device})",
                         report=filled.report)


def _run(client, plan: Plan, parts, writer: StoreWriter, todo: int, progress: bool,
         on_partition) -> dict[str, str]:
    from distributed import as_completed

    from stages.common.progress import progress_bar

    token = uuid.uuid4().hex[:8]
    resources = {"GPU": 1} if plan.device == "cuda" else None
    futures = [client.submit(encode_partition, plan, part, key=f"extract-{token}-{part[0][0]}",
                             resources=resources, pure=False) for part in parts]
    failures: dict[str, str] = {}
    try:
        with progress_bar("extract", total=todo, enabled=progress, unit="img") as advance:
            for n, fut in enumerate(as_completed(futures), 1):
                for r in fut.result():
                    writer.mark_done(r.start, r.heights, r.widths, r.hashes, r.failed)
                    for sid, err in r.errors.items():
                        failures[sid] = err
                        print(f"skipped: {err}", file=sys.stderr)
                    advance(len(r.heights))
                if on_partition is not None:
                    on_partition(n, len(futures))
    finally:
        client.cancel([f for f in futures if not f.done()])
    return failures


__all__ = ["Plan", "ShardResult", "connect", "encode_partition", "encode_shards", "extract_distributed",
           "partition_size", "partitions"]
