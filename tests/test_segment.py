"""Segmentation stage: metrics against hand-computed cases, geometry, volume re-assembly,
labelled-subset selection, and training/evaluation end to end on a tiny ACDC-layout
dataset with a real feature store (embeddings written with StoreWriter, no encoder run)."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from cache import SignatureMismatchError, StoreError, StoreWriter, make_signature
from stages.datasets import open_dataset
from stages.extract.config import listing_of
from stages.segment.config import SegmentConfig
from stages.segment.evaluate import evaluate_segmentation
from stages.segment.train import train_segmentation
from stages.segment.data import (
    IGNORE,
    SegmentData,
    canvas_shape,
    label_to_canvas,
    logits_to_raw,
)
from stages.common.splits import order_volumes, select_training
from stages.segment.losses import segmentation_loss, soft_dice_loss
from stages.segment.metrics import (
    case_metrics,
    dice_iou,
    evaluate_predictions,
    hd95,
    stack_volumes,
)

# --- metrics, by hand ---------------------------------------------------------------


def test_dice_and_iou_hand_computed():
    pred = np.zeros((4, 4), bool)
    gt = np.zeros((4, 4), bool)
    pred[0, :4] = True  # 4 pixels
    gt[0, 1:4] = True
    gt[1, 1:4] = True  # 6 pixels, 3 shared
    d, j = dice_iou(pred, gt)
    assert d == pytest.approx(2 * 3 / 10)
    assert j == pytest.approx(3 / 7)
    assert dice_iou(np.zeros((3, 3)), np.zeros((3, 3))) == (1.0, 1.0)
    assert dice_iou(pred, np.zeros_like(gt)) == (0.0, 0.0)


def test_hd95_hand_computed_cases():
    a = np.zeros((6, 10), bool)
    b = np.zeros((6, 10), bool)
    a[1, :] = True
    b[4, :] = True  # parallel lines three rows apart: every surface distance is 3
    assert hd95(a, b) == pytest.approx(3.0)
    assert hd95(a, b, spacing=(2.0, 0.5)) == pytest.approx(6.0)
    # pooled percentile (medpy's hd95): distances pred->gt [0, 10], gt->pred [0];
    # 95th percentile of [0, 0, 10] = 0 + 0.9 * 10 = 9 (the max of the directed ones would be 9.5)
    p = np.zeros((1, 12), bool)
    g = np.zeros((1, 12), bool)
    p[0, [0, 10]] = True
    g[0, 0] = True
    assert hd95(p, g) == pytest.approx(9.0)
    # identical masks: 0; both empty: 0; one empty: the diagonal in spacing units
    assert hd95(a, a) == 0.0
    assert hd95(np.zeros((6, 10)), np.zeros((6, 10))) == 0.0
    assert hd95(a, np.zeros_like(a)) == pytest.approx(math.hypot(6, 10))
    assert hd95(np.zeros_like(a), a, spacing=(2.0, 1.0)) == pytest.approx(math.hypot(12, 10))


def test_hd95_3d_uses_slice_spacing():
    p = np.zeros((3, 5, 5), bool)
    g = np.zeros((3, 5, 5), bool)
    p[0, 2, 2] = True
    g[2, 2, 2] = True  # two slices apart
    assert hd95(p, g) == pytest.approx(2.0)
    assert hd95(p, g, spacing=(10.0, 1.5, 1.5)) == pytest.approx(20.0)
    with pytest.raises(ValueError, match="spacing"):
        hd95(p, g, spacing=(1.0, 1.0))


def test_case_metrics_per_class_with_empty_classes():
    gt = np.zeros((8, 8), np.int64)
    gt[1:3, 1:3] = 1
    pred = gt.copy()
    pred[6, 6] = 3  # class 3 predicted, absent from the label; class 2 absent from both
    m = case_metrics(pred, gt, num_classes=4)
    assert m["dice"] == [1.0, 1.0, 0.0]
    assert m["iou"] == [1.0, 1.0, 0.0]
    assert m["hd95"][:2] == [0.0, 0.0]
    assert m["hd95"][2] == pytest.approx(math.hypot(8, 8))
    assert m["empty"] == [0.0, 0.0, 1.0]


def test_volume_reassembly_and_3d_dice_differs_from_2d_mean():
    gt0 = np.zeros((4, 4), np.int64)
    gt0[:2, :2] = 1
    gt1 = np.zeros((4, 4), np.int64)
    pred1 = np.zeros((4, 4), np.int64)
    pred1[2:, 2:] = 1  # slice 1: 4 false-positive pixels
    # keys deliberately out of slice order: re-assembly sorts by slice index
    preds = {7: pred1, 3: gt0.copy()}
    gts = {7: gt1, 3: gt0}
    groups = {3: "vol", 7: "vol"}
    slices = {3: 0, 7: 1}
    vol = stack_volumes([("vol", 1, pred1), ("vol", 0, gt0)])["vol"]
    assert vol.shape == (2, 4, 4) and np.array_equal(vol[0], gt0) and np.array_equal(vol[1], pred1)
    r3 = evaluate_predictions(preds, gts, 2, ["bg", "fg"], groups=groups, slices=slices)
    assert r3["mode"] == "3d" and r3["cases"] == 1
    assert r3["dice"]["fg"] == pytest.approx(2 * 4 / (8 + 4))  # 3D: 8/12
    r2 = evaluate_predictions(preds, gts, 2, ["bg", "fg"])
    assert r2["mode"] == "2d" and r2["dice"]["fg"] == pytest.approx(0.5)  # mean of 1 and 0
    assert r2["hd95_empty"]["fg"] == 1
    with pytest.raises(ValueError, match="repeated"):
        stack_volumes([("v", 0, gt0), ("v", 0, gt0)])
    with pytest.raises(ValueError, match="different shapes"):
        stack_volumes([("v", 0, gt0), ("v", 1, np.zeros((3, 4)))])


# --- geometry and loss -----------------------------------------------------------------


def test_label_canvas_and_back_are_exact():
    rng = np.random.default_rng(0)
    # long side 256 with a 256 encoder: the canvas holds the label unchanged
    m = rng.integers(0, 4, (256, 200))
    c = label_to_canvas(m, 256)
    assert np.array_equal(c[:, :200], m) and (c[:, 200:] == IGNORE).all()
    # 1024 encoder (SAM ViT), label (512,256) blocky at the canvas resolution (2x2 blocks)
    small = rng.integers(0, 3, (256, 128))
    m = small.repeat(2, 0).repeat(2, 1)
    assert canvas_shape(512, 256, 1024) == (256, 128)
    c = label_to_canvas(m, 1024)
    assert np.array_equal(c[:, :128], small) and (c[:, 128:] == IGNORE).all()
    logits = torch.nn.functional.one_hot(torch.from_numpy(np.where(c == IGNORE, 0, c)).long(), 3)
    logits = logits.permute(2, 0, 1)[None].float()
    back = logits_to_raw(logits, (512, 256), 1024).argmax(1)[0].numpy()
    assert back.shape == (512, 256) and np.array_equal(back, m)


def test_soft_dice_ignores_padding_and_excludes_background():
    y = torch.zeros(1, 8, 8, dtype=torch.int64)
    y[0, 2:4, 2:4] = 1
    y[0, :, 6:] = IGNORE
    good = torch.nn.functional.one_hot(torch.where(y == IGNORE, 0, y), 2).permute(0, 3, 1, 2).float() * 50
    assert soft_dice_loss(good, y) < 1e-3
    moved = good.clone()
    moved[:, :, :, 6:] = torch.tensor([-50.0, 50.0]).view(1, 2, 1, 1)  # "foreground" in the padding
    assert segmentation_loss(moved, y)[0] == pytest.approx(float(segmentation_loss(good, y)[0]), abs=1e-6)


# --- a tiny ACDC-layout dataset and its store --------------------------------------------


def _slice(rng, h, w, shift):
    """Image and label of one slice: a ring (Myo, 2) around a disc (LV, 3) and a blob (RV, 1)."""
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = h / 2 + shift, w / 2 - shift
    r = np.hypot(yy - cy, xx - cx)
    lab = np.zeros((h, w), np.uint8)
    lab[r < 9] = 2
    lab[r < 6] = 3
    lab[np.hypot(yy - cy, xx - cx + 13) < 5] = 1
    img = (0.2 + 0.25 * lab + rng.normal(0, 0.05, (h, w))).astype(np.float32)
    return img, lab


def make_acdc(root: Path, train_vols=3, val_vols=2, slices=3, shape=(48, 40)) -> Path:
    """root/data/*.h5 + lists: training volumes as slice files, validation as volumes."""
    rng = np.random.default_rng(0)
    data = root / "data"
    data.mkdir(parents=True)
    train, val = [], []
    for v in range(train_vols + val_vols):
        name = f"patient{v + 1:03d}_frame01"
        imgs, labs = zip(*[_slice(rng, *shape, shift=k - 1 + v % 2) for k in range(slices)])
        if v < train_vols:
            train.append(name)
            for k in range(slices):
                with h5py.File(data / f"{name}_slice_{k + 1}.h5", "w") as f:
                    f["image"], f["label"] = imgs[k], labs[k]
        else:
            val.append(name)
            with h5py.File(data / f"{name}.h5", "w") as f:
                f["image"], f["label"] = np.stack(imgs), np.stack(labs)
    (root / "train.list").write_text("\n".join(train) + "\n")
    (root / "val.list").write_text("\n".join(val) + "\n")
    (root / "train_slices.list").write_text(
        "\n".join(f"{v}_slice_{k + 1}" for v in train for k in range(slices)) + "\n")
    return root


def embeddings_from_masks(ds) -> np.ndarray:
    """(N,256,64,64): the one-hot label on the encoder's 256 canvas, pooled to 64x64 in
    channels 0..3, plus noise: learnable, and in the geometry real embeddings have."""
    rng = np.random.default_rng(1)
    out = rng.normal(0, 0.3, (len(ds), 256, 64, 64)).astype(np.float32)
    for i in range(len(ds)):
        c = label_to_canvas(ds.load_mask(i), 256)
        onehot = (c[None] == np.arange(4)[:, None, None]).astype(np.float32)
        out[i, :4] += 4 * onehot.reshape(4, 64, 4, 64, 4).mean(axis=(2, 4))
    return out


def write_store(ds, url: str, emb: np.ndarray | None = None, encoder: str = "toy") -> str:
    sig = make_signature(encoder=encoder, checkpoint_sha256="0" * 64, img_size=256, preprocessing={},
                         precision="fp32", dataset_kind=ds.kind, dataset_signature=ds.signature(), dtype="float16")
    emb = embeddings_from_masks(ds) if emb is None else emb
    with StoreWriter.open(url, signature=sig, listing=listing_of(ds), mask_classes=ds.mask_classes,
                          shard_size=8) as w:
        for a, b in w.shards():
            w.write_shard(a, emb[a:b])
            shapes = [ds.load_image(i).shape for i in range(a, b)]
            w.mark_done(a, [s[0] for s in shapes], [s[1] for s in shapes],
                        [ds.content_hash(i) for i in range(a, b)], [False] * (b - a))
        w.commit()
    return url


@pytest.fixture(scope="module")
def acdc(tmp_path_factory):
    root = make_acdc(tmp_path_factory.mktemp("acdc"))
    ds = open_dataset("acdc-h5", root)
    store = write_store(ds, str(root.parent / "acdc.zarr"))
    return root, store


def test_data_joins_store_and_dataset(acdc):
    root, store = acdc
    data = SegmentData(store, "acdc-h5", str(root))
    assert data.num_classes == 4 and data.volumetric
    assert len(data.split_indices("train")) == 9 and len(data.split_indices("val")) == 6
    i = data.split_indices("val")[0]
    assert data.features([i]).shape == (1, 256, 64, 64)
    assert data.targets([i], 256).shape == (1, 256, 256)
    assert data.unet_images([i]).shape == (1, 3, 256, 256)


def test_labelled_volumes_are_nested_and_from_distinct_patients(acdc):
    groups = ["patient001_frame01", "patient001_frame02", "patient002_frame01", "patient002_frame02",
              "patient003_frame01"]
    order = order_volumes(groups, seed=0)
    assert sorted(order) == sorted(groups)
    assert len({g.split("_frame")[0] for g in order[:3]}) == 3  # first three: three patients
    root, store = acdc
    data = SegmentData(store, "acdc-h5", str(root))
    train = data.split_indices("train")
    one, vols1 = select_training(data.groups, train, 1, 1.0, seed=0)
    two, vols2 = select_training(data.groups, train, 2, 1.0, seed=0)
    assert len(vols1) == 1 and len(one) == 3 and set(vols1) < set(vols2) and set(one) < set(two)
    with pytest.raises(ValueError, match="only 3 volumes"):
        select_training(data.groups, train, 5, 1.0, seed=0)
    with pytest.raises(ValueError, match="use one of them"):
        select_training(data.groups, train, 1, 0.5, seed=0)


def _cfg(root, store, out, **kw) -> SegmentConfig:
    base = dict(store=store, data_root=str(root), dataset="acdc-h5", out=str(out), head="linear", epochs=3,
                batch_size=4, lr=1e-2, device="cpu", progress=False, overlays=2)
    base.update(kw)
    return SegmentConfig(**base)


def test_train_end_to_end_writes_outputs_and_learns(acdc, tmp_path):
    root, store = acdc
    out = tmp_path / "run"
    m = train_segmentation(_cfg(root, store, out, epochs=4))
    for name in ("model.pt", "metrics.json", "history.csv", "last.pt"):
        assert (out / name).is_file(), name
    assert len(list((out / "overlays").glob("*.png"))) == 2
    val = m["splits"]["val"]
    assert val["mode"] == "3d" and val["cases"] == 2  # two validation volumes, scored in 3D
    assert set(val["dice"]) == {"RV", "Myo", "LV"} and set(val["hd95"]) == {"RV", "Myo", "LV"}
    assert val["mean_dice"] > 0.5  # the embeddings carry the labels
    assert json.loads((out / "metrics.json").read_text())["splits"]["val"]["mean_dice"] == val["mean_dice"]
    rows = list(csv.DictReader(open(out / "history.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4"]
    # re-scoring the saved model gives the same numbers
    ev = evaluate_segmentation(out / "model.pt", store, str(root), "acdc-h5", tmp_path / "eval", device="cpu",
                               overlays=0)
    assert ev["splits"]["val"]["mean_dice"] == pytest.approx(val["mean_dice"])
    # resume (as for classification): a finished run is not trained again and keeps its
    # history; other training settings (here --epochs, --lr) are another run, refused
    m2 = train_segmentation(_cfg(root, store, out, epochs=4, resume=True))
    assert m2["epochs_run"] == 4 and m2["splits"]["val"]["mean_dice"] == pytest.approx(val["mean_dice"])
    assert [r["epoch"] for r in csv.DictReader(open(out / "history.csv"))] == ["1", "2", "3", "4"]
    for changed in (dict(epochs=6), dict(lr=1e-3)):
        with pytest.raises(ValueError, match="cannot resume"):
            train_segmentation(_cfg(root, store, out, **{"epochs": 4, **changed}, resume=True))


def test_unet_and_labelled_volumes(acdc, tmp_path):
    root, store = acdc
    m = train_segmentation(_cfg(root, store, tmp_path / "unet", head="unet", epochs=1, labeled_volumes=1,
                                overlays=0))
    assert m["train_volumes"] and len(m["train_volumes"]) == 1 and m["train_samples"] == 3
    assert m["splits"]["val"]["cases"] == 2


def test_mismatched_store_and_changed_image_are_refused(acdc, tmp_path):
    root, store = acdc
    # a store made from another dataset kind
    syn = tmp_path / "syn"
    from stages.datasets import make_synthetic

    make_synthetic(syn, n_per_class=1, size=64)
    sds = open_dataset("synthetic", syn)
    other = write_store(sds, str(tmp_path / "syn.zarr"), np.zeros((len(sds), 256, 64, 64), np.float32))
    # (one check for both tasks: stages.common.joined.check_match)
    with pytest.raises(SignatureMismatchError, match="dataset kind: store 'synthetic', dataset 'acdc-h5'"):
        train_segmentation(_cfg(root, other, tmp_path / "a"))
    # a store that lacks samples of the dataset, and one listed differently
    copy = make_acdc(tmp_path / "acdc2", train_vols=4)
    with pytest.raises(StoreError, match="dataset ids not in the store"):
        SegmentData(store, "acdc-h5", str(copy))
    # an image changed after extraction
    root2 = make_acdc(tmp_path / "acdc3")
    store2 = write_store(open_dataset("acdc-h5", root2), str(tmp_path / "acdc3.zarr"))
    with h5py.File(root2 / "data" / "patient004_frame01.h5", "r+") as f:
        f["image"][0, 0, 0] = 0.99
    with pytest.raises(StoreError, match="changed since it was extracted"):
        train_segmentation(_cfg(root2, store2, tmp_path / "b"))


def test_bad_options_are_refused(acdc, tmp_path):
    root, store = acdc
    with pytest.raises(ValueError, match="--head"):
        train_segmentation(_cfg(root, store, tmp_path / "c", head="segformer"))
    with pytest.raises(ValueError, match="--sam-checkpoint initialises the autosam head only"):
        train_segmentation(_cfg(root, store, tmp_path / "c", sam_checkpoint="x.pth"))


def test_non_finite_loss_stops_training_with_a_clear_error(tmp_path):
    from stages.common.training import TrainingError

    root = make_acdc(tmp_path / "acdc", train_vols=1, val_vols=1, slices=2)
    ds = open_dataset("acdc-h5", root)
    store = write_store(ds, str(tmp_path / "nan.zarr"), np.full((len(ds), 256, 64, 64), np.nan, np.float32))
    with pytest.raises(TrainingError, match="loss became nan at epoch 1, step 1"):
        train_segmentation(_cfg(root, store, tmp_path / "run", epochs=1))
    assert not (tmp_path / "run" / "model.pt").exists()


def test_train_on_a_real_litemedsam_store_of_2d_images(synthetic_root, synthetic_store, tmp_path):
    """2D path on real encoder features: per-image metrics, overlays, model.pt metadata."""
    cfg = SegmentConfig(store=str(synthetic_store), data_root=str(synthetic_root), dataset="synthetic",
                        out=str(tmp_path / "syn"), head="linear", epochs=1, batch_size=4, device="cpu",
                        progress=False, overlays=1, in_memory=True)
    m = train_segmentation(cfg)
    val = m["splits"]["val"]
    assert val["mode"] == "2d" and val["cases"] == m["val_samples"] > 0
    assert set(val["dice"]) == {"lesion"} and 0.0 <= val["mean_dice"] <= 1.0
    assert "test" in m["splits"] and len(m["overlays"]) == 1
    saved = torch.load(tmp_path / "syn" / "model.pt", weights_only=True)
    assert saved["task"] == "segment" and saved["head"] == "linear" and saved["input_kind"] == "features"
    assert saved["store"]["signature"]["encoder"] == "litemedsam" and saved["mask_classes"] == ["background", "lesion"]
    with pytest.raises(ValueError, match="needs a volumetric dataset"):
        train_segmentation(SegmentConfig(**{**cfg.to_dict(), "labeled_volumes": 1, "out": str(tmp_path / "x")}))


def test_evaluation_refuses_a_missing_split_and_another_encoder(acdc, tmp_path):
    root, store = acdc
    train_segmentation(_cfg(root, store, tmp_path / "run", epochs=1, overlays=0))
    model = tmp_path / "run" / "model.pt"
    with pytest.raises(ValueError, match="no samples in split.*test.*the dataset has train, val"):
        evaluate_segmentation(model, store, str(root), "acdc-h5", tmp_path / "ev", device="cpu", splits=("test",))
    other = write_store(open_dataset("acdc-h5", root), str(tmp_path / "other.zarr"), encoder="vit_b")
    with pytest.raises(SignatureMismatchError, match="embeddings made differently.*encoder"):
        evaluate_segmentation(model, other, str(root), "acdc-h5", tmp_path / "ev", device="cpu")


def test_cli_train_and_evaluate_print_a_score_table(acdc, tmp_path):
    """`pipeline train --task segment` and `pipeline evaluate` print per-class Dice/IoU/HD95
    (not the whole metrics.json) to stdout; --json gives the record."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    root, store = acdc
    out = tmp_path / "cli"
    r = CliRunner().invoke(app, ["train", "--task", "segment", "--from-cache", store, "--dataset", "acdc-h5",
                                 "--data-root", str(root), "--head", "linear", "--epochs", "1", "--batch-size", "4",
                                 "--device", "cpu", "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    saved = json.loads((out / "metrics.json").read_text())["splits"]["val"]
    rows = [line.split() for line in r.stdout.splitlines() if line.startswith("val")]
    assert [row[1] for row in rows] == [*saved["dice"], "mean"]
    assert float(rows[-1][2]) == pytest.approx(saved["mean_dice"], abs=1e-4)
    assert "(3d," in r.stdout and (out / "last.pt").is_file()
    r = CliRunner().invoke(app, ["evaluate", str(out / "model.pt"), "--split", "val", "--out", str(tmp_path / "ev"),
                                 "--json", "-q"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["splits"]["val"]["mean_dice"] == pytest.approx(saved["mean_dice"])
