"""Which codec for the embeddings? Size ratio and write/read speed on real embeddings.

    python benchmarks/bench_compressors.py --store cache/pneumonia.zarr --store cache/acdc.zarr
    python benchmarks/bench_compressors.py            # extracts 32 phantoms with litemedsam first

Each codec writes the same float16 embeddings with the store's layout (chunk = 1 sample,
shard = 32 samples, whole-shard writes) into a local folder, then reads them back shard
by shard, through zarr's generic path (what remote stores use) and through the direct
shard reader that FeatureStore uses for local stores (cache/shardread.py). Speeds are MB/s
of decoded float16 (page cache warm: median of runs 2..R); size ratio = raw bytes / bytes
on disk. The default of cache/schema.py (DEFAULT_COMPRESSION) is marked.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._util import machine, median, note, scratch_folder, table, timed  # noqa: E402

CODECS = [
    ("none", None),
    ("blosc lz4 shuffle", {"name": "blosc", "cname": "lz4", "clevel": 5, "shuffle": "shuffle"}),
    ("blosc lz4 bitshuffle", {"name": "blosc", "cname": "lz4", "clevel": 5, "shuffle": "bitshuffle"}),
    ("blosc zstd1 shuffle", {"name": "blosc", "cname": "zstd", "clevel": 1, "shuffle": "shuffle"}),
    ("blosc zstd1 bitshuffle", {"name": "blosc", "cname": "zstd", "clevel": 1, "shuffle": "bitshuffle"}),
    ("blosc zstd5 bitshuffle", {"name": "blosc", "cname": "zstd", "clevel": 5, "shuffle": "bitshuffle"}),
    ("zstd1", {"name": "zstd", "level": 1}),
    ("zstd3", {"name": "zstd", "level": 3}),
]


def codec(spec):
    from zarr.codecs import BloscCodec, ZstdCodec

    if spec is None:
        return None
    if spec["name"] == "blosc":
        return BloscCodec(cname=spec["cname"], clevel=spec["clevel"], shuffle=spec["shuffle"])
    return ZstdCodec(level=spec["level"])


def embeddings(args, work: Path) -> tuple[np.ndarray, str]:
    from cache import FeatureStore

    stores = list(args.store or [])
    if not stores:
        from stages.datasets import make_synthetic
        from stages.extract import ExtractConfig, extract

        root = make_synthetic(work / "syn", n_per_class=-(-args.samples // 3), size=256, seed=0)
        note(f"extracting {args.samples} phantoms with litemedsam (no --store given)")
        out = work / "phantoms.zarr"
        extract(ExtractConfig(dataset="synthetic", data_root=str(root), out=str(out)), progress=False)
        stores = [str(out)]
    parts, names = [], []
    per = -(-args.samples // len(stores))
    for url in stores:
        s = FeatureStore(url)
        if s.dtype == "int8":
            raise SystemExit(f"{url}: an int8 store; pass float16 or float32 stores")
        k = min(per, s.n)
        parts.append(s.load(np.linspace(0, s.n - 1, k).astype(int), dtype=np.float16))
        names.append(f"{Path(url).name} ({s.attrs.get('encoder')}, {k} samples)")
    return np.concatenate(parts)[:args.samples], ", ".join(names)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", action="append", help="a complete feature store to take embeddings from (repeatable)")
    p.add_argument("--samples", type=int, default=64, help="embeddings to use (spread over the stores)")
    p.add_argument("--shard", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work", default=None)
    args = p.parse_args(argv)
    import zarr
    from zarr.storage import LocalStore

    from cache.schema import COMPRESSIONS, DEFAULT_COMPRESSION
    from cache.shardread import layout, read_rows

    work = scratch_folder(args.work, "bench_codecs_")  # codec.zarr is deleted there before each write
    data, source = embeddings(args, work)
    n = len(data)
    raw = data.nbytes
    rows = []
    for name, spec in CODECS:
        note(f"codec {name}")
        path = work / "codec.zarr"

        def write():
            shutil.rmtree(path, ignore_errors=True)
            arr = zarr.create_array(LocalStore(path), shape=data.shape, chunks=(1, *data.shape[1:]),
                                    shards=(args.shard, *data.shape[1:]), dtype="float16", compressors=codec(spec),
                                    fill_value=0)
            for a in range(0, n, args.shard):
                arr[a:a + args.shard] = data[a:a + args.shard]

        def read():
            arr = zarr.open_array(LocalStore(path, read_only=True))
            for a in range(0, n, args.shard):
                arr[a:a + args.shard]

        def direct():
            lay = layout(zarr.open_array(LocalStore(path, read_only=True)), path)
            out = np.empty((args.shard, *data.shape[1:]), np.float16)
            for a in range(0, n, args.shard):
                rows = np.arange(a, min(a + args.shard, n))
                read_rows(lay, rows, out[:len(rows)])

        tw = timed(write, args.repeats)
        disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        tr = timed(read, args.repeats)
        direct_ok = layout(zarr.open_array(LocalStore(path, read_only=True)), path) is not None
        td = timed(direct, args.repeats) if direct_ok else None
        back = zarr.open_array(LocalStore(path, read_only=True))[:]
        assert np.array_equal(back.view(np.uint16), data.view(np.uint16)), name  # lossless
        chosen = " *" if spec == COMPRESSIONS[DEFAULT_COMPRESSION] else ""
        rows.append([name + chosen, f"{raw / disk:.3f}x", f"{raw / median(tw[1:] or tw) / 1e6:.0f}",
                     f"{raw / median(tr[1:] or tr) / 1e6:.0f}", f"{raw / median(td[1:] or td) / 1e6:.0f}" if td else "-"])
    print("# bench_compressors: float16 embeddings, chunk 1 sample, shard "
          f"{args.shard} samples, local disk")
    print(f"machine: {machine()}")
    print(f"command: python benchmarks/bench_compressors.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"data: {n} embeddings ({raw / 2**20:.0f} MiB) from {source}")
    print()
    print(table(rows, ["codec", "size ratio", "write MB/s", "read MB/s (zarr)", "read MB/s (direct)"]))
    print("* = cache/schema.py DEFAULT_COMPRESSION; MB/s of decoded float16, warm page cache, median of runs 2.."
          f"{args.repeats}")


if __name__ == "__main__":
    main()
