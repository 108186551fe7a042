"""``pipeline extract --resize fast``: the SAM ViT encoders' opt-in torch resize.

The default (``exact``) is PIL's resize, bit for bit (tests/test_encoders.py,
tests/test_hostpath.py); ``fast`` resizes with torch's antialiased uint8 bilinear kernel:
1 level from PIL's in a small fraction of the values (2 in a handful of a downscaled image's
values, where both passes round the other way), recorded in the store's
preprocessing, refused on resume with the other choice, rebuilt by predict, refused by the
encoders whose reference resize is not PIL's (LiteMedSAM, SAM 2)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cache import FeatureStore
from pipeline.cli import app
from stages.common.joined import saved_store, store_encoder
from stages.datasets import open_dataset
from stages.encoders import build_encoder
from stages.encoders.preprocess import (
    SAM_RESIZES,
    finish_sam,
    prepare_sam,
    prepare_sam_u8,
    resize_choice,
    resize_sam_u8,
    resize_u8_torch,
)
from stages.extract.steps import torch_threads

runner = CliRunner()
FAST, EXACT = SAM_RESIZES["fast"], SAM_RESIZES["exact"]


def _image(shape: tuple[int, ...], seed: int, dtype=np.uint8) -> np.ndarray:
    """Noise over a smooth ramp: every intensity occurs, and edges everywhere (the worst
    case for rounding differences; real photographs differ less, see the README)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    ramp = (yy * 3 + xx * 5) % 256
    if len(shape) == 3:
        ramp = ramp[:, :, None]
    x = np.clip(ramp + rng.normal(0, 40, shape), 0, 255)
    return (x * 16).astype(dtype) if dtype == np.uint16 else x.astype(dtype)


# gray and RGB, odd sizes; upscaled (< 1024) and downscaled (> 1024); uint16 (min-max first)
SHAPES = [(37, 512), (100, 61, 3), (224, 224), (360, 363, 3), (1025, 1023), (1500, 1101, 3), (1311, 977, 3),
          (3000, 2000), (1000, 3000, 3)]
# images more than ~2x taller than wide, downscaled: Pillow 13 resizes these vertically first,
# torch always horizontally first, and the 8-bit intermediate rounds differently in ~20% of
# the values (still by 1 level at most); Pillow 12 went horizontally first for every shape
TALL = [(2001, 333), (2048, 1000, 3)]


@pytest.mark.parametrize("shape", SHAPES + TALL)
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_fast_resize_is_one_level_from_pil_in_few_values_two_at_most(shape, dtype):
    img = _image(shape, sum(shape), dtype)
    exact, fast = resize_sam_u8(img, 1024, "exact"), resize_sam_u8(img, 1024, "fast")
    assert fast.shape == exact.shape and fast.dtype == np.uint8 and max(fast.shape[:2]) == 1024
    diff = np.abs(fast.astype(np.int16) - exact.astype(np.int16))
    # each pass's result is within 1 level of PIL's; the second averages the first's, so 2
    # is possible where both round the other way (real images: ~1e-7 of the values)
    assert diff.max() <= 2 and (diff == 2).mean() < 1e-5, f"{shape}: max difference {diff.max()}"
    bound = 0.25 if shape in TALL else 0.005
    assert (diff > 0).mean() < bound, f"{shape}: {(diff > 0).mean():.2%} of the values differ"


def test_fast_resize_differs_from_pil_somewhere_when_downscaling():
    """Not PIL under another name: a downscaled image shows the 1-level differences."""
    img = _image((1500, 1101, 3), 1)
    assert (resize_sam_u8(img, 1024, "fast") != resize_sam_u8(img, 1024, "exact")).any()


def test_gray_stored_as_rgb_is_one_channel_of_the_rgb_result_and_threads_do_not_matter():
    """The one-channel shortcut for equal channels gives the bits of resizing all three,
    and the kernel's result does not depend on the torch thread count."""
    gray = _image((777, 1203), 2)
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    shape = (661, 1024)
    whole = resize_u8_torch(rgb, shape)
    one = resize_u8_torch(gray, shape)
    assert all(np.array_equal(whole[:, :, c], one) for c in range(3))
    assert np.array_equal(resize_sam_u8(rgb, 1024, "fast"), one)
    with torch_threads(1):
        single = resize_u8_torch(rgb, shape)
    with torch_threads(2):
        double = resize_u8_torch(rgb, shape)
    assert np.array_equal(single, whole) and np.array_equal(double, whole)
    frozen = rgb.copy()
    frozen.setflags(write=False)  # e.g. np.asarray of a PIL image
    assert np.array_equal(resize_u8_torch(frozen, shape), whole)


def test_fast_uint8_canvas_finished_on_the_device_equals_the_cpu_path():
    """The GPU path's host half (uint8 canvas) + ``finish_sam`` gives the fast CPU path's bits."""
    imgs = [_image((1200, 500, 3), 3), _image((300, 1100), 4), _image((50, 70, 3), 5)]
    canvases = torch.stack([prepare_sam_u8(i, 1024, "fast") for i in imgs])
    got = finish_sam(canvases, [i.shape[0] for i in imgs], [i.shape[1] for i in imgs], 1024)
    want = torch.stack([prepare_sam(i, 1024, "fast") for i in imgs])
    assert got.numpy().tobytes() == want.numpy().tobytes()


def test_encoders_record_the_choice_and_old_records_mean_exact(tiny_sam_checkpoint):
    exact = build_encoder("sam", tiny_sam_checkpoint)
    fast = build_encoder("sam", tiny_sam_checkpoint, resize="fast")
    assert exact.preprocessing["resize"] == EXACT and exact.resize == "exact"
    assert fast.preprocessing["resize"] == FAST and fast.resize == "fast"
    assert {k: v for k, v in fast.preprocessing.items() if k != "resize"} == \
        {k: v for k, v in exact.preprocessing.items() if k != "resize"}
    img = _image((1300, 900, 3), 6)
    assert torch.equal(fast.prepare(img), prepare_sam(img, 1024, "fast"))
    assert torch.equal(fast.preprocessor()(img), fast.prepare(img))
    assert torch.equal(fast.prepare_host()(img), prepare_sam_u8(img, 1024, "fast"))
    assert not torch.equal(fast.prepare(img), exact.prepare(img))
    # what stage two reads back: stores made before the option, LiteMedSAM's, SAM 2's
    assert resize_choice(None) == resize_choice({}) == resize_choice(exact.preprocessing) == "exact"
    assert resize_choice({"resize": "longest_side_area"}) == resize_choice({"resize": "square_x"}) == "exact"
    assert resize_choice(fast.preprocessing) == "fast"
    for enc, want in ((exact, "exact"), (fast, "fast")):
        record = {"encoder": "sam", "checkpoint_path": str(tiny_sam_checkpoint), "fast_kernels": False,
                  "signature": enc.signature()}
        assert store_encoder(record, "cpu").resize == want


# -- extract: recorded, resumed, refused ----------------------------------------------------

def _folder(root: Path) -> Path:
    """3 images: an RGB and a gray one larger than 1024 (downscaled: fast differs from
    exact) and a small RGB one (upscaled)."""
    for k, shape in enumerate([(1100, 740, 3), (333, 1090), (64, 40, 3)]):
        (root / "a").mkdir(parents=True, exist_ok=True)
        Image.fromarray(_image(shape, 10 + k)).save(root / "a" / f"img{k}.png")
    return root


def _extract(root: Path, out: Path, ckpt: Path, *more: str):
    return runner.invoke(app, ["extract", "-d", "imagefolder", "-r", str(root), "-o", str(out), "--encoder", "sam",
                               "--checkpoint", str(ckpt), "--batch-size", "1", "--threads", "1", "--workers", "0",
                               "--shard-size", "2", "--dtype", "float32", "-q", *more])


def _shards(store: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted((store / "embeddings").rglob("*")) if p.is_file()}


def test_fast_store_records_the_resize_and_holds_its_embeddings(tmp_path, tiny_sam_checkpoint):
    root = _folder(tmp_path / "imgs")
    out = tmp_path / "fast.zarr"
    res = _extract(root, out, tiny_sam_checkpoint, "--resize", "fast")
    assert res.exit_code == 0, res.output
    store = FeatureStore(out)
    assert store.attrs["preprocessing"]["resize"] == FAST and store.signature["preprocessing"]["resize"] == FAST
    data = open_dataset("imagefolder", root)
    fast = build_encoder("sam", tiny_sam_checkpoint, fast=True, resize="fast")  # extract's kernels (--fast)
    exact = build_encoder("sam", tiny_sam_checkpoint, fast=True)
    with torch_threads(1):  # extract's: one stream of one thread, batches of one
        for i in range(len(data)):
            img = data.load_image(i)
            stored = store.read([i])[0]
            assert np.array_equal(stored, fast.forward(fast.prepare(img)[None])[0].numpy()), data.samples[i].id
            if max(img.shape[:2]) > 1024:  # downscaled: the exact path gives other embeddings
                assert not np.array_equal(stored, exact.forward(exact.prepare(img)[None])[0].numpy())


def test_resuming_with_the_other_resize_is_refused_naming_it(tmp_path, tiny_sam_checkpoint):
    root = _folder(tmp_path / "imgs")
    for first, second in (([], ["--resize", "fast"]), (["--resize", "fast"], [])):
        out = tmp_path / f"{'fast' if first else 'exact'}.zarr"
        assert _extract(root, out, tiny_sam_checkpoint, *first).exit_code == 0
        before = _shards(out)
        res = _extract(root, out, tiny_sam_checkpoint, *second)
        assert res.exit_code == 2 and res.stderr.strip().count("\n") == 0
        a, b = (EXACT, FAST) if not first else (FAST, EXACT)
        assert (f"preprocessing: store has {{'resize': {a!r}}}, asked for {{'resize': {b!r}}}" in res.stderr
                and "--overwrite" in res.stderr), res.stderr
        assert _shards(out) == before
        again = _extract(root, out, tiny_sam_checkpoint, *first)
        assert again.exit_code == 0 and "nothing to do" in again.output


@pytest.mark.parametrize("args,message", [
    (["--encoder", "litemedsam", "--resize", "fast"],
     "encoder 'litemedsam': --resize fast applies to the SAM ViT encoders (vit_b, vit_l, vit_h, sam) only; "
     "LiteMedSAM keeps its reference INTER_AREA resize, drop --resize fast"),
    (["--encoder", "sam2_hiera_t", "--checkpoint", "unused.pt", "--resize", "fast"],
     "encoder 'sam2_hiera_t': --resize fast applies to the SAM ViT encoders (vit_b, vit_l, vit_h, sam) only; "
     "SAM 2's reference resize already is torch's bilinear, drop --resize fast"),
    (["--encoder", "litemedsam", "--resize", "quick"], "--resize 'quick': unknown; use exact"),
])
def test_bad_combinations_are_one_line_errors_before_any_work(tmp_path, args, message):
    root = _folder(tmp_path / "imgs")
    out = tmp_path / "never.zarr"
    res = runner.invoke(app, ["extract", "-d", "imagefolder", "-r", str(root), "-o", str(out), "--workers", "0",
                              "-q", *args])
    assert res.exit_code == 2 and res.stderr.startswith("error: ") and message in res.stderr, res.output
    assert res.stderr.strip().count("\n") == 0
    assert not out.exists()


# -- stage two: predict rebuilds the fast encoder --------------------------------------------

def _seg_dataset(root: Path) -> Path:
    """4 images with a bright disc (the mask), two of them larger than 1024: 2 train, 1 val, 1 test."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    rows = []
    for n, (h, w) in enumerate([(1100, 800), (300, 420), (700, 1090), (260, 200)]):
        yy, xx = np.mgrid[0:h, 0:w]
        disc = np.hypot(yy - h * 0.45, xx - w * 0.55) < min(h, w) * 0.3
        img = np.clip(40 + 150 * disc + rng.normal(0, 30, (h, w)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / f"img{n}.png")
        Image.fromarray((disc * 255).astype(np.uint8)).save(root / "images" / f"img{n}_mask.png")
        rows.append([f"images/img{n}.png", "a", ("train", "train", "val", "test")[n], f"images/img{n}_mask.png"])
    with open(root / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "label", "split", "mask"], *rows])
    return root


def test_predict_rebuilds_the_fast_resize_from_the_model(tmp_path, tiny_sam_checkpoint):
    from stages.segment.config import SegmentConfig
    from stages.segment.evaluate import evaluate_segmentation
    from stages.segment.train import train_segmentation

    root = _seg_dataset(tmp_path / "data")
    store = tmp_path / "seg.zarr"
    res = runner.invoke(app, ["extract", "-d", "csv", "-r", str(root), "-o", str(store), "--encoder", "sam",
                              "--checkpoint", str(tiny_sam_checkpoint), "--resize", "fast", "--batch-size", "2",
                              "--workers", "0", "-q"])
    assert res.exit_code == 0, res.output
    train_segmentation(SegmentConfig(store=str(store), data_root=str(root), dataset="csv", out=str(tmp_path / "run"),
                                     head="linear", epochs=1, steps_per_epoch=4, batch_size=2, lr=1e-2, device="cpu",
                                     progress=False, overlays=0))
    model = tmp_path / "run" / "model.pt"
    saved = torch.load(model, weights_only=True)
    enc = store_encoder(saved_store(saved), "cpu")
    assert enc.resize == "fast" and enc.preprocessing["resize"] == FAST
    ev = evaluate_segmentation(model, str(store), str(root), "csv", tmp_path / "ev", device="cpu",
                               splits=("train", "val", "test"), overlays=0, keep_predictions=True)
    preds = {k: v for split in ev["predictions"].values() for k, v in split.items()}
    r = runner.invoke(app, ["predict", str(model), str(root / "images" / "img0.png"), "--out", str(tmp_path / "out"),
                            "--device", "cpu"])
    assert r.exit_code == 0, r.output  # an exact encoder would be refused: its preprocessing differs
    mask = np.asarray(Image.open(tmp_path / "out" / "img0_mask.png"))
    np.testing.assert_array_equal(mask, preds["images/img0.png"])


@pytest.mark.cuda
def test_cuda_fast_store_equals_the_fast_inputs_encoded_on_the_gpu(tmp_path, tiny_sam_checkpoint):
    """On a GPU (workers hand over fast-resized uint8 canvases, normalised on the device):
    the store holds the embeddings of ``prepare_sam(..., "fast")`` inputs."""
    root = _folder(tmp_path / "imgs")
    out = tmp_path / "gpu.zarr"
    res = runner.invoke(app, ["extract", "-d", "imagefolder", "-r", str(root), "-o", str(out), "--encoder", "sam",
                              "--checkpoint", str(tiny_sam_checkpoint), "--device", "cuda", "--precision", "fp32",
                              "--batch-size", "1", "--workers", "2", "--dtype", "float32", "--resize", "fast", "-q"])
    assert res.exit_code == 0, res.output
    data = open_dataset("imagefolder", root)
    enc = build_encoder("sam", tiny_sam_checkpoint, device="cuda", fast=True, resize="fast")
    store = FeatureStore(out)
    for i in range(len(data)):
        want = enc.forward(prepare_sam(data.load_image(i), 1024, "fast")[None].cuda())[0].cpu().numpy()
        np.testing.assert_allclose(store.read([i])[0], want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
