"""HDF5 export and import: the round trip is exact (values, dtypes, attributes, shard bytes)."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from cache import FeatureStore, Listing, StoreError, StoreWriter, make_signature
from cache.hdf5 import export_hdf5, import_hdf5
from pipeline.cli import app


def _store(url: str, dtype: str, n: int = 7, shard: int = 4, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = (rng.standard_normal((n, 256, 64, 64)) * rng.uniform(0.1, 5, (n, 256, 1, 1))).astype(np.float32)
    sig = make_signature(encoder="litemedsam", checkpoint_sha256="ab" * 32, img_size=256,
                         preprocessing={"resize": "longest_side_area", "target": 256}, precision="fp32",
                         dataset_kind="synthetic", dataset_signature="cd" * 32, dtype=dtype)
    listing = Listing(ids=[f"p{i // 3}/slice_{i}.png" for i in range(n)], labels=[i % 3 for i in range(n)],
                      splits=(["train", "val", "test"] * n)[:n], groups=[f"p{i // 3}" for i in range(n)],
                      slices=[i % 3 for i in range(n)])
    with StoreWriter.open(url, signature=sig, listing=listing, classes=["a", "b", "c"], mask_classes=["bg", "lv"],
                          shard_size=shard, provenance={"dataset_root": "/data/x", "versions": {"torch": "9"}}) as w:
        for a, b in w.pending():
            w.write_shard(a, data[a:b])
            w.mark_done(a, list(range(10 + a, 10 + b)), [64] * (b - a), [f"hash{i}é" for i in range(a, b)],
                        [i == 5 for i in range(a, b)])
        w.commit({"failures": [{"id": "p1/slice_5.png", "error": "truncated"}]})
    return data


def _files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_round_trip_is_exact(tmp_path, dtype):
    src, back = tmp_path / "s.zarr", tmp_path / "back.zarr"
    data = _store(str(src), dtype)
    h5 = export_hdf5(str(src), tmp_path / "s.h5")
    with h5py.File(h5, "r") as f:
        assert f["embeddings"].dtype == np.dtype(dtype) and f["embeddings"].chunks == (1, 256, 64, 64)
        assert f["embeddings"].compression is None
        assert ("scale" in f) == (dtype == "int8")
        assert f["id"].asstr()[3] == "p1/slice_3.png"
        assert json.loads(f.attrs["classes"]) == ["a", "b", "c"] and f.attrs["num_samples"] == 7
    import_hdf5(h5, str(back))

    a, b = FeatureStore(str(src)), FeatureStore(str(back))
    assert a.attrs == b.attrs  # every attribute, nested ones included, with its type
    for name in ("embeddings", "id", "label", "split", "group", "slice", "height", "width", "hash", "done",
                 "failed") + (("scale",) if dtype == "int8" else ()):
        x, y = a.group[name][:], b.group[name][:]
        assert x.dtype == y.dtype and np.array_equal(x, y), name
    np.testing.assert_array_equal(a.read(range(7)), b.read(range(7)))
    if dtype == "float16":
        np.testing.assert_array_equal(b.read(range(7)), data.astype(np.float16).astype(np.float32))
    # same values through the same codec: the stores' files are byte for byte the same,
    # except zarr.json (attribute order may differ)
    fa, fb = _files(src), _files(back)
    assert fa.keys() == fb.keys()
    assert [k for k in fa if fa[k] != fb[k]] in ([], ["zarr.json"])
    assert json.loads(fa["zarr.json"]) == json.loads(fb["zarr.json"])


def test_cli_export_import_and_bad_input(tmp_path):
    src = tmp_path / "s.zarr"
    _store(str(src), "float16", n=5)
    runner = CliRunner()
    run = lambda *a: runner.invoke(app, list(a))  # noqa: E731
    r = run("export", str(src), "--format", "hdf5", "--out", str(tmp_path / "s.h5"), "--compression", "lzf")
    assert r.exit_code == 0, r.stderr
    with h5py.File(tmp_path / "s.h5", "r") as f:
        assert f["embeddings"].compression == "lzf"
    r = run("import", str(tmp_path / "s.h5"), "--out", str(tmp_path / "back.zarr"))
    assert r.exit_code == 0, r.stderr
    np.testing.assert_array_equal(FeatureStore(str(src)).load(), FeatureStore(str(tmp_path / "back.zarr")).load())
    # existing outputs are refused unless --overwrite, with a one-line message
    r = run("import", str(tmp_path / "s.h5"), "--out", str(tmp_path / "back.zarr"))
    assert r.exit_code == 2 and "--overwrite" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run("export", str(src), "--out", str(tmp_path / "s.h5"))
    assert r.exit_code == 2 and "--overwrite" in r.stderr
    r = run("export", str(src), "--out", str(tmp_path / "x.h5"), "--format", "parquet")
    assert r.exit_code == 2 and "only hdf5" in r.stderr
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(StoreError, match="not an HDF5 file"):
        import_hdf5(tmp_path / "junk.h5", str(tmp_path / "j.zarr"))
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(StoreError, match="not a feature-store export"):
        import_hdf5(tmp_path / "other.h5", str(tmp_path / "o.zarr"))
