"""Reliability, through `pipeline extract` and the real store: bad images, bad
manifests, SIGKILL at random points, a second writer, readers during a write, a full
disk, changed images, and CUDA out-of-memory retries.

Encoder: a tiny random-weight SAM ViT (``tiny_sam``; ~0.3 s CPU per image, half of
LiteMedSAM's cost on 64 px images), run through the real ``sam`` registry entry.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_run import cli
from PIL import Image
from torch import nn

from cache import FeatureStore, IncompleteStoreError, StoreError
from cache.io import StoreLock
from stages.datasets import open_dataset
from stages.encoders import build_encoder
from stages.encoders.base import Encoder
from stages.extract.failures import failures_report_path
from stages.extract.hostpath import forward_resilient

REPO = Path(__file__).resolve().parents[1]


# --- helpers -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A SAM ViT smaller than the session's tiny one (embed 16, 1 block): the 256-channel
    neck is most of the cost that is left."""
    from tiny_sam import make_tiny_sam_checkpoint

    return make_tiny_sam_checkpoint(tmp_path_factory.mktemp("rel") / "sam16.pth", embed_dim=16, depth=1,
                                    global_attn=(0,), num_heads=1)


def sam_args(ckpt: Path) -> list[str]:
    return ["--encoder", "sam", "--checkpoint", str(ckpt)]


def extract_args(root: Path, out: Path, ckpt: Path, kind: str = "synthetic") -> list[str]:
    """The one command line of the crash/lock/disk tests: 6 shards of 2 samples."""
    return ["extract", "-d", kind, "-r", str(root), "-o", str(out), *sam_args(ckpt), "--shard-size", "2",
            "--batch-size", "2", "-q"]


def error_line(res) -> str:
    """The one stderr line of a failed command (asserts there is exactly one)."""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


def shard_files(store: Path) -> dict[str, bytes]:
    root = store / "embeddings" / "c"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def n_shards_written(store: Path) -> int:
    return len(list((store / "embeddings" / "c").glob("*/0/0/0")))  # final names only, not *.partial


def assert_same_store(a: Path, b: Path) -> None:
    assert shard_files(a) == shard_files(b)
    sa, sb = FeatureStore(a), FeatureStore(b)
    for name in ("ids", "heights", "widths", "hashes", "done", "failed"):
        assert (getattr(sa, name) == getattr(sb, name)).all(), name
    assert not list(a.rglob("*.partial"))


def assert_done_rows_match(store: Path, ref: Path) -> None:
    """Every sample marked done holds exactly the reference embedding: no sample is
    marked done before its shard is written."""
    if not (store / "zarr.json").exists() or store_attrs(store).get("initialized") is False:
        return  # killed while being created: holds no work, the re-run replaces it
    s, r = FeatureStore(store, require_complete=False), FeatureStore(ref)
    rows = np.flatnonzero(s.done)
    if len(rows):
        np.testing.assert_array_equal(s.read(rows, np.float16), r.read(rows, np.float16))
        assert (s.hashes[rows] == r.hashes[rows]).all()


def store_attrs(store: Path) -> dict:
    return json.loads((store / "zarr.json").read_text()).get("attributes", {})


@pytest.fixture(scope="module")
def ref_store(synthetic_root, ckpt, tmp_path_factory) -> Path:
    """The uninterrupted run every crash test must reproduce byte for byte."""
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    res = cli(*extract_args(synthetic_root, out, ckpt), "--workers", "0")
    assert res.exit_code == 0, res.output
    return out


def _png_claiming(path: Path, width: int, height: int) -> None:
    """A small PNG whose header claims ``width`` x ``height`` pixels (decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def _good(path: Path, seed: int = 0) -> None:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (24, 24), dtype=np.uint8)).save(path)


def _truncated(path: Path) -> None:
    _good(path, 1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD_IMAGES = {  # name -> (writer, words of the expected message)
    "truncated": (_truncated, "truncated or corrupt"),
    "not_an_image": (lambda p: p.write_text("just text, not pixels\n"), "not a readable image"),
    "empty": (lambda p: p.write_bytes(b""), "file is empty"),
    "1x1": (lambda p: Image.fromarray(np.zeros((1, 1), np.uint8)).save(p), "1x1 pixels"),
    "bomb": (lambda p: _png_claiming(p, 30000, 30000), "over the"),
}


def _folder_with(root: Path, bad: list[str]) -> Path:
    (root / "a").mkdir(parents=True)
    _good(root / "a" / "good.png")
    for name in bad:
        BAD_IMAGES[name][0](root / "a" / f"{name}.png")
    return root


def _npz(path: Path, poison: bool) -> Path:
    """A MedMNIST-style file of 4 float32 16x16 images; with ``poison`` row 1 holds a NaN
    and row 2 an inf."""
    x = np.random.default_rng(0).standard_normal((4, 16, 16)).astype(np.float32)
    if poison:
        x[1, 3, 3] = np.nan
        x[2, 0, 0] = np.inf
    np.savez(path, train_images=x, train_labels=np.array([[0], [1], [0], [1]]))
    return path


# --- bad images ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(BAD_IMAGES))
def test_bad_image_stops_extraction_naming_the_file(tmp_path, ckpt, kind):
    root = _folder_with(tmp_path / "d", [kind])
    out = tmp_path / "s.zarr"
    # --workers 1: the image is decoded in a DataLoader worker process, whose error must
    # still reach the user as the reader's one line
    res = cli("extract", "-d", "imagefolder", "-r", root, "-o", out, *sam_args(ckpt), "--workers", "1", "-q")
    assert res.exit_code == 2
    line = error_line(res)
    assert str(root / "a" / f"{kind}.png") in line and BAD_IMAGES[kind][1] in line and "--skip-bad" in line
    assert not FeatureStore(out, require_complete=False).done.any()
    with pytest.raises(IncompleteStoreError):
        FeatureStore(out)


def test_skip_bad_records_every_bad_image_and_goes_on(tmp_path, ckpt):
    root = _folder_with(tmp_path / "d", list(BAD_IMAGES))
    out = tmp_path / "s.zarr"
    res = cli("extract", "-d", "imagefolder", "-r", root, "-o", out, *sam_args(ckpt), "--workers", "1",
              "--skip-bad", "-q")
    assert res.exit_code == 0, res.output
    store = FeatureStore(out)
    bad_ids = {f"a/{k}.png" for k in BAD_IMAGES}
    assert {str(i) for i in store.ids[store.failed]} == bad_ids
    assert list(store.ids[store.usable()]) == ["a/good.png"]
    assert np.abs(store.read(store.usable())).max() > 0 and not store.read(np.flatnonzero(store.failed)).any()
    recorded = {f["id"]: f["error"] for f in store.attrs["failures"]}
    assert set(recorded) == bad_ids and store.attrs["failed_count"] == len(bad_ids)
    for kind, (_, words) in BAD_IMAGES.items():
        assert words in recorded[f"a/{kind}.png"]
        assert f"skipped: {root / 'a' / kind}.png" in res.stderr
    report = Path(failures_report_path(out))
    assert report == tmp_path / "s.zarr.failures.csv" and report.parent == out.parent  # beside, not inside
    import csv

    rows = list(csv.DictReader(report.open()))
    assert {r["id"]: r["error"] for r in rows} == recorded
    assert all(store.ids[int(r["row"])] == r["id"] for r in rows)
    assert str(report) in res.stdout and f"{len(bad_ids)} failed" in res.stdout
    # fix the files: --refresh-changed retries the failed samples whose file changed, and
    # the stale report goes away
    for kind in BAD_IMAGES:
        _good(root / "a" / f"{kind}.png", 2)
    res = cli("extract", "-d", "imagefolder", "-r", root, "-o", out, *sam_args(ckpt), "--workers", "0",
              "--refresh-changed", "-q")
    assert res.exit_code == 0, res.output
    assert not FeatureStore(out).failed.any() and not report.exists()


def test_nan_and_inf_in_npz(tmp_path, ckpt):
    npz = _npz(tmp_path / "poisoned.npz", poison=True)
    out = tmp_path / "s.zarr"
    args = ["extract", "-d", "medmnist", "-r", npz, "-o", out, *sam_args(ckpt), "--workers", "0", "-q"]
    res = cli(*args)
    assert res.exit_code == 2
    line = error_line(res)
    assert f"{npz}:train_images[1]" in line and "NaN/inf" in line
    res = cli(*args, "--skip-bad")
    assert res.exit_code == 0, res.output
    store = FeatureStore(out)
    assert store.failed.tolist() == [False, True, True, False]
    assert "train_images[2]" in Path(failures_report_path(out)).read_text()


def test_16_bit_and_float_images_extract(tmp_path, ckpt):
    rng = np.random.default_rng(0)
    (tmp_path / "d" / "a").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 65536, (20, 30), dtype=np.uint16)).save(tmp_path / "d" / "a" / "g16.png")
    Image.fromarray(rng.standard_normal((30, 20)).astype(np.float32) * 1e4).save(tmp_path / "d" / "a" / "f32.tif")
    out = tmp_path / "s.zarr"
    res = cli("extract", "-d", "imagefolder", "-r", tmp_path / "d", "-o", out, *sam_args(ckpt), "--workers", "0", "-q")
    assert res.exit_code == 0, res.output
    store = FeatureStore(out)
    assert not store.failed.any() and store.heights.tolist() == [30, 20] and store.widths.tolist() == [20, 30]
    emb = store.read([0, 1])
    assert np.isfinite(emb).all() and not np.array_equal(emb[0], emb[1])
    out2 = tmp_path / "n.zarr"
    res = cli("extract", "-d", "medmnist", "-r", _npz(tmp_path / "float.npz", poison=False), "-o", out2,
              *sam_args(ckpt), "--workers", "0", "-q")
    assert res.exit_code == 0, res.output
    assert FeatureStore(out2).usable().tolist() == [0, 1, 2, 3]


# --- refused before any work -------------------------------------------------------------

def _manifest(root: Path, rows: list[str], files: tuple[str, ...] = ("a.png", "b.png")) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for f in files:
        _good(root / f)
    (root / "manifest.csv").write_text("\n".join(["path,label,id", *rows]) + "\n")
    return root / "manifest.csv"


def _case(name: str, tmp: Path, ckpt: Path) -> tuple[list[str], str, str]:
    """(extract arguments after -r, expected words, path the message must name)."""
    sam = sam_args(ckpt)
    if name == "missing_file":
        m = _manifest(tmp / "d", ["a.png,x,", "gone.png,y,"])
        return ["csv", m, *sam], "do not exist", str(tmp / "d" / "gone.png")
    if name == "duplicate_ids":
        m = _manifest(tmp / "d", ["a.png,x,same", "b.png,y,same"])
        return ["csv", m, *sam], "duplicate id 'same'", str(m)
    if name == "unknown_label":
        m = _manifest(tmp / "d", ["a.png,x,", "b.png,z,"])
        return ["csv", m, *sam, "--option", 'classes=["x","y"]'], "unknown label 'z'", str(m)
    if name == "escaping_path":
        _good(tmp / "outside.png")
        m = _manifest(tmp / "d", ["a.png,x,", "../outside.png,y,"])
        return ["csv", m, *sam], "lead outside", str(m)
    if name == "empty_manifest":
        m = _manifest(tmp / "d", [])
        return ["csv", m, *sam], "manifest is empty", str(m)
    if name == "empty_folder":
        (tmp / "d").mkdir()
        return ["imagefolder", tmp / "d", *sam], "no class folders", str(tmp / "d")
    if name == "labels_do_not_match_images":
        x = np.zeros((3, 16, 16), np.uint8)
        np.savez(tmp / "m.npz", train_images=x, train_labels=np.zeros((2, 1), np.int64))
        return ["medmnist", tmp / "m.npz", *sam], "2 labels but train_images has 3 images", str(tmp / "m.npz")
    if name == "truncated_checkpoint":
        _manifest(tmp / "d", ["a.png,x,"])
        cut = tmp / "cut.pth"
        cut.write_bytes(ckpt.read_bytes()[:5000])
        return ["csv", tmp / "d", "--encoder", "sam", "--checkpoint", cut], "truncated", str(cut)
    raise KeyError(name)


@pytest.mark.parametrize("name", ["missing_file", "duplicate_ids", "unknown_label", "escaping_path",
                                  "empty_manifest", "empty_folder", "labels_do_not_match_images",
                                  "truncated_checkpoint"])
def test_bad_dataset_is_refused_before_any_work(tmp_path, ckpt, name):
    rest, words, names = _case(name, tmp_path, ckpt)
    kind, root, *more = rest
    out = tmp_path / "never.zarr"
    res = cli("extract", "-d", kind, "-r", root, "-o", out, *more, "-q")
    assert res.exit_code == 2
    line = error_line(res)
    assert words in line and names in line
    assert not out.exists() and not Path(f"{out}.lock").exists()


@pytest.mark.parametrize("flag,field", [(["--dtype", "int8"], "dtype: store has 'float16', asked for 'int8'"),
                                        (["--checkpoint", "OTHER"], "checkpoint_sha256: store has")])
def test_store_made_differently_is_refused_naming_the_field(tmp_path, synthetic_root, ckpt, ref_store, flag,
                                                            field):
    from tiny_sam import make_tiny_sam_checkpoint

    if flag[1] == "OTHER":
        flag = ["--checkpoint", str(make_tiny_sam_checkpoint(tmp_path / "o.pth", embed_dim=16, depth=1,
                                                             global_attn=(0,), num_heads=1, seed=1))]
    before = shard_files(ref_store)
    res = cli(*extract_args(synthetic_root, ref_store, ckpt), *flag)
    assert res.exit_code == 2 and field in error_line(res) and "--overwrite" in res.stderr
    assert shard_files(ref_store) == before


# --- crashes, concurrency, full disk -------------------------------------------------------

def test_sigkill_at_random_points_then_rerun_gives_identical_store(tmp_path, synthetic_root, ckpt, ref_store):
    """Three SIGKILLs, each once the run holds the store, after 0 or 1 more finished
    shards plus a random delay (so inside a decode, an encode or a shard write), then a
    plain re-run. The seed is in the failure message."""
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    out = tmp_path / "k.zarr"
    lock = Path(f"{out}.lock")
    cmd = [sys.executable, "-m", "pipeline", *extract_args(synthetic_root, out, ckpt), "--workers", "1"]
    for extra in rng.sample([0, 0, 1], 3):  # at most ~4 of the 6 shards get done before the last kill
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not (
                lock.exists() and lock.read_text().strip() == str(proc.pid) and (out / "zarr.json").exists()):
            time.sleep(0.01)
        start = n_shards_written(out)
        while time.time() < deadline and proc.poll() is None and n_shards_written(out) < start + extra:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.3))
        assert proc.poll() is None, f"seed {seed}: run ended before kill {extra} shards on: {proc.stderr.read()}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        # the kernel freed the writer lock with the process (no orphaned decode worker holds it)
        StoreLock(out).acquire().release()
        with pytest.raises(StoreError):  # IncompleteStoreError, or no store yet
            FeatureStore(out)
        assert_done_rows_match(out, ref_store)
    res = cli(*extract_args(synthetic_root, out, ckpt), "--workers", "0")
    assert res.exit_code == 0, f"seed {seed}: {res.output}"
    assert_same_store(out, ref_store)


def test_second_writer_is_refused_and_readers_see_not_complete(tmp_path, synthetic_root, ckpt, ref_store):
    out = tmp_path / "w.zarr"
    cmd = [sys.executable, "-m", "pipeline", *extract_args(synthetic_root, out, ckpt), "--workers", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (out / "zarr.json").exists():
        time.sleep(0.02)
    try:
        res = cli(*extract_args(synthetic_root, out, ckpt), "--workers", "0")
        with pytest.raises(IncompleteStoreError, match="not complete"):
            FeatureStore(out)
        assert proc.poll() is None, "the first writer finished before the checks ran"
    except BaseException:
        proc.kill()
        raise
    assert res.exit_code == 2
    line = error_line(res)
    assert "another process is writing this store" in line and f"{out}.lock" in line
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr  # the refused writer did not disturb the first
    assert_same_store(out, ref_store)


_FILL_DISK = """
import resource, sys, threading, time
from pathlib import Path

first, limit = Path(sys.argv[1]), int(sys.argv[2])

def fill():  # once shard 0 is on disk, no file may grow past `limit` bytes: EFBIG
    while not first.exists():
        time.sleep(0.005)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

threading.Thread(target=fill, daemon=True).start()
sys.argv = ["pipeline"] + sys.argv[3:]
from pipeline.cli import app
app()
"""


def test_disk_full_during_a_write_fails_loudly_and_resumes(tmp_path, synthetic_root, ckpt, ref_store):
    """The disk "fills up" after shard 0: RLIMIT_FSIZE makes every larger write fail with
    EFBIG (a shard is ~4 MiB, the per-sample arrays a few bytes), as ENOSPC would."""
    out = tmp_path / "f.zarr"
    first = out / "embeddings" / "c" / "0" / "0" / "0" / "0"
    cmd = [sys.executable, "-c", _FILL_DISK, str(first), str(1 << 20), *extract_args(synthetic_root, out, ckpt),
           "--workers", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: {out}: disk full while writing shard ")
    assert "free space and re-run the same command to resume" in lines[0]
    with pytest.raises(IncompleteStoreError):
        FeatureStore(out)
    done = FeatureStore(out, require_complete=False).done
    assert done[:2].all() and not done.all()
    assert_done_rows_match(out, ref_store)
    res = cli(*extract_args(synthetic_root, out, ckpt), "--workers", "0")
    assert res.exit_code == 0, res.output
    assert_same_store(out, ref_store)


# --- staleness -----------------------------------------------------------------------------

def _touch_pixel(path: Path, value: int | None = None) -> None:
    img = np.asarray(Image.open(path)).copy()
    img[5, 5] = (int(img[5, 5]) + 77) % 256 if value is None else value
    Image.fromarray(img).save(path)


def test_changed_image_is_refused_or_refreshed(tmp_path, synthetic_root, ckpt, ref_store):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    out = tmp_path / "s.zarr"
    shutil.copytree(ref_store, out)
    data = open_dataset("synthetic", root)
    sid = data.samples[3].id  # shard 1 = rows 2, 3
    _touch_pixel(root / "images" / f"{sid}.png")
    args = extract_args(root, out, ckpt)

    res = cli(*args)
    assert res.exit_code == 2
    line = error_line(res)
    assert repr(sid) in line and "changed since it was extracted" in line and "--refresh-changed" in line
    # stage two refuses the stale store too, and says how to refresh it
    res = cli("train", "--from-cache", out, "-o", tmp_path / "run", "-d", "synthetic", "-r", root, "--model",
              "probe", "-q")
    assert res.exit_code == 2
    line = error_line(res)
    assert repr(sid) in line and "changed since it was extracted" in line and "--refresh-changed" in line

    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / "embeddings" / "c").rglob("*")
              if p.is_file()}
    res = cli(*args, "--refresh-changed")
    assert res.exit_code == 0, res.output
    assert "2 of 12 samples encoded" in res.stdout and "1 changed image(s); re-encoding 1 shard(s)" in res.stderr
    changed = {p.relative_to(out).as_posix() for p, (t, b) in before.items()
               if p.stat().st_mtime_ns != t or p.read_bytes() != b}
    assert changed == {"embeddings/c/1/0/0/0"}  # only the shard holding the changed image
    store = FeatureStore(out)
    assert store.hashes[3] == data.content_hash(3) != FeatureStore(ref_store).hashes[3]
    enc = build_encoder("sam", ckpt)
    ref = enc.forward(torch.stack([enc.prepare(data.load_image(i)) for i in (2, 3)])).numpy()
    np.testing.assert_allclose(store.read([2, 3]), ref, rtol=2e-3, atol=2e-3 * float(np.abs(ref).max()))
    assert cli(*args).exit_code == 0  # fresh again: a plain re-run has nothing to do

    # a refresh that stops half-way never leaves a complete-looking store behind
    sid5 = data.samples[5].id
    (root / "images" / f"{sid5}.png").write_text("overwritten by a broken export")
    res = cli(*args, "--refresh-changed")
    assert res.exit_code == 2 and f"{sid5}.png" in res.stderr.strip().splitlines()[-1]
    with pytest.raises(IncompleteStoreError):
        FeatureStore(out)
    shutil.copy(synthetic_root / "images" / f"{sid5}.png", root / "images" / f"{sid5}.png")
    res = cli(*args)  # plain resume recomputes the shard left pending
    assert res.exit_code == 0, res.output
    assert "2 of 12 samples encoded" in res.stdout
    np.testing.assert_array_equal(FeatureStore(out).read([4, 5]), FeatureStore(ref_store).read([4, 5]))


# --- CUDA out of memory -----------------------------------------------------------------------

class _OomAbove(nn.Module):
    """A real conv (B,3,256,256) -> (B,256,64,64) that raises CUDA's out-of-memory error
    for batches larger than ``limit``, as a GPU with too little memory would."""

    def __init__(self, limit: int):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 256, 4, stride=4)
        self.limit = limit
        self.sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {x.shape[0] * 16} MiB")
        self.sizes.append(x.shape[0])
        return self.conv(x)


def test_cuda_oom_retries_in_smaller_batches(capsys):
    """No GPU in CI: the module raises torch.cuda.OutOfMemoryError itself, so what is
    tested is forward_resilient's retry logic (split, recurse, reassemble in order)."""
    net = _OomAbove(limit=2)
    enc = Encoder(name="oom", net=net, img_size=256, checkpoint_sha256="", checkpoint_path="")
    batch = torch.randn(7, 3, 256, 256)
    out = forward_resilient(enc, batch, None)
    assert out.shape == (7, 256, 64, 64) and sorted(net.sizes) == [1, 2, 2, 2] and sum(net.sizes) == 7
    with torch.no_grad():
        want = torch.cat([net.conv(batch[i:i + 1]) for i in range(7)]).numpy()
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    assert "CUDA out of memory at batch 7; retrying as 3+4" in capsys.readouterr().err
    with pytest.raises(torch.cuda.OutOfMemoryError):  # one image that does not fit: give up
        forward_resilient(Encoder(name="oom", net=_OomAbove(limit=0), img_size=256, checkpoint_sha256="",
                                  checkpoint_path=""), batch[:3], None)


# --- training: NaN guard and resume (segmentation; classification has its own test) ----------

def test_segmentation_nan_loss_keeps_last_good_checkpoint_then_resumes(tmp_path, monkeypatch):
    """The NaN comes from the data: right after epoch 1's optimizer steps the cached
    embeddings are overwritten with NaN (a corrupted cache, through the trainer's own
    after-epoch hook), so epoch 2's real loss is NaN. Resuming after the store is repaired
    continues from epoch 1's state (``epoch`` counts finished epochs, as for classification)."""
    import zarr
    from test_segment import make_acdc, write_store

    from stages.common.training import TrainingError, load_checkpoint
    from stages.segment.config import SegmentConfig
    from stages.segment.train import SegmentTrainer, train_segmentation

    root = make_acdc(tmp_path / "acdc", train_vols=2, val_vols=1, slices=2, shape=(32, 32))
    store = write_store(open_dataset("acdc-h5", root), str(tmp_path / "acdc.zarr"))
    out = tmp_path / "run"
    cfg = SegmentConfig(store=store, data_root=str(root), dataset="acdc-h5", out=str(out), head="linear",
                        epochs=2, batch_size=4, lr=5e-3, device="cpu", progress=False, overlays=0, workers=0)
    emb = zarr.open_group(store, mode="r+")["embeddings"]
    clean = emb[:]

    def corrupt_after_first(self, epoch: int) -> None:
        if epoch == 0:
            emb[:] = np.full(emb.shape, np.nan, np.float16)

    monkeypatch.setattr(SegmentTrainer, "after_epoch", corrupt_after_first)
    ckpt = out / "last.pt"
    with pytest.raises(TrainingError, match=rf"loss became nan at epoch 2.*last good checkpoint is {ckpt}.*--resume"):
        train_segmentation(cfg)
    good = load_checkpoint(ckpt)
    assert good["epoch"] == 1 and not good["finished"]  # epoch 1's state, intact
    assert all(torch.isfinite(v).all() for v in good["state_dict"].values() if v.is_floating_point())
    monkeypatch.undo()
    emb[:] = clean
    m = train_segmentation(SegmentConfig(**{**cfg.to_dict(), "resume": True}))
    assert m["epochs_run"] == 2 and load_checkpoint(ckpt)["epoch"] == 2 and load_checkpoint(ckpt)["finished"]


class _Payload:
    """Unpickling this creates a file: what a malicious model.pt would do instead."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_model_checkpoints_are_never_unpickled_freely(tmp_path):
    """`pipeline evaluate` / `predict` load model.pt with weights_only=True: a pickle
    payload is refused (never run), a truncated file is a clear error."""
    evil = tmp_path / "model.pt"
    torch.save({"task": "classify", "state_dict": {"w": _Payload(tmp_path / "pwned")}}, evil)
    for cmd in (["evaluate", evil, "--store", tmp_path / "none.zarr"], ["predict", evil, tmp_path / "x.png"]):
        res = cli(*cmd)
        assert res.exit_code == 2 and str(evil) in error_line(res), res.output
    assert not (tmp_path / "pwned").exists()
    cut = tmp_path / "cut.pt"
    torch.save({"task": "classify", "state_dict": {"w": torch.zeros(1000)}}, cut)
    cut.write_bytes(cut.read_bytes()[:300])
    res = cli("evaluate", cut, "--store", tmp_path / "none.zarr")
    assert res.exit_code == 2 and "not a readable checkpoint" in error_line(res)
