"""Direct reads of embedding shards of a local store: the shard index, then each wanted
chunk, decoded straight into the caller's array.

zarr's generic path reads a shard, decodes each chunk into a buffer and copies it into
the result (about twice the decode time on a memory-bound machine). The store's layout
is fixed (``schema``: chunk = 1 sample, shard = S samples, bytes(little), optionally
blosc, index at the end with a crc32c), so a shard can be decoded by hand: read its
index, check the checksum, then blosc-decompress each wanted chunk straight into its row
of ``out``, or, uncompressed (the default), ``readinto`` the row itself, one call per run
of chunks that are consecutive in both the file and ``out``: a plain file read.
Anything else (remote stores, other codecs, a future layout) gets None from ``layout``
and the caller uses zarr.

Shard file format (zarr v3 ``sharding_indexed``): the encoded chunks, then the index:
``S`` pairs of little-endian uint64 (offset, nbytes), 2**64-1 for a chunk never written
(it reads as the fill value 0), then 4 bytes of crc32c over the pairs.
"""
from __future__ import annotations

from pathlib import Path

import google_crc32c
import numpy as np
import zarr

_EMPTY = 2**64 - 1


def codec_endian(codec) -> str | None:
    e = getattr(codec, "endian", None)
    return None if e is None else str(getattr(e, "value", e))


def layout(arr: zarr.Array, root: Path | None) -> dict | None:
    """The facts a direct read needs, or None when this array is not the plain layout."""
    if root is None:
        return None
    meta = arr.metadata
    codecs = getattr(meta, "codecs", ())
    if len(codecs) != 1 or type(codecs[0]).__name__ != "ShardingCodec":
        return None
    sh = codecs[0]
    inner = [type(c).__name__ for c in sh.codecs]
    index = [type(c).__name__ for c in sh.index_codecs]
    if (inner not in (["BytesCodec", "BloscCodec"], ["BytesCodec"]) or index != ["BytesCodec", "Crc32cCodec"]
            or str(sh.index_location.value) != "end" or tuple(sh.chunk_shape) != (1, *arr.shape[1:])):
        return None
    endian = codec_endian(sh.codecs[0])
    if endian != "little" and not (endian is None and np.dtype(arr.dtype).itemsize == 1):
        return None
    enc = meta.chunk_key_encoding
    sep = getattr(enc, "separator", "/")
    if type(enc).__name__ != "DefaultChunkKeyEncoding":
        return None
    return {"root": root, "name": arr.path, "sep": sep, "shard": meta.chunk_grid.chunk_shape[0],
            "ndim": arr.ndim, "blosc": inner[-1] == "BloscCodec"}


def _index(path: Path, f, size: int, s: int) -> np.ndarray:
    tail = 16 * s + 4
    if size < tail:
        raise ValueError(f"{path}: shard file is truncated")
    f.seek(size - tail)
    raw = f.read(tail)
    if np.uint32(google_crc32c.value(raw[:-4])).tobytes() != raw[-4:]:
        raise ValueError(f"{path}: shard index checksum mismatch (damaged file)")
    return np.frombuffer(raw[:-4], dtype="<u8").reshape(s, 2)


def read_rows(lay: dict, rows: np.ndarray, out: np.ndarray, dest: np.ndarray | None = None) -> None:
    """Decode the samples ``rows`` (sorted, unique) into ``out[dest]`` (``out``: (M, *sample)
    of the stored dtype, C-contiguous; ``dest``: the position in ``out`` of each row,
    default 0..len(rows)-1). Per shard: one read of the index, then one read per wanted
    chunk, or per run of chunks that lie back to back in both the file and ``out``
    (uncompressed shards read whole in one call). Raises ValueError on a damaged file."""
    from numcodecs import blosc

    s = lay["shard"]
    flat = out.reshape(len(out), -1).view(np.uint8)
    size_of = flat.shape[1]
    dest = np.arange(len(rows)) if dest is None else np.asarray(dest)
    shard_of = rows // s
    bounds = np.flatnonzero(np.diff(shard_of)) + 1
    for grp in np.split(np.arange(len(rows)), bounds):
        if len(grp) == 0:
            continue
        k = int(shard_of[grp[0]])
        key = lay["sep"].join(["c", str(k)] + ["0"] * (lay["ndim"] - 1))
        path = lay["root"] / lay["name"] / key
        try:
            f = open(path, "rb", buffering=0)
        except FileNotFoundError:  # a shard never written: fill value
            out[dest[grp]] = 0
            continue
        with f:
            size = f.seek(0, 2)
            pairs = _index(path, f, size, s)
            j, end = 0, len(grp)
            while j < end:
                off, nb = (int(x) for x in pairs[rows[grp[j]] - k * s])
                d = int(dest[grp[j]])
                if off == _EMPTY:
                    out[d] = 0
                    j += 1
                    continue
                if off + nb > size or (not lay["blosc"] and nb != size_of):
                    raise ValueError(f"{path}: chunk {rows[grp[j]] - k * s} does not fit the file (damaged shard)")
                if lay["blosc"]:
                    f.seek(off)
                    blosc.decompress(f.read(nb), flat[d])
                    j += 1
                    continue
                run = 1  # raw chunks that follow each other in the file and in ``out``: one read
                while (j + run < end and dest[grp[j + run]] == d + run
                       and int(pairs[rows[grp[j + run]] - k * s, 0]) == off + run * nb
                       and int(pairs[rows[grp[j + run]] - k * s, 1]) == nb):
                    run += 1
                if off + run * nb > size:
                    raise ValueError(f"{path}: chunk {rows[grp[j]] - k * s} does not fit the file (damaged shard)")
                f.seek(off)
                if f.readinto(flat[d:d + run].reshape(-1)) != run * nb:
                    raise ValueError(f"{path}: shard file is truncated")
                j += run
