"""Section 7 of bench_extract.py: stage one's host path, measured with a null encoder.

On a GPU the encoder stops being the limit and the host work around it decides the rate.
This measures that work without a GPU: ``pipeline extract``'s own pipeline
(stages.extract.hostpath: DataLoader workers, shard buffers, writer threads, a real store) runs
with an encoder that returns a fixed embedding at once (or sleeps a given "GPU time" per
image first), on real images (../shared/datasets when present, else phantoms), at 1024 px
(SAM) and 256 px (LiteMedSAM) inputs. Reported:

- per-image core-time of each phase, each timed alone on one thread; at 1024 px also the
  opt-in ``--resize fast`` (torch's uint8 resize instead of PIL's), side by side;
- the end-to-end ceiling of the real pipeline on this machine (instant encoder);
- that ceiling projected to a 16-core host: for each pool of threads (decode workers, the
  loader's pin-memory thread, the main thread, the writer threads, the serialised
  mark_done), threads / core-time per image, and the smallest of those;
- wall time vs encoder time with the encoder sleeping: overlap, not capacity.
"""
from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stages.encoders.base import Encoder

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
HOST_CORES = 16
# the phases of the opt-in --resize fast (torch's uint8 resize instead of PIL's), at 1024
FAST_F32 = "--resize fast: resize+normalise (float32 canvas)"
FAST_U8 = "--resize fast: resize (uint8 canvas, GPU path)"


class NullNet(nn.Module):
    """(B,3,S,S) -> a fixed (B,256,64,64) float32 embedding (random values: the cast and the
    write see real data); ``sleep_s`` per image first (the GPU's time, GIL released)."""

    def __init__(self, max_batch: int, sleep_s: float = 0.0):
        super().__init__()
        fixed = torch.randn(max_batch, 256, 64, 64, generator=torch.Generator().manual_seed(0)) * 0.1
        self.register_buffer("fixed", fixed, persistent=False)  # moves with .to(device)
        self.sleep_s = sleep_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sleep_s:
            time.sleep(self.sleep_s * x.shape[0])
        return self.fixed[: x.shape[0]]


class NullEncoder(Encoder):
    """The null net with the real preprocessing of SAM (1024; ``--resize`` as its
    preprocessing records) or LiteMedSAM (256)."""

    @property
    def resize(self) -> str:
        from stages.encoders.preprocess import resize_choice

        return resize_choice(self.preprocessing)

    def prepare(self, image: np.ndarray) -> torch.Tensor:
        from stages.encoders.preprocess import prepare_litemedsam, prepare_sam

        return prepare_sam(image, 1024, self.resize) if self.img_size == 1024 else prepare_litemedsam(image, self.img_size)

    def prepare_host(self):
        from functools import partial

        from stages.encoders.preprocess import prepare_sam_u8

        return partial(prepare_sam_u8, size=1024, resize=self.resize) if self.img_size == 1024 else None

    def finish(self, batch, heights, widths):
        from stages.encoders.preprocess import finish_sam

        return finish_sam(batch, heights, widths, 1024) if batch.dtype == torch.uint8 else batch


def null_encoder(size: int, max_batch: int, sleep_s: float = 0.0, resize: str = "exact") -> NullEncoder:
    from stages.encoders.preprocess import sam_preprocessing

    prep = sam_preprocessing(1024, resize) if size == 1024 else {}
    return NullEncoder(name=f"null{size}", net=NullNet(max_batch, sleep_s), img_size=size, checkpoint_sha256="0" * 64,
                       checkpoint_path="", preprocessing=prep)


def image_folders(work: Path, n: int) -> dict[str, Path]:
    """Up to ``n`` real images per kind as imagefolders: RGB JPEG blood smears (360x363) and
    grayscale JPEG chest X-rays (224x224) from ../shared/datasets; phantoms if absent."""
    out = {}
    for kind, src in (("rgb blood_pbc 360x363 jpeg", SHARED / "blood_pbc" / "train"),
                      ("gray chest_xray 224x224 jpeg", SHARED / "chest_xray" / "train")):
        every = sorted(src.rglob("*.jp*g")) if src.is_dir() else []
        files = every[:: max(1, len(every) // n)][:n]  # spread over the classes
        if len(files) < n:
            continue
        root = work / f"host_{kind.split()[1]}_{n}"
        if not root.exists():
            for k, f in enumerate(files):
                (root / f.parent.name).mkdir(parents=True, exist_ok=True)
                shutil.copy(f, root / f.parent.name / f"{k:04d}{f.suffix}")
        out[kind] = root
    if not out:
        from stages.datasets import make_synthetic

        root = work / f"host_phantoms_{n}"
        if not (root / "manifest.csv").exists():
            make_synthetic(root, n_per_class=-(-n // 3), size=512, seed=0)
        out["gray phantoms 512x512 png"] = root
    return out


def _per_image(fn, items, repeats: int = 1) -> float:
    """Median CPU seconds of ``fn(item)`` over ``items``: process CPU time (user + system,
    all of this process's threads: zarr writes on its own event-loop thread), not wall, so
    that neighbours on a shared machine do not inflate it; nothing else runs meanwhile."""
    ts = []
    for _ in range(repeats):
        for it in items:
            t = time.process_time()
            fn(it)
            ts.append(time.process_time() - t)
    return statistics.median(ts)


def _store(work: Path, name: str, ds, enc, shard: int):
    from cache import StoreWriter, make_signature
    from stages.extract.config import listing_of

    sig = make_signature(encoder=enc.name, checkpoint_sha256=enc.checkpoint_sha256, img_size=enc.img_size,
                         preprocessing={}, precision="fp32", dataset_kind=ds.kind,
                         dataset_signature=ds.signature(), dtype="float16")
    return StoreWriter.open(str(work / name), signature=sig, listing=listing_of(ds), classes=ds.classes,
                            mask_classes=ds.mask_classes, shard_size=shard, overwrite=True)


def phases(work: Path, ds, size: int, batch: int, shard: int) -> dict[str, float]:
    """Core-seconds per image of each phase, each alone on this thread."""
    from cache.schema import EMBED_SHAPE
    from stages.encoders.preprocess import prepare_sam_reference
    from stages.extract.hostpath import collate_prepared

    n = len(ds)
    enc = null_encoder(size, batch)
    raw = [ds.load_image(i) for i in range(n)]
    f: dict[str, float] = {}
    f["read+hash+decode"] = _per_image(lambda i: (ds.content_hash(i), ds.load_image(i)), range(n))
    f["resize+normalise (float32 canvas)"] = _per_image(enc.prepare, raw)
    if size == 1024:
        f["old: resize RGB + arithmetic normalise"] = _per_image(prepare_sam_reference, raw)
        fast = null_encoder(size, batch, resize="fast")
        f[FAST_F32] = _per_image(fast.prepare, raw)
        f[FAST_U8] = _per_image(fast.prepare_host(), raw)
    canv = [enc.prepare(r) for r in raw[:batch]]
    host = enc.prepare_host()
    if host is not None:
        f["resize (uint8 canvas, GPU path)"] = _per_image(host, raw)
        u8 = [host(r) for r in raw[:batch]]
        h, w = [r.shape[0] for r in raw[:batch]], [r.shape[1] for r in raw[:batch]]
        f["normalise on the device (here: CPU)"] = _per_image(lambda b: enc.finish(b, h, w), [torch.stack(u8)]) / batch

    class _Worker:  # collate_prepared's shared-memory branch runs where get_worker_info() is set
        id, num_workers, seed, dataset = 0, 1, 0, None

    import torch.utils.data._utils.worker as wmod

    items = [(i, c, 1, 1, "", "") for i, c in enumerate(canv)]
    wmod._worker_info = _Worker()
    try:
        f["collate into shared memory (float32)"] = _per_image(collate_prepared, [items] * 3) / batch
        if host is not None:
            f["collate into shared memory (uint8)"] = _per_image(collate_prepared, [[(*it[:1], u, *it[2:]) for it, u in
                                                                              zip(items, u8)]] * 3) / batch
    finally:
        wmod._worker_info = None
    stacked = torch.stack(canv)
    dst = torch.empty_like(stacked)
    f["pin-memory copy (float32 batch)"] = _per_image(lambda _: dst.copy_(stacked), range(5)) / batch
    if host is not None:
        s8 = torch.stack(u8)
        d8 = torch.empty_like(s8)
        f["pin-memory copy (uint8 batch)"] = _per_image(lambda _: d8.copy_(s8), range(5)) / batch
    emb = enc.net.fixed[:batch]
    buf32 = np.empty((shard, *EMBED_SHAPE), np.float32)
    buf16 = torch.empty((shard, *EMBED_SHAPE), dtype=torch.float16)
    f["old: copy to float32 shard buffer"] = _per_image(lambda _: np.copyto(buf32[:batch], emb.numpy()), range(5)) / batch
    f["old: numpy float32->float16 in the writer"] = _per_image(lambda _: buf32.astype(np.float16), range(3)) / shard
    f["new CPU: cast fused into the buffer copy"] = _per_image(lambda _: buf16[:batch].copy_(emb), range(5)) / batch
    w = _store(work, f"phase{size}.zarr", ds, enc, shard)
    with w:
        starts = [a for a, _ in w.pending()]
        data16 = buf16.numpy()
        # each shard rewritten 3 times (a whole-shard write replaces the file): a median of
        # 3 writes alone is at the mercy of one slow one
        f["shard write (float16)"] = _per_image(lambda a: w.write_shard(a, data16[: min(shard, n - a)]), starts,
                                                3) / shard
        raw = work / f"raw{size}.bin"

        def plain(_):
            with open(raw, "wb") as fh:
                fh.write(data16[:shard].data)

        f["plain file write of the same bytes"] = _per_image(plain, range(9)) / shard
        hs = [0] * shard
        f["mark_done (serialised)"] = _per_image(lambda a: w.mark_done(a, hs[: min(shard, n - a)], hs[: min(shard, n - a)],
                                                                       [""] * min(shard, n - a),
                                                                       [False] * min(shard, n - a)), starts) / shard
    return f


def end_to_end(work: Path, ds, size: int, batch: int, shard: int, workers: int, sleep_s: float,
               device: torch.device, writers: int = 0, resize: str = "exact") -> tuple[float, float]:
    """(wall seconds, encoder seconds) of the real pipeline (stages.extract.hostpath.run_shards,
    the path extract takes on ``device``) with the null encoder. The sleep blocks the main
    thread (a real GPU forward would return at once and overlap more): conservative."""
    from stages.extract.hostpath import make_loader, prepared, run_shards
    from stages.extract.steps import shard_batches

    enc = null_encoder(size, batch, sleep_s, resize).to(device)
    w = _store(work, f"e2e{size}.zarr", ds, enc, shard)
    with w:
        shards = w.pending()
        loader = make_loader(prepared(enc, ds, False, device), shard_batches(shards, batch), workers, device)
        t = time.perf_counter()
        run_shards(enc, loader, w, shards, device, None, len(ds), False, ds, writers=writers)
        wall = time.perf_counter() - t
    return wall, sleep_s * len(ds)


def _defaults_on(cores: int) -> tuple[int, int]:
    """(decode workers, writer threads) that extract picks for CUDA on a host of ``cores``."""
    import os

    from stages.extract.hostpath import decode_workers, default_writers

    real = os.cpu_count
    os.cpu_count = lambda: cores
    try:
        return decode_workers(torch.device("cuda")), default_writers(torch.device("cuda"))
    finally:
        os.cpu_count = real


def projection(f: dict[str, float], plan: str) -> list[tuple[str, float, int, float]]:
    """(pool, core-ms per image, threads on a 16-core GPU host, images/s that pool allows).
    ``plan``: "new" (uint8 canvas where the encoder has one, cast on the device, parallel
    writers), "new-f32" (the same with the float32 canvas), either with "-fast" (the
    ``--resize fast`` resize instead of PIL's), or "old" (float32 canvas, arithmetic
    normalise, float32 copied back, numpy cast in one writer thread)."""
    workers, writers = _defaults_on(HOST_CORES)
    fast = plan.endswith("-fast")
    plan = plan.removesuffix("-fast")
    u8 = plan == "new" and "resize (uint8 canvas, GPU path)" in f
    old = plan == "old"
    prep = (f[FAST_U8 if fast else "resize (uint8 canvas, GPU path)"] if u8 else
            f.get("old: resize RGB + arithmetic normalise", f["resize+normalise (float32 canvas)"]) if old else
            f[FAST_F32 if fast else "resize+normalise (float32 canvas)"])
    collate = f["collate into shared memory (uint8)" if u8 else "collate into shared memory (float32)"]
    if old:
        collate *= 2  # the old collate stacked, then torch copied the batch into shared memory
    pools = [("decode workers: read+decode, resize(+normalise), collate", f["read+hash+decode"] + prep + collate,
              workers),
             ("pin-memory thread (DataLoader)", f["pin-memory copy (uint8 batch)" if u8 else
                                                  "pin-memory copy (float32 batch)"], 1)]
    if old:
        pools += [("main thread: float32 copy into the shard buffer", f["old: copy to float32 shard buffer"], 1),
                  ("one writer thread: numpy cast + shard write + mark_done",
                   f["old: numpy float32->float16 in the writer"] + f["shard write (float16)"]
                   + f["mark_done (serialised)"], 1)]
    else:
        # a local uncompressed shard is written by cache/shardwrite.py in the writer thread
        # itself (index, crc32c, file I/O), so the whole write is shared by the writer threads;
        # only zarr's path (lz4, remote stores) encodes on zarr's single event-loop thread
        pools += [("main thread: bookkeeping (copy back and cast: device/DMA)",
                   f["bookkeeping (fill loop, main thread)"], 1),
                  ("writer threads: shard write (cache/shardwrite.py)", f["shard write (float16)"], writers),
                  ("mark_done, one per shard (no cap: calls that queue are merged)", f["mark_done (serialised)"], 1)]
    total = sum(c for _, c, _ in pools)
    pools.append((f"all {HOST_CORES} cores: the sum of the above", total, HOST_CORES))
    return [(name, 1e3 * c, k, (k / c) if c > 0 else float("inf")) for name, c, k in pools]


def bookkeeping(batch: int) -> float:
    """Main-thread seconds per image of the shard-buffer bookkeeping (``fill_shard_buffer``'s Python
    loop, a tiny copy), what remains on the main thread on a GPU besides kernel launches."""
    from stages.extract.hostpath import fill_shard_buffer

    emb = torch.zeros(batch, 1)

    def one(_):
        buf = {"emb": torch.zeros(batch, 1), "h": [], "w": [], "hash": [], "failed": [], "filled": 0}
        fill_shard_buffer(buf, list(range(batch)), emb, [1] * batch, [1] * batch, [""] * batch, [""] * batch, {}, None, False)

    return _per_image(one, range(20)) / batch


PLANS = {"new": "now: uint8 canvas, normalise + cast on the device, parallel writers",
         "new-fast": "now with --resize fast (torch's uint8 resize instead of PIL's), uint8 canvas",
         "new-f32": "now, float32 canvas (as the CPU path prepares)",
         "new-f32-fast": "now with --resize fast, float32 canvas (as the CPU path prepares)",
         "old": "before: float32 canvas, float32 copied back, numpy cast in one writer"}


def section(b, sizes=(1024, 256)) -> str:
    """Run section 7 for bench_extract's ``Bench`` ``b``; returns its report text."""
    from benchmarks._util import note
    from stages.common.runtime import tune_allocator
    from stages.datasets import open_dataset

    tune_allocator()  # extract's process settings: large buffers reuse heap memory
    a, work = b.a, b.work
    b.host_ceilings, b.host_e2e, b.host_phases = {}, {}, {}
    n, batch, shard = a.host_n, 32, 32
    out = [f"## 7. host path with a null encoder ({n} real images per kind, batch {batch}, shard {shard}; "
           f"core-ms per image, one thread each)"]
    for kind, root in image_folders(work, n).items():
        ds = open_dataset("imagefolder", str(root))
        for size in sizes:
            note(f"7. host path: {kind} at {size}")
            out += _kind_at_size(b, kind, ds, size, batch, shard)
    from benchmarks.resize_difference import exact_vs_fast

    return "\n".join(out + exact_vs_fast(b))


def _kind_at_size(b, kind: str, ds, size: int, batch: int, shard: int) -> list[str]:
    """Section 7's phases, end-to-end runs and projections for one kind of image at one size."""
    from benchmarks._util import table
    from stages.extract.hostpath import decode_workers
    from stages.extract.steps import torch_threads

    a, work, n = b.a, b.work, len(ds)
    with torch_threads(1):  # every phase on this one thread: CPU time = core time
        f = phases(work, ds, size, batch, shard)
        f["bookkeeping (fill loop, main thread)"] = bookkeeping(batch)
    dev = b.device
    cpu_workers = a.workers if a.workers >= 0 else decode_workers(dev)
    # CPU: small batches and shards, so that a few dozen images make a pipeline
    eb, es = (32, 32) if dev.type == "cuda" else (8, 16)
    ceiling = n / end_to_end(work, ds, size, eb, es, cpu_workers, 0.0, dev)[0]
    # GPU: ViT-B's bf16 time (~1 ms/img at 1024, the bound; 0.25 ms at 256), or
    # --host-gpu-ms; CPU: 1.5x the host's own time (tests overlap, not capacity)
    sleep = (a.host_gpu_ms / 1e3 if a.host_gpu_ms else (1e-3 if size == 1024 else 2.5e-4)
             if dev.type == "cuda" else 1.5 / ceiling)
    wall_s, enc_s = end_to_end(work, ds, size, eb, es, cpu_workers, sleep, dev)
    e2e = {"ceiling_img_s": ceiling, "sleep_ms_per_img": 1e3 * sleep, "wall_over_encoder": wall_s / enc_s,
           "device": str(dev)}
    if size == 1024:
        e2e["ceiling_img_s_resize_fast"] = n / end_to_end(work, ds, size, eb, es, cpu_workers, 0.0, dev,
                                                          resize="fast")[0]
        from benchmarks.resize_difference import pixel_difference

        e2e["resize_fast_vs_exact"] = pixel_difference(ds, size)
    b.host_e2e[f"{kind} {size}"] = e2e
    b.host_phases[f"{kind} {size}"] = {k: 1e3 * v for k, v in f.items()}
    fast_e2e = ""
    if size == 1024:
        d = e2e["resize_fast_vs_exact"]
        fast_e2e = (f"; with --resize fast: **{e2e['ceiling_img_s_resize_fast']:.1f} img/s** (its resized images "
                    f"differ from PIL's in {100 * d['fraction_differing']:.4f}% of the values, by at most "
                    f"{d['max_difference']} level; {d['images_differing']} of {n} images differ at all)")
    out = [f"### {kind} -> {size} px", table([[k, f"{1e3 * v:.2f}"] for k, v in f.items()],
                                             ["phase", "core-ms / image"]),
           f"end to end on this machine (real pipeline, instant encoder, {cpu_workers} decode worker(s), "
           f"{dev.type} path, batch {eb}, shard {es}): **{ceiling:.1f} img/s**{fast_e2e}; encoder sleeping "
           f"{1e3 * sleep:.2f} ms/img: wall {wall_s:.2f} s / encoder {enc_s:.2f} s = **{wall_s / enc_s:.2f}x**"]
    for plan in PLANS if size == 1024 else ("new-f32", "old"):
        rows = projection(f, plan)
        cap = min((r for r in rows if "no cap" not in r[0]), key=lambda r: r[3])
        out += [f"projected to a {HOST_CORES}-core GPU host, {PLANS[plan]}:",
                table([[r[0], f"{r[1]:.2f}", r[2], f"{r[3]:.0f}"] for r in rows],
                      ["pool", "core-ms / image", "threads", "img/s it allows"]),
                f"ceiling **{cap[3]:.0f} img/s**, set by: {cap[0]}", ""]
        b.host_ceilings[f"{kind} {size} {plan}"] = cap[3]
    return out
