"""Stage one on this machine (``extract_local``): the encoder runs in this process.

A shard's samples are decoded and preprocessed in DataLoader workers, encoded in batches
that never cross a shard boundary, and handed to writer threads that write the shard and
then mark its samples done while the encoder goes on with the next one (that machinery,
and what it does to keep a GPU fed, is in ``hostpath.py``); the store is opened, checked
and committed by the steps both runs share (``steps.py``).
"""
from __future__ import annotations

import time

import torch

from stages.common.runtime import amp_dtype_for, resolve_device, resolve_precision, tune_allocator
from stages.datasets import open_dataset
from stages.encoders.base import Encoder
from stages.extract.config import ExtractConfig, ExtractResult, store_signature
from stages.extract.hostpath import decode_workers, default_batch_size, make_loader, prepared, run_shards, stream_plan
from stages.extract.steps import fill_store, make_encoder, open_store, shard_batches, torch_threads


def warm_up(encoder: Encoder, batch_size: int, device: torch.device, amp: torch.dtype | None) -> float:
    """Compile a ``--compile`` encoder now, on this thread (not racing in the first
    streams); returns the seconds it took (0 when there is nothing to compile)."""
    from stages.encoders.fast import CompiledNet

    net = encoder.net
    if not isinstance(net, CompiledNet) or net.state != "new":
        return 0.0
    encoder.forward(torch.zeros(batch_size, 3, encoder.img_size, encoder.img_size, device=device), amp_dtype=amp)
    return net.compile_seconds


def extract_local(cfg: ExtractConfig, progress: bool = True) -> ExtractResult:
    """Stage one in this process, with ``cfg.threads`` torch threads (0: torch's default)."""
    tune_allocator()
    with torch_threads(cfg.threads):
        return _extract(cfg, progress)


def _extract(cfg: ExtractConfig, progress: bool) -> ExtractResult:
    t0 = time.perf_counter()
    dataset = open_dataset(cfg.dataset, cfg.data_root, **cfg.dataset_options)
    device = resolve_device(cfg.device)
    batch_size = cfg.batch_size or default_batch_size(device)
    encoder = make_encoder(cfg, device, batch_size)
    precision = resolve_precision(cfg.precision, device)
    amp = amp_dtype_for(precision)
    workers = decode_workers(device) if cfg.workers < 0 else cfg.workers
    streams, stream_threads = stream_plan(cfg.streams or (1 if cfg.compile else 0), device)
    writer = open_store(cfg, dataset, store_signature(encoder, dataset, precision, cfg.dtype),
                        encoder.checkpoint_path, str(device))
    compile_s = 0.0

    def encode(shards: list[tuple[int, int]], todo: int) -> dict[str, str]:
        nonlocal compile_s
        loader = make_loader(prepared(encoder, dataset, cfg.skip_bad, device), shard_batches(shards, batch_size),
                             workers, device)
        with torch_threads(stream_threads):  # CPU streams: one single-threaded stream per core
            compile_s = warm_up(encoder, batch_size, device, amp)
            return run_shards(encoder, loader, writer, shards, device, amp, todo, progress, dataset, streams)

    filled = fill_store(cfg, dataset, writer, encode)
    seconds = time.perf_counter() - t0
    return ExtractResult(out=cfg.out, total=len(dataset), encoded=filled.encoded, failed=filled.failed,
                         seconds=seconds, encoder=cfg.encoder, device=str(device), report=filled.report,
                         compile_seconds=compile_s)
