"""Reading a finished feature store (stage two, ``pipeline info``, export)."""
from __future__ import annotations

import json
import os
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import zarr

from . import io
from .shardread import layout, read_rows
from .schema import EMBEDDINGS, FORMAT, SCALE, SCHEMA_VERSION, SIGNATURE_KEYS
from .signature import IncompleteStoreError, StoreError, check_signature


def _runs(sorted_idx: np.ndarray) -> list[tuple[int, int, int]]:
    """Split sorted unique indices into (position, start, stop) runs of consecutive values."""
    if len(sorted_idx) == 0:
        return []
    breaks = np.flatnonzero(np.diff(sorted_idx) != 1) + 1
    bounds = np.concatenate([[0], breaks, [len(sorted_idx)]])
    return [(int(a), int(sorted_idx[a]), int(sorted_idx[b - 1]) + 1) for a, b in zip(bounds[:-1], bounds[1:])]


_PER_SAMPLE = (("ids", "id", object), ("labels", "label", np.int64), ("splits", "split", object),
               ("groups", "group", object), ("slices", "slice", np.int64), ("heights", "height", np.int64),
               ("widths", "width", np.int64), ("hashes", "hash", object), ("done", "done", bool),
               ("failed", "failed", bool))


def damaged(url: str, name: str, error: BaseException) -> StoreError:
    """StoreError naming the store and the file of it that could not be read.

    ``name``: the array being read ("" for the group itself). For a local store each
    candidate ``zarr.json`` is parsed to find the broken one; else the array's chunks are
    named (a truncated or corrupt chunk file)."""
    what = f"{type(error).__name__}: {error}".splitlines()[0][:160]
    if io.is_remote(url):
        where = f"{url.rstrip('/')}/{name + '/' if name else ''}zarr.json (or its chunks)"
    else:
        root = io.local_path(url)
        where = str(root / name / "c") if name else str(root / "zarr.json")
        for meta in [root / "zarr.json"] + ([root / name / "zarr.json"] if name else []):
            try:
                json.loads(meta.read_bytes())
            except (OSError, ValueError):
                where = str(meta)
                break
    return StoreError(f"{url}: the store is damaged, {where} cannot be read ({what}); "
                      "re-extract it (`pipeline extract ... --overwrite`)")


class FeatureStore:
    """A complete store, opened read-only.

    Per-sample arrays are loaded into memory at open (N strings and ints); embeddings
    stay on disk and are read by ``read`` (any indices) or all at once by ``load``. A
    local store of the standard layout is read by ``cache.shardread``: per shard one
    index read, then each wanted chunk decoded straight into the result (2x zarr's
    generic path in ``benchmarks/bench_extract.py``); remote stores go through zarr, one
    read per run of consecutive samples.
    """

    def __init__(self, url: str | os.PathLike, *, require_complete: bool = True,
                 storage_options: dict[str, Any] | None = None):
        self.url = str(url)
        if not io.exists(url, storage_options):
            raise StoreError(f"{url}: no feature store there; run `pipeline extract ... --out {url}` first")
        try:
            self.group: zarr.Group = io.open_group(url, "r", storage_options)
            self.attrs: dict[str, Any] = dict(self.group.attrs)
        except StoreError:
            raise
        except Exception as e:  # a damaged zarr.json: say which store and which file
            raise damaged(self.url, "", e) from None
        if self.attrs.get("format") != FORMAT:
            raise StoreError(f"{url}: not a feature store made by `pipeline extract`")
        if self.attrs.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(
                f"{url}: store schema {self.attrs.get('schema_version')} is not {SCHEMA_VERSION}; re-extract it"
            )
        if require_complete and self.attrs.get("complete") is not True:
            raise IncompleteStoreError(
                f"{url}: store is not complete (extraction was interrupted or is still running); "
                "re-run the same `pipeline extract` command to finish it"
            )
        self._reading = ""
        try:
            self._open_arrays(url)
        except StoreError:
            raise
        except Exception as e:
            raise damaged(self.url, self._reading, e) from None

    def _open_arrays(self, url) -> None:
        g = self.group
        self._reading = EMBEDDINGS
        self.embeddings: zarr.Array = g[EMBEDDINGS]
        self._reading = ""
        self.n = int(self.attrs["num_samples"])
        self.shard_size = int(self.attrs["shard_size"])
        for attr, name, dtype in _PER_SAMPLE:
            self._reading = name
            setattr(self, attr, np.asarray(g[name][:], dtype=dtype))
        self._reading = SCALE
        self._scale = g[SCALE] if SCALE in g else None
        self._reading = EMBEDDINGS
        self._direct = None if io.is_remote(url) else layout(self.embeddings, io.local_path(url))
        self._pos = {s: i for i, s in enumerate(self.ids)}

    # --- metadata -------------------------------------------------------------------
    @property
    def signature(self) -> dict[str, Any]:
        return {k: self.attrs.get(k) for k in SIGNATURE_KEYS}

    @property
    def classes(self) -> list[str]:
        return list(self.attrs.get("classes", []))

    @property
    def mask_classes(self) -> list[str]:
        return list(self.attrs.get("mask_classes", []))

    @property
    def dtype(self) -> str:
        return str(self.embeddings.dtype)

    def check(self, wanted: Mapping[str, Any], keys: Sequence[str] = SIGNATURE_KEYS) -> None:
        """Refuse (SignatureMismatchError naming the field) if ``wanted`` differs."""
        check_signature(self.url, self.attrs, wanted, keys)

    def index(self, ids: Sequence[str]) -> np.ndarray:
        """Store rows of the given sample ids; KeyError-free: unknown ids raise StoreError."""
        try:
            return np.fromiter((self._pos[i] for i in ids), dtype=np.int64, count=len(ids))
        except KeyError as e:
            raise StoreError(f"{self.url}: sample {e.args[0]!r} is not in the store; re-extract it") from None

    def usable(self) -> np.ndarray:
        """Rows that hold an embedding (done and not failed)."""
        return np.flatnonzero(self.done & ~self.failed)

    # --- embeddings -----------------------------------------------------------------
    def read(self, indices: Sequence[int] | np.ndarray, dtype: np.dtype | type = np.float32) -> np.ndarray:
        """Embeddings of ``indices`` (any order, repeats allowed) -> (B,256,64,64) ``dtype``."""
        idx = np.asarray(indices, dtype=np.int64)
        uniq, first, inverse = np.unique(idx, return_index=True, return_inverse=True)
        in_order = np.array_equal(uniq, idx)
        if self._direct is None:  # zarr's generic path (remote stores)
            out = np.empty((len(uniq), *self.embeddings.shape[1:]), dtype=dtype)
            for pos, a, b in _runs(uniq):
                out[pos:pos + b - a] = self._convert(self.embeddings[a:b], np.arange(a, b), dtype)
            return out if in_order else out[inverse]
        if self._scale is not None:  # int8: dequantise, then order
            out = self._convert(self._read_direct(uniq), uniq, dtype)
            return out if in_order else out[inverse]
        out = np.empty((len(idx), *self.embeddings.shape[1:]), dtype=dtype)
        if out.dtype == self.embeddings.dtype:  # each sample straight to its place in the batch
            self._read_direct(uniq, out, first)
            repeats = np.flatnonzero(first[inverse] != np.arange(len(idx)))
            out[repeats] = out[first[inverse[repeats]]]
        else:  # order and convert in one pass per sample
            block = self._read_direct(uniq)
            for k, j in enumerate(inverse):
                out[k] = block[j]
        return out

    def _read_direct(self, rows: np.ndarray, out: np.ndarray | None = None,
                     dest: np.ndarray | None = None) -> np.ndarray:
        if out is None:
            out = np.empty((len(rows), *self.embeddings.shape[1:]), dtype=self.embeddings.dtype)
        try:
            read_rows(self._direct, rows, out, dest)
        except ValueError as e:
            raise StoreError(f"{e}; re-extract the store (`pipeline extract ... --overwrite`)") from None
        return out

    def _convert(self, block: np.ndarray, rows: np.ndarray, dtype) -> np.ndarray:
        """Stored values -> ``dtype``; int8 stores are multiplied by their per-channel scale."""
        if self._scale is not None:
            scale = np.concatenate([self._scale[a:b] for _, a, b in _runs(rows)])
            return (block.astype(np.float32) * scale[:, :, None, None]).astype(dtype, copy=False)
        return block.astype(dtype, copy=False)

    def _decode(self, a: int, b: int, dtype) -> np.ndarray:
        rows = np.arange(a, b)
        block = self._read_direct(rows) if self._direct is not None else self.embeddings[a:b]
        return self._convert(block, rows, dtype)

    def iter_shards(self, dtype=np.float32) -> Iterator[tuple[int, np.ndarray]]:
        """(start, embeddings) per shard, in order: the fastest full scan."""
        for a in range(0, self.n, self.shard_size):
            b = min(a + self.shard_size, self.n)
            yield a, self._decode(a, b, dtype)

    def load(self, indices: Sequence[int] | None = None, dtype=np.float16) -> np.ndarray:
        """All (or the given) embeddings in memory: N * 2 MiB at float16."""
        if indices is None:
            out = np.empty(self.embeddings.shape, dtype=dtype)
            for a, block in self.iter_shards(dtype):
                out[a:a + len(block)] = block
            return out
        return self.read(indices, dtype)

    def nbytes_on_disk(self) -> int | None:
        if io.is_remote(self.url):
            return None
        root = io.local_path(self.url)
        return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())

    def file_count(self) -> int | None:
        if io.is_remote(self.url):
            return None
        return sum(1 for p in io.local_path(self.url).rglob("*") if p.is_file())
