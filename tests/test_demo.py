"""The committed `dvc repro` report (reports/metrics.json) is the first thing a new user
sees: every model in it must have learnt, and the comparison must point the way the
benchmarks do. test_dvc_deps.py checks that dvc.lock (and so this report) is up to date
with the code, so these numbers are the code's, not a stale file's."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _report() -> dict:
    return json.loads((ROOT / "reports" / "metrics.json").read_text())


def test_the_report_holds_every_configured_model():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    report = _report()
    assert set(report["classify"]) == set(params["models"]["classify"])
    assert set(report["segment"]) == set(params["models"]["segment"])


def test_every_classifier_is_well_above_chance():
    # three phantom classes: chance is accuracy 1/3 and AUC 0.5
    for name, m in _report()["classify"].items():
        assert m["test_auc"] >= 0.75 and m["test_accuracy"] >= 0.55, (name, m)


def test_slca_beats_its_backbone_on_the_demo():
    c = _report()["classify"]
    assert c["slca"]["test_auc"] > c["backbone"]["test_auc"], c


def test_every_segmentation_head_finds_the_lesions():
    for name, m in _report()["segment"].items():
        assert m["test_dice"] >= 0.3, (name, m)
