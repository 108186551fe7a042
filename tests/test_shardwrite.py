"""cache.shardwrite writes shard files by hand: they must be byte for byte the files zarr
writes for the same data (so zarr, shardread and FeatureStore read them), and replace an
old shard atomically."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cache import (
    FeatureStore,
    Listing,
    StoreWriter,
    make_signature,
    quantize,
    shardwrite,
)
from cache.schema import EMBEDDINGS, SCALE


def _open(url, dtype, n, shard, compression="none"):
    sig = make_signature(encoder="e", checkpoint_sha256="0" * 64, img_size=256, preprocessing={}, precision="fp32",
                         dataset_kind="k", dataset_signature="1" * 64, dtype=dtype)
    lst = Listing(ids=[str(i) for i in range(n)], labels=[0] * n, splits=[""] * n, groups=[""] * n, slices=[-1] * n)
    return StoreWriter.open(url, signature=sig, listing=lst, shard_size=shard, compression=compression)


def _data(n, dtype):
    """Random samples, with the cases zarr's empty-chunk test decides: zeros (failed samples),
    a whole shard of zeros (rows 4..7), -0.0 everywhere (stored: not bitwise the fill), a NaN."""
    data = np.random.default_rng(3).standard_normal((n, 256, 64, 64)).astype(np.float32)
    data[[2, 4, 5, 6, 7]] = 0
    data[1] = -0.0
    if dtype == "int8":  # quantised: NaN and -0.0 do not survive, zeros do
        return data
    data[3, 7, 1, 2] = np.nan
    return data.astype(dtype)


def _files(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def _shard_files(root: Path) -> dict[str, bytes | None]:
    return {k: v for k, v in _files(root / EMBEDDINGS).items() if k != "zarr.json"}


def _zarr_write(w, a, b, data):
    """zarr's own path, what write_shard did before shardwrite."""
    if str(w.group[EMBEDDINGS].dtype) == "int8":
        q, scale = quantize(data[a:b])
        w.group[SCALE][a:b] = scale
        w.group[EMBEDDINGS][a:b] = q
    else:
        w.group[EMBEDDINGS][a:b] = data[a:b]


@pytest.mark.parametrize("shard,n", [(1, 9), (4, 9), (8, 9), (4, 8)])
@pytest.mark.parametrize("dtype", ["float16", "float32", "int8"])
def test_files_equal_zarr(tmp_path, dtype, shard, n, monkeypatch):
    data = _data(n, dtype)
    ref, mine = tmp_path / "ref.zarr", tmp_path / "mine.zarr"
    with _open(str(ref), dtype, n, shard) as w:
        for a, b in w.shards():
            _zarr_write(w, a, b, data)
    used = []
    real = shardwrite.write_direct
    monkeypatch.setattr(shardwrite, "write_direct", lambda *a, **k: used.append(real(*a, **k)) or used[-1])
    with _open(str(mine), dtype, n, shard) as w:
        assert shardwrite.plan(w.group[EMBEDDINGS]) is not None
        for a, b in w.shards():
            w.write_shard(a, data[a:b])  # the hook every writer uses
    assert used and all(used)  # every shard went the direct way
    got, want = _shard_files(mine), _shard_files(ref)
    assert list(got) == list(want) and got == want
    if shard == 4:  # rows 4..7 are all zeros: no file, as zarr does
        assert "c/1/0/0/0" not in got and "c/0/0/0/0" in got
    s = FeatureStore(str(mine), require_complete=False)
    assert s._direct is not None
    back = s.embeddings[:]
    zref = FeatureStore(str(ref), require_complete=False).embeddings[:]
    assert np.array_equal(back.view(np.uint8), zref.view(np.uint8))
    if dtype != "int8":
        assert np.array_equal(back.view(np.uint8), data.view(np.uint8))  # -0.0 and the NaN kept bit for bit
        assert np.signbit(back[1]).all() and np.isnan(back[3, 7, 1, 2])
    rows = np.array([0, 1, 3, 5, n - 1])
    assert np.array_equal(s.read(rows, dtype=np.float32), FeatureStore(str(ref), require_complete=False).read(
        rows, dtype=np.float32), equal_nan=True)


def test_empty_test_is_zarrs_bitwise_one():
    x = np.zeros((6, 4, 4), np.float16)
    x[1] = -0.0
    x[2, 3, 3] = np.nan  # past the first word: found by the full scan
    x[3, 0, 0] = np.float16(6e-8)  # the smallest subnormal: one bit set
    x[4, 3, 3] = -0.0
    assert shardwrite.nonempty(x).tolist() == [False, True, True, True, True, False]
    from zarr.core.buffer.cpu import (
        NDBuffer,  # zarr's own test, against the fill value 0.0
    )

    assert [not NDBuffer.from_numpy_array(r).all_equal(np.float16(0)) for r in x] == shardwrite.nonempty(x).tolist()
    y = np.zeros((3, 3), np.int8)  # 3 bytes a row: no wider word divides it
    y[2, 2] = -1
    assert shardwrite.nonempty(y).tolist() == [False, False, True]


def test_rewrite_replaces_atomically(tmp_path, monkeypatch):
    url = tmp_path / "s.zarr"
    shard_file = url / EMBEDDINGS / "c" / "0" / "0" / "0" / "0"
    a = np.random.default_rng(4).standard_normal((4, 256, 64, 64)).astype(np.float16)
    with _open(str(url), "float16", 6, 4) as w:
        w.write_shard(0, a)
        first = shard_file.read_bytes()
        w.write_shard(0, a[::-1].copy())  # replaced, not patched in place
        assert shard_file.read_bytes() != first
        assert np.array_equal(w.group[EMBEDDINGS][0:4], a[::-1])

        def boom(src, dst):
            raise OSError("disk full")

        monkeypatch.setattr(shardwrite.os, "replace", boom)
        before = shard_file.read_bytes()
        with pytest.raises(OSError, match="disk full"):
            w.write_shard(0, a)
        monkeypatch.undo()
        assert shard_file.read_bytes() == before  # the old shard, whole
        assert not list(url.rglob("*.partial"))  # no temporary left behind
        synced = []
        monkeypatch.setattr(shardwrite.io, "fsync_path", lambda p: synced.append(Path(p)))
        w.write_shard(0, np.zeros_like(a))  # all fill values: zarr deletes the shard file
        monkeypatch.undo()
        assert not shard_file.exists()
        assert synced == [shard_file.parent]  # the removal is made durable like a write
        assert not w.group[EMBEDDINGS][0:4].any()


def test_other_stores_and_writes_go_through_zarr(tmp_path):
    data = np.ones((4, 256, 64, 64), np.float16)
    with _open(str(tmp_path / "lz4.zarr"), "float16", 6, 4, compression="lz4") as w:
        assert shardwrite.plan(w.group[EMBEDDINGS]) is None  # blosc: zarr's path
        w.write_shard(0, data)
        assert np.array_equal(w.group[EMBEDDINGS][0:4], data)
    with _open("memory://shardwrite/s.zarr", "float16", 6, 4) as w:
        assert shardwrite.plan(w.group[EMBEDDINGS]) is None  # not a local folder
    with _open(str(tmp_path / "s.zarr"), "float16", 6, 4) as w:
        arr = w.group[EMBEDDINGS]
        lay = shardwrite.plan(arr)
        assert not shardwrite.write_direct(arr, 2, data[:2], lay)  # not a whole shard
        assert not shardwrite.write_direct(arr, 4, data[:3], lay)  # the last shard holds 2 rows
        assert not shardwrite.write_direct(arr, 0, data[:, :10], lay)  # wrong sample shape
        assert not shardwrite.write_direct(arr.with_config({"write_empty_chunks": True}), 0, data)
        assert not list((tmp_path / "s.zarr" / EMBEDDINGS).rglob("c"))  # none of them wrote anything
        w.write_shard(4, data[:2])
        assert np.array_equal(arr[4:6], data[:2])
