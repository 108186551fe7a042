"""Exporting a feature store to one HDF5 file (for HDF5 tools) and importing it back.

HDF5 layout (``h5py``), the same names as the Zarr store::

    FILE.h5
      /                       attributes: every store attribute; str, int, float and bool
                              natively, anything else (lists, dicts, null) as a JSON string,
                              named in the attribute ``json_attributes`` (a JSON list)
      embeddings              (N,256,64,64) in the store's dtype (float16, float32 or int8,
                              the raw stored values: int8 is *not* dequantised)
      scale                   (N,256) float32, int8 stores only: value = int8 * scale[:, :, None, None]
      id split group hash     (N,) UTF-8 variable-length strings
      label slice height width (N,) int32
      done failed             (N,) bool

``embeddings`` is chunked one sample per chunk (256x64x64), so reading one sample reads
one chunk; compression is off by default (embeddings barely compress, see
``schema.COMPRESSIONS``) and may be ``lzf`` or ``gzip``. The round trip is exact: import
writes the same values, dtypes and attributes into a new store through the usual commit
protocol (embeddings, then ``done``, then ``complete: true`` last), and with the same
codec the shard files come out byte for byte the same.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from . import io, ownership
from .reader import FeatureStore
from .schema import EMBEDDINGS, FORMAT, LISTING, RESULTS, SCALE, SIGNATURE_KEYS, compression_of
from .signature import StoreError
from .writer import Listing, StoreWriter

COMPRESSIONS = ("none", "lzf", "gzip")
_STRINGS = ("id", "split", "group", "hash")
_DTYPES = {"label": np.int32, "slice": np.int32, "height": np.int32, "width": np.int32,
           "done": np.bool_, "failed": np.bool_}


def _attrs_to_h5(attrs: dict[str, Any], target) -> None:
    encoded = []
    for k, v in attrs.items():
        if isinstance(v, (bool, int, float, str)):
            target[k] = v
        else:
            target[k] = json.dumps(v)
            encoded.append(k)
    target["json_attributes"] = json.dumps(encoded)


def _attrs_from_h5(source) -> dict[str, Any]:
    encoded = set(json.loads(source.get("json_attributes", "[]")))
    out = {}
    for k, v in source.items():
        if k == "json_attributes":
            continue
        if isinstance(v, bytes):
            v = v.decode()
        elif isinstance(v, np.generic):
            v = v.item()
        out[k] = json.loads(v) if k in encoded else v
    return out


def export_hdf5(store: str | os.PathLike, out: str | os.PathLike, *, compression: str = "none",
                overwrite: bool = False, storage_options: dict[str, Any] | None = None) -> Path:
    """Write the complete store ``store`` to the HDF5 file ``out``, one shard at a time
    (memory: one shard). Returns the file's path."""
    import h5py

    if compression not in COMPRESSIONS:
        raise ValueError(f"--compression {compression!r}: use one of {', '.join(COMPRESSIONS)}")
    out = Path(out)
    ownership.check_file_target(out, overwrite=overwrite, is_ours=is_export, what="feature-store HDF5 export")
    src = FeatureStore(store, storage_options=storage_options)
    emb = src.group[EMBEDDINGS]
    comp = None if compression == "none" else compression
    # a fresh temporary name, created exclusively ("w-"): never truncates a file of the user's
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        _write_export(h5py, src, emb, tmp, comp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)
    io.fsync_path(out)
    return out


def is_export(path: str | os.PathLike) -> bool:
    """An HDF5 file written by ``export_hdf5`` (its ``format`` attribute is ours)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            fmt = f.attrs.get("format")
    except (OSError, ValueError):
        return False
    return (fmt.decode() if isinstance(fmt, bytes) else fmt) == FORMAT


def _write_export(h5py, src: FeatureStore, emb, tmp: Path, comp) -> None:
    with h5py.File(tmp, "w-") as f:
        _attrs_to_h5(src.attrs, f.attrs)
        dset = f.create_dataset(EMBEDDINGS, shape=emb.shape, dtype=emb.dtype, chunks=(1, *emb.shape[1:]),
                                compression=comp)
        scale = None
        if SCALE in src.group:
            scale = f.create_dataset(SCALE, shape=src.group[SCALE].shape, dtype=np.float32, compression=comp)
        for a in range(0, src.n, src.shard_size):
            b = min(a + src.shard_size, src.n)
            dset[a:b] = emb[a:b]
            if scale is not None:
                scale[a:b] = src.group[SCALE][a:b]
        for name in _STRINGS:
            f.create_dataset(name, data=np.asarray(src.group[name][:], dtype=object),
                             dtype=h5py.string_dtype("utf-8"))
        for name, dt in _DTYPES.items():
            f.create_dataset(name, data=np.asarray(src.group[name][:], dtype=dt))


def import_hdf5(path: str | os.PathLike, store: str | os.PathLike, *, overwrite: bool = False,
                storage_options: dict[str, Any] | None = None) -> str:
    """Write the HDF5 export ``path`` into a new store ``store`` (same values, dtypes and
    attributes); ``complete`` is written last. Returns the store's URL."""
    import h5py

    path, store = Path(path), str(store)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such HDF5 file; make one with `pipeline export STORE --format hdf5`")
    if ownership.check_store_target(store, storage_options) == "ours" and not overwrite:
        raise StoreError(f"{store}: a feature store exists there; choose another --out or pass --overwrite")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise StoreError(f"{path}: not an HDF5 file ({e}); pass a file made by `pipeline export`") from None
    with f:
        attrs = _attrs_from_h5(f.attrs)
        missing = [n for n in (EMBEDDINGS, *LISTING, *RESULTS) if n not in f]
        if attrs.get("format") != FORMAT or missing:
            raise StoreError(f"{path}: not a feature-store export (missing {missing or 'format attribute'}); "
                             "pass a file made by `pipeline export STORE --format hdf5`")
        if not np.asarray(f["done"][:]).all():
            raise StoreError(f"{path}: the exported store was incomplete; export a complete store")
        emb = f[EMBEDDINGS]
        strings = {n: f[n].asstr()[:].astype(object) for n in _STRINGS}
        listing = Listing(ids=strings["id"], labels=f["label"][:], splits=strings["split"], groups=strings["group"],
                          slices=f["slice"][:])
        signature = {k: attrs[k] for k in SIGNATURE_KEYS if k in attrs}
        if str(emb.dtype) != signature.get("dtype"):
            raise StoreError(f"{path}: embeddings are {emb.dtype} but the attributes say {signature.get('dtype')}; "
                             "the file was modified, export it again")
        provenance = {k: v for k, v in attrs.items() if k not in SIGNATURE_KEYS and k != "complete"}
        writer = StoreWriter.open(store, signature=signature, listing=listing, classes=attrs.get("classes", []),
                                  mask_classes=attrs.get("mask_classes", []), shard_size=int(attrs["shard_size"]),
                                  compression=compression_of(attrs),
                                  overwrite=overwrite, provenance=provenance, storage_options=storage_options)
        with writer:
            g = writer.group
            for a, b in writer.shards():
                if SCALE in f:
                    g[SCALE][a:b] = f[SCALE][a:b]
                g[EMBEDDINGS][a:b] = emb[a:b]  # raw values: int8 stays int8, nothing re-quantised
                writer.mark_done(a, f["height"][a:b], f["width"][a:b], strings["hash"][a:b], f["failed"][a:b])
            # commit() would stamp a new completion time; the export's attributes are kept as they were
            g.attrs.update(provenance)
            g.attrs.update({"complete": True})
    return store


__all__ = ["COMPRESSIONS", "export_hdf5", "import_hdf5", "is_export"]
