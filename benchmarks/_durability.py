"""bench_extract.py section 8: what fsync costs the store writer.

Writes the same shards through ``StoreWriter`` (``write_shard`` then ``mark_done`` per
shard, then ``commit``) into a fresh local store, with the cache layer's fsync on (the
default: every key's file and folder are synced before the next key is written) and off
(``cache.io.durability(False)``), alternating the two so drift in the machine's load hits
both alike. Reports per-shard milliseconds and MB/s side by side and their ratio.
"""
from __future__ import annotations

import os
import time

import numpy as np

from benchmarks._util import median, note, table

SHARD = 8  # samples per shard: 16 MiB of float16 (the default 32 is 64 MiB: fsync's share is smaller)
SHARDS = 12
REPEATS = 3


def _write(url: str, data: np.ndarray, durable: bool) -> float:
    from cache import Listing, StoreWriter, make_signature
    from cache import io as store_io

    n = len(data)
    sig = make_signature(encoder="bench", checkpoint_sha256="0" * 64, img_size=256, preprocessing={},
                         precision="fp32", dataset_kind="bench", dataset_signature="0" * 64, dtype="float16")
    listing = Listing(ids=[f"s{i}" for i in range(n)], labels=[0] * n, splits=["train"] * n, groups=[""] * n,
                      slices=[-1] * n)
    with store_io.durability(durable):
        with StoreWriter.open(url, signature=sig, listing=listing, shard_size=SHARD, overwrite=True) as w:
            os.sync()  # the store's creation is not what is measured
            t0 = time.perf_counter()
            for a, b in w.shards():
                w.write_shard(a, data[a:b])
                w.mark_done(a, [256] * (b - a), [256] * (b - a), ["h"] * (b - a), [False] * (b - a))
            w.commit()
            seconds = time.perf_counter() - t0
    return seconds


def section(bench) -> str:
    from cache.ownership import remove_store

    n = SHARD * SHARDS
    data = np.random.default_rng(0).standard_normal((n, 256, 64, 64)).astype(np.float16)
    url = str(bench.work / "durability.zarr")
    times: dict[bool, list[float]] = {True: [], False: []}
    for r in range(REPEATS):
        for durable in (False, True) if r % 2 == 0 else (True, False):
            note(f"section 8: {'with' if durable else 'without'} fsync, run {r + 1}/{REPEATS}")
            times[durable].append(_write(url, data, durable))
    remove_store(url)  # the scratch store (only its own files)
    mb = data.nbytes / 1e6
    rows = []
    for durable in (False, True):
        s = median(times[durable])
        rows.append([("with" if durable else "without") + " fsync", f"{s * 1000 / SHARDS:.1f} ms",
                     f"{mb / s:.0f} MB/s", f"{s / median(times[False]):.2f}x"])
    extra = (median(times[True]) - median(times[False])) * 1000 / SHARDS
    fs_type = _fs_type(bench.work)
    return "\n".join([f"## 8. durability: cost of fsync ({SHARDS} shards of {SHARD} float16 samples, "
                      f"{mb / SHARDS:.0f} MB each, on {fs_type}; median of {REPEATS})",
                      table(rows, ["store writer", "per shard", "throughput", "time vs no fsync"]),
                      f"fsync adds {extra:.1f} ms per shard (shard file + its folder, and the done/height/width/"
                      "hash chunks and zarr.json each with their folder)"])


def _fs_type(path) -> str:
    """The filesystem type holding ``path`` (from /proc/mounts; 'unknown' elsewhere)."""
    try:
        best, kind = "", "unknown"
        real = os.path.realpath(path)
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 2 and real.startswith(parts[1]) and len(parts[1]) > len(best):
                    best, kind = parts[1], parts[2]
        return f"{kind} ({best})"
    except OSError:
        return "unknown"
