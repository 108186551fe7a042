"""`pipeline compare`: models x fractions x seeds on a real (toy) store through the normal
training path; the table and JSON equal the runs' own metrics.json, finished runs are
reused, an interrupted run resumes, run folders of other settings and foreign output
folders are refused, and the CLI end to end on a store extracted with the real encoder."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from toy_store import make_toy

from stages.classify import train as classify_mod
from stages.classify import compare as cmp
from stages.classify.compare import CompareConfig, parse_variant, run_compare
from stages.common.training import load_checkpoint

FAST = dict(backbone="resnet10t", img_size=32, batch_size=8, workers=0, epochs=1, precise_bn=0)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy(tmp_path_factory.mktemp("toy"), n_per_class=12)


@pytest.fixture(scope="module")
def compared(toy, tmp_path_factory):
    """2 models x 2 fractions x 2 seeds, trained once for the module."""
    ds, url = toy
    cc = CompareConfig(store=url, out=str(tmp_path_factory.mktemp("cmp") / "cmp"), models=["backbone", "probe"],
                       fractions=[0.5, 1.0], seeds=[0, 1], options=FAST)
    return cc, run_compare(cc, dataset=ds, progress=False)


def _metrics(out: str, model: str, frac: float, seed: int) -> dict:
    return json.loads((cmp.run_dir(out, model, frac, seed) / "metrics.json").read_text())


def test_table_and_json_equal_the_runs_metrics(compared):
    cc, report = compared
    out = Path(cc.out)
    saved = json.loads((out / "compare.json").read_text())
    assert saved["complete"] and saved["format"] == cmp.COMPARE_FORMAT
    assert len(saved["runs"]) == 8 and {r["status"] for r in saved["runs"]} == {"trained"}
    for r in saved["runs"]:
        assert r["metrics"] == _metrics(cc.out, r["model"], r["fraction"], r["seed"])
        assert (out / r["dir"] / "model.pt").is_file()
    md = (out / "compare.md").read_text()
    rows = {(r["model"], r["fraction"]): r for r in saved["summary"]}
    assert set(rows) == {(m, f) for m in cc.models for f in cc.fractions}
    for (model, frac), row in rows.items():
        ms = [_metrics(cc.out, model, frac, s) for s in cc.seeds]
        assert row["n_train"] == sorted({m["n_train"] for m in ms})
        for key in ("auc", "accuracy", "balanced_accuracy"):
            v = np.array([m["test"][key] for m in ms])
            assert row[key]["mean"] == pytest.approx(v.mean()) and row[key]["std"] == pytest.approx(v.std(ddof=1))
        val = np.array([m["val"]["auc"] for m in ms])
        assert row["val_auc"]["mean"] == pytest.approx(val.mean())
        assert row["gate_max_dev"]["n"] == 0  # no SLCA in these models
        cells = [f"{row[k]['mean']:.3f} ± {row[k]['std']:.3f}" for k in ("auc", "accuracy", "balanced_accuracy")]
        line = f"| {model} | {frac:g} | {row['n_train'][0]} | " + " | ".join(cells)
        assert line in md, (line, md)
        if model == "probe":  # paired by seed against backbone at the same fraction
            base = [_metrics(cc.out, "backbone", frac, s)["test"]["auc"] for s in cc.seeds]
            d = np.array([m["test"]["auc"] for m in ms]) - np.array(base)
            got = row["delta_auc_vs_backbone"]
            assert got["mean"] == pytest.approx(d.mean()) and got["std"] == pytest.approx(d.std(ddof=1))
            assert f"{d.mean():+.3f} ± {d.std(ddof=1):.3f}" in line + md.split(line, 1)[1].splitlines()[0]
    assert (out / "compare.png").stat().st_size > 1000


def test_slca_runs_report_their_gate_spread(toy, tmp_path):
    """compare runs write no figures, but every SLCA run still records its gates, and the
    table's gate column is the largest departure from the identity over its stages."""
    ds, url = toy
    cc = CompareConfig(store=url, out=str(tmp_path / "cmp"), models=["slca/norm=1"], fractions=[1.0], seeds=[0],
                       options=FAST)
    report = run_compare(cc, dataset=ds, progress=False)
    run_out = cmp.run_dir(cc.out, "slca/norm=1", 1.0, 0)
    saved = json.loads((run_out / "slca_gates.json").read_text())
    assert not (run_out / "slca_attention.png").exists()
    assert report["runs"][0]["gates"] == saved and len(saved) >= 2
    worst = max(g["max_abs_dev"] for g in saved.values())
    assert worst > 0 and report["summary"][0]["gate_max_dev"]["mean"] == pytest.approx(worst)
    assert f"{worst:.3f}" in (tmp_path / "cmp" / "compare.md").read_text()
    with pytest.raises(ValueError, match=r"other settings \(slca_window\)"):  # they do concern slca runs
        run_compare(dataclasses.replace(cc, options={**FAST, "slca_window": 4}), dataset=ds, progress=False)


def test_second_invocation_reuses_every_finished_run(compared, toy):
    cc, first = compared
    ds, _ = toy
    pts = sorted(Path(cc.out).glob("runs/*/*/*/model.pt"))
    before = {p: p.stat().st_mtime_ns for p in pts}
    again = run_compare(dataclasses.replace(cc, options={**FAST, "workers": 0, "device": "cpu"}),
                        dataset=ds, progress=False)
    assert len(pts) == 8 and {p: p.stat().st_mtime_ns for p in pts} == before
    assert {r["status"] for r in again["runs"]} == {"reused"}
    assert again["summary"] == first["summary"]
    # SLCA settings do not concern backbone and probe runs: another SLCA default reuses them
    slca_changed = {**FAST, "slca_window": 4, "slca_norm": False}
    assert {r["status"] for r in run_compare(dataclasses.replace(cc, options=slca_changed), dataset=ds,
                                             progress=False)["runs"]} == {"reused"}


def test_interrupted_run_resumes_and_the_rest_is_trained(toy, tmp_path, monkeypatch):
    ds, url = toy
    cc = CompareConfig(store=url, out=str(tmp_path / "cmp"), models=["backbone", "probe"], fractions=[1.0],
                       seeds=[0], options={**FAST, "epochs": 2})
    per_epoch = -(-sum(1 for x in ds.samples if x.split == "train") // FAST["batch_size"])
    real, calls = classify_mod.augment, {"n": 0}

    def killed(*a):
        calls["n"] += 1
        if calls["n"] > per_epoch:  # Ctrl-C in the first batch of epoch 2 of the backbone run
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(classify_mod, "augment", killed)
    with pytest.raises(KeyboardInterrupt):
        run_compare(cc, dataset=ds, progress=False)
    run = cmp.run_dir(cc.out, "backbone", 1.0, 0)
    assert load_checkpoint(run / "last.pt")["epoch"] == 1 and not (run / "metrics.json").exists()
    assert not cmp.run_dir(cc.out, "probe", 1.0, 0).exists()
    assert cmp.is_compare_dir(cc.out)  # the marker was written before training
    monkeypatch.setattr(classify_mod, "augment", real)
    report = run_compare(cc, dataset=ds, progress=False)
    assert [r["status"] for r in report["runs"]] == ["resumed", "trained"]
    assert load_checkpoint(run / "last.pt")["epoch"] == 2
    assert len((run / "history.csv").read_text().splitlines()) == 3  # header + epochs 1 and 2
    assert report["runs"][0]["metrics"] == json.loads((run / "metrics.json").read_text())


def test_run_of_other_settings_is_refused_and_overwrite_deletes_only_its_files(toy, tmp_path):
    ds, url = toy
    cc = CompareConfig(store=url, out=str(tmp_path / "cmp"), models=["probe"], fractions=[1.0], seeds=[0],
                       options=FAST)
    run_compare(cc, dataset=ds, progress=False)
    run = cmp.run_dir(cc.out, "probe", 1.0, 0)
    (run / "notes.txt").write_text("mine")
    (tmp_path / "cmp" / "mine.txt").write_text("mine")
    other = dataclasses.replace(cc, options={**FAST, "probe_c": "1"})
    with pytest.raises(ValueError, match=r"s0: holds a run made with other settings \(probe_c\); pass --overwrite"):
        run_compare(other, dataset=ds, progress=False)
    assert json.loads((run / "config.json").read_text())["probe_c"] != "1"
    other.overwrite = True
    report = run_compare(other, dataset=ds, progress=False)
    assert report["runs"][0]["status"] == "retrained"
    assert json.loads((run / "config.json").read_text())["probe_c"] == "1"
    assert (run / "notes.txt").read_text() == "mine" and (tmp_path / "cmp" / "mine.txt").read_text() == "mine"


def test_jobs_train_runs_at_once_exactly_as_one_at_a_time(toy, tmp_path, capfd):
    """--jobs 2 from a two-thread process trains in two spawned one-thread processes: every
    run's weights and metrics equal the same comparison trained here with one thread."""
    ds, url = toy
    base = CompareConfig(store=url, out=str(tmp_path / "one"), models=["backbone", "probe"], fractions=[1.0],
                         seeds=[0, 1], options=FAST)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_compare(base, dataset=ds, progress=False)
        torch.set_num_threads(2)
        two = run_compare(dataclasses.replace(base, out=str(tmp_path / "two"), jobs=2), dataset=ds)
    finally:
        torch.set_num_threads(threads)
    assert "4 runs to train, 2 at a time, 1 thread(s) each" in capfd.readouterr().err
    assert [r["status"] for r in two["runs"]] == ["trained"] * 4
    for a, b in zip(one["runs"], two["runs"]):
        assert (a["model"], a["seed"], a["metrics"]["val"], a["metrics"]["test"]) == \
            (b["model"], b["seed"], b["metrics"]["val"], b["metrics"]["test"])
        wa = load_checkpoint(tmp_path / "one" / a["dir"] / "model.pt")["state_dict"]
        wb = load_checkpoint(tmp_path / "two" / b["dir"] / "model.pt")["state_dict"]
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert one["summary"] == two["summary"]
    with pytest.raises(ValueError, match="--jobs 0: must be at least 1"):
        run_compare(dataclasses.replace(base, out=str(tmp_path / "three"), jobs=0), dataset=ds)
    assert not (tmp_path / "three").exists()


def test_variants_and_settings_are_parsed_against_the_training_config():
    assert parse_variant("slca/window=0/gate=mul/fuse=1") == ("slca", {"slca_window": 0, "slca_gate": "mul",
                                                                      "slca_fuse": True})
    assert parse_variant("backbone/lr=0.01/img=48/label-smoothing=0.1") == (
        "backbone", {"lr": 0.01, "img_size": 48, "label_smoothing": 0.1})
    assert cmp.run_name("slca/window=0") == "slca+window=0"
    assert parse_variant("slca/augment=flip+photometric/branch_sup=0") == (
        "slca", {"augment": "flip+photometric", "slca_branch_sup": 0.0})
    assert parse_variant("slca/branch_detach=1") == ("slca", {"slca_branch_detach": True})
    assert parse_variant("slca/image_sup=0.5/independent=1") == ("slca", {"slca_image_sup": 0.5,
                                                                           "slca_independent": True})
    with pytest.raises(ValueError, match=r"--models 'slca/windw=0': unknown setting 'windw'"):
        parse_variant("slca/windw=0")
    with pytest.raises(ValueError, match=r"slca_window='x' is not int"):
        parse_variant("slca/window=x")
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        parse_variant("resnet")
    with pytest.raises(ValueError, match="'seed' is set by the comparison itself"):
        parse_variant("slca/seed=3")


def test_backbone_weights_apply_only_to_models_with_a_backbone(toy, tmp_path):
    _, url = toy
    runs = cmp.build_runs(CompareConfig(store=url, out=str(tmp_path), models=["slca", "probe", "sam-head"],
                                        options={"backbone_weights": "w.pth", "lr": "0.01"}))
    assert [(r.cfg.model, r.cfg.backbone_weights, r.cfg.lr) for r in runs] == [
        ("slca", "w.pth", 0.01), ("probe", None, 0.01), ("sam-head", None, 0.01)]
    assert runs[0].cfg.out == str(tmp_path / "runs" / "slca" / "f1" / "s0")


def _cli(args):
    from typer.testing import CliRunner

    from pipeline.cli import app

    return CliRunner().invoke(app, ["compare", *map(str, args)])


def test_cli_compare_on_a_real_store(synthetic_store, tmp_path):
    out = tmp_path / "cmp"
    args = ["--from-cache", synthetic_store, "--out", out, "--models", "probe,sam-head", "--fractions", "1.0",
            "--seeds", "0", "--epochs", "1", "--batch-size", "4", "--workers", "0", "--set", "precise_bn=0", "-q"]
    r = _cli(args)
    assert r.exit_code == 0, r.output
    assert "| probe | 1 |" in r.stdout and "| sam-head | 1 |" in r.stdout and "±" not in r.stdout.split("\n\n")[0]
    assert r.stdout.startswith((out / "compare.md").read_text().strip().splitlines()[0])
    assert json.loads((out / "compare.json").read_text())["complete"]
    assert (out / "runs" / "sam-head" / "f1" / "s0" / "model.pt").is_file()
    pt = out / "runs" / "probe" / "f1" / "s0" / "model.pt"
    before = pt.stat().st_mtime_ns
    r = _cli([*args, "--jobs", "2"])  # reused: nothing to hand to jobs
    assert r.exit_code == 0 and pt.stat().st_mtime_ns == before
    bad = _cli([*args, "--set", "bogus=1"])
    assert bad.exit_code == 2 and "unknown setting 'bogus'" in bad.output and len(bad.output.splitlines()) == 1
    bad = _cli([*args, "--epochs", "0"])
    assert bad.exit_code == 2 and "--epochs 0: must be at least 1" in bad.output
    bad = _cli([*args, "--jobs", "0"])
    assert bad.exit_code == 2 and "--jobs 0: must be at least 1" in bad.output and len(bad.output.splitlines()) == 1


def test_cli_refuses_a_foreign_non_empty_out(synthetic_store, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("x")
    for extra in ([], ["--overwrite"]):
        r = _cli(["--from-cache", synthetic_store, "--out", out, "--models", "probe", "--fractions", "1",
                  "--seeds", "0", "-q", *extra])
        assert r.exit_code == 2 and len(r.output.splitlines()) == 1
        assert r.output.startswith(f"error: {out}: is not empty and not a `pipeline compare` folder")
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]
    r = _cli(["--from-cache", tmp_path / "nostore.zarr", "--out", tmp_path / "new", "--models", "probe", "-q"])
    assert r.exit_code == 2 and "no feature store there" in r.output and not (tmp_path / "new").exists()


def test_cli_refuses_a_users_compare_md_or_a_link_before_training(synthetic_store, tmp_path):
    """compare.md and compare.png are rewritten at the end of a comparison: one that is not
    ours (a note of yours under that name, a link to elsewhere) is refused before any run."""
    from stages.classify.compare import COMPARE_FORMAT

    out = tmp_path / "cmp"
    out.mkdir()
    (out / "compare.json").write_text(json.dumps({"format": COMPARE_FORMAT}))
    elsewhere = tmp_path / "paper.md"
    elsewhere.write_text("| model | fraction | my own table |")
    for name, make in (("compare.md", lambda f: f.write_text("# my notes on the comparison\n")),
                       ("compare.png", lambda f: f.write_text("not a picture")),
                       ("compare.md", lambda f: f.symlink_to(elsewhere))):
        make(out / name)
        for extra in ([], ["--overwrite"]):
            r = _cli(["--from-cache", synthetic_store, "--out", out, "--models", "probe", "--fractions", "1",
                      "--seeds", "0", "-q", *extra])
            assert r.exit_code == 2 and len(r.output.splitlines()) == 1, r.output
            assert r.output.startswith(f"error: {out / name}: not written by `pipeline compare`")
        assert not (out / "runs").exists()
        (out / name).unlink()
    assert elsewhere.read_text() == "| model | fraction | my own table |"


def test_bench_slca_aggregates_compare_folders_and_keeps_foreign_files(compared, tmp_path):
    import subprocess
    import sys

    cc, report = compared
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_slca.py"
    out = tmp_path / "agg"

    def bench(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), f"a={cc.out}", f"b={cc.out}", "--out", str(out), *args],
                              capture_output=True, text=True)

    done = bench()
    assert done.returncode == 0, done.stderr
    saved = json.loads((out / "bench_slca.json").read_text())
    for row in report["summary"]:  # the same folder twice: the mean over datasets is its table
        cell = saved["tables"]["mean"][f"{row['model']}@{row['fraction']:g}"]
        assert cell["auc"] == pytest.approx(row["auc"]["mean"]) and cell["auc"] == saved["tables"]["a"][
            f"{row['model']}@{row['fraction']:g}"]["auc"]
    assert saved["chosen"] is None  # no slca variant among the models
    assert bench().returncode == 0  # its own outputs are replaced
    (out / "bench_slca.json").write_text("{}")
    (out / "bench_slca.md").write_text("someone's notes\n")
    refused = bench()
    assert refused.returncode != 0 and "not written by bench_slca.py" in refused.stderr
    assert (out / "bench_slca.md").read_text() == "someone's notes\n"


def test_a_run_older_than_an_option_counts_as_made_without_it():
    """A config.json written before --slca-norm existed is a run without it, not one with
    today's default (norm on): reusing it as such would mislabel its numbers."""
    want = dataclasses.asdict(dataclasses.replace(cmp.ClassifyConfig(store="s", out="o"), model="slca"))
    new = ("slca_norm", "slca_branch", "slca_prior", "slca_prior_blend")
    old = {k: v for k, v in want.items() if k not in new}
    assert set(cmp._same(old, want)) == set(new)  # all on by default now
    assert cmp._same({**old, **{k: True for k in new}}, want) == []
    assert cmp._same({**old, "model": "probe"}, {**want, "model": "probe"}) == []  # no SLCA in a probe run


def test_settings_without_effect_do_not_block_reuse():
    """A run differs from a request only in settings that change it: without the prior there
    is nothing to blend or fold, and a blended prior uses no out-of-fold logits."""
    alone = dataclasses.asdict(dataclasses.replace(cmp.ClassifyConfig(store="s", out="o"), model="slca",
                                                   slca_prior=False))
    # an slca/prior=0 run made when stacking was the default is today's slca/prior=0
    assert cmp._same({**alone, "slca_prior_blend": False, "slca_prior_folds": 0}, alone) == []
    blend = {**alone, "slca_prior": True}
    assert cmp._same({**blend, "slca_prior_folds": 3}, blend) == []
    stack = {**blend, "slca_prior_blend": False}
    assert cmp._same({**stack, "slca_prior_folds": 3}, stack) == ["slca_prior_folds"]
    assert cmp._same(stack, blend) == ["slca_prior_blend"]
    assert set(cmp._same(alone, blend)) == {"slca_prior"}
    # without a branch, neither its loss weight nor whether it is its only loss changes anything
    nobranch = {**alone, "slca_branch": False}
    assert cmp._same({**nobranch, "slca_branch_sup": 0.0, "slca_branch_detach": True}, nobranch) == []
    assert cmp._same({**alone, "slca_branch_detach": True}, alone) == ["slca_branch_detach"]
    assert cmp._same({k: v for k, v in alone.items() if k != "slca_branch_detach"}, alone) == []  # older run
    older = {k: v for k, v in alone.items() if k not in ("slca_image_sup", "slca_independent")}
    # a run from before the image part's own loss had none: today's slca/image_sup=0, not today's slca
    assert cmp._same(older, {**alone, "slca_image_sup": 0.0}) == []
    assert cmp._same(older, alone) == ["slca_image_sup"]


@pytest.fixture(scope="module")
def slca_compared(toy, tmp_path_factory):
    """One default slca run (branch and blended prior), trained once for the module."""
    ds, url = toy
    cc = CompareConfig(store=url, out=str(tmp_path_factory.mktemp("cmp") / "cmp"), models=["slca"], fractions=[1.0],
                       seeds=[0], options=FAST)
    run_compare(cc, dataset=ds, progress=False)
    return cc


def test_bench_blend_reads_the_blended_runs_curves(slca_compared, tmp_path):
    import subprocess
    import sys

    cc = slca_compared
    run_out = cmp.run_dir(cc.out, "slca", 1.0, 0)
    rows = (run_out / "blend.csv").read_text().splitlines()[1:]
    auc = [float(r.split(",")[3]) for r in rows]
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_blend.py"
    done = subprocess.run([sys.executable, str(script), cc.out, "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(done.stdout).values()
    chosen = _metrics(cc.out, "slca", 1.0, 0)["prior_weight"]
    assert row["runs"] == 1 and row["chosen"] == {f"{chosen:g}": 1}
    assert row["last_step_max"] == pytest.approx(auc[-1] - auc[-2]) and row["gain_median"] == pytest.approx(
        max(auc) - auc[0])
    (tmp_path / "none").mkdir()
    empty = subprocess.run([sys.executable, str(script), str(tmp_path / "none")], capture_output=True, text=True)
    assert empty.returncode != 0 and "no blend.csv below it" in empty.stderr


def test_bench_classify_passes_its_set_pairs_to_every_run(toy, tmp_path):
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "bench_classify", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_classify.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ds, url = toy
    args = argparse.Namespace(backbone="resnet10t", img_size=32, epochs=1, patience=0, batch_size=8, in_memory=False,
                              models=["slca"], fractions=[1.0], seeds=[0], overwrite=False, jobs=3,
                              settings=["slca_branch_sup=0", "precise-bn=0", "workers=0"])
    cc = bench.compare_config(args, url, tmp_path / "cmp")
    assert cc.jobs == 3
    run_compare(cc, dataset=ds, progress=False)  # one run to train: trained here, not in a job
    cfg = json.loads((cmp.run_dir(cc.out, "slca", 1.0, 0) / "config.json").read_text())
    assert (cfg["slca_branch_sup"], cfg["precise_bn"], cfg["workers"]) == (0.0, 0, 0)
    with pytest.raises(SystemExit, match="--set 'slca_branch_sup': expected KEY=VALUE"):
        bench.compare_config(argparse.Namespace(**{**vars(args), "settings": ["slca_branch_sup"]}), url, tmp_path)


def test_bench_parts_splits_slca_into_parts_that_sum_to_its_logits(slca_compared, toy):
    """The image part, the branch and the prior at the saved weight add up to the trained
    model's test predictions, and the ``auc`` rule (what training does) re-chooses that weight."""
    import csv

    import torch

    from benchmarks import bench_parts
    from cache import FeatureStore
    from stages.classify.evaluate import _rows
    from stages.classify.probe import BLEND_WEIGHTS
    from stages.common.joined import open_joined

    cc, (ds, _) = slca_compared, toy
    run = cmp.run_dir(cc.out, "slca", 1.0, 0)
    joined = open_joined(FeatureStore(cc.store), ds)
    net, saved = bench_parts.load_slca(run)
    y, z = bench_parts.logit_parts(net, saved, joined, "test")
    w = saved["model_kwargs"]["prior_weight"]
    probs = torch.softmax(torch.as_tensor(bench_parts.combine(z, w, True)), 1).numpy()
    ids = [str(i) for i in joined.store.ids[_rows(saved, joined.store, joined.rows, "test")]]
    with open(run / "predictions.csv", newline="") as f:
        want = {r["id"]: [float(r[k]) for k in r if k.startswith("prob_")] for r in csv.DictReader(f)
                if r["split"] == "test"}
    assert sorted(ids) == sorted(want) and len(ids) > 0
    np.testing.assert_allclose(probs, [want[i] for i in ids], atol=2e-5)
    got = bench_parts.run_parts(run, joined, BLEND_WEIGHTS)
    assert got["w_auc"] == w and got["auc"] == pytest.approx(_metrics(cc.out, "slca", 1.0, 0)["test"]["auc"], abs=1e-6)
    assert got["image_auc"] == 1.0 and got["image_loss"] == 1.0
    for rule in bench_parts.RULES:
        assert 0 <= got[f"val half {rule}"] <= 1 and got[f"w_{rule}"] in BLEND_WEIGHTS


def test_bench_shift_tells_a_shifted_split_from_a_random_one(slca_compared, toy):
    """The domain classifier finds a test split drawn from other images and not one drawn
    from the same; on a compare folder it uses the run's own splits."""
    from benchmarks import bench_shift
    from stages.common.training import load_checkpoint

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 100)
    domain = np.tile(np.repeat([0, 1], 50), 2)
    same = rng.normal(size=(200, 20))
    shifted = same + 2.0 * domain[:, None] * (np.arange(20) < 3)
    assert bench_shift.domain_auc(shifted, domain, labels) > 0.9
    assert bench_shift.domain_auc(same, domain, labels) < 0.65

    cc, (ds, _) = slca_compared, toy
    row = bench_shift.folder_row(Path(cc.out), ds)
    splits = load_checkpoint(cmp.run_dir(cc.out, "slca", 1.0, 0) / "model.pt")["splits"]
    assert (row["seen"], row["test"]) == (len(splits["train"]) + len(splits["val"]), len(splits["test"]))
    assert all(0 <= row[v] <= 1 for v in (*bench_shift.VIEWS, "null"))
