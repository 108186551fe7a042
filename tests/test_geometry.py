"""Stage two follows the store's input geometry: padded (SAM 1, LiteMedSAM: today's
outputs, bit for bit) or stretched (SAM 2: the image fills the whole square, no padding),
in segmentation targets/logits, the UNet's and the classifier's images, and model.pt."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_predict_segment import SIZES, make_png_dataset
from tiny_sam2 import make_tiny_sam2_checkpoint
from typer.testing import CliRunner

from pipeline.cli import app
from stages.classify.data import IMAGE_MEAN, IMAGE_STD, ClassifyData, prepare_image
from stages.common.geometry import PAD, STRETCH, input_geometry, saved_geometry
from stages.common.joined import open_joined
from stages.encoders.preprocess import (
    LITEMEDSAM_PREPROCESSING,
    SAM_PREPROCESSING,
    prepare_litemedsam,
)
from stages.encoders.preprocess_sam2 import SAM2_PREPROCESSING
from stages.encoders.resize import longest_side_shape, resize_area
from stages.segment.evaluate import evaluate_segmentation
from stages.segment.train import train_segmentation
from stages.segment.config import SegmentConfig
from stages.segment.data import (
    CANVAS,
    IGNORE,
    SegmentData,
    label_to_canvas,
    logits_to_raw,
    resize_nearest,
    unet_image,
)
from stages.segment.evaluate import load_model

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")


def labels(h: int, w: int, k: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, k, (h, w))


def one_hot(canvas: np.ndarray, k: int) -> torch.Tensor:
    return F.one_hot(torch.from_numpy(canvas.astype(np.int64)), k).permute(2, 0, 1)[None].float()


def test_geometry_of_each_encoder_family():
    assert input_geometry(SAM2_PREPROCESSING) == STRETCH
    assert input_geometry(SAM_PREPROCESSING) == input_geometry(LITEMEDSAM_PREPROCESSING) == PAD
    assert input_geometry(None) == input_geometry({}) == PAD  # stores made before SAM 2
    assert saved_geometry({"geometry": "stretch"}) == STRETCH
    assert saved_geometry({"store_signature": {"preprocessing": SAM2_PREPROCESSING}}) == STRETCH  # segment
    assert saved_geometry({"store": {"signature": {"preprocessing": SAM2_PREPROCESSING}}}) == STRETCH  # classify
    assert saved_geometry({"store_signature": {"preprocessing": SAM_PREPROCESSING}}) == PAD
    with pytest.raises(ValueError, match="unknown input geometry 'crop'"):
        saved_geometry({"geometry": "crop"})


@pytest.mark.parametrize("img_size", [256, 1024])
@pytest.mark.parametrize("shape", [(40, 100), (100, 40), (9, 120)])
def test_stretched_labels_round_trip_and_fill_the_canvas(img_size, shape):
    """Exact for sides under 128 (each label pixel spans more than two canvas pixels, so
    all four bilinear neighbours of a pixel centre carry its label)."""
    m = labels(*shape)
    c = label_to_canvas(m, img_size, STRETCH)
    assert c.shape == (CANVAS, CANVAS) and not (c == IGNORE).any()  # no padding to ignore
    back = logits_to_raw(one_hot(c, 3), shape, img_size, STRETCH)
    assert back.shape == (1, 3, *shape)
    np.testing.assert_array_equal(back.argmax(1)[0].numpy(), m)


@pytest.mark.parametrize("img_size", [256, 1024])
def test_padded_is_todays_geometry_bit_for_bit(img_size):
    m = labels(40, 100, seed=1)
    nh, nw = longest_side_shape(40, 100, img_size)
    ch, cw = max(1, round(nh * CANVAS / img_size)), max(1, round(nw * CANVAS / img_size))
    want = np.full((CANVAS, CANVAS), IGNORE, np.uint8)
    want[:ch, :cw] = resize_nearest(m, (ch, cw))
    np.testing.assert_array_equal(label_to_canvas(m, img_size), want)
    np.testing.assert_array_equal(label_to_canvas(m, img_size, PAD), want)
    assert (want[ch:] == IGNORE).all()  # the padding rows are ignored

    logits = torch.randn(2, 3, CANVAS, CANVAS, generator=torch.Generator().manual_seed(0))
    ref = F.interpolate(logits, (img_size, img_size), mode="bilinear", align_corners=False) \
        if img_size != CANVAS else logits
    ref = F.interpolate(ref[..., :nh, :nw], (40, 100), mode="bilinear", align_corners=False)
    assert torch.equal(logits_to_raw(logits, (40, 100), img_size), ref)
    assert torch.equal(logits_to_raw(logits, (40, 100), img_size, PAD), ref)
    # stretched differs: the whole canvas, straight to (H,W) as SAM 2's postprocess_masks
    direct = F.interpolate(logits, (40, 100), mode="bilinear", align_corners=False)
    assert torch.equal(logits_to_raw(logits, (40, 100), img_size, STRETCH), direct)


def test_prepare_image_stretched_fills_the_square_padded_unchanged():
    rng = np.random.default_rng(2)
    img = rng.integers(100, 256, (40, 100), dtype=np.uint8)  # no dark pixel anywhere
    padded = prepare_image(img, 64)
    assert torch.equal(prepare_image(img, 64, PAD), padded)
    x = torch.from_numpy(img.astype(np.float32) / 255)
    old = F.interpolate(F.pad(x, (0, 0, 0, 60))[None, None], (64, 64), mode="bilinear", align_corners=False,
                        antialias=True)[0].expand(3, -1, -1)
    # the backbone's input is held at float16 precision (what --in-memory stores)
    assert torch.equal(padded, ((old - IMAGE_MEAN) / IMAGE_STD).half().float())
    shown = lambda t: (t * IMAGE_STD + IMAGE_MEAN)[0]  # noqa: E731
    assert shown(padded)[-10:].abs().max() < 5e-4  # bottom rows: zero padding, to float16's step

    stretched = prepare_image(img, 64, STRETCH)
    assert stretched.shape == (3, 64, 64)
    rows_min = shown(stretched).min(dim=1).values
    assert (rows_min > 0.3).all()  # every row is image (pixels >= 100/255), none is padding
    want = F.interpolate(x[None, None], (64, 64), mode="bilinear", align_corners=False, antialias=True)[0]
    assert torch.allclose(shown(stretched), want[0], atol=5e-4)  # float16's step at |x| < 2.7, x std


def test_unet_image_follows_the_geometry():
    img = np.random.default_rng(3).integers(0, 256, (40, 100, 3), dtype=np.uint8)
    assert torch.equal(unet_image(img), prepare_litemedsam(img, 256))
    assert torch.equal(unet_image(img, PAD), prepare_litemedsam(img, 256))
    s = unet_image(img, STRETCH)
    r = resize_area(img, (256, 256), cv_channels=3).astype(np.float64)
    want = ((r - r.min()) / (r.max() - r.min())).transpose(2, 0, 1).astype(np.float32)
    np.testing.assert_array_equal(s.numpy(), want)
    assert s.shape == (3, 256, 256) and (s[:, -1].abs().sum() > 0)


@pytest.mark.slow
def test_sam2_store_end_to_end_non_square(tmp_path):
    """Tiny SAM 2 store of non-square PNGs -> a few training steps -> evaluate and predict:
    targets cover the whole canvas, masks come back at each input's size, and model.pt
    records the stretched geometry that evaluate/predict then use."""
    root = make_png_dataset(tmp_path / "data")
    ckpt = make_tiny_sam2_checkpoint(tmp_path / "tiny.pt")
    store = tmp_path / "s2.zarr"
    runner = CliRunner()
    res = runner.invoke(app, ["extract", "-d", "csv", "-r", str(root), "-o", str(store), "--encoder", "sam2_hiera_t",
                              "--checkpoint", str(ckpt), "--device", "cpu", "--batch-size", "3", "--workers", "0",
                              "-q"])
    assert res.exit_code == 0, res.output
    data = SegmentData(str(store), "csv", str(root))
    assert data.geometry == STRETCH and data.img_size == 1024
    targets = data.targets(list(range(len(SIZES))), data.img_size)
    assert targets.shape == (len(SIZES), CANVAS, CANVAS) and not (targets == IGNORE).any()
    assert set(torch.unique(targets).tolist()) == {0, 1}

    run = tmp_path / "run"
    train_segmentation(SegmentConfig(store=str(store), data_root=str(root), dataset="csv", out=str(run),
                                     head="linear", epochs=1, steps_per_epoch=3, batch_size=2, lr=1e-2,
                                     device="cpu", progress=False, overlays=0), data)
    model, saved = load_model(run / "model.pt", torch.device("cpu"))
    assert saved["geometry"] == STRETCH
    ev = evaluate_segmentation(run / "model.pt", str(store), str(root), "csv", tmp_path / "ev", device="cpu",
                               splits=("train", "val", "test"), overlays=0, keep_predictions=True)
    preds = {k: v for split in ev["predictions"].values() for k, v in split.items()}
    feats = data.features(list(range(len(SIZES))))
    with torch.inference_mode():
        logits = model(feats)
    for n, size in enumerate(SIZES):
        got = preds[f"images/img{n}.png"]
        assert got.shape == size  # the input's own size
        want = logits_to_raw(logits[n:n + 1], size, 1024, STRETCH).argmax(1)[0].numpy()
        np.testing.assert_array_equal(got, want)  # evaluate used the stretched geometry

    paths = [str(root / "images" / f"img{n}.png") for n in (0, 1)]
    res = runner.invoke(app, ["predict", str(run / "model.pt"), *paths, "--out", str(tmp_path / "out"),
                              "--device", "cpu"])
    assert res.exit_code == 0, res.output
    from PIL import Image

    for n in (0, 1):
        mask = np.asarray(Image.open(tmp_path / "out" / f"img{n}_mask.png"))
        assert mask.shape == SIZES[n]
        np.testing.assert_array_equal(mask, preds[f"images/img{n}.png"])

    # classification on the same store: the backbone's image is stretched like the store's input
    joined = open_joined(str(store), kind="csv", data_root=str(root))
    cd = ClassifyData(joined, joined.rows, 64, need_image=True, need_sam=False)
    assert cd.geometry == STRETCH
    img = cd.__getitems__([0])["image"][0]
    raw = joined.dataset.load_image(int(joined.rows[0]))
    assert torch.equal(img, prepare_image(raw, 64, STRETCH))
