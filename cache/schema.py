"""The feature-store format: one Zarr v3 group per store.

Layout (N samples, S = shard size)::

    STORE.zarr/
      zarr.json                 group attributes (see ATTRS below), ``complete`` written last
      embeddings/               (N,256,64,64) float16 (or float32 / int8), chunk = 1 sample,
                                shard = S samples: a 10k-sample store is ~N/S files, not N;
                                raw bytes by default (see COMPRESSIONS)
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

# Embedding compression (``--compression``), measured by benchmarks/bench_compressors.py
# and bench_extract.py on real LiteMedSAM embeddings (float16): they are dense and barely
# compress (blosc-lz4+bitshuffle, the best of the fast codecs: 1.12x smaller; zstd-1:
# 1.08x), and decoding costs far more than reading. Uncompressed shards are read straight
# into the caller's array at the speed of a plain file read, so ``none`` is the default;
# ``lz4`` saves ~11% of disk for 4-6x slower reads (for disks billed by the byte).
COMPRESSIONS: dict[str, dict | None] = {
    "none": None,
    "lz4": {"name": "blosc", "cname": "lz4", "clevel": 5, "shuffle": "bitshuffle"},
}
DEFAULT_COMPRESSION = "none"
# the small per-sample arrays always use this one
META_COMPRESSOR = COMPRESSIONS["lz4"]


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


def compression_of(attrs) -> str:
    """The ``--compression`` a store was made with (stores older than the option: lz4)."""
    return attrs.get("compression") or ("lz4" if attrs.get("compressor") else "none")
