"""Stage two, classification: training every model kind from a real (toy) feature store,
metrics, splits, refusal of mismatched or stale stores, reproducibility, NaN guard, resume,
and the CLI end to end on a store extracted with the real encoder."""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn import metrics as skm
from toy_store import make_toy

from cache import FeatureStore, SignatureMismatchError, StoreError
from stages.classify.train import ClassifyConfig, train_classifier
from stages.common.training import TrainingError
from stages.classify import train as classify_mod
from stages.classify.augment import augment, mixed_loss, mixup, parse_augment
from stages.classify.data import ShardBatchSampler, auto_img_size, prepare_image
from stages.classify.metrics import classification_metrics
from stages.common.joined import open_joined
from stages.common.splits import assign_splits, subsample
from stages.common.training import load_checkpoint

FAST = dict(backbone="resnet10t", img_size=32, batch_size=8, workers=0, epochs=2, plots=False)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    return make_toy(root, n_per_class=12)


def _cfg(url: str, out: Path, **kw) -> ClassifyConfig:
    return ClassifyConfig(store=url, out=str(out), **{**FAST, **kw})


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("model", ["slca", "backbone", "sam-head", "probe"])
def test_every_model_kind_trains_and_writes_its_outputs(toy, tmp_path, model):
    ds, url = toy
    plots = model == "slca"
    m = train_classifier(_cfg(url, tmp_path, model=model, plots=plots, attention_images=2), dataset=ds,
                         progress=False)
    for f in ("model.pt", "metrics.json", "history.csv", "predictions.csv", "config.json"):
        assert (tmp_path / f).is_file(), f
    if plots:
        for f in ("confusion_test.png", "roc_test.png", "history.png", "slca_attention.png"):
            assert (tmp_path / f).stat().st_size > 1000, f
        gates = json.loads((tmp_path / "slca_gates.json").read_text())
        assert list(gates) == ["layer1", "layer2", "layer3", "layer4"]  # resnet10t's SLCA stages
        for s in gates.values():
            assert s["min"] <= s["mean"] <= s["max"] and s["n"] > 0 and s["max_abs_dev"] >= 0
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert set(saved) >= {"val", "test", "n_train", "best_epoch"}
    assert set(saved["test"]) >= {"accuracy", "balanced_accuracy", "auc", "f1_macro", "precision_c0", "recall_c1"}
    preds = _csv(tmp_path / "predictions.csv")
    held_out = sum(1 for x in ds.samples if x.split in ("val", "test"))
    assert len(preds) == saved["val"]["n"] + saved["test"]["n"] == held_out
    assert {p["split"] for p in preds} == {"val", "test"}
    p = np.asarray([[float(r["prob_c0"]), float(r["prob_c1"])] for r in preds])
    np.testing.assert_allclose(p.sum(axis=1), 1, atol=1e-5)
    hist = _csv(tmp_path / "history.csv")
    assert len(hist) == (5 if model == "probe" else 2) and all(float(r["seconds"]) >= 0 for r in hist)
    ck = load_checkpoint(tmp_path / "model.pt")
    assert ck["task"] == "classify" and ck["classes"] == ["c0", "c1"]
    assert ck["store"]["signature"] == FeatureStore(url).signature
    assert ck["config"]["model"] == model
    # evaluate re-scores the saved model to the same test metrics
    from stages.classify.evaluate import evaluate_classifier

    again = evaluate_classifier(tmp_path / "model.pt", url, dataset=ds, progress=False)
    for k in ("accuracy", "auc", "f1_macro"):
        assert again["test"][k] == pytest.approx(m["test"][k], nan_ok=True)


def test_loss_decreases_on_a_learnable_toy(toy, tmp_path):
    ds, url = toy
    m = train_classifier(_cfg(url, tmp_path, model="slca", epochs=6, lr=3e-3, augment="none", patience=0),
                         dataset=ds, progress=False)
    losses = [float(r["train_loss"]) for r in _csv(tmp_path / "history.csv")]
    assert losses[-1] < 0.6 * losses[0], losses
    assert m["val"]["auc"] >= 0.75


def test_same_seed_same_run(toy, tmp_path):
    ds, url = toy
    runs = []
    for name in ("a", "b", "c"):
        seed = 1 if name == "c" else 0
        train_classifier(_cfg(url, tmp_path / name, model="slca", augment="flip,rot,photometric", seed=seed,
                              epochs=1), dataset=ds, progress=False)
        runs.append(load_checkpoint(tmp_path / name / "model.pt")["state_dict"])
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_metrics_match_sklearn_on_known_predictions():
    y = np.array([0, 0, 1, 1, 2, 2, 2, 0])
    prob = np.array([[.7, .2, .1], [.3, .4, .3], [.1, .8, .1], [.5, .3, .2],
                     [.1, .1, .8], [.2, .2, .6], [.3, .5, .2], [.6, .3, .1]])
    m = classification_metrics(y, prob, ["a", "b", "c"])
    pred = prob.argmax(1)
    assert m["accuracy"] == skm.accuracy_score(y, pred) == 5 / 8
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, prob, multi_class="ovr", average="macro"))
    assert m["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["precision_b"] == pytest.approx(skm.precision_score(y, pred, average=None)[1])
    assert m["recall_c"] == pytest.approx(2 / 3)
    yb = np.array([0, 1, 1, 0, 1])
    pb = np.array([[.9, .1], [.4, .6], [.6, .4], [.2, .8], [.1, .9]])
    assert classification_metrics(yb, pb, ["n", "p"])["auc"] == pytest.approx(skm.roc_auc_score(yb, pb[:, 1]))
    assert np.isnan(classification_metrics(np.array([1, 1]), pb[:2], ["n", "p"])["auc"])


def test_store_of_another_dataset_is_refused(toy):
    ds, url = toy
    other = dataclasses.replace(ds, samples=[dataclasses.replace(s, label=1 - s.label) if i == 0 else s
                                             for i, s in enumerate(ds.samples)])
    with pytest.raises(SignatureMismatchError, match="same ids, different labels"):
        open_joined(url, other)
    fewer = dataclasses.replace(ds, samples=ds.samples[:-1], images=ds.images[:-1])
    with pytest.raises(SignatureMismatchError, match="1 store ids not in the dataset"):
        open_joined(url, fewer)
    kind = dataclasses.replace(ds, kind="imagefolder")
    with pytest.raises(SignatureMismatchError, match="dataset kind"):
        open_joined(url, kind)


def test_image_changed_since_extraction_is_refused(toy, tmp_path):
    ds, url = toy
    images = list(ds.images)
    images[5] = images[5].copy()
    images[5][0, 0] ^= 1
    stale = dataclasses.replace(ds, images=images)
    with pytest.raises(StoreError, match=r"image 'img0005' changed since it was extracted.*pipeline extract"):
        train_classifier(_cfg(url, tmp_path, model="probe"), dataset=stale, progress=False)


def test_splits_without_official_ones_are_stratified_seeded_and_group_aware():
    n = 60
    labels = np.arange(n) % 3
    groups = np.asarray([f"vol{i // 4}" if i < 24 else "" for i in range(n)], dtype=object)
    rows = np.arange(n)
    empty = np.asarray([""] * n, dtype=object)
    a = assign_splits(rows, labels, empty, groups, seed=3)
    b = assign_splits(rows, labels, empty, groups, seed=3)
    assert all(np.array_equal(a[s], b[s]) for s in a)
    assert sorted(np.concatenate(list(a.values())).tolist()) == list(range(n))
    for s in ("train", "val", "test"):
        assert set(labels[a[s]]) == {0, 1, 2}, s
    where = {r: s for s, rr in a.items() for r in rr}
    for g in {g for g in groups if g}:
        assert len({where[r] for r in rows[groups == g]}) == 1  # a volume never straddles splits
    # official splits are kept; a missing val split is carved from train
    given = np.asarray(["train"] * 40 + ["test"] * 20, dtype=object)
    c = assign_splits(rows, labels, given, np.asarray([""] * n, dtype=object), seed=0)
    assert np.array_equal(c["test"], np.arange(40, 60)) and len(c["val"]) > 0
    assert set(c["val"]) <= set(range(40))


def test_train_fraction_is_stratified_seeded_and_nested():
    labels = np.r_[np.zeros(80, int), np.ones(20, int)]
    rows = np.arange(100)
    g = np.asarray([""] * 100, dtype=object)
    s10, s50 = subsample(rows, labels, g, 0.1, seed=0), subsample(rows, labels, g, 0.5, seed=0)
    assert np.bincount(labels[s10]).tolist() == [8, 2]
    assert set(s10) <= set(s50)
    assert not np.array_equal(s10, subsample(rows, labels, g, 0.1, seed=1))
    assert np.bincount(labels[subsample(rows, labels, g, 0.01, seed=0)]).tolist() == [1, 1]
    with pytest.raises(ValueError, match="train-fraction"):
        subsample(rows, labels, g, 0.0, seed=0)


def test_shard_sampler_covers_each_sample_once_and_keeps_shards_together():
    rows = np.arange(0, 128)
    s = ShardBatchSampler(rows, shard_size=16, batch_size=16, shuffle=True, seed=0, mix=2)
    s.set_epoch(0)
    batches = list(s)
    assert len(batches) == len(s) == 8
    flat = sorted(p for b in batches for p in b)
    assert flat == list(range(128))
    assert all(len({rows[p] // 16 for p in b}) <= 2 for b in batches)
    s.set_epoch(1)
    assert list(s) != batches
    ev = ShardBatchSampler(rows[::-1], 16, 50, shuffle=False)
    assert [len(b) for b in ev] == [50, 50, 28]


def test_augmentation_moves_image_and_sam_grid_together():
    gen = torch.Generator().manual_seed(0)
    pattern = torch.rand(4, 1, 64, 64)
    image, sam = pattern.expand(4, 3, 64, 64).clone(), pattern.expand(4, 256, 64, 64).clone()
    img2, sam2 = augment(image, sam, ("rot",), gen)
    assert not torch.equal(img2, image)
    torch.testing.assert_close(img2[:, :1], sam2[:, :1])
    img3, sam3 = augment(image, sam, ("photometric",), gen)
    assert torch.equal(sam3, sam) and not torch.equal(img3, image)


def test_mixup_blends_image_grid_prior_and_labels_with_one_weight():
    image, sam, prior = torch.randn(6, 3, 8, 8), torch.randn(6, 256, 4, 4), torch.randn(6, 2)
    mi, ms, mp, perm, lam = mixup(image, sam, prior, 0.4, torch.Generator().manual_seed(3))
    assert 0 < lam < 1 and sorted(perm.tolist()) == list(range(6)) and perm.tolist() != list(range(6))
    for mixed, x in ((mi, image), (ms, sam), (mp, prior)):
        torch.testing.assert_close(mixed, lam * x + (1 - lam) * x[perm])
    again = mixup(image, sam, None, 0.4, torch.Generator().manual_seed(3))
    assert again[2] is None and again[4] == lam and torch.equal(again[1], ms)  # the seed fixes the draw
    y, z = torch.tensor([0, 1, 1, 0, 1, 0]), torch.randn(6, 2)
    ce = torch.nn.CrossEntropyLoss()
    torch.testing.assert_close(mixed_loss(ce, z, y, (perm, lam)), lam * ce(z, y) + (1 - lam) * ce(z, y[perm]))
    assert mixed_loss(ce, z, y, None) == ce(z, y)


def test_mixup_trains_another_model_and_is_recorded(toy, tmp_path):
    ds, url = toy
    for name, mix in (("plain", 0.0), ("mixed", 0.4), ("again", 0.4)):
        train_classifier(_cfg(url, tmp_path / name, model="slca", epochs=1, mixup=mix), dataset=ds, progress=False)
    plain, mixed, again = (load_checkpoint(tmp_path / r / "model.pt") for r in ("plain", "mixed", "again"))
    assert mixed["config"]["mixup"] == 0.4 and plain["config"]["mixup"] == 0.0
    weights = [k for k, v in plain["state_dict"].items() if v.is_floating_point()]
    assert any(not torch.equal(plain["state_dict"][k], mixed["state_dict"][k]) for k in weights)
    assert all(torch.equal(again["state_dict"][k], mixed["state_dict"][k]) for k in weights)  # seeded
    with pytest.raises(ValueError, match="--mixup -1"):
        ClassifyConfig(store=url, out=str(tmp_path / "bad"), mixup=-1.0).check()


def test_augment_lists_take_commas_or_plus_signs():
    # "+" lets a `pipeline compare` variant (slca/augment=flip+photometric) hold a list
    assert parse_augment("flip+photometric") == parse_augment("flip, photometric") == ("flip", "photometric")
    assert parse_augment("none") == parse_augment("") == ()
    with pytest.raises(ValueError, match="unknown --augment blur"):
        parse_augment("flip+blur")


def test_prepare_image_pads_like_the_encoder():
    img = np.full((20, 40), 255, np.uint8)
    x = prepare_image(img, 64)
    assert x.shape == (3, 64, 64)
    top, bottom = x[0, :28].mean(), x[0, 36:].mean()
    assert top > 2 and bottom < -2  # image at the top, zero padding below
    assert auto_img_size(np.array([28]), np.array([28])) == 64
    assert auto_img_size(np.array([512]), np.array([400])) == 224


def test_the_backbone_input_is_64_px_unless_asked_and_0_sizes_it_from_the_images(tmp_path):
    ds, url = make_toy(tmp_path / "big", n_per_class=6, size=128)
    sizes = {}
    for name, kw in {"default": {}, "auto": {"img_size": 0}, "asked": {"img_size": 96}}.items():
        cfg = ClassifyConfig(store=url, out=str(tmp_path / name), model="probe", workers=0, plots=False, **kw)
        train_classifier(cfg, dataset=ds, progress=False)
        sizes[name] = load_checkpoint(tmp_path / name / "model.pt")["img_size"]
    assert sizes == {"default": 64, "auto": 128, "asked": 96}


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint_then_resume(toy, tmp_path, monkeypatch):
    ds, url = toy
    cfg = _cfg(url, tmp_path / "run", model="sam-head", epochs=3)
    real = classify_mod.augment
    calls = {"n": 0}
    per_epoch = -(-sum(1 for x in ds.samples if x.split == "train") // cfg.batch_size)

    def poisoned(image, sam, modes, gen):
        calls["n"] += 1
        image, sam = real(image, sam, modes, gen)
        if calls["n"] > per_epoch:  # from the first batch of epoch 2 on
            sam = sam * float("nan")
        return image, sam

    monkeypatch.setattr(classify_mod, "augment", poisoned)
    with pytest.raises(TrainingError, match=r"loss became nan at epoch 2.*last\.pt.*--resume"):
        train_classifier(cfg, dataset=ds, progress=False)
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["epoch"] == 1 and all(torch.isfinite(v).all() for v in last["state_dict"].values()
                                      if v.is_floating_point())
    with pytest.raises(TrainingError, match="--resume"):
        train_classifier(cfg, dataset=ds, progress=False)  # an earlier run is there
    monkeypatch.setattr(classify_mod, "augment", real)
    train_classifier(dataclasses.replace(cfg, resume=True), dataset=ds, progress=False)
    resumed = load_checkpoint(tmp_path / "run" / "model.pt")
    # the uninterrupted run gives the same weights and history
    train_classifier(dataclasses.replace(cfg, out=str(tmp_path / "ref")), dataset=ds, progress=False)
    ref = load_checkpoint(tmp_path / "ref" / "model.pt")
    assert resumed["epoch"] == ref["epoch"]
    assert all(torch.equal(resumed["state_dict"][k], ref["state_dict"][k]) for k in ref["state_dict"])
    a = _csv(tmp_path / "run" / "history.csv")
    b = _csv(tmp_path / "ref" / "history.csv")
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b] and len(a) == 3
    with pytest.raises(TrainingError, match="cannot resume a run made with other settings.*lr"):
        train_classifier(dataclasses.replace(cfg, resume=True, lr=0.5), dataset=ds, progress=False)


@pytest.mark.parametrize("model", ["sam-head", "slca"])
def test_in_memory_equals_lazy(toy, tmp_path, model):
    """--in-memory is how a run reads its data, not what it learns: the same weights
    bitwise (images and embeddings alike; slca reads both)."""
    ds, url = toy
    a = train_classifier(_cfg(url, tmp_path / "lazy", model=model, epochs=2), dataset=ds, progress=False)
    b = train_classifier(_cfg(url, tmp_path / "mem", model=model, epochs=2, in_memory=True), dataset=ds,
                         progress=False)
    assert a["test"] == b["test"]
    lazy, mem = (load_checkpoint(tmp_path / k / "model.pt")["state_dict"] for k in ("lazy", "mem"))
    assert all(torch.equal(lazy[k], mem[k]) for k in lazy)


def test_cli_train_evaluate_predict_on_a_real_store(synthetic_store, synthetic_root, tmp_path):
    """End to end through the CLI: probe and sam-head on a litemedsam store of the phantoms,
    then `evaluate` and `predict` (which runs the real encoder on image files)."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    runner = CliRunner()
    out = tmp_path / "probe"
    r = runner.invoke(app, ["train", "--from-cache", str(synthetic_store), "--model", "probe", "--out", str(out),
                            "--no-plots", "-q"])
    assert r.exit_code == 0, r.output
    assert "auc" in r.stdout and (out / "model.pt").is_file()
    r = runner.invoke(app, ["evaluate", str(out / "model.pt"), "--split", "all", "--json", "-q"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["all"]["n"] == 12
    images = sorted((synthetic_root / "images").glob("*.png"))[:2]
    r = runner.invoke(app, ["predict", str(out / "model.pt"), *map(str, images), "--format", "json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert len(rows) == 2 and abs(sum(rows[0]["probs"].values()) - 1) < 1e-5
    assert set(rows[0]["probs"]) == {"benign", "cyst", "malignant"}
    r = runner.invoke(app, ["train", "--from-cache", str(synthetic_store), "--model", "probe", "--out", str(out),
                            "-q"])
    assert r.exit_code == 2 and "--resume" in r.output
    r = runner.invoke(app, ["train", "--from-cache", str(synthetic_store), "--model", "nope", "--out",
                            str(tmp_path / "x"), "-q"])
    assert r.exit_code == 2 and "unknown --model 'nope'" in r.output


def test_cli_dispatches_the_segment_task(synthetic_store, tmp_path):
    """`train --task segment` and `evaluate` of its model.pt reach the segmentation stage."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    runner = CliRunner()
    out = tmp_path / "seg"
    r = runner.invoke(app, ["train", "--from-cache", str(synthetic_store), "--task", "segment", "--head", "linear",
                            "--epochs", "1", "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    assert load_checkpoint(out / "model.pt")["task"] == "segment"
    r = runner.invoke(app, ["evaluate", str(out / "model.pt"), "--out", str(tmp_path / "ev"), "-q"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "ev" / "metrics.json").is_file()
    r = runner.invoke(app, ["train", "--from-cache", str(synthetic_store), "--task", "nope", "--out", str(out)])
    assert r.exit_code == 2 and "--task 'nope'" in r.output


def test_precise_bn_sets_the_running_statistics_to_the_training_average():
    """After precise_bn, eval-mode BatchNorm uses the plain mean/variance of the training
    batches (not a lagging momentum average), the momentum is restored, and the loop
    stops after max_samples."""
    from stages.common.training import Amp, precise_bn

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = torch.nn.BatchNorm2d(3)

        def forward(self, image, sam):
            return self.bn(image).mean(dim=(2, 3))

    g = torch.Generator().manual_seed(0)
    batches = [{"image": torch.randn(4, 3, 5, 5, generator=g) * 3 + 2, "sam": None, "label": torch.zeros(4)}
               for _ in range(3)]
    net, amp = Net(), Amp(torch.device("cpu"), "fp32")

    def forward(batch) -> int:
        net(batch["image"], batch["sam"])
        return len(batch["label"])

    assert precise_bn(net, batches, forward, amp, 8) == 8  # two batches
    x = torch.cat([b["image"] for b in batches[:2]])
    torch.testing.assert_close(net.bn.running_mean, x.mean(dim=(0, 2, 3)))
    per_batch_var = torch.stack([b["image"].var(dim=(0, 2, 3)) for b in batches[:2]])
    torch.testing.assert_close(net.bn.running_var, per_batch_var.mean(0))
    assert net.bn.momentum == 0.1
    assert precise_bn(net, batches, forward, amp, 0) == 0
    assert precise_bn(torch.nn.Linear(2, 2), batches, forward, amp, 8) == 0


def test_slca_prior_is_the_probe_fit_frozen_through_training_and_resume(toy, tmp_path):
    ds, url = toy
    probe = train_classifier(_cfg(url, tmp_path / "probe", model="probe"), dataset=ds, progress=False)
    cfg = _cfg(url, tmp_path / "slca", model="slca", slca_prior=True, slca_prior_blend=False, epochs=2)
    train_classifier(cfg, dataset=ds, progress=False)
    fit = load_checkpoint(tmp_path / "probe" / "model.pt")["state_dict"]
    got = load_checkpoint(tmp_path / "slca" / "model.pt")
    assert got["model_kwargs"]["prior"] is True
    for k, v in fit.items():  # the same C, scaler and weights as the probe run, unchanged by training
        assert torch.equal(got["state_dict"][f"prior.{k}"], v), k
    rows = _csv(tmp_path / "slca" / "prior.csv")
    assert len(rows) == 5 and float(rows[0]["val_auc"]) == pytest.approx(
        float(_csv(tmp_path / "probe" / "history.csv")[0]["val_auc"]))
    assert probe["val"]["auc"] > 0.5
    # resumed: the prior is refitted to the same values, and last.pt restores them too
    train_classifier(dataclasses.replace(cfg, resume=True), dataset=ds, progress=False)
    again = load_checkpoint(tmp_path / "slca" / "model.pt")["state_dict"]
    assert all(torch.equal(again[k], got["state_dict"][k]) for k in again)
    # training on the in-sample logits instead of the out-of-fold ones gives another network
    insample = dataclasses.replace(cfg, out=str(tmp_path / "in"), slca_prior_folds=0)
    train_classifier(insample, dataset=ds, progress=False)
    other = load_checkpoint(tmp_path / "in" / "model.pt")["state_dict"]
    assert torch.equal(other["prior.fc.weight"], got["state_dict"]["prior.fc.weight"])
    assert not torch.equal(other["net.fc.weight"], got["state_dict"]["net.fc.weight"])
    with pytest.raises(ValueError, match="--slca-prior-folds 1"):
        train_classifier(dataclasses.replace(cfg, out=str(tmp_path / "bad"), slca_prior_folds=1), dataset=ds,
                         progress=False)


def test_slca_prior_blend_trains_alone_then_adds_the_prior_at_its_best_validation_weight(toy, tmp_path):
    from stages.classify.evaluate import evaluate_classifier
    from stages.classify.probe import BLEND_WEIGHTS

    ds, url = toy
    cfg = _cfg(url, tmp_path / "blend", model="slca", epochs=2)  # blending is the default
    metrics = train_classifier(cfg, dataset=ds, progress=False)
    saved = load_checkpoint(tmp_path / "blend" / "model.pt")
    rows = _csv(tmp_path / "blend" / "blend.csv")
    assert [float(r["prior_weight"]) for r in rows] == list(BLEND_WEIGHTS)
    w = saved["model_kwargs"]["prior_weight"]
    assert metrics["prior_weight"] == w and w in BLEND_WEIGHTS
    auc = {float(r["prior_weight"]): float(r["val_auc"]) for r in rows}
    assert auc[w] == max(auc.values())
    # the network trained alone: its best validation AUC in training is the blend's at weight 0
    best = max(float(r["val_auc"]) for r in _csv(tmp_path / "blend" / "history.csv"))
    assert auc[0.0] == pytest.approx(best)
    assert metrics["val"]["auc"] == pytest.approx(auc[w])
    # model.pt carries the weight: evaluate rebuilds the same blend
    again = evaluate_classifier(tmp_path / "blend" / "model.pt", url, dataset=ds, progress=False)
    assert again["test"]["auc"] == pytest.approx(metrics["test"]["auc"])
    # resuming the finished run (the state a stop while blending leaves: training done, model.pt
    # saved) chooses the same weight and writes blend.csv afresh
    resumed = train_classifier(dataclasses.replace(cfg, resume=True), dataset=ds, progress=False)
    assert resumed["prior_weight"] == w and resumed["test"]["auc"] == pytest.approx(metrics["test"]["auc"])
    assert _csv(tmp_path / "blend" / "blend.csv") == rows
    # without the prior there is nothing to blend: no weight is chosen, none is saved
    alone = train_classifier(dataclasses.replace(cfg, out=str(tmp_path / "alone"), slca_prior=False), dataset=ds,
                             progress=False)
    assert "prior_weight" not in alone and not (tmp_path / "alone" / "blend.csv").exists()
    assert "prior_weight" not in load_checkpoint(tmp_path / "alone" / "model.pt")["model_kwargs"]


def test_out_of_fold_prior_logits_are_those_of_fits_that_did_not_see_the_image(toy):
    """Held-out logits are less confident on the training images than the in-sample fit's
    (which is why the network trains on them), and every training image gets one."""
    from stages.classify.data import ClassifyData, make_loader
    from stages.classify.probe import fit_probe, out_of_fold_logits
    from stages.classify.train import HISTORY_FIELDS, prepare
    from stages.common.training import History
    from stages.models.sam_head import LinearProbe

    ds, url = toy
    cfg = _cfg(url, "unused", model="probe")
    prep = prepare(cfg, ds)
    load = {s: make_loader(ClassifyData(prep.joined, prep.splits[s], 32, False, True, False, False), 8, False, 0, 0,
                           prep.joined.store.shard_size) for s in ("train", "val")}
    probe = LinearProbe(len(prep.classes))
    fit = fit_probe(cfg, probe, load["train"], load["val"], prep, History("/dev/null", HISTORY_FIELDS), False)
    y = torch.from_numpy(prep.joined.labels[prep.splits["train"]])
    assert torch.equal(torch.from_numpy(fit.y), y)  # the fit's own features, in position order
    oof = torch.from_numpy(out_of_fold_logits(cfg, fit, len(prep.classes), 3, False))
    inside = torch.zeros_like(oof)
    for b in load["train"]:
        inside[b["pos"]] = probe(None, b["sam"]).detach()
    assert oof.shape == inside.shape == (len(y), len(prep.classes))
    ce = torch.nn.functional.cross_entropy
    assert ce(oof, y) > ce(inside, y) + 0.05
    assert (oof.argmax(1) == y).float().mean() > 0.5  # still a probe: right more often than not


def test_slca_distill_adds_its_auxiliary_loss_to_training(toy, tmp_path):
    ds, url = toy
    plain = _cfg(url, tmp_path / "plain", model="slca", epochs=1)
    train_classifier(plain, dataset=ds, progress=False)
    train_classifier(dataclasses.replace(plain, out=str(tmp_path / "kd"), slca_distill=1.0), dataset=ds,
                     progress=False)
    got = load_checkpoint(tmp_path / "kd" / "model.pt")
    assert got["model_kwargs"]["distill"] is True and "distill.weight" in got["state_dict"]
    loss = {k: float(_csv(tmp_path / k / "history.csv")[0]["train_loss"]) for k in ("plain", "kd")}
    assert loss["kd"] > loss["plain"] + 0.1  # cross-entropy + an MSE of order 1 on standardised targets
    with pytest.raises(ValueError, match="--slca-distill"):
        train_classifier(dataclasses.replace(plain, out=str(tmp_path / "bad"), slca_distill=-1), dataset=ds,
                         progress=False)


def test_slca_branch_sup_adds_the_branch_loss_to_training(toy, tmp_path):
    ds, url = toy
    plain = _cfg(url, tmp_path / "plain", model="slca", epochs=1, slca_prior=False, slca_branch_sup=0.0)
    train_classifier(plain, dataset=ds, progress=False)
    sup = dataclasses.replace(plain, out=str(tmp_path / "sup"), slca_branch_sup=1.0)
    assert ClassifyConfig(store="s", out="o").slca_branch_sup == 1.0  # the default
    train_classifier(sup, dataset=ds, progress=False)
    loss = {k: float(_csv(tmp_path / k / "history.csv")[0]["train_loss"]) for k in ("plain", "sup")}
    # a second cross-entropy of order log(K) on top of the first, from the same start
    assert loss["sup"] > loss["plain"] + 0.3
    same = load_checkpoint(tmp_path / "sup" / "model.pt")["model_kwargs"]
    assert same == load_checkpoint(tmp_path / "plain" / "model.pt")["model_kwargs"]  # a training choice only
    nobranch = dataclasses.replace(plain, out=str(tmp_path / "nb"), slca_branch=False)
    train_classifier(nobranch, dataset=ds, progress=False)
    train_classifier(dataclasses.replace(nobranch, out=str(tmp_path / "nb_sup"), slca_branch_sup=1.0), dataset=ds,
                     progress=False)
    assert _csv(tmp_path / "nb" / "history.csv")[0]["train_loss"] == _csv(tmp_path / "nb_sup" / "history.csv")[0][
        "train_loss"]  # without a branch the option has nothing to supervise
    with pytest.raises(ValueError, match="--slca-branch-sup"):
        train_classifier(dataclasses.replace(plain, out=str(tmp_path / "bad"), slca_branch_sup=-1), dataset=ds,
                         progress=False)


def test_slca_branch_detach_trains_the_branch_on_its_own_loss_only(toy, tmp_path):
    ds, url = toy
    joint = _cfg(url, tmp_path / "joint", model="slca", epochs=2, slca_prior=False)
    train_classifier(joint, dataset=ds, progress=False)
    train_classifier(dataclasses.replace(joint, out=str(tmp_path / "det"), slca_branch_detach=True), dataset=ds,
                     progress=False)
    got = {k: load_checkpoint(tmp_path / k / "model.pt") for k in ("joint", "det")}
    assert got["det"]["model_kwargs"]["branch_detach"] is True  # evaluate/predict rebuild it
    assert got["joint"]["model_kwargs"]["branch_detach"] is False
    # same seed, same batches: only the gradient reaching the branch differs (an identical run if it did not)
    moved = (got["joint"]["state_dict"]["branch.fc.weight"] - got["det"]["state_dict"]["branch.fc.weight"])
    assert moved.abs().max() > 1e-4
    for bad in (dict(slca_branch_sup=0.0), dict(slca_branch=False)):
        with pytest.raises(ValueError, match="--slca-branch-detach"):
            train_classifier(dataclasses.replace(joint, out=str(tmp_path / "bad"), slca_branch_detach=True, **bad),
                             dataset=ds, progress=False)
    assert not (tmp_path / "bad").exists()


def test_slca_independent_trains_each_part_on_its_own_loss_only(toy, tmp_path):
    ds, url = toy
    # no gradient clipping: a global norm would couple the parts' updates; last.pt: every run
    # ends after the same epochs (model.pt's best epoch may differ)
    base = _cfg(url, tmp_path, model="slca", slca_prior=False, clip_grad=0.0, slca_image_sup=1.0)

    def parts(name: str, **kw) -> tuple[torch.Tensor, torch.Tensor]:
        """(branch, image part) weights after training, each flattened into one vector."""
        train_classifier(dataclasses.replace(base, out=str(tmp_path / name), **kw), dataset=ds, progress=False)
        state = load_checkpoint(tmp_path / name / "last.pt")["state_dict"]
        branch, image = ([v.float().flatten() for k, v in state.items() if k.startswith(p)]
                         for p in ("branch.", "net."))
        return torch.cat(branch), torch.cat(image)

    def gap(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max())

    # a faster SLCA (an image-part setting) changes the image part; the branch sees that only
    # through the summed loss
    ind1, ind2 = parts("ind1", slca_independent=True), parts("ind2", slca_independent=True, slca_lr_mult=3.0)
    torch.testing.assert_close(ind1[0], ind2[0])
    assert gap(ind1[1], ind2[1]) > 1e-3
    joint1, joint2 = parts("joint1"), parts("joint2", slca_lr_mult=3.0)
    assert gap(joint1[0], joint2[0]) > 1e-3
    assert gap(joint1[1], ind1[1]) > 1e-3  # and dropping the summed loss changes the image part
    assert gap(joint1[1], parts("sum_only", slca_image_sup=0.0)[1]) > 1e-3  # as does the image part's own loss
    for bad in (dict(slca_image_sup=0.0), dict(slca_branch_sup=0.0)):
        with pytest.raises(ValueError, match="--slca-independent"):
            train_classifier(dataclasses.replace(base, out=str(tmp_path / "bad"), slca_independent=True, **bad),
                             dataset=ds, progress=False)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="--slca-image-sup"):
        train_classifier(dataclasses.replace(base, out=str(tmp_path / "bad"), slca_image_sup=-1.0), dataset=ds,
                         progress=False)
