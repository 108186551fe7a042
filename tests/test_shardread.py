"""cache.shardread decodes shard files by hand: it must give zarr's bytes exactly, and
refuse damaged files instead of returning garbage."""
from __future__ import annotations

import numpy as np
import pytest

from cache import FeatureStore, Listing, StoreWriter, make_signature
from cache.shardread import layout, read_rows


def _store(url, dtype, n=10, shard=4, skip=(), compression="none"):
    data = np.random.default_rng(2).standard_normal((n, 256, 64, 64)).astype(np.float32)
    sig = make_signature(encoder="e", checkpoint_sha256="0" * 64, img_size=256, preprocessing={}, precision="fp32",
                         dataset_kind="k", dataset_signature="1" * 64, dtype=dtype)
    lst = Listing(ids=[str(i) for i in range(n)], labels=[0] * n, splits=[""] * n, groups=[""] * n, slices=[-1] * n)
    with StoreWriter.open(url, signature=sig, listing=lst, shard_size=shard, compression=compression) as w:
        for a, b in w.pending():
            if a not in skip:
                w.write_shard(a, data[a:b])
    return data


@pytest.mark.parametrize("compression", ["none", "lz4"])
@pytest.mark.parametrize("dtype", ["float16", "int8", "float32"])
def test_rows_equal_zarr(tmp_path, dtype, compression):
    url = str(tmp_path / "s.zarr")
    _store(url, dtype, skip=(4,), compression=compression)  # shard 1 never written: reads as the fill value
    s = FeatureStore(url, require_complete=False)
    lay = layout(s.embeddings, s.group.store.root)
    assert lay is not None and lay["shard"] == 4 and lay["blosc"] == (compression == "lz4")
    ref = s.embeddings[:]
    for rows in (np.arange(10), np.array([1, 5, 8, 9]), np.array([3]), np.array([0, 1, 2, 3, 9])):
        out = np.empty((len(rows), 256, 64, 64), dtype)
        read_rows(lay, rows, out)
        assert np.array_equal(out.view(np.uint8), ref[rows].view(np.uint8)), rows
        back = np.empty_like(out)  # each row to a given place: here the reverse order
        read_rows(lay, rows, back, dest=np.arange(len(rows))[::-1])
        assert np.array_equal(back[::-1].view(np.uint8), ref[rows].view(np.uint8)), rows
    assert not ref[4:8].any()


@pytest.mark.parametrize("compression", ["none", "lz4"])
def test_damage_is_refused_and_other_stores_fall_back(tmp_path, compression):
    url = str(tmp_path / "s.zarr")
    _store(url, "float16", compression=compression)
    s = FeatureStore(url, require_complete=False)
    lay = layout(s.embeddings, s.group.store.root)
    shard = tmp_path / "s.zarr" / "embeddings" / "c" / "1" / "0" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[-10] ^= 0xFF  # a bit of the index
    shard.write_bytes(bytes(raw))
    for rows in (np.arange(4, 8), np.array([5])):  # whole-file and per-chunk reads
        with pytest.raises(ValueError, match="checksum"):
            read_rows(lay, rows, np.empty((len(rows), 256, 64, 64), np.float16))
    shard.write_bytes(bytes(raw[:40]))  # shorter than its index
    with pytest.raises(ValueError, match="truncated"):
        read_rows(lay, np.array([5]), np.empty((1, 256, 64, 64), np.float16))
    # not a local folder: no direct path (callers use zarr)
    mem = "memory://shardread/s.zarr"
    _store(mem, "float16")
    m = FeatureStore(mem, require_complete=False)
    assert layout(m.embeddings, None) is None


@pytest.mark.parametrize("read_as", [np.float32, np.float16])
@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_feature_store_reads_local_stores_directly_and_equals_zarr(tmp_path, dtype, read_as):
    from cache import StoreError

    url = str(tmp_path / "s.zarr")
    _store(url, dtype)
    s = FeatureStore(url, require_complete=False)
    assert s._direct is not None
    for rows in (np.array([9, 2, 3, 2, 7, 9]), np.arange(3, 9)):  # any order, repeats; a sorted run
        got = s.read(rows, dtype=read_as)
        s._direct = None  # zarr's path, the one remote stores take
        want = s.read(rows, dtype=read_as)
        s = FeatureStore(url, require_complete=False)
        assert got.dtype == read_as and got.shape == (len(rows), 256, 64, 64) and np.array_equal(got, want)
    assert np.array_equal(s.load(dtype=np.float32), FeatureStore(url, require_complete=False).load(dtype=np.float32))
    shard = tmp_path / "s.zarr" / "embeddings" / "c" / "0" / "0" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:40])
    with pytest.raises(StoreError, match="truncated.*re-extract"):
        FeatureStore(url, require_complete=False).read([1])
