"""`pipeline predict` with segmentation heads: a head trained on a real LiteMedSAM store
predicts, on new files (2D PNGs of odd sizes, ACDC-style .h5 volumes and slices), the same
label maps `pipeline evaluate` scored for those images; outputs never overwrite files
predict did not write."""
from __future__ import annotations

import csv
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from test_segment import make_acdc
from typer.testing import CliRunner

from pipeline.cli import app
from stages.extract import ExtractConfig, extract
from stages.segment.config import SegmentConfig
from stages.segment.evaluate import evaluate_segmentation
from stages.segment.train import train_segmentation

SIZES = [(40, 64), (64, 36), (33, 57), (61, 45), (48, 30), (56, 40)]


def make_png_dataset(root: Path) -> Path:
    """CSV manifest of 6 grayscale PNGs of different non-square sizes with a bright disc
    (the lesion mask) on noise: 3 train, 1 val, 2 test."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    rows = []
    for n, (h, w) in enumerate(SIZES):
        yy, xx = np.mgrid[0:h, 0:w]
        disc = np.hypot(yy - h * 0.45, xx - w * 0.55) < min(h, w) * 0.3
        img = np.clip(40 + 150 * disc + rng.normal(0, 12, (h, w)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / f"img{n}.png")
        Image.fromarray((disc * 255).astype(np.uint8)).save(root / "images" / f"img{n}_mask.png")
        split = "train" if n < 3 else "val" if n < 4 else "test"
        rows.append([f"images/img{n}.png", "a" if n % 2 else "b", split, f"images/img{n}_mask.png"])
    with open(root / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "label", "split", "mask"], *rows])
    return root


def extract_store(kind: str, root: Path, out: Path) -> str:
    extract(ExtractConfig(dataset=kind, data_root=str(root), out=str(out), device="cpu", batch_size=4,
                          workers=0, shard_size=8), progress=False)
    return str(out)


def train(kind: str, root: Path, store: str, out: Path, head: str = "linear", steps: int = 10) -> Path:
    """A toy head: one epoch of ``steps`` batches of two (enough for foreground classes)."""
    train_segmentation(SegmentConfig(store=store, data_root=str(root), dataset=kind, out=str(out), head=head,
                                     epochs=1, steps_per_epoch=steps, batch_size=2, lr=1e-2, device="cpu",
                                     progress=False, overlays=0))
    return out / "model.pt"


@pytest.fixture(scope="module")
def png_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("segpng")
    root = make_png_dataset(base / "data")
    store = extract_store("csv", root, base / "png.zarr")
    return root, store, train("csv", root, store, base / "run")


@pytest.fixture(scope="module")
def acdc_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("segacdc")
    root = make_acdc(base / "acdc", train_vols=2, val_vols=1, slices=3)
    store = extract_store("acdc-h5", root, base / "acdc.zarr")
    return root, store, train("acdc-h5", root, store, base / "run")


def predict_cli(*args: str):
    return CliRunner().invoke(app, ["predict", *args, "--device", "cpu"])


def printed_counts(stdout: str) -> dict[str, list[int]]:
    """The stdout table -> {input path: per-class counts}; checks the header."""
    lines = stdout.strip().splitlines()
    head = lines[0].split()
    assert head[:3] == ["path", "shape", "mask"]
    return {row.split()[0]: [int(v) for v in row.split()[3:]] for row in lines[1:]}


def scored(model: Path, root: Path, store: str, kind: str, splits, tmp: Path) -> dict[str, np.ndarray]:
    ev = evaluate_segmentation(model, store, str(root), kind, tmp, device="cpu", splits=splits, overlays=0,
                               keep_predictions=True)
    return {k: v for split in ev["predictions"].values() for k, v in split.items()}


def test_2d_masks_equal_what_evaluate_scored(png_run, tmp_path):
    root, store, model = png_run
    preds = scored(model, root, store, "csv", ("train", "val", "test"), tmp_path / "ev")
    assert len(preds) == len(SIZES)
    paths = [root / "images" / f"img{n}.png" for n in range(len(SIZES))]
    r = predict_cli(str(model), *map(str, paths), "--out", str(tmp_path / "out"))
    assert r.exit_code == 0, r.output
    counts = printed_counts(r.stdout)
    classes_seen = set()
    for n, p in enumerate(paths):
        mask = np.asarray(Image.open(tmp_path / "out" / f"img{n}_mask.png"))
        assert mask.dtype == np.uint8 and mask.shape == SIZES[n]  # the input's own size
        np.testing.assert_array_equal(mask, preds[f"images/img{n}.png"])
        assert counts[str(p)] == np.bincount(mask.ravel(), minlength=2).tolist()
        classes_seen |= set(np.unique(mask).tolist())
        overlay = Image.open(tmp_path / "out" / f"img{n}_overlay.png")
        assert overlay.format == "PNG" and overlay.size[0] > 100
    assert classes_seen == {0, 1}  # the head learned something: both classes occur


def test_volumes_and_slice_files_equal_what_evaluate_scored(acdc_run, tmp_path):
    root, store, model = acdc_run
    preds = scored(model, root, store, "acdc-h5", ("train", "val"), tmp_path / "ev")
    vol, slice_file = root / "data" / "patient003_frame01.h5", root / "data" / "patient001_frame01_slice_2.h5"
    r = predict_cli(str(model), str(vol), str(slice_file), "--out", str(tmp_path / "out"), "--batch-size", "2")
    assert r.exit_code == 0, r.output
    counts = printed_counts(r.stdout)
    with h5py.File(vol) as f:
        shape = f["image"].shape
    with h5py.File(tmp_path / "out" / "patient003_frame01_mask.h5") as f:
        label = f["label"][()]
        assert list(f.attrs["mask_classes"]) == ["background", "RV", "Myo", "LV"]
    assert label.dtype == np.uint8 and label.shape == shape == (3, 48, 40)  # slices re-stacked
    for k in range(shape[0]):
        np.testing.assert_array_equal(label[k], preds[f"patient003_frame01/slice_{k:02d}"])
    assert counts[str(vol)] == np.bincount(label.ravel(), minlength=4).tolist()
    with h5py.File(tmp_path / "out" / "patient001_frame01_slice_2_mask.h5") as f:
        one = f["label"][()]
    assert one.shape == (48, 40)  # a 2D slice file gives a 2D label
    np.testing.assert_array_equal(one, preds["patient001_frame01/slice_01"])
    assert counts[str(slice_file)] == np.bincount(one.ravel(), minlength=4).tolist()
    assert len(np.unique(np.concatenate([label.ravel(), one.ravel()]))) >= 2  # not all background
    assert (tmp_path / "out" / "patient003_frame01_overlay.png").is_file()


def test_unet_head_predicts_without_an_encoder(acdc_run, tmp_path):
    root, store, _ = acdc_run
    model = train("acdc-h5", root, store, tmp_path / "unet", head="unet", steps=1)
    preds = scored(model, root, store, "acdc-h5", ("val",), tmp_path / "ev")
    vol = root / "data" / "patient003_frame01.h5"
    r = predict_cli(str(model), str(vol), "--out", str(tmp_path / "out"), "--format", "csv")
    assert r.exit_code == 0, r.output
    with h5py.File(tmp_path / "out" / "patient003_frame01_mask.h5") as f:
        label = f["label"][()]
    for k in range(label.shape[0]):
        np.testing.assert_array_equal(label[k], preds[f"patient003_frame01/slice_{k:02d}"])
    row = list(csv.reader(r.stdout.strip().splitlines()))[1]
    assert [int(v) for v in row[3:]] == np.bincount(label.ravel(), minlength=4).tolist()
    again = predict_cli(str(model), str(vol), "--out", str(tmp_path / "out"), "--overwrite", "--format", "csv")
    assert again.exit_code == 0, again.output  # its own .h5 mask is recognised (format attribute) and replaced


def test_existing_outputs_are_refused_and_overwrite_replaces_only_predicts_own(png_run, tmp_path):
    """A ground-truth ``<stem>_mask.png`` beside the images (a real PNG, not ours) survives
    --overwrite; predict's own earlier outputs are replaced with it and only with it."""
    root, store, model = png_run
    img = root / "images" / "img0.png"
    out = tmp_path / "out"
    out.mkdir()
    Image.fromarray(np.ones(SIZES[0], np.uint8)).save(out / "img0_mask.png")  # the user's ground truth
    truth = (out / "img0_mask.png").read_bytes()
    (out / "notes.txt").write_text("keep")
    (out / "img0_mask.h5").write_bytes(b"not predict's for a PNG input")
    (out / "img9_overlay.png").write_bytes(b"another stem")
    for extra in ([], ["--overwrite"]):
        r = predict_cli(str(model), str(img), "--out", str(out), *extra)
        assert r.exit_code == 2
        assert r.stderr.strip().count("\n") == 0 and "img0_mask.png: exists and was not written by" in r.stderr
        assert (out / "img0_mask.png").read_bytes() == truth and not (out / "img0_overlay.png").exists()
    mine = tmp_path / "elsewhere"
    mine.mkdir()
    (mine / "picture.png").write_bytes(truth)
    (out / "img0_mask.png").unlink()
    (out / "img0_mask.png").symlink_to(mine / "picture.png")  # a link is never written through
    r = predict_cli(str(model), str(img), "--out", str(out), "--overwrite")
    assert r.exit_code == 2 and "img0_mask.png: exists and was not written by" in r.stderr
    assert (mine / "picture.png").read_bytes() == truth
    (out / "img0_mask.png").unlink()
    assert predict_cli(str(model), str(img), "--out", str(out)).exit_code == 0
    r = predict_cli(str(model), str(img), "--out", str(out))
    assert r.exit_code == 2 and "img0_mask.png: already exists" in r.stderr
    r = predict_cli(str(model), str(img), "--out", str(out), "--overwrite")
    assert r.exit_code == 0, r.output
    assert np.asarray(Image.open(out / "img0_mask.png")).shape == SIZES[0]
    assert (out / "img0_overlay.png").is_file()
    assert (out / "notes.txt").read_text() == "keep"
    assert (out / "img0_mask.h5").read_bytes() == b"not predict's for a PNG input"
    assert (out / "img9_overlay.png").read_bytes() == b"another stem"
    assert sorted(p.name for p in out.iterdir()) == ["img0_mask.h5", "img0_mask.png", "img0_overlay.png",
                                                     "img9_overlay.png", "notes.txt"]


def test_bad_requests_are_one_line_errors_and_write_nothing(png_run, tmp_path):
    root, store, model = png_run
    img = root / "images" / "img1.png"
    other = tmp_path / "elsewhere" / "img1.png"
    other.parent.mkdir()
    other.write_bytes(img.read_bytes())
    out = tmp_path / "out"
    cases = [
        ([str(img)], "pass --out DIR"),  # no --out for a segmentation model
        ([str(img), str(other), "--out", str(out)], "same file stem"),
        ([str(tmp_path / "scan.nii"), "--out", str(out)], "not an input predict reads"),
        ([str(img), "--out", str(out), "--format", "xml"], "unknown --format"),
    ]
    for args, message in cases:
        r = predict_cli(str(model), *args)
        assert r.exit_code == 2 and message in r.stderr, (args, r.output)
        assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.output
    assert not out.exists()
    # a model whose recorded encoder signature the rebuilt encoder does not reproduce
    saved = torch.load(model, weights_only=True)
    saved["store"]["signature"] = {**saved["store"]["signature"], "checkpoint_sha256": "0" * 64}
    torch.save(saved, tmp_path / "tampered.pt")
    r = predict_cli(str(tmp_path / "tampered.pt"), str(img), "--out", str(out))
    assert r.exit_code == 2 and "differs from the one the model's store was made with" in r.stderr
    assert "(checkpoint_sha256); pass --checkpoint" in r.stderr
    # the same weights preprocessed otherwise: no checkpoint would help, so none is asked for
    saved = torch.load(model, weights_only=True)
    sig = saved["store"]["signature"]
    saved["store"]["signature"] = {**sig, "preprocessing": {**sig["preprocessing"], "pad": "center"}}
    torch.save(saved, tmp_path / "tampered.pt")
    r = predict_cli(str(tmp_path / "tampered.pt"), str(img), "--out", str(out))
    assert r.exit_code == 2 and "(preprocessing); this installation preprocesses differently" in r.stderr
    assert "--checkpoint" not in r.stderr and r.stderr.strip().count("\n") == 0
    assert not out.exists()
