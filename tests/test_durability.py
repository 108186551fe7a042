"""Durable, not just atomic: a shard's bytes and the rename that made it are fsynced
(file, then folder) before its samples are marked done, and ``complete: true`` is written
after everything it vouches for is on disk. Checked by recording the real ``os.fsync``
calls and zarr's real key writes on a real store, in the order they happen."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
import zarr
import zarr.storage._local as zlocal

from cache import FeatureStore, Listing, StoreWriter, make_signature, shardwrite
from cache import io as store_io


class Recorder:
    """Events ("put", key) and ("fsync", path relative to the store) in call order."""

    def __init__(self, root: Path, monkeypatch):
        self.root = Path(root).resolve()
        self.events: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        real_fsync, real_put = os.fsync, zlocal._put

        def fsync(fd):
            real_fsync(fd)  # the real call first: recorded only once it has returned
            self._add("fsync", os.readlink(f"/proc/self/fd/{fd}"))

        def put(path, value, exclusive=False):
            n = real_put(path, value, exclusive=exclusive)
            self._add("put", str(path))
            return n

        real_direct = shardwrite._put

        def direct(path, *args):  # cache.shardwrite's own shard files (local uncompressed stores)
            real_direct(path, *args)
            self._add("put", str(path))

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(zlocal, "_put", put)
        monkeypatch.setattr(shardwrite, "_put", direct)

    def _add(self, kind: str, path: str) -> None:
        p = Path(path).resolve()
        rel = p.relative_to(self.root).as_posix() if p.is_relative_to(self.root) else None
        if rel is not None:
            with self._lock:
                self.events.append((kind, rel or "."))

    def index(self, kind: str, key: str, nth: int = 0) -> int:
        hits = [i for i, e in enumerate(self.events) if e == (kind, key)]
        assert len(hits) > nth, (kind, key, self.events)
        return hits[nth]


def _sig():
    return make_signature(encoder="litemedsam", checkpoint_sha256="ab" * 32, img_size=256, preprocessing={},
                          precision="fp32", dataset_kind="synthetic", dataset_signature="cd" * 32, dtype="float16")


def test_shard_and_its_rename_are_on_disk_before_done_and_complete(tmp_path, monkeypatch):
    url = tmp_path / "s.zarr"
    listing = Listing(ids=["a", "b", "c", "d"], labels=[0, 1, 0, 1], splits=["train"] * 4, groups=[""] * 4,
                      slices=[-1] * 4)
    w = StoreWriter.open(str(url), signature=_sig(), listing=listing, shard_size=2)
    rec = Recorder(url, monkeypatch)
    data = np.random.default_rng(0).standard_normal((4, 256, 64, 64)).astype(np.float32)
    for k, (a, b) in enumerate(w.pending()):
        w.write_shard(a, data[a:b])
        w.mark_done(a, [8, 8], [8, 8], ["h", "h"], [False, False])
        shard = f"embeddings/c/{k}/0/0/0"
        done = rec.index("put", "done/c/0", nth=k)
        # the shard file, then its folder (the rename), both synced before the done flag is written
        assert rec.index("put", shard) < rec.index("fsync", shard) < rec.index("fsync", f"embeddings/c/{k}/0/0") < done
        for name in ("height", "width", "hash"):  # what a done sample vouches for, too ("failed" is all
            assert rec.index("fsync", f"{name}/c/0", nth=k) < done  # fill value here: zarr writes no chunk)
    w.commit()
    w.close()
    puts = [i for i, e in enumerate(rec.events) if e[0] == "put"]
    # every key written is synced before the next key is written: zarr's write order is the disk's order
    for i, j in zip(puts, puts[1:] + [len(rec.events)]):
        assert ("fsync", rec.events[i][1]) in rec.events[i + 1:j], rec.events[i:j]
    last_done_sync = max(i for i, e in enumerate(rec.events) if e == ("fsync", "done/c/0"))
    assert rec.events[puts[-1]] == ("put", "zarr.json") and puts[-1] > last_done_sync
    assert ("fsync", ".") in rec.events[puts[-1]:]  # the root folder: the rename of zarr.json
    assert FeatureStore(str(url)).attrs["complete"] is True


def test_extract_orders_every_shard_before_its_done_flag(tmp_path, monkeypatch):
    """The real stage-one path (writer thread, tiny random-weight encoder)."""
    from PIL import Image
    from tiny_sam import make_tiny_sam_checkpoint

    from stages.extract import ExtractConfig, extract

    ckpt = make_tiny_sam_checkpoint(tmp_path / "sam16.pth", embed_dim=16, depth=1, global_attn=(0,), num_heads=1)
    for i in range(6):
        (tmp_path / "data" / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((16, 16), 30 * i, np.uint8)).save(tmp_path / "data" / "ab"[i % 2] / f"{i}.png")
    out = tmp_path / "s.zarr"
    rec = Recorder(tmp_path, monkeypatch)
    extract(ExtractConfig(dataset="imagefolder", data_root=str(tmp_path / "data"), out=str(out), encoder="sam",
                          checkpoint=str(ckpt), shard_size=2, batch_size=2, workers=0), progress=False)
    ev = [(k, p.removeprefix("s.zarr/")) for k, p in rec.events if p.startswith("s.zarr")]
    done_puts = [i for i, e in enumerate(ev) if e == ("put", "done/c/0")]
    assert len(done_puts) == 3
    for n, i in enumerate(done_puts, 1):  # the n-th done write comes after n shards are on disk
        synced = {p for k, p in ev[:i] if k == "fsync" and p.startswith("embeddings/c/") and p.count("/") == 5}
        assert len(synced) >= n, ev[:i]
    assert FeatureStore(str(out)).done.all()


def test_durability_can_be_turned_off_for_the_benchmark(tmp_path, monkeypatch):
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    store = store_io.open_store(tmp_path / "x", read_only=False)
    with store_io.durability(False):
        zarr.create_group(store=store, zarr_format=3)
    assert calls == []
    zarr.create_group(store=store_io.open_store(tmp_path / "y", read_only=False), zarr_format=3)
    assert len(calls) >= 2
    with pytest.raises(FileNotFoundError):
        store_io.fsync_path(tmp_path / "missing")
