"""Stage one end to end: `pipeline extract` into a real store, read back."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import PIL
import torch
from PIL import Image
from typer.testing import CliRunner

from cache import FeatureStore, IncompleteStoreError
from pipeline.cli import app
from stages.datasets import open_dataset
from stages.encoders import build_encoder
from stages.extract import ExtractConfig, extract

runner = CliRunner()


def fp16_close(a: np.ndarray, b: np.ndarray) -> None:
    """Equal within float16 rounding of values of this scale."""
    scale = float(np.abs(b).max())
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3 * scale)


def test_store_holds_the_encoder_output_of_every_sample(synthetic_root, synthetic_store):
    store = FeatureStore(synthetic_store)
    data = open_dataset("synthetic", synthetic_root)
    assert list(store.ids) == data.ids and store.classes == data.classes
    assert store.mask_classes == ["background", "lesion"]
    assert store.embeddings.shape == (12, 256, 64, 64) and store.dtype == "float16"
    assert (store.heights == 64).all() and store.done.all() and not store.failed.any()
    assert store.hashes[3] == data.content_hash(3)
    assert torch.__version__.startswith(store.attrs["versions"]["torch"])
    assert store.attrs["versions"]["pillow"] == PIL.__version__  # it decodes and resizes the images
    enc = build_encoder("litemedsam")
    rows = [0, 7]
    ref = enc.forward(torch.stack([enc.prepare(data.load_image(i)) for i in rows])).numpy()
    fp16_close(store.read(rows), ref)


def _rgb_and_gray_folder(root: Path) -> Path:
    rng = np.random.default_rng(3)
    sizes = [(100, 60), (60, 100), (333, 333), (37, 512)]
    for k, (h, w) in enumerate(sizes):
        cls = "a" if k % 2 else "b"
        (root / cls).mkdir(parents=True, exist_ok=True)
        shape = (h, w, 3) if k % 2 else (h, w)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / cls / f"img{k}.png")
    return root


def test_stored_sam_embedding_equals_sam_predictor(tmp_path, tiny_sam_checkpoint):
    from segment_anything import SamPredictor
    from tiny_sam import make_tiny_sam

    root = _rgb_and_gray_folder(tmp_path / "imgs")
    out = tmp_path / "sam.zarr"
    res = runner.invoke(app, ["extract", "-d", "imagefolder", "-r", str(root), "-o", str(out), "--encoder", "sam",
                              "--checkpoint", str(tiny_sam_checkpoint), "--batch-size", "3", "--workers", "0",
                              "--dtype", "float32", "-q"])
    assert res.exit_code == 0, res.output
    store = FeatureStore(out)
    assert store.attrs["img_size"] == 1024
    data = open_dataset("imagefolder", root)
    predictor = SamPredictor(make_tiny_sam())
    for i in range(len(data)):
        img = np.asarray(Image.open(root / data.samples[i].id).convert("RGB"))
        predictor.set_image(img)
        ref = predictor.get_image_embedding()[0].numpy()
        fp16_close(store.read([i])[0], ref)


def _shard_bytes(store: Path) -> dict[str, bytes]:
    root = store / "embeddings" / "c"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_killed_extraction_resumes_to_identical_bytes(tmp_path, synthetic_root, synthetic_store):
    out = tmp_path / "killed.zarr"
    cmd = [sys.executable, "-m", "pipeline", "extract", "-d", "synthetic", "-r", str(synthetic_root), "-o", str(out),
           "--shard-size", "4", "--batch-size", "4", "--workers", "0", "-q"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE)
    deadline = time.time() + 240
    first_shard = out / "embeddings" / "c" / "0"
    while time.time() < deadline and proc.poll() is None and not first_shard.exists():
        time.sleep(0.05)
    assert proc.poll() is None, "extraction finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with pytest.raises(IncompleteStoreError):
        FeatureStore(out)
    res = runner.invoke(app, ["info", str(out)])
    assert res.exit_code == 1 and "INCOMPLETE" in res.output
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "samples encoded" in rerun.stdout
    assert _shard_bytes(out) == _shard_bytes(synthetic_store)
    assert not list(out.rglob("*.partial"))


def test_storage_and_kernel_options_are_recorded(tmp_path, synthetic_root, synthetic_store, tiny_sam_checkpoint):
    default = FeatureStore(synthetic_store).attrs
    assert default["fast_kernels"] is True and default["compression"] == "none"
    out = tmp_path / "exact.zarr"
    res = runner.invoke(app, ["extract", "-d", "synthetic", "-r", str(synthetic_root), "-o", str(out), "--encoder",
                              "sam", "--checkpoint", str(tiny_sam_checkpoint), "--exact", "--compression", "lz4",
                              "--workers", "0", "-q"])
    assert res.exit_code == 0, res.output
    attrs = FeatureStore(out).attrs
    assert attrs["fast_kernels"] is False and attrs["compression"] == "lz4"
    bad = runner.invoke(app, ["extract", "-d", "synthetic", "-r", str(synthetic_root), "-o", str(tmp_path / "z.zarr"),
                              "--encoder", "sam", "--checkpoint", str(tiny_sam_checkpoint), "--compression", "zip",
                              "-q"])
    assert bad.exit_code == 2 and "unknown compression 'zip'; use one of none, lz4" in bad.output
    assert not (tmp_path / "z.zarr").exists()


def test_rerun_of_complete_store_does_nothing(synthetic_root, synthetic_store):
    res = extract(ExtractConfig(dataset="synthetic", data_root=str(synthetic_root), out=str(synthetic_store),
                                shard_size=4, batch_size=4, workers=0), progress=False)
    assert res.encoded == 0 and "nothing to do" in res.summary()


def test_other_encoder_on_same_store_is_refused(synthetic_root, synthetic_store, tiny_sam_checkpoint):
    res = runner.invoke(app, ["extract", "-d", "synthetic", "-r", str(synthetic_root), "-o", str(synthetic_store),
                              "--encoder", "sam", "--checkpoint", str(tiny_sam_checkpoint), "-q"])
    assert res.exit_code == 2
    assert "encoder: store has 'litemedsam', asked for 'sam'" in res.output
    assert "--overwrite" in res.output


def test_changed_image_is_refused_on_resume(tmp_path, synthetic_root):
    import shutil

    root = tmp_path / "syn"
    shutil.copytree(synthetic_root, root)
    out = tmp_path / "s.zarr"
    cfg = ExtractConfig(dataset="synthetic", data_root=str(root), out=str(out), shard_size=4, batch_size=4, workers=0)
    extract(cfg, progress=False)
    data = open_dataset("synthetic", root)
    path = root / "images" / f"{data.samples[2].id}.png"
    img = np.asarray(Image.open(path)).copy()
    img[0, 0] ^= 1
    Image.fromarray(img).save(path)
    res = runner.invoke(app, ["extract", "-d", "synthetic", "-r", str(root), "-o", str(out), "--shard-size", "4",
                              "-q"])
    assert res.exit_code == 2 and data.samples[2].id in res.output and "changed" in res.output


def test_info_summarises_store(synthetic_store):
    res = runner.invoke(app, ["info", str(synthetic_store)])
    assert res.exit_code == 0, res.output
    for text in ("complete", "samples      12", "benign 4", "litemedsam", "per sample"):
        assert text in res.output
