"""Direct writes of whole embedding shards to a local, uncompressed store: the mirror of
``shardread``.

Through zarr, one shard costs 4-8 ms of zarr's single event-loop thread per 256x64x64
float16 sample (more than half of it in the per-chunk "is this chunk empty" test, which
builds a broadcast void view per chunk), against well under 1 ms for a plain write of
the same bytes: on a many-core GPU host that thread, not the GPU, caps stage one. The
store's layout is fixed (``schema``), so the shard file can be written by hand, byte for
byte what zarr 3.1 writes (``tests/test_shardwrite.py`` compares every file):

* the non-empty chunks (1 sample each, raw little-endian bytes, C order), in order;
* the index: per chunk a little-endian uint64 pair (offset, nbytes), ``2**64-1`` twice
  for an empty chunk; then the crc32c of the index as a little-endian uint32.

A chunk is empty when it equals the fill value 0 bit for bit: zarr (``NDBuffer.all_equal``)
compares float chunks against a zero fill value by their bit patterns, so a chunk of
-0.0 or one holding a NaN is stored, and only +0.0 everywhere is omitted (zarr's
``write_empty_chunks`` default, False, which ``plan`` requires). A shard whose chunks are
all empty has no file: zarr deletes it, and so does ``write_direct``.

The file is written to ``<name>.<uuid4 hex>.partial`` (the form of zarr's own temporaries,
which ``io.is_partial`` recognises and ``io.remove_partials`` sweeps after a kill), then
renamed over the shard, so a reader sees the old shard or the new one, never a mix. With
``io._FSYNC`` on and a ``DurableLocalStore`` (what ``io.open_group`` gives a writer), the
bytes and the rename are on disk before ``write_direct`` returns, as for zarr's path:
the ``done`` flags written next never describe a shard still in the page cache.

Anything else (remote stores, blosc-compressed shards, other codecs or layouts, a
non-zero fill value, ``write_empty_chunks``, a write that is not one whole shard) gets
None from ``plan`` or False from ``write_direct``, and the caller uses zarr.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import google_crc32c
import numpy as np
import zarr
from zarr.storage import LocalStore

from . import io
from .shardread import codec_endian, layout

_EMPTY = 2**64 - 1


def _zero_fill(arr: zarr.Array) -> bool:
    """The fill value is all zero bits (a fill of -0.0 would not be)."""
    fill = arr.metadata.fill_value
    if fill is None:
        return False
    dt = np.dtype(arr.dtype)
    return not np.asarray(fill, dtype=dt).reshape(1).view(np.uint8).any()


def plan(arr: zarr.Array) -> dict | None:
    """The facts a direct write of ``arr``'s shards needs, or None (write through zarr)."""
    store = arr.store
    if not isinstance(store, LocalStore) or store.read_only:
        return None
    dt = np.dtype(arr.dtype)
    if dt.kind not in "fiu" or not _zero_fill(arr) or arr.config.write_empty_chunks:
        return None
    lay = layout(arr, Path(store.root))
    if lay is None or lay["blosc"]:
        return None
    sh = arr.metadata.codecs[0]
    if codec_endian(sh.index_codecs[0]) != "little":
        return None
    return {**lay, "dtype": dt.newbyteorder("<"), "n": int(arr.shape[0]), "sample": tuple(arr.shape[1:]),
            "fsync": isinstance(store, io.DurableLocalStore)}


def shard_path(lay: dict, k: int) -> Path:
    """The file of shard ``k``: ``<root>/<array>/c/<k>/0/0/0`` (zarr's default chunk keys)."""
    key = lay["sep"].join(["c", str(k)] + ["0"] * (lay["ndim"] - 1))
    return lay["root"] / lay["name"] / key


def nonempty(rows: np.ndarray) -> np.ndarray:
    """Per sample of ``rows`` (C-contiguous, (B, ...)): does it differ from +0 in any bit?"""
    flat = rows.reshape(len(rows), -1).view(np.uint8)
    for word in (np.uint64, np.uint32, np.uint16):
        if flat.shape[1] % np.dtype(word).itemsize == 0:
            flat = flat.view(word)
            break
    if flat.shape[1] == 0:
        return np.zeros(len(flat), dtype=bool)
    keep = flat[:, 0] != 0  # real embeddings: decided by their first word, no scan
    for i in np.flatnonzero(~keep).tolist():  # zeros so far (failed samples): scan them whole
        keep[i] = flat[i].max() != 0  # max: twice as fast as any() on words
    return keep


def encode_index(keep: np.ndarray, shard: int, nbytes: int) -> bytes:
    """The shard index for chunks ``keep`` (bool, length <= shard) stored back to back."""
    index = np.full((shard, 2), _EMPTY, dtype="<u8")
    where = np.flatnonzero(keep)
    index[where, 0] = np.arange(len(where), dtype=np.uint64) * np.uint64(nbytes)
    index[where, 1] = nbytes
    raw = index.tobytes()
    return raw + google_crc32c.value(raw).to_bytes(4, "little")


def _runs(keep: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs [a, b) of True in ``keep``."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], keep.astype(np.int8), [0]))))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def _put(target: Path, flat: np.ndarray, keep: np.ndarray, tail: bytes, fsync: bool) -> None:
    """Write the kept rows of ``flat`` then ``tail`` to a temporary, then rename it over
    ``target`` (zarr's ``LocalStore`` ``_put``, for a shard held in pieces)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f"{target.name}.{uuid.uuid4().hex}.partial"
    try:
        with open(tmp, "xb") as f:
            for a, b in _runs(keep):  # consecutive non-empty samples: one write, straight from memory
                f.write(memoryview(flat[a:b]).cast("B"))
            f.write(tail)
            if fsync:
                f.flush()
                os.fsync(f.fileno())  # the bytes first, so the new name never points at a hole
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_direct(arr: zarr.Array, start: int, data: np.ndarray, lay: dict | None = None) -> bool:
    """Write ``data`` as the whole shard starting at row ``start`` of ``arr``, as zarr would;
    False (nothing written) when this store or this write is not one ``plan`` covers."""
    lay = plan(arr) if lay is None else lay
    if lay is None:
        return False
    s, n = lay["shard"], lay["n"]
    if start < 0 or start % s or start >= n or tuple(data.shape) != (min(s, n - start), *lay["sample"]):
        return False
    if data.dtype.kind not in "fiub":
        return False
    rows = np.ascontiguousarray(data, dtype=lay["dtype"])
    flat = rows.reshape(len(rows), -1).view(np.uint8)
    keep = nonempty(rows)
    target = shard_path(lay, start // s)
    fsync = lay["fsync"] and io._FSYNC["enabled"]
    if not keep.any():  # zarr stores no shard of fill values and deletes the old one
        if target.is_file():
            target.unlink()
            if fsync:  # the removal on disk too, or a crash could bring the old shard back
                io.fsync_path(target.parent)
        return True
    _put(target, flat, keep, encode_index(keep, s, flat.shape[1]), fsync)
    if fsync:
        io.fsync_path(target)  # and the rename (the folder), as DurableLocalStore does
    return True
