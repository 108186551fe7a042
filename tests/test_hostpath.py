"""Stage one's host path (stages/extract/hostpath.py): the store's bytes do not depend on where the
float16 cast runs, how many writer threads write, or whether buffers are reused."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from cache import FeatureStore, StoreWriter, shard_ranges
from stages.datasets import make_synthetic, open_dataset
from stages.extract import ExtractConfig, extract
from stages.extract.config import listing_of, store_signature
from stages.extract.hostpath import (
    BufferPool,
    PreparedDataset,
    default_writers,
    make_loader,
    out_dtype_for,
    run_shards,
)
from stages.extract.steps import make_encoder, shard_batches, torch_threads


def _shard_files(store: Path) -> dict[str, bytes]:
    root = store / "embeddings"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _old_way_store(cfg: ExtractConfig, out: Path) -> Path:
    """The store as the code before the host-path rework made it: float32 embeddings
    copied to the host, then cast by numpy (``write_shard``'s ``astype``) in the writer."""
    dataset = open_dataset(cfg.dataset, cfg.data_root)
    enc = make_encoder(cfg, "cpu")
    w = StoreWriter.open(str(out), signature=store_signature(enc, dataset, "fp32", cfg.dtype),
                         listing=listing_of(dataset), classes=dataset.classes, mask_classes=dataset.mask_classes,
                         shard_size=cfg.shard_size, overwrite=True)
    with w, torch_threads(1):
        for a, b in shard_ranges(len(dataset), cfg.shard_size):
            embs = [enc.forward(torch.stack([enc.prepare(dataset.load_image(i)) for i in batch])).cpu().numpy()
                    for batch in shard_batches([(a, b)], cfg.batch_size)]
            w.write_shard(a, np.concatenate(embs).astype(np.float32))
            w.mark_done(a, [64] * (b - a), [64] * (b - a), [dataset.content_hash(i) for i in range(a, b)],
                        [False] * (b - a))
        w.commit()
    return out


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("hp") / "syn", n_per_class=1, size=64, seed=1)


@pytest.mark.parametrize("dtype", ["float16", "float32", "int8"])
def test_store_bytes_equal_the_old_numpy_cast(tmp_path, tiny_root, tiny_sam_checkpoint, dtype):
    """3 images, shards of 2 (one full, one partial), batches of 2: the new path (cast fused with the copy into a reused shard buffer) writes
    the bytes the old float32 buffer + numpy ``astype`` wrote."""
    cfg = ExtractConfig(dataset="synthetic", data_root=str(tiny_root), out=str(tmp_path / "new.zarr"),
                        encoder="sam", checkpoint=str(tiny_sam_checkpoint), device="cpu", batch_size=2, workers=0,
                        threads=1, shard_size=2, dtype=dtype)
    extract(cfg, progress=False)
    ref = _old_way_store(cfg, tmp_path / "old.zarr")
    new_files, old_files = _shard_files(Path(cfg.out)), _shard_files(ref)
    assert len(new_files) >= 2 and new_files.keys() == old_files.keys()
    assert all(new_files[k] == old_files[k] for k in new_files), "embedding shard bytes differ"
    a, b = FeatureStore(cfg.out), FeatureStore(str(ref))
    assert a.dtype == dtype and (a.hashes == b.hashes).all() and a.done.all()


def test_torch_cast_rounds_like_numpy():
    """torch's float32->float16 (what the fused copy uses) equals numpy's astype on every
    non-NaN bit pattern sampled (subnormals, ties, overflow to inf included) and on the
    NaNs arithmetic makes, with and without the encoder threads' denormal flushing."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2**32, size=2_000_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    ties = (np.arange(-70000, 70000, 0.03125, dtype=np.float64)).astype(np.float32)  # exact halves, overflow
    tiny = np.float32(2.0 ** -24) * np.arange(-64, 64, 0.25, dtype=np.float32)  # float16 subnormals
    x = np.concatenate([x[~np.isnan(x)], ties, tiny, np.array([np.nan, -np.nan, 0.0, -0.0], np.float32)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy's "overflow in cast": the inf is the point
        want = x.astype(np.float16).view(np.uint16)
    for ftz in (False, True):
        torch.set_flush_denormal(ftz)
        try:
            got = torch.empty(len(x), dtype=torch.float16).copy_(torch.from_numpy(x)).numpy().view(np.uint16)
        finally:
            torch.set_flush_denormal(False)
        assert (got == want).all(), f"flush_denormal={ftz}: {int((got != want).sum())} values differ"


def _reference_and_writer(tmp_path, tiny_root, ckpt, shard: int, ref: str, new: str):
    """extract's own store ``<ref>.zarr`` (batches of ``shard``), plus the dataset, encoder
    and an open StoreWriter for ``<new>.zarr`` with the same signature, for a second path."""
    cfg = ExtractConfig(dataset="synthetic", data_root=str(tiny_root), out=str(tmp_path / f"{ref}.zarr"),
                        encoder="sam", checkpoint=str(ckpt), device="cpu", batch_size=shard, workers=0,
                        threads=1, shard_size=shard)
    extract(cfg, progress=False)
    dataset = open_dataset("synthetic", str(tiny_root))
    enc = make_encoder(cfg, "cpu")
    w = StoreWriter.open(str(tmp_path / f"{new}.zarr"), signature=store_signature(enc, dataset, "fp32", "float16"),
                         listing=listing_of(dataset), classes=dataset.classes, mask_classes=dataset.mask_classes,
                         shard_size=shard, overwrite=True)
    return cfg, dataset, enc, w


def test_parallel_writers_and_reused_buffers_give_the_same_store(tmp_path, tiny_root, tiny_sam_checkpoint):
    """run_shards with 3 writer threads and shards of one sample (buffers reused,
    mark_done serialised) against extract's default single writer."""
    cfg, dataset, enc, w = _reference_and_writer(tmp_path, tiny_root, tiny_sam_checkpoint, 1, "one", "three")
    out = tmp_path / "three.zarr"
    with w, torch_threads(1):
        shards = w.pending()
        loader = make_loader(PreparedDataset(dataset, enc.prepare, enc.img_size, False), shard_batches(shards, 1), 0,
                             torch.device("cpu"))
        assert run_shards(enc, loader, w, shards, torch.device("cpu"), None, len(dataset), False, dataset,
                          writers=3) == {}
        w.commit()
    assert _shard_files(out) == _shard_files(Path(cfg.out))
    a, b = FeatureStore(str(out)), FeatureStore(cfg.out)
    assert a.done.all() and (a.heights == b.heights).all() and (a.hashes == b.hashes).all()


def test_buffer_pool_reuses_and_bounds():
    pool = BufferPool(2, (2, 3), torch.float16, pin=False)
    a, b = pool.get(), pool.get()
    assert pool.made == 2 and b is not a and a.dtype == torch.float16 and a.shape == (2, 3)
    pool.put(a)
    assert pool.get() is a and pool.made == 2  # reused, not a third allocation
    import threading

    got: list = []
    t = threading.Thread(target=lambda: got.append(pool.get()))
    t.start()
    t.join(0.3)
    assert t.is_alive() and not got  # at the limit: waits for a buffer to come back
    pool.put(b)
    t.join(5)
    assert got[0] is b and pool.made == 2


def test_device_dtype_choices():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert out_dtype_for("float16", cuda) == torch.float16  # cast on the GPU: half the copy
    assert out_dtype_for("float16", cpu) == torch.float32  # CPU: fused into the buffer copy
    assert out_dtype_for("int8", cuda) == torch.float32  # quantised from float32
    assert default_writers(cpu) == 1 and default_writers(cuda) >= 1


@pytest.mark.cuda
def test_cuda_store_equals_the_old_device_to_host_path(tmp_path, tiny_root, tiny_sam_checkpoint):
    """On a GPU: float16 cast on the device, pinned reused buffers and asynchronous copies
    give the bytes of the old path on the same GPU (float32 copied back, numpy cast)."""
    cudnn = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True  # the same kernels in both runs
    try:
        _cuda_store_check(tmp_path, tiny_root, tiny_sam_checkpoint)
    finally:
        torch.backends.cudnn.deterministic = cudnn


def _cuda_store_check(tmp_path, tiny_root, tiny_sam_checkpoint):
    cfg = ExtractConfig(dataset="synthetic", data_root=str(tiny_root), out=str(tmp_path / "gpu.zarr"),
                        encoder="sam", checkpoint=str(tiny_sam_checkpoint), device="cuda", precision="fp32",
                        batch_size=2, workers=2, shard_size=2)
    extract(cfg, progress=False)
    dataset = open_dataset("synthetic", str(tiny_root))
    enc = make_encoder(cfg, "cuda")
    ref = np.concatenate([enc.forward(torch.stack([enc.prepare(dataset.load_image(i)) for i in batch]).cuda())
                          .cpu().numpy() for batch in shard_batches(shard_ranges(len(dataset), 2), 2)])
    got = FeatureStore(cfg.out).read(range(len(dataset)), dtype=np.float16)
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got.view(np.uint16), ref.astype(np.float16).view(np.uint16))


def _images():
    rng = np.random.default_rng(5)
    return [rng.integers(0, 256, (50, 60), dtype=np.uint8), rng.integers(0, 256, (70, 33, 3), dtype=np.uint8),
            rng.integers(0, 65535, (40, 41), dtype=np.uint16), rng.random((1500, 20)).astype(np.float32),
            rng.integers(0, 256, (30, 30, 4), dtype=np.uint8), rng.integers(0, 256, (64, 64, 1), dtype=np.uint8),
            np.repeat(rng.integers(0, 256, (45, 90, 1), dtype=np.uint8), 3, axis=2),  # gray stored as RGB
            np.repeat(rng.random((20, 30, 1)), 3, axis=2) * 1000.0]  # the same, float


def test_sam_preprocessing_halves_give_the_reference_bits():
    """Gray resized as one channel, the lookup-table normaliser, and the uint8 canvas
    finished on the device (here the CPU) all give the old float32 arithmetic's bits."""
    from stages.encoders.preprocess import finish_sam, prepare_sam, prepare_sam_reference, prepare_sam_u8

    imgs = _images()
    for img in imgs:
        assert prepare_sam(img, 1024).numpy().tobytes() == prepare_sam_reference(img).tobytes(), img.shape
    canvases = torch.stack([prepare_sam_u8(img, 1024) for img in imgs] + [torch.zeros(3, 1024, 1024, dtype=torch.uint8)])
    heights, widths = [i.shape[0] for i in imgs] + [0], [i.shape[1] for i in imgs] + [0]
    got = finish_sam(canvases, heights, widths, 1024).numpy()
    want = np.stack([prepare_sam_reference(img) for img in imgs] + [np.zeros((3, 1024, 1024), np.float32)])
    assert got.dtype == np.float32 and got.tobytes() == want.tobytes()


def test_gpu_preprocessing_split_gives_the_same_store_on_cpu(tmp_path, tiny_root, tiny_sam_checkpoint):
    """The CUDA loader's path (uint8 canvases from the workers, ``Encoder.finish`` on the
    device) run on the CPU: the same store bytes as the default float32 preprocessing."""
    cfg, dataset, enc, w = _reference_and_writer(tmp_path, tiny_root, tiny_sam_checkpoint, 2, "ref", "u8")
    out = tmp_path / "u8.zarr"
    with w, torch_threads(1):
        shards = w.pending()
        data = PreparedDataset(dataset, enc.prepare_host(), enc.img_size, False, dtype=torch.uint8)
        loader = make_loader(data, shard_batches(shards, 2), 1, torch.device("cpu"))  # a worker: shared-memory collate
        run_shards(enc, loader, w, shards, torch.device("cpu"), None, len(dataset), False, dataset)
        w.commit()
    assert _shard_files(out) == _shard_files(Path(cfg.out))


def test_written_shards_are_marked_done_in_merged_runs(tmp_path):
    """ShardWriter._mark on a real store: shards written out of order by several threads
    are marked in one call per adjacent run, each sample with its own results."""
    from cache import Listing, make_signature
    from stages.extract.hostpath import ShardWriter

    n = 8
    sig = make_signature(encoder="t", checkpoint_sha256="0" * 64, img_size=256, preprocessing={}, precision="fp32",
                         dataset_kind="t", dataset_signature="0" * 64, dtype="float16")
    listing = Listing(ids=[f"s{i}" for i in range(n)], labels=[0] * n, splits=["train"] * n, groups=[""] * n,
                      slices=[0] * n)
    w = StoreWriter.open(str(tmp_path / "m.zarr"), signature=sig, listing=listing, classes=["a"],
                         mask_classes=[], shard_size=2, overwrite=True)
    calls = []
    with w:
        real = w.mark_done
        w.mark_done = lambda start, *rest: (calls.append((start, len(rest[0]))), real(start, *rest))[1]
        sink = ShardWriter(w, threads=1)
        # shards at 4, 0, 2 (adjacent run 0..5) and 6 missing, then 6 alone
        sink.written = [(s, [s + 10, s + 11], [1, 1], [f"h{s}", f"h{s + 1}"], [False, s == 2])
                        for s in (4, 0, 2)]
        sink._mark()
        assert calls == [(0, 6)] and w.done[:6].all() and not w.done[6:].any()
        sink.written = [(6, [16, 17], [1, 1], ["h6", "h7"], [False, False])]
        sink._mark()
        assert calls[-1] == (6, 2) and w.done.all()
        assert list(w.group["height"][:]) == [10, 11, 12, 13, 14, 15, 16, 17]
        assert list(w.group["failed"][:]) == [False, False, False, True, False, False, False, False]
        assert list(w.group["hash"][:]) == [f"h{i}" for i in range(8)]
