"""Test-time augmentation (``--tta``): the views are the symmetries a model was trained on,
the scores are the mean logits over those views of the image and the SAM grid together, and
`evaluate`, `predict` and the benchmark over compare folders apply it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from toy_store import make_toy
from typer.testing import CliRunner

from pipeline.cli import app
from stages.classify.augment import transform, tta_views
from stages.classify.data import ClassifyData, make_loader
from stages.classify.evaluate import _rows, evaluate_classifier, load_classifier
from stages.classify.metrics import classification_metrics
from stages.classify.train import ClassifyConfig, train_classifier
from stages.common.joined import open_joined

FAST = dict(backbone="resnet10t", img_size=32, batch_size=8, workers=0, epochs=2, plots=False)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy(tmp_path_factory.mktemp("toy"), n_per_class=12)


@pytest.fixture(scope="module")
def slca_run(toy, tmp_path_factory) -> Path:
    ds, url = toy
    out = tmp_path_factory.mktemp("slca")
    train_classifier(ClassifyConfig(store=url, out=str(out), model="slca", **FAST), dataset=ds, progress=False)
    return out


def test_the_views_are_the_symmetries_of_the_square_the_model_was_trained_on():
    x = torch.arange(9.0).reshape(1, 3, 3)
    for modes, n in ((("flip",), 4), (("rot",), 8), (("flip", "rot", "photometric"), 8)):
        views = tta_views(modes)
        seen = {tuple(transform(x, v).flatten().tolist()) for v in views}
        assert len(views) == len(seen) == n and tuple(x.flatten().tolist()) in seen
    assert {tuple(transform(x, v).flatten().tolist()) for v in tta_views(("flip",))} == {
        tuple(x.flip(d).flatten().tolist()) if d else tuple(x.flatten().tolist()) for d in ((), (-1,), (-2,), (-2, -1))}
    assert transform(None, (True, True, 1)) is None
    for modes in ((), ("photometric",)):
        with pytest.raises(ValueError, match="--tta: this model was trained without flips"):
            tta_views(modes)


def test_evaluate_tta_scores_the_mean_logits_over_flips_of_image_and_grid(toy, slca_run):
    ds, url = toy
    net, saved = load_classifier(slca_run / "model.pt")
    joined = open_joined(url, ds, None, None, None)
    rows = _rows(saved, joined.store, joined.rows, "test")
    data = ClassifyData(joined, rows, int(saved["img_size"]), True, True, False, False)
    probs, plain = np.zeros((len(rows), 2)), np.zeros((len(rows), 2))
    with torch.no_grad():
        for batch in make_loader(data, 8, False, 0, 0, joined.store.shard_size, pin=False):
            image, sam, pos = batch["image"], batch["sam"].float(), batch["pos"].numpy()
            z = [net(image.flip(d) if d else image, sam.flip(d) if d else sam) for d in ((), (-1,), (-2,), (-2, -1))]
            probs[pos] = torch.softmax(torch.stack(z).mean(0), 1).numpy()
            plain[pos] = torch.softmax(z[0], 1).numpy()
    assert not np.allclose(probs, plain, atol=1e-4)  # the flips change this model's answer
    want = classification_metrics(joined.store.labels[rows], probs, ["c0", "c1"])
    got = evaluate_classifier(slca_run / "model.pt", url, dataset=ds, progress=False, tta=True)["test"]
    for k in ("auc", "accuracy", "balanced_accuracy", "f1_macro"):
        assert got[k] == pytest.approx(want[k], abs=1e-6, nan_ok=True), k


def test_a_model_trained_without_flips_refuses_tta(toy, tmp_path):
    ds, url = toy
    train_classifier(ClassifyConfig(store=url, out=str(tmp_path), model="sam-head", augment="none", **FAST),
                     dataset=ds, progress=False)
    with pytest.raises(ValueError, match="trained without flips or rotations"):
        evaluate_classifier(tmp_path / "model.pt", url, dataset=ds, progress=False, tta=True)


def test_cli_evaluate_and_predict_take_tta_on_a_real_store(synthetic_store, synthetic_root, tmp_path):
    """Through the CLI on a litemedsam store: `evaluate --tta` writes what it did into
    metrics.json; `predict --tta` runs the real encoder once per image and averages the
    sam-head over flips of its grid, which the pooled probe does not see (equal output)."""
    runner = CliRunner()
    images = [str(p) for p in sorted((synthetic_root / "images").glob("*.png"))[:2]]
    probs = {}
    for model in ("sam-head", "probe"):
        out = tmp_path / model
        r = runner.invoke(app, ["train", "--from-cache", str(synthetic_store), "--model", model, "--out", str(out),
                                "--epochs", "2", "--no-plots", "-q"])
        assert r.exit_code == 0, r.output
        for tta in ((), ("--tta",)):
            r = runner.invoke(app, ["predict", str(out / "model.pt"), *images, "--format", "json", *tta])
            assert r.exit_code == 0, r.output
            probs[model, bool(tta)] = np.array([list(x["probs"].values()) for x in json.loads(r.stdout)])
    assert np.allclose(probs["probe", False], probs["probe", True], atol=1e-6)
    assert not np.allclose(probs["sam-head", False], probs["sam-head", True], atol=1e-6)
    np.testing.assert_allclose(probs["sam-head", True].sum(1), 1, atol=1e-5)
    r = runner.invoke(app, ["evaluate", str(tmp_path / "sam-head" / "model.pt"), "--tta", "--out",
                            str(tmp_path / "ev"), "-q"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["tta"] is True


def test_bench_tta_scores_a_compare_folder_both_ways(toy, tmp_path):
    """The benchmark re-scores a real `pipeline compare` folder's runs: its plain scores are
    the runs' own metrics.json, and the table pairs the first model with the others."""
    from benchmarks import bench_tta
    from stages.classify import compare as cmp

    ds, url = toy
    cc = cmp.CompareConfig(store=url, out=str(tmp_path / "cmp"), models=["slca", "backbone"], fractions=[1.0],
                           seeds=[0, 1], options={**FAST, "epochs": 1})
    cmp.run_compare(cc, dataset=ds, progress=False)
    scores = bench_tta.folder_scores(Path(cc.out), cc.models, ds)
    assert set(scores) == {("f1", "slca"), ("f1", "backbone")}
    for (_, model), runs in scores.items():
        assert set(runs) == {"s0", "s1"}
        for seed, got in runs.items():
            m = json.loads((cmp.run_dir(cc.out, model, 1.0, int(seed[1:])) / "metrics.json").read_text())
            assert got["test"] == pytest.approx(m["test"]["auc"]) and got["val"] == pytest.approx(m["val"]["auc"])
            assert 0 <= got["test_tta"] <= 1 and 0 <= got["val_tta"] <= 1
    lines = bench_tta.tables("cmp", scores, cc.models)
    assert [line.split("|")[3].strip() for line in lines] == ["backbone", "slca", "slca - backbone"]
    margin = np.mean([scores["f1", "slca"][s]["test_tta"] - scores["f1", "backbone"][s]["test_tta"]
                      for s in ("s0", "s1")])
    assert f"{margin:+.3f}" in lines[-1].split("|")[8]


def test_tta_on_a_segmentation_model_is_one_error_line(tmp_path):
    """Refused before any store or image is read (a model.pt carrying only its task and store)."""
    model = tmp_path / "model.pt"
    torch.save({"task": "segment", "store": {"url": str(tmp_path / "none.zarr")}}, model)
    runner = CliRunner()
    for args in (["evaluate", str(model), "--tta"], ["predict", str(model), str(tmp_path / "x.png"), "--tta"]):
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and "--tta is for classifiers" in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1
