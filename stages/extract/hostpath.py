"""The host side of stage one: decode workers -> encoder -> shard buffers -> writer threads.

On a GPU the encoder stops being the bottleneck and this path becomes the limit, so each
step is placed where it costs least (figures: ``benchmarks/bench_extract.py --sections 7``):

- embeddings leave the encoder already in the store's dtype (float16 by default): on a GPU
  the cast runs on the device, so only half the bytes cross the bus; on the CPU the cast is
  fused with the copy into the shard buffer (torch's float32->float16 conversion rounds to
  nearest even like numpy's, so the stored bytes are those numpy's ``astype`` gave);
- shard buffers come from a small pool that is reused (pinned memory on CUDA), and the
  device-to-host copy is asynchronous: the next batch is launched while it runs; the
  writer thread that takes the shard waits for the copy's event, not the main thread;
- several writer threads write shard files in parallel (each shard is its own file);
  ``mark_done`` (per-sample arrays shared by all shards) stays serialised under a lock;
- on CUDA, an encoder that can finish its preprocessing on the device
  (``Encoder.prepare_host``/``finish``: SAM) gets uint8 canvases from the workers, a
  quarter of the float32 bytes to collate, send and pin; workers stack batches straight
  into shared memory.

Store bytes do not change with any of this (tests/test_hostpath.py).
"""
from __future__ import annotations

import os
import queue
import sys
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from cache import StoreWriter
from cache.schema import EMBED_SHAPE, EMBEDDINGS
from stages.datasets import BadImageError, DatasetError
from stages.datasets.base import Dataset
from stages.encoders.base import Encoder
from stages.extract.failures import disk_full_error


class PreparedDataset(TorchDataset):
    """Index -> (index, (3,S,S) tensor, height, width, content hash, error message);
    ``dtype``: that of ``prepare``'s tensors (the zeros of a bad image match them)."""

    def __init__(self, dataset: Dataset, prepare: Callable[[np.ndarray], torch.Tensor], size: int, skip_bad: bool,
                 dtype: torch.dtype = torch.float32):
        self.dataset, self.prepare, self.size, self.skip_bad, self.dtype = dataset, prepare, size, skip_bad, dtype

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        # Errors travel as data and are raised on the main thread (encode_batches): torch
        # re-raises a worker's exception as "Caught X in DataLoader worker process 0",
        # which loses the one-line message naming the file.
        digest = ""
        try:
            digest = self.dataset.content_hash(i)
            image = self.dataset.load_image(i)
            return i, self.prepare(image), image.shape[0], image.shape[1], digest, ""
        except DatasetError as e:
            error = str(e).splitlines()[0] if str(e) else type(e).__name__
        except OSError as e:  # e.g. the file vanished after listing
            error = f"{e.filename or self.dataset.samples[i].id}: cannot read the file ({e.strerror or e}); " \
                    "restore it or remove it from the dataset"
        return i, torch.zeros(3, self.size, self.size, dtype=self.dtype), 0, 0, digest, error


def prepared(encoder: Encoder, dataset: Dataset, skip_bad: bool, device: torch.device) -> PreparedDataset:
    """The loader's dataset: on CUDA with an encoder that can finish preprocessing on the
    device (``Encoder.prepare_host``: SAM's uint8 canvas, a quarter of the bytes to
    collate, send and pin), its host half; otherwise ``prepare`` whole."""
    host = encoder.prepare_host() if device.type == "cuda" else None
    if host is None:
        return PreparedDataset(dataset, encoder.prepare, encoder.img_size, skip_bad)
    return PreparedDataset(dataset, host, encoder.img_size, skip_bad, dtype=torch.uint8)


def collate_prepared(items: list[tuple]) -> tuple[list[int], torch.Tensor, list, list, list, list]:
    """A batch of ``PreparedDataset`` items: (indices, stacked tensors, heights, widths,
    hashes, errors), the loader's ``collate_fn``."""
    idx, tensors, h, w, hashes, errors = zip(*items)
    out = None
    if torch.utils.data.get_worker_info() is not None:
        # in a worker, stack straight into shared memory (as torch's default_collate does):
        # otherwise the batch is copied once more when it is sent to the main process
        t = tensors[0]
        storage = t._typed_storage()._new_shared(len(tensors) * t.numel(), device=t.device)
        out = t.new(storage).resize_(len(tensors), *t.shape)
    return list(idx), torch.stack(tensors, out=out), list(h), list(w), list(hashes), list(errors)


def decode_workers(device: torch.device) -> int:
    """DataLoader workers. CPU: one (the encoder streams need the cores). CUDA: every core
    but two (the main thread and the writers): at 1024 px, read + decode + resize cost
    4-14 ms of a core per image (bench_extract.py section 7) while a GPU takes ~1 ms for
    ViT-B, so decoding needs every core there is."""
    cores = os.cpu_count() or 1
    if device.type == "cuda":
        return max(1, cores - 2)
    return 1 if cores >= 2 else 0


def default_writers(device: torch.device) -> int:
    """Writer threads: one on CPU (a shard every few seconds); on CUDA a quarter of the
    cores, at most 4: a shard write costs ~1 ms of a core per image (bench_extract.py
    section 7), so 4 threads allow ~5,000 img/s and never hold the encoder up."""
    if device.type != "cuda":
        return 1
    return max(1, min(4, (os.cpu_count() or 1) // 4))


def default_batch_size(device: torch.device) -> int:
    """32 on GPU; 1 on CPU, where parallel streams (see ``encode_batches``) are faster than
    batching: bigger activations leave the caches (LiteMedSAM: 1.90 CPU-s/img at batch 1,
    2.43 at batch 8, one thread)."""
    return 32 if device.type == "cuda" else 1


def stream_plan(streams: int, device: torch.device) -> tuple[int, int]:
    """(streams, torch threads per stream) for a process allowed the current torch
    thread count: on CPU one stream per thread, each single-threaded; on GPU one stream."""
    total = torch.get_num_threads()
    n = streams or (total if device.type == "cpu" else 1)
    return n, max(1, total // n)


def out_dtype_for(store_dtype: str, device: torch.device) -> torch.dtype:
    """The dtype embeddings leave the encoder in: the store's float16 on a GPU (the cast
    runs there and halves the copy back); float32 otherwise (int8 quantises from float32;
    on CPU the cast is fused with the copy into the shard buffer instead)."""
    if device.type == "cuda" and store_dtype == "float16":
        return torch.float16
    return torch.float32


def forward_device(encoder: Encoder, batch: torch.Tensor, amp: torch.dtype | None,
                   out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Encoder forward, result left on the device; on CUDA out-of-memory, retry the batch
    in halves instead of dying."""
    try:
        return encoder.forward(batch, amp_dtype=amp, out_dtype=out_dtype)
    except torch.cuda.OutOfMemoryError:
        if batch.shape[0] == 1:
            raise
        torch.cuda.empty_cache()
        half = batch.shape[0] // 2
        print(f"CUDA out of memory at batch {batch.shape[0]}; retrying as {half}+{batch.shape[0] - half}",
              file=sys.stderr)
        return torch.cat([forward_device(encoder, batch[:half], amp, out_dtype),
                          forward_device(encoder, batch[half:], amp, out_dtype)])


def forward_resilient(encoder: Encoder, batch: torch.Tensor, amp: torch.dtype | None) -> np.ndarray:
    """``forward_device`` copied back to the host as float32 numpy (synchronous)."""
    return forward_device(encoder, batch, amp).cpu().numpy()


def encode_tensors(encoder: Encoder, loader: DataLoader, device: torch.device, amp: torch.dtype | None,
                   streams: int = 1, out_dtype: torch.dtype = torch.float32
                   ) -> Iterator[tuple[list[int], torch.Tensor, list, list, list, list]]:
    """Yield (indices, embeddings (B,256,64,64) on the device in ``out_dtype``, heights,
    widths, hashes, errors), in the loader's order.

    A bad image raises BadImageError (its one-line message) before its batch is encoded,
    unless the loader's dataset skips bad images (``skip_bad``): then its error is yielded
    and its embedding is zeros. ``streams`` > 1 encodes that many batches at once in
    threads (torch releases the GIL inside its kernels): on CPU, streams of one torch
    thread each beat one stream of many threads, whose small kernels scale poorly."""
    strict = not getattr(loader.dataset, "skip_bad", False)

    def checked():
        for idx, batch, h, w, hashes, errors in loader:
            bad = [e for e in errors if e]
            if bad and strict:
                raise BadImageError(f"{bad[0]} (or re-run with --skip-bad to record such images as failed and go on)")
            yield idx, encoder.finish(batch.to(device, non_blocking=True), h, w), h, w, hashes, errors

    if streams <= 1:
        for idx, batch, h, w, hashes, errors in checked():
            yield idx, forward_device(encoder, batch, amp, out_dtype), h, w, hashes, errors
        return
    with ThreadPoolExecutor(streams, thread_name_prefix="encode") as pool:
        pending: deque = deque()
        for idx, batch, h, w, hashes, errors in checked():
            pending.append(((idx, h, w, hashes, errors), pool.submit(forward_device, encoder, batch, amp, out_dtype)))
            if len(pending) > streams:  # keep every stream busy, hand results on in order
                (idx, h, w, hashes, errors), fut = pending.popleft()
                yield idx, fut.result(), h, w, hashes, errors
        while pending:
            (idx, h, w, hashes, errors), fut = pending.popleft()
            yield idx, fut.result(), h, w, hashes, errors


def encode_batches(encoder: Encoder, loader: DataLoader, device: torch.device, amp: torch.dtype | None,
                   streams: int = 1) -> Iterator[tuple[list[int], np.ndarray, list, list, list, list]]:
    """``encode_tensors`` with the embeddings as float32 numpy arrays on the host."""
    for idx, emb, h, w, hashes, errors in encode_tensors(encoder, loader, device, amp, streams):
        yield idx, emb.cpu().numpy(), h, w, hashes, errors


class BufferPool:
    """Shard-sized host buffers, reused: at most ``size`` exist (pinned on CUDA, where
    pinning is what makes the copy asynchronous and allocating pinned memory is slow);
    ``get`` waits for one to come back when all are in use (back-pressure on the encoder)."""

    def __init__(self, size: int, shape: tuple[int, ...], dtype: torch.dtype, pin: bool):
        self.size, self.shape, self.dtype, self.pin = size, shape, dtype, pin
        self.made = 0
        self.free: queue.Queue = queue.Queue()

    def get(self) -> torch.Tensor:
        try:
            return self.free.get_nowait()
        except queue.Empty:
            if self.made < self.size:
                self.made += 1
                return torch.empty(self.shape, dtype=self.dtype, pin_memory=self.pin)
            return self.free.get()

    def put(self, buf: torch.Tensor) -> None:
        self.free.put(buf)


class ShardWriter:
    """Writes finished shards (in ``threads`` threads) and marks them done, off the
    compute thread. A job is (start, host buffer, size, heights, widths, hashes, failed,
    event): the writer waits for the buffer's copy ``event`` (CUDA), writes the shard file,
    returns the buffer to ``pool`` and marks the samples done: one thread at a time (the
    per-sample arrays are shared), and shards written meanwhile by the other threads in the
    same call when adjacent (the cost is per call: five small arrays rewritten and synced,
    ~10 ms, which would otherwise cap a GPU run at ~3,000 img/s)."""

    def __init__(self, writer: StoreWriter, threads: int = 1, pool: BufferPool | None = None):
        self.writer, self.pool = writer, pool
        self.jobs: queue.Queue = queue.Queue(maxsize=max(2, threads))
        self.error: BaseException | None = None
        self.mark_lock = threading.Lock()
        self.written: list[tuple] = []  # (start, heights, widths, hashes, failed): written, not yet marked
        self.written_lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, daemon=True, name=f"shard-writer-{k}")
                        for k in range(max(1, threads))]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def run(self) -> None:
        while (job := self.jobs.get()) is not None:
            start, buf, size, h, w, hashes, failed, event = job
            if self.error is None:
                try:
                    if event is not None:
                        event.synchronize()
                    self.writer.write_shard(start, buf[:size].numpy())
                    if self.pool is not None:
                        self.pool.put(buf)
                        buf = None
                    with self.written_lock:
                        self.written.append((start, h, w, hashes, failed))
                    self._mark()
                except OSError as e:  # surfaced on the main thread
                    what = f"writing shard {start // self.writer.shard_size} (samples {start}..{start + size - 1})"
                    self.error = disk_full_error(e, self.writer.url, what) or e
                except BaseException as e:  # surfaced on the main thread
                    self.error = e
            if self.pool is not None and buf is not None:
                self.pool.put(buf)

    def _mark(self) -> None:
        """Mark every written shard done, adjacent ones in one ``mark_done`` call."""
        with self.mark_lock:
            with self.written_lock:
                todo, self.written = sorted(self.written, key=lambda r: r[0]), []
            runs: list[list] = []
            for start, h, w, hashes, failed in todo:
                if runs and runs[-1][0] + len(runs[-1][1]) == start:
                    for into, more in zip(runs[-1][1:], (h, w, hashes, failed)):
                        into.extend(more)
                else:
                    runs.append([start, list(h), list(w), list(hashes), list(failed)])
            for start, h, w, hashes, failed in runs:
                self.writer.mark_done(start, h, w, hashes, failed)

    def put(self, job) -> None:
        if self.error is not None:
            raise self.error
        self.jobs.put(job)

    def finish(self) -> None:
        for _ in self.threads:
            self.jobs.put(None)
        for t in self.threads:
            t.join()
        if self.error is not None:
            raise self.error


def make_loader(prepared: PreparedDataset, batches: list[list[int]], workers: int, device: torch.device) -> DataLoader:
    """The decode/resize DataLoader of both the local and the dask path."""
    return DataLoader(
        prepared,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=collate_prepared,
        pin_memory=device.type == "cuda",
        # CUDA: many workers x batches of 32 sit in shared memory; 2 each is ~1 s of GPU work
        prefetch_factor=(2 if device.type == "cuda" else 4) if workers else None,
        persistent_workers=False,
    )


def store_dtype(writer: StoreWriter) -> str:
    return str(writer.group[EMBEDDINGS].dtype)


def run_shards(encoder: Encoder, loader: DataLoader, writer: StoreWriter, shards, device: torch.device,
               amp: torch.dtype | None, todo: int, progress: bool, dataset: Dataset, streams: int = 1,
               writers: int = 0) -> dict[str, str]:
    """Encode the pending shards into the store; returns {sample id: error} of the samples
    skipped as bad."""
    from stages.common.progress import progress_bar

    bounds = dict(shards)
    kind = store_dtype(writer)
    out_dtype = out_dtype_for(kind, device)
    host_dtype = torch.float16 if kind == "float16" else torch.float32
    writers = writers or default_writers(device)
    cuda = device.type == "cuda"
    # buffers: one filling, one per writer thread, the writer queue's
    pool = BufferPool(2 * max(2, writers) + 1, (writer.shard_size, *EMBED_SHAPE), host_dtype, pin=cuda)
    sink = ShardWriter(writer, writers, pool)
    sink.start()
    failures: dict[str, str] = {}
    buf: dict[str, Any] | None = None
    try:
        with progress_bar("extract", total=todo, enabled=progress, unit="img") as advance:
            for idx, emb, h, w, hashes, errors in encode_tensors(encoder, loader, device, amp, streams, out_dtype):
                if buf is None:
                    start = idx[0]
                    buf = {"start": start, "size": bounds[start] - start, "emb": pool.get(), "h": [], "w": [],
                           "hash": [], "failed": [], "filled": 0}
                fill_shard_buffer(buf, idx, emb, h, w, hashes, errors, failures, dataset, cuda)
                if buf["filled"] == buf["size"]:
                    event = None
                    if cuda:
                        event = torch.cuda.Event()
                        event.record()
                    sink.put((buf["start"], buf["emb"], buf["size"], buf["h"], buf["w"], buf["hash"],
                              buf["failed"], event))
                    buf = None
                advance(len(idx))
    finally:
        sink.finish()
    return failures


@torch.inference_mode()  # emb is an inference tensor: zeroing it in place needs the mode
def fill_shard_buffer(buf: dict[str, Any], idx, emb: torch.Tensor, h, w, hashes, errors, failures: dict[str, str],
          dataset: Dataset, cuda: bool) -> None:
    """Copy one batch into the shard buffer (cast to its dtype on the way, asynchronously
    from a GPU) and record its per-sample results; bad samples get zeros."""
    k = buf["filled"]
    for j, (i, err) in enumerate(zip(idx, errors)):
        buf["h"].append(h[j]), buf["w"].append(w[j]), buf["hash"].append(hashes[j]), buf["failed"].append(bool(err))
        if err:
            emb[j] = 0  # on the device, before the copy (a host write could race the DMA)
            failures[dataset.samples[i].id] = err
            print(f"skipped: {err}", file=sys.stderr)
    buf["emb"][k:k + len(idx)].copy_(emb, non_blocking=cuda)
    buf["filled"] += len(idx)
