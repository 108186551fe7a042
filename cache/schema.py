"""The feature-store format: one Zarr v3 group per store.

Layout (N samples, S = shard size)::

    STORE.zarr/
      zarr.json                 group attributes (see ATTRS below), ``complete`` written last
      embeddings/               (N,256,64,64) float16 (or float32 / int8), chunk = 1 sample,
                                shard = S samples: a 10k-sample store is ~N/S files, not N
      scale/                    (N,256) float32, only for int8 stores: per-channel dequant scale
      id/ label/ split/ group/ slice/       (N,) per-sample listing, written at creation
      height/ width/ hash/ done/ failed/    (N,) per-sample results, written after the shard
                                            holding the sample is durably on disk

Per-sample arrays are chunked in blocks of ``META_CHUNK`` samples (a multiple of S).
Only one process writes them (the writer thread, or the dask coordinator), so no two
writers ever touch the same chunk; embedding shards are written whole, by whoever
computed them.

Commit protocol (as in micro-sam's embedding cache): a shard is written and replaced
atomically, then its samples' ``done`` flags; ``complete: true`` goes into the group
attributes only once every sample is done. Readers refuse a store without it.
"""
from __future__ import annotations

FORMAT = "sam-feature-cache"
SCHEMA_VERSION = 1

EMBED_SHAPE = (256, 64, 64)
EMBEDDINGS = "embeddings"
SCALE = "scale"

# listing arrays (known before any image is encoded)
LISTING = ("id", "label", "split", "group", "slice")
# result arrays (filled as shards finish)
RESULTS = ("height", "width", "hash", "done", "failed")

DEFAULT_SHARD = 32
META_CHUNK = 4096

DTYPES = ("float16", "float32", "int8")

# Compressor, chosen by benchmarks/bench_compressors.py on real LiteMedSAM embeddings
# (PneumoniaMNIST + ACDC slices, float16): embeddings are dense and barely compress, so
# speed decides. Measured (2-core Xeon, page cache): none 1.00x size ratio / 523 MB/s
# read; blosc-lz4+shuffle 1.02x / 1008 MB/s; blosc-lz4+bitshuffle 1.12x / 1286 MB/s;
# blosc-zstd1+shuffle 1.11x / 775 MB/s; zstd1 1.08x / 562 MB/s.
COMPRESSOR = {"name": "blosc", "cname": "lz4", "clevel": 5, "shuffle": "bitshuffle"}

# Attributes that must match for a store to be reused (resume) or read against a
# dataset/encoder; anything else in the attributes is provenance.
SIGNATURE_KEYS = (
    "schema_version",
    "encoder",
    "checkpoint_sha256",
    "img_size",
    "preprocessing",
    "precision",
    "dataset_kind",
    "dataset_signature",
    "dtype",
)
