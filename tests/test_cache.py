"""The store format on its own: writer, reader, signatures, commit marker, lock, int8."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cache import (
    FeatureStore,
    IncompleteStoreError,
    Listing,
    SignatureMismatchError,
    StoreError,
    StoreWriter,
    make_signature,
    quantize,
)
from cache.summary import describe, format_summary


def signature(**over):
    base = dict(encoder="litemedsam", checkpoint_sha256="ab" * 32, img_size=256,
                preprocessing={"resize": "longest_side_area", "target": 256}, precision="fp32",
                dataset_kind="synthetic", dataset_signature="cd" * 32, dtype="float16")
    base.update(over)
    return make_signature(**base)


def listing(n: int) -> Listing:
    return Listing(ids=[f"img/{i:03d}.png" for i in range(n)], labels=[i % 3 for i in range(n)],
                   splits=["train", "val", "test"] * (n // 3) + ["train"] * (n % 3),
                   groups=[""] * n, slices=[-1] * n)


def fill(writer: StoreWriter, data: np.ndarray, shards=None) -> None:
    for a, b in shards if shards is not None else writer.pending():
        writer.write_shard(a, data[a:b])
        writer.mark_done(a, [20] * (b - a), [30] * (b - a), [f"h{i}" for i in range(a, b)], [False] * (b - a))


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return rng.standard_normal((10, 256, 64, 64)).astype(np.float32)


@pytest.mark.parametrize("compression", ["none", "lz4"])
def test_round_trip_shards_and_metadata(tmp_path, data, compression):
    url = str(tmp_path / "s.zarr")
    with StoreWriter.open(url, signature=signature(), listing=listing(10), classes=["a", "b", "c"],
                          shard_size=4, compression=compression) as w:
        assert w.pending() == [(0, 4), (4, 8), (8, 10)]
        fill(w, data)
        w.commit()
    s = FeatureStore(url)
    assert s.n == 10 and s.classes == ["a", "b", "c"]
    assert list(s.ids[:2]) == ["img/000.png", "img/001.png"]
    assert s.labels.tolist() == [i % 3 for i in range(10)]
    assert s.hashes[7] == "h7" and s.heights[3] == 20 and s.widths[3] == 30
    expected = data.astype(np.float16).astype(np.float32)
    idx = [9, 2, 3, 2, 5]
    np.testing.assert_array_equal(s.read(idx), expected[idx])
    np.testing.assert_array_equal(s.load(), expected.astype(np.float16))
    assert s.index(["img/004.png", "img/001.png"]).tolist() == [4, 1]
    with pytest.raises(StoreError, match="not in the store"):
        s.index(["nope"])
    # 10 samples, shard 4 -> 3 embedding files, not 10
    shard_files = [p for p in (tmp_path / "s.zarr" / "embeddings" / "c").rglob("*") if p.is_file()]
    assert len(shard_files) == 3
    attrs = json.loads((tmp_path / "s.zarr" / "zarr.json").read_text())["attributes"]
    assert attrs["complete"] is True and attrs["encoder"] == "litemedsam"
    assert attrs["compression"] == compression
    # raw shards hold exactly the float16 bytes plus the shard index (16 B per chunk + crc32c)
    raw = 256 * 64 * 64 * 2 * 4 + 16 * 4 + 4
    size = (tmp_path / "s.zarr" / "embeddings" / "c" / "0" / "0" / "0" / "0").stat().st_size
    assert size == raw if compression == "none" else size < raw
    assert describe(url)["compression"] == compression


def test_unknown_compression_is_refused(tmp_path):
    with pytest.raises(StoreError, match="unknown compression 'zip'; use one of none, lz4"):
        StoreWriter.open(str(tmp_path / "s.zarr"), signature=signature(), listing=listing(3), compression="zip")
    assert not (tmp_path / "s.zarr").exists()


def test_reader_refuses_incomplete_store(tmp_path, data):
    url = str(tmp_path / "s.zarr")
    with StoreWriter.open(url, signature=signature(), listing=listing(10), shard_size=4) as w:
        fill(w, data, shards=[(0, 4)])
    with pytest.raises(IncompleteStoreError, match="not complete"):
        FeatureStore(url)
    with pytest.raises(StoreError, match="samples not extracted"):
        with StoreWriter.open(url, signature=signature(), listing=listing(10), shard_size=4) as w:
            w.commit()
    summary = describe(url)
    assert summary["complete"] is False and summary["done"] == 4
    assert "INCOMPLETE (4/10 done" in format_summary(summary)


def test_resume_keeps_done_shards_and_gives_same_bytes(tmp_path, data):
    once, twice = str(tmp_path / "once.zarr"), str(tmp_path / "twice.zarr")
    with StoreWriter.open(once, signature=signature(), listing=listing(10), shard_size=4) as w:
        fill(w, data)
        w.commit()
    with StoreWriter.open(twice, signature=signature(), listing=listing(10), shard_size=4) as w:
        fill(w, data, shards=[(4, 8)])
    with StoreWriter.open(twice, signature=signature(), listing=listing(10), shard_size=4) as w:
        assert w.pending() == [(0, 4), (8, 10)]
        fill(w, data)
        w.commit()
    for name in ("0", "1", "2"):
        a = (tmp_path / "once.zarr" / "embeddings" / "c" / name / "0" / "0" / "0").read_bytes()
        b = (tmp_path / "twice.zarr" / "embeddings" / "c" / name / "0" / "0" / "0").read_bytes()
        assert a == b


@pytest.mark.parametrize("field,value", [
    ("encoder", "vit_b"),
    ("checkpoint_sha256", "ef" * 32),
    ("preprocessing", {"resize": "bilinear", "target": 256}),
    ("dataset_signature", "00" * 32),
])
def test_signature_mismatch_is_refused_naming_the_field(tmp_path, data, field, value):
    url = str(tmp_path / "s.zarr")
    with StoreWriter.open(url, signature=signature(), listing=listing(10), shard_size=4) as w:
        fill(w, data)
        w.commit()
    with pytest.raises(SignatureMismatchError, match=f"{field}: store has"):
        StoreWriter.open(url, signature=signature(**{field: value}), listing=listing(10), shard_size=4)
    with pytest.raises(SignatureMismatchError, match=field):
        FeatureStore(url).check(signature(**{field: value}))
    # --overwrite replaces it
    with StoreWriter.open(url, signature=signature(**{field: value}), listing=listing(10), shard_size=4,
                          overwrite=True) as w:
        assert len(w.pending()) == 3


def test_second_writer_is_refused_while_first_holds_the_lock(tmp_path):
    url = str(tmp_path / "s.zarr")
    first = StoreWriter.open(url, signature=signature(), listing=listing(10), shard_size=4)
    try:
        with pytest.raises(StoreError, match="another process is writing"):
            StoreWriter.open(url, signature=signature(), listing=listing(10), shard_size=4)
    finally:
        first.close()
    StoreWriter.open(url, signature=signature(), listing=listing(10), shard_size=4).close()


def test_int8_store_reads_back_within_its_stated_error(tmp_path, data):
    url = str(tmp_path / "q.zarr")
    with StoreWriter.open(url, signature=signature(dtype="int8"), listing=listing(10), shard_size=4) as w:
        fill(w, data)
        w.commit()
    back = FeatureStore(url).read(range(10))
    bound = np.abs(data).reshape(10, 256, -1).max(axis=2) / 254.0  # max|x_c| / 254 per channel
    err = np.abs(back - data).reshape(10, 256, -1).max(axis=2)
    assert (err <= bound * 1.0001 + 1e-7).all()
    size = sum(p.stat().st_size for p in (tmp_path / "q.zarr").rglob("*") if p.is_file())
    assert size < data.nbytes / 3.5  # about a quarter of float32


def test_quantize_handles_all_zero_channels():
    x = np.zeros((1, 256, 64, 64), np.float32)
    q, scale = quantize(x)
    assert (q == 0).all() and (scale == 1).all()


def test_not_a_store_and_missing_store(tmp_path):
    with pytest.raises(StoreError, match="no feature store"):
        FeatureStore(str(tmp_path / "missing.zarr"))
