"""Stores at fsspec URLs: a real S3-compatible server (moto's server mode on 127.0.0.1,
spoken to over HTTP by s3fs, no client mock) and fsspec's in-process ``memory://``."""
from __future__ import annotations

import numpy as np
import pytest
import s3fs
from s3_server import moto_s3

from cache import (
    FeatureStore,
    IncompleteStoreError,
    Listing,
    StoreWriter,
    make_signature,
)
from cache.hdf5 import export_hdf5, import_hdf5


@pytest.fixture(scope="module")
def s3():
    """(endpoint URL, storage options) of a fresh moto S3 server with bucket ``feat``."""
    with moto_s3("feat") as (endpoint, opts, _):
        yield endpoint, opts


def _sig(dtype="float16"):
    return make_signature(encoder="litemedsam", checkpoint_sha256="ab" * 32, img_size=256, preprocessing={},
                          precision="fp32", dataset_kind="synthetic", dataset_signature="cd" * 32, dtype=dtype)


def _listing(n):
    return Listing(ids=[f"i{k}" for k in range(n)], labels=[k % 2 for k in range(n)], splits=["train"] * n,
                   groups=[""] * n, slices=[-1] * n)


def _fill(w, data, shards=None):
    for a, b in shards if shards is not None else w.pending():
        w.write_shard(a, data[a:b])
        w.mark_done(a, [8] * (b - a), [9] * (b - a), [f"h{i}" for i in range(a, b)], [False] * (b - a))


@pytest.fixture(scope="module")
def data():
    return np.random.default_rng(1).standard_normal((6, 256, 64, 64)).astype(np.float32)


def test_s3_write_resume_read(s3, data):
    endpoint, opts = s3
    url = "s3://feat/run/s.zarr"
    with StoreWriter.open(url, signature=_sig(), listing=_listing(6), shard_size=4, storage_options=opts) as w:
        _fill(w, data, shards=[(0, 4)])
    # the objects are really on the server, seen by an independent client
    fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
    assert fs.exists("feat/run/s.zarr/zarr.json") and fs.exists("feat/run/s.zarr/embeddings/c/0/0/0/0")
    with pytest.raises(IncompleteStoreError):
        FeatureStore(url, storage_options=opts)
    with StoreWriter.open(url, signature=_sig(), listing=_listing(6), shard_size=4, storage_options=opts) as w:
        assert w.pending() == [(4, 6)]  # resumed from the server's state
        _fill(w, data)
        w.commit()
    s = FeatureStore(url, storage_options=opts)
    np.testing.assert_array_equal(s.read([5, 0, 3]), data[[5, 0, 3]].astype(np.float16).astype(np.float32))
    assert s.hashes.tolist() == [f"h{i}" for i in range(6)] and s.attrs["complete"] is True
    # --overwrite removes the remote store first
    with StoreWriter.open(url, signature=_sig("int8"), listing=_listing(6), shard_size=4, storage_options=opts,
                          overwrite=True) as w:
        assert len(w.pending()) == 2
        _fill(w, data)
        w.commit()
    q = FeatureStore(url, storage_options=opts)
    assert q.dtype == "int8"
    bound = np.abs(data).reshape(6, 256, -1).max(axis=2) / 254.0
    assert (np.abs(q.read(range(6)) - data).reshape(6, 256, -1).max(axis=2) <= bound * 1.0001 + 1e-7).all()


def test_memory_store_and_hdf5_between_s3_and_memory(s3, data, tmp_path):
    _, opts = s3
    mem = "memory://stores/m.zarr"
    with StoreWriter.open(mem, signature=_sig(), listing=_listing(6), shard_size=2) as w:
        _fill(w, data)
        w.commit()
    expected = data.astype(np.float16)
    np.testing.assert_array_equal(FeatureStore(mem).load(), expected)
    # memory -> HDF5 -> S3 -> HDF5 -> local: still the same values and attributes
    export_hdf5(mem, tmp_path / "a.h5")
    import_hdf5(tmp_path / "a.h5", "s3://feat/imported.zarr", storage_options=opts)
    export_hdf5("s3://feat/imported.zarr", tmp_path / "b.h5", storage_options=opts)
    import_hdf5(tmp_path / "b.h5", str(tmp_path / "local.zarr"))
    a, b = FeatureStore(mem), FeatureStore(str(tmp_path / "local.zarr"))
    np.testing.assert_array_equal(b.load(), expected)
    assert a.attrs == b.attrs and b.ids.tolist() == a.ids.tolist()
    # file:// URLs are local folders (with the local lock)
    url = f"file://{tmp_path}/f.zarr"
    with StoreWriter.open(url, signature=_sig(), listing=_listing(6), shard_size=2) as w:
        assert (tmp_path / "f.zarr.lock").exists()
        _fill(w, data)
        w.commit()
    assert (tmp_path / "f.zarr" / "zarr.json").exists()
    np.testing.assert_array_equal(FeatureStore(url).load(), expected)


def test_extract_cli_writes_to_s3(s3, tmp_path, tiny_sam_extract):
    """`pipeline extract --out s3://... --storage-option endpoint_url=...`, as a user runs it;
    the S3 store holds the same bytes as a local one."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    endpoint, opts = s3
    root, ckpt, local = tiny_sam_extract
    r = CliRunner().invoke(app, ["extract", "-d", "synthetic", "-r", str(root), "-e", "sam", "--checkpoint", str(ckpt),
                                 "--shard-size", "2", "--out", "s3://feat/x.zarr", "--storage-option",
                                 f"endpoint_url={endpoint}", "-q", "--workers", "0"])
    assert r.exit_code == 0, r.output
    s, ref = FeatureStore("s3://feat/x.zarr", storage_options=opts), FeatureStore(local)
    assert s.n == ref.n == 3
    np.testing.assert_array_equal(s.load(), ref.load())
    assert s.hashes.tolist() == ref.hashes.tolist()


@pytest.fixture(scope="module")
def tiny_sam_extract(tmp_path_factory):
    """(dataset root, tiny SAM checkpoint, local store) for 3 phantom images."""
    from tiny_sam import make_tiny_sam_checkpoint

    from stages.datasets import make_synthetic
    from stages.extract import ExtractConfig, extract

    d = tmp_path_factory.mktemp("remote")
    root = make_synthetic(d / "syn", n_per_class=1, size=64, seed=3)
    ckpt = make_tiny_sam_checkpoint(d / "tiny.pth")
    out = str(d / "local.zarr")
    extract(ExtractConfig(dataset="synthetic", data_root=str(root), out=out, encoder="sam", checkpoint=str(ckpt),
                          shard_size=2, workers=0), progress=False)
    return root, ckpt, out
