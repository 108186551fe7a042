"""Creating, resuming and committing a feature store (see ``schema`` for the layout)."""
from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from . import io, ownership, shardwrite
from .schema import (
    COMPRESSIONS,
    DEFAULT_COMPRESSION,
    DEFAULT_SHARD,
    DTYPES,
    EMBED_SHAPE,
    EMBEDDINGS,
    FORMAT,
    META_CHUNK,
    META_COMPRESSOR,
    SCALE,
    SCHEMA_VERSION,
)
from .signature import StoreError, check_signature

if TYPE_CHECKING:
    from .lease import Lease


@dataclass
class Listing:
    """The per-sample listing known before extraction (all arrays of length N)."""

    ids: Sequence[str]
    labels: Sequence[int]
    splits: Sequence[str]
    groups: Sequence[str]
    slices: Sequence[int]

    def __len__(self) -> int:
        return len(self.ids)


def compressor(spec: Mapping[str, Any] | None) -> BloscCodec | None:
    """The zarr codec of a ``schema.COMPRESSIONS`` entry (None: stored as raw bytes)."""
    if spec is None:
        return None
    return BloscCodec(cname=spec["cname"], clevel=spec["clevel"], shuffle=spec["shuffle"])


def quantize(emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-sample, per-channel int8: emb (B,256,64,64) float -> (q int8, scale (B,256)).

    Error bound: |x - q*scale| <= scale/2 = max|x_c| / 254 for every value of channel c."""
    amax = np.abs(emb).reshape(emb.shape[0], emb.shape[1], -1).max(axis=2)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.rint(emb / scale[:, :, None, None]).clip(-127, 127).astype(np.int8)
    return q, scale


def shard_ranges(n: int, shard: int) -> list[tuple[int, int]]:
    return [(s, min(s + shard, n)) for s in range(0, n, shard)]


def write_shard(group: zarr.Group, start: int, emb: np.ndarray) -> None:
    """Write the embeddings of one whole shard (rows start..start+len(emb)) in one piece.

    Used by the local writer thread and by dask workers alike; a whole-shard write
    never reads the old shard and replaces its file atomically. Local uncompressed stores
    write the shard file by hand (``shardwrite``: the same bytes, without zarr's per-chunk
    cost); anything else goes through zarr."""
    arr = group[EMBEDDINGS]
    stop = start + emb.shape[0]
    if str(arr.dtype) == "int8":
        q, scale = quantize(emb.astype(np.float32, copy=False))
        group[SCALE][start:stop] = scale
        data = q
    else:
        data = emb.astype(arr.dtype, copy=False)
    if not shardwrite.write_direct(arr, start, data):
        arr[start:stop] = data


def _half_created(url: str, storage_options: dict[str, Any] | None) -> bool:
    """A store of ours whose creation was interrupted before all its arrays existed."""
    attrs = dict(io.open_group(url, "r", storage_options).attrs)
    return attrs.get("format") == FORMAT and attrs.get("initialized") is False


class StoreWriter:
    """Owns the per-sample result arrays and the commit of one store.

    ``open`` creates a store, resumes a matching one, or refuses one that was made
    differently (``--overwrite`` replaces it). Whatever is at ``url`` must be ours first
    (``ownership``): anything else is refused, with or without ``overwrite``, and a store
    of ours is replaced by deleting only its own files. Shard size and compression are storage,
    not content: a resumed store keeps its own. Embedding shards go through
    ``write_shard``; ``mark_done`` then records the shard's samples; ``commit`` writes
    ``complete: true`` last.
    """

    def __init__(self, url: str, group: zarr.Group, lock: "io.StoreLock | Lease"):
        self.url = url
        self.group = group
        self.lock = lock
        self.n = int(group.attrs["num_samples"])
        self.shard_size = int(group.attrs["shard_size"])
        self.done = np.asarray(group["done"][:], dtype=bool)

    @classmethod
    def open(
        cls,
        url: str | os.PathLike,
        *,
        signature: Mapping[str, Any],
        listing: Listing,
        classes: Sequence[str] = (),
        mask_classes: Sequence[str] = (),
        shard_size: int = DEFAULT_SHARD,
        compression: str = DEFAULT_COMPRESSION,
        overwrite: bool = False,
        provenance: Mapping[str, Any] | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> "StoreWriter":
        url = str(url)
        dtype = signature["dtype"]
        if dtype not in DTYPES:
            raise StoreError(f"{url}: unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        if shard_size < 1 or META_CHUNK % shard_size:
            raise StoreError(f"shard size {shard_size} must divide {META_CHUNK}; use e.g. 16, 32 or 64")
        if compression not in COMPRESSIONS:
            raise StoreError(f"{url}: unknown compression {compression!r}; use one of {', '.join(COMPRESSIONS)}")
        lock = io.writer_lock(url, storage_options)
        try:
            # what is at --out must be ours before anything is deleted or written there
            kind = ownership.check_store_target(url, storage_options)
            if kind == "ours" and (overwrite or _half_created(url, storage_options)):
                ownership.remove_store(url, storage_options)  # a half-made creation holds no work
                kind = "absent"
            if kind == "ours":
                group = io.open_group(url, "r+", storage_options)
                check_signature(url, dict(group.attrs), signature)
                io.remove_partials(url)
                return cls(url, group, lock)
            io.remove_partials(url)  # temporaries of a creation killed before zarr.json existed
            group = cls._create(url, signature, listing, classes, mask_classes, shard_size, compression, provenance,
                                storage_options)
            return cls(url, group, lock)
        except BaseException:
            lock.release()
            raise

    @staticmethod
    def _create(url, signature, listing, classes, mask_classes, shard_size, compression, provenance,
                storage_options) -> zarr.Group:
        n = len(listing)
        if n == 0:
            raise StoreError(f"{url}: the dataset has no samples; nothing to extract")
        attrs = {
            "format": FORMAT,
            **dict(signature),
            "schema_version": SCHEMA_VERSION,
            "num_samples": n,
            "shard_size": shard_size,
            "compression": compression,
            "compressor": COMPRESSIONS[compression],
            "classes": list(classes),
            "mask_classes": list(mask_classes),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "complete": False,
            **dict(provenance or {}),
            "initialized": False,  # True once every array exists (see _half_created)
        }
        # zarr.json is born with the attributes (a killed creation is recognisably ours);
        # overwrite=False, never mode "w" (which clears the path): open() proved it free
        group = zarr.create_group(store=io.open_store(url, read_only=False, storage_options=storage_options),
                                  overwrite=False, zarr_format=3, attributes=attrs)
        dtype = signature["dtype"]
        group.create_array(
            EMBEDDINGS,
            shape=(n, *EMBED_SHAPE),
            chunks=(1, *EMBED_SHAPE),
            shards=(shard_size, *EMBED_SHAPE),
            dtype=dtype,
            compressors=compressor(COMPRESSIONS[compression]),
            fill_value=0,
            dimension_names=("sample", "channel", "y", "x"),
        )
        if dtype == "int8":
            group.create_array(SCALE, shape=(n, EMBED_SHAPE[0]), chunks=(shard_size, EMBED_SHAPE[0]),
                               dtype="float32", fill_value=1.0, compressors=None)
        meta = min(META_CHUNK, max(n, 1))

        def array(name, data, dtype):
            text = dtype is str
            a = group.create_array(name, shape=(n,), chunks=(meta,), dtype=dtype, fill_value=None if text else 0,
                                   compressors=None if text else compressor(META_COMPRESSOR))
            if data is not None:
                a[:] = np.asarray(data, dtype=object if dtype is str else dtype)
            return a

        array("id", listing.ids, str)
        array("label", listing.labels, "int32")
        array("split", listing.splits, str)
        array("group", listing.groups, str)
        array("slice", listing.slices, "int32")
        array("height", None, "int32")
        array("width", None, "int32")
        array("hash", [""] * n, str)
        array("done", None, "bool")
        array("failed", None, "bool")
        group.attrs.update({"initialized": True})
        return group

    def shards(self) -> list[tuple[int, int]]:
        return shard_ranges(self.n, self.shard_size)

    def pending(self) -> list[tuple[int, int]]:
        """Shard ranges holding at least one sample not yet done."""
        return [(a, b) for a, b in self.shards() if not self.done[a:b].all()]

    def write_shard(self, start: int, emb: np.ndarray) -> None:
        if start % self.shard_size:
            raise ValueError(f"shard start {start} is not a multiple of {self.shard_size}")
        write_shard(self.group, start, emb)

    def mark_done(self, start: int, heights, widths, hashes, failed) -> None:
        """Record a shard's samples as done; call only after its embeddings are written."""
        self.lock.check()  # a writer that lost its remote lease marks nothing more done
        stop = start + len(heights)
        self.group["height"][start:stop] = np.asarray(heights, dtype=np.int32)
        self.group["width"][start:stop] = np.asarray(widths, dtype=np.int32)
        self.group["hash"][start:stop] = np.asarray(hashes, dtype=object)
        self.group["failed"][start:stop] = np.asarray(failed, dtype=bool)
        self.group["done"][start:stop] = True
        self.done[start:stop] = True

    def commit(self, extra: Mapping[str, Any] | None = None) -> None:
        """Write ``complete: true`` (and ``extra`` provenance) once every sample is done."""
        if not self.done.all():
            missing = int((~self.done).sum())
            raise StoreError(f"{self.url}: {missing} samples not extracted yet; run the same command again")
        self.lock.check()
        attrs = dict(extra or {})
        attrs["failed_count"] = int(np.asarray(self.group["failed"][:]).sum())
        attrs["completed"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self.group.attrs.update(attrs)
        self.group.attrs.update({"complete": True})

    def close(self) -> None:
        self.lock.release()

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
