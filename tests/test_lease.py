"""One writer per remote store: the lease object, between real processes on the loopback
S3 server (moto's server mode, spoken to over HTTP by s3fs)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from s3_server import moto_s3

from cache import Listing, StoreError, StoreWriter, make_signature
from cache.lease import Lease

REPO = Path(__file__).resolve().parents[1]
TTL = 2.0


@pytest.fixture(scope="module")
def s3():
    with moto_s3("lease", SAM_CACHE_LEASE_TTL=str(TTL)) as server:
        yield server


def _sig():
    return make_signature(encoder="litemedsam", checkpoint_sha256="ab" * 32, img_size=256, preprocessing={},
                          precision="fp32", dataset_kind="synthetic", dataset_signature="cd" * 32, dtype="float16")


def _listing(n=4):
    return Listing(ids=[f"i{k}" for k in range(n)], labels=[0] * n, splits=["train"] * n, groups=[""] * n,
                   slices=[-1] * n)


WRITER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from cache import Listing, StoreError, StoreWriter, make_signature
    sig = make_signature(encoder="litemedsam", checkpoint_sha256="ab" * 32, img_size=256, preprocessing={{}},
                         precision="fp32", dataset_kind="synthetic", dataset_signature="cd" * 32, dtype="float16")
    listing = Listing(ids=[f"i{{k}}" for k in range(4)], labels=[0] * 4, splits=["train"] * 4, groups=[""] * 4,
                      slices=[-1] * 4)
    try:
        w = StoreWriter.open({url!r}, signature=sig, listing=listing, shard_size=2,
                             storage_options={{"client_kwargs": {{"endpoint_url": {endpoint!r}}}}})
    except StoreError as e:
        print("refused:", e, flush=True)
        sys.exit(2)
    print("held", flush=True)
    time.sleep(float(sys.argv[1]))
    w.close()
    print("released", flush=True)
""")


def _writer(url: str, endpoint: str, hold: float) -> subprocess.Popen:
    code = WRITER.format(repo=str(REPO), url=url, endpoint=endpoint)
    return subprocess.Popen([sys.executable, "-c", code, str(hold)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "SAM_CACHE_LEASE_TTL": str(TTL)})


def test_second_writer_is_refused_while_the_first_runs_and_a_dead_one_expires(s3):
    endpoint, opts, fs = s3
    url = "s3://lease/a.zarr"
    first = _writer(url, endpoint, hold=60)
    try:
        assert first.stdout.readline().strip() == "held", first.stderr.read()
        second = _writer(url, endpoint, hold=0)
        out, err = second.communicate(timeout=60)
        assert second.returncode == 2 and "another process is writing this store" in out and url in out
        time.sleep(TTL * 1.5)  # longer than the TTL: the live writer's heartbeat keeps its lease
        with pytest.raises(StoreError, match=r"another process is writing.*a\.zarr\.lease"):
            StoreWriter.open(url, signature=_sig(), listing=_listing(), shard_size=2, storage_options=opts)
        first.send_signal(signal.SIGKILL)  # dies without releasing
        first.wait(timeout=30)
        with pytest.raises(StoreError, match="another process"):  # not yet expired
            StoreWriter.open(url, signature=_sig(), listing=_listing(), shard_size=2, storage_options=opts)
        time.sleep(TTL + 0.5)
        w = StoreWriter.open(url, signature=_sig(), listing=_listing(), shard_size=2, storage_options=opts)
        data = np.zeros((4, 256, 64, 64), np.float32)
        for a, b in w.pending():
            w.write_shard(a, data[a:b])
            w.mark_done(a, [8] * 2, [8] * 2, ["h"] * 2, [False] * 2)
        w.commit()
        w.close()
    finally:
        if first.poll() is None:
            first.kill()
    fs.invalidate_cache()
    assert not fs.exists("lease/a.zarr.lease")  # a clean close gives the lease back
    third = _writer(url, endpoint, hold=0)  # and the next writer gets it at once
    out, _ = third.communicate(timeout=60)
    assert third.returncode == 0 and "held" in out and "released" in out


def test_a_stalled_writer_that_lost_its_lease_marks_nothing_done(s3):
    endpoint, opts, fs = s3
    url = "s3://lease/b.zarr"
    w = StoreWriter.open(url, signature=_sig(), listing=_listing(), shard_size=2, storage_options=opts)
    w.lock._stop.set()  # the heartbeat stops, as in a process frozen longer than the TTL
    w.lock._thread.join()
    time.sleep(TTL + 0.5)
    other = Lease(url, opts).acquire()  # the lease expired: another writer takes it over
    try:
        with pytest.raises(StoreError, match="lost the writer lease"):
            w.mark_done(0, [8] * 2, [8] * 2, ["h"] * 2, [False] * 2)
        assert not np.asarray(w.group["done"][:]).any()
        w.close()  # does not delete the other writer's lease
        fs.invalidate_cache()
        assert fs.exists("lease/b.zarr.lease")
    finally:
        other.release()


def test_an_object_under_the_lease_name_that_is_not_a_lease_is_never_replaced(s3):
    endpoint, opts, fs = s3
    for n, body in enumerate((b"my own notes", b'{"owner": "me", "expires": 0}')):  # the second: another store's
        url = f"s3://lease/c{n}.zarr"
        fs.pipe(f"lease/c{n}.zarr.lease", body)
        with pytest.raises(StoreError, match=rf"c{n}\.zarr\.lease: exists and is not a writer lease"):
            StoreWriter.open(url, signature=_sig(), listing=_listing(), shard_size=2, storage_options=opts)
        fs.invalidate_cache()
        assert fs.cat(f"lease/c{n}.zarr.lease") == body and not fs.exists(f"lease/c{n}.zarr")


def test_memory_stores_are_guarded_in_process():
    a = Lease("memory://m/x.zarr").acquire()
    with pytest.raises(StoreError, match="another process"):
        Lease("memory://m/x.zarr").acquire()
    a.release()
    Lease("memory://m/x.zarr").acquire().release()
