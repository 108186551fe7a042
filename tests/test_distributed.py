"""Stage one on dask.distributed: a LocalCluster of 2 worker processes writes the same
store, byte for byte, as one process; an interrupted run resumes per partition.

The encoder is a tiny random SAM ViT (tests/tiny_sam.py): it runs the real SAM code
path, is faster than LiteMedSAM on this CPU, and its float32 results do not depend on
the torch thread count (LiteMedSAM's oneDNN convolutions do, in the last bit; see
stages/extract/distributed.py), so the 1-thread workers can be compared with a 2-thread run.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from tiny_sam import make_tiny_sam_checkpoint

from cache import FeatureStore, IncompleteStoreError
from stages.datasets import make_synthetic
from stages.extract import ExtractConfig, extract
from stages.extract.distributed import extract_distributed, partition_size, partitions

distributed = pytest.importorskip("distributed")

ARRAYS = ("id", "label", "split", "group", "slice", "height", "width", "hash", "done", "failed")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(dataset root, checkpoint, single-process store): 9 phantoms in shards of 4 (the
    last holds one sample), batches of 3 (so batches [0-2] [3] [4-6] [7] [8]: never across a shard)."""
    d = tmp_path_factory.mktemp("dist")
    root = make_synthetic(d / "syn", n_per_class=3, size=64, seed=1)
    ckpt = make_tiny_sam_checkpoint(d / "tiny.pth")
    ref = str(d / "single.zarr")
    extract(_cfg(root, ckpt, ref), progress=False)
    return root, ckpt, ref


def _cfg(root, ckpt, out, **over) -> ExtractConfig:
    kw = dict(dataset="synthetic", data_root=str(root), out=str(out), encoder="sam", checkpoint=str(ckpt),
              shard_size=4, batch_size=3, workers=0)
    kw.update(over)
    return ExtractConfig(**kw)


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  silence_logs=40) as c:
        yield c


def assert_same_store(a_url: str, b_url: str) -> None:
    a, b = FeatureStore(a_url), FeatureStore(b_url)
    for name in ARRAYS:
        assert np.array_equal(a.group[name][:], b.group[name][:]), name
    assert a.signature == b.signature
    # the embedding shard files themselves are identical
    files = lambda s: {p.relative_to(s): p.read_bytes() for p in (s / "embeddings" / "c").rglob("*")  # noqa: E731
                       if p.is_file()}
    fa, fb = files(a.group.store.root), files(b.group.store.root)
    assert len(fa) == 3 and fa == fb


def test_partitions_are_whole_shards():
    shards = [(0, 2), (2, 4), (4, 6), (6, 8), (8, 9)]
    assert partitions(shards, 2) == [[(0, 2), (2, 4)], [(4, 6), (6, 8)], [(8, 9)]]
    assert partition_size(5, 2, "cpu") == 1 and partition_size(1000, 2, "cpu") == 4
    assert partition_size(1000, 2, "cuda") == 16 and partition_size(1000, 100, "cuda") == 3


def test_two_workers_write_the_single_process_store(setup, cluster, tmp_path):
    root, ckpt, ref = setup
    out = tmp_path / "dask.zarr"
    res = extract(_cfg(root, ckpt, out, scheduler=cluster.scheduler_address), progress=False)
    assert res.encoded == 9 and res.device == "dask (cpu)"
    assert_same_store(ref, str(out))
    # both worker processes took part (each built and cached the dataset and encoder)
    with distributed.Client(cluster) as client:
        cached = client.run(lambda: len(__import__("stages.extract.distributed", fromlist=["_CACHE"])._CACHE))
    assert sorted(cached.values()) == [2, 2]
    attrs = json.loads((out / "zarr.json").read_text())["attributes"]
    assert attrs["complete"] is True and attrs["device"] == "cpu"


def test_interrupted_run_resumes_per_partition(setup, cluster, tmp_path):
    root, ckpt, ref = setup
    out = tmp_path / "resume.zarr"
    client = distributed.Client(cluster)
    seen = []

    def stop_after_one(done, total):
        seen.append((done, total))
        raise KeyboardInterrupt  # what Ctrl-C in the coordinator does

    with client, pytest.raises(KeyboardInterrupt):
        extract_distributed(_cfg(root, ckpt, out), progress=False, client=client, on_partition=stop_after_one)
    assert seen == [(1, 3)]  # 3 shards, 2 workers: one shard per partition
    with pytest.raises(IncompleteStoreError):
        FeatureStore(str(out))
    done = FeatureStore(str(out), require_complete=False).done
    assert done.sum() in (1, 4)  # the partition that finished first: (0,4), (4,8) or (8,9)
    # the lock was released: a new run (here through the --scheduler path) finishes the rest
    res = extract(_cfg(root, ckpt, out, scheduler=cluster.scheduler_address), progress=False)
    assert res.encoded == 9 - done.sum()
    assert_same_store(ref, str(out))


def test_cli_local_cluster_with_a_bad_image(setup, tmp_path):
    """`pipeline extract --dask-workers 1 --skip-bad`: a LocalCluster of its own (one
    worker, to keep the test cheap); a broken file is recorded as failed, the other
    samples match the single-process store."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    root, ckpt, ref = setup
    bad_root = tmp_path / "syn"
    shutil.copytree(root, bad_root)
    victim = sorted((bad_root / "images").iterdir())[5]
    victim.write_bytes(victim.read_bytes()[:60])  # truncated PNG
    out = tmp_path / "bad.zarr"
    r = CliRunner().invoke(app, ["extract", "-d", "synthetic", "-r", str(bad_root), "-o", str(out), "-e", "sam",
                                 "--checkpoint", str(ckpt), "--shard-size", "4", "-b", "3", "--workers", "0",
                                 "--dask-workers", "1", "--skip-bad", "-q"])
    assert r.exit_code == 0, (r.output, r.stderr, repr(r.exception))
    assert "1 failed" in r.stdout and "skipped:" in r.stderr
    s, a = FeatureStore(str(out)), FeatureStore(ref)
    (i,) = np.flatnonzero(s.failed)
    assert victim.stem in s.ids[i]
    assert s.attrs["failures"][0]["id"] == s.ids[i]
    keep = np.flatnonzero(~s.failed)
    np.testing.assert_array_equal(s.read(keep), a.read(keep))
    assert (s.read([i]) == 0).all()


def test_parallel_streams_keep_batches_and_order(setup, tmp_path):
    """Single process, 3 encoder streams (threads) of one torch thread each: batches are
    encoded out of order but handed on in order, so the store is the same."""
    root, ckpt, ref = setup
    out = tmp_path / "streams.zarr"
    res = extract(_cfg(root, ckpt, out, streams=3, threads=3), progress=False)
    assert res.encoded == 9
    assert_same_store(ref, str(out))
