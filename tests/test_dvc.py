"""dvc.yaml end to end: a copy of the repository, `git init`, `dvc init`, `dvc repro` with
the repository's params.yaml shrunk (12 phantoms of 64 px, one epoch), then a second
`dvc repro` that must do nothing."""
from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.report import ReportError, collect

pytestmark = [pytest.mark.dvc, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
SKIP = (".dvc/", "dvc.lock", "reports/")  # the copy gets its own, like a fresh clone before `dvc repro`


def reduced_params() -> dict:
    """The repository's params.yaml with the sizes cut down (same keys, so the test follows it)."""
    p = copy.deepcopy(yaml.safe_load((ROOT / "params.yaml").read_text()))
    assert p["data"]["kind"] == "synthetic", "params.yaml: the default dataset must be the embedded phantoms"
    p["generate"].update({"per-class": 4, "size": 64})
    p["train"].update({"epochs": 1, "batch-size": 8})
    p["segment"].update({"epochs": 1, "batch-size": 4})
    return p


def run(args: list[str], cwd: Path, env: dict, timeout: float = 1800, stdout_only: bool = False) -> str:
    """Run to completion -> stdout + stderr (or stdout alone); on timeout kill the whole
    process group, dvc's stage commands included."""
    p = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"{' '.join(args)} ran over {timeout} s:\n{(out + err)[-4000:]}")
    assert p.returncode == 0, f"{' '.join(args)} failed ({p.returncode}):\n{(out + err)[-4000:]}"
    return out if stdout_only else out + err


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> tuple[Path, dict, str]:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip(f"{ROOT} is not a git checkout")
    dst = tmp_path_factory.mktemp("clone")
    for rel in filter(None, listed.stdout.split("\0")):
        if rel.startswith(SKIP) or not (ROOT / rel).is_file():
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dst / rel)
    # `pipeline` must be found the way dvc.yaml looks for it: .venv/bin (absent here), else PATH
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
           "DVC_NO_ANALYTICS": "1", "MPLBACKEND": "Agg"}
    env.pop("DVC_ROOT", None)
    run(["git", "init", "-q"], dst, env)
    run([sys.executable, "-m", "dvc", "init", "-q"], dst, env)
    shutil.copy2(ROOT / ".dvc" / "config", dst / ".dvc" / "config")  # parsing.list=append
    (dst / "params.yaml").write_text(yaml.safe_dump(reduced_params(), sort_keys=False))
    log = run([sys.executable, "-m", "dvc", "repro"], dst, env)
    return dst, env, log


def dvc(repo, *args: str, stdout_only: bool = False) -> str:
    dst, env, _ = repo
    return run([sys.executable, "-m", "dvc", *args], dst, env, stdout_only=stdout_only)


def stage_names() -> list[str]:
    p = reduced_params()
    return (["generate", "extract"] + [f"train@{m}" for m in p["models"]["classify"]]
            + [f"segment@{h}" for h in p["models"]["segment"]] + ["report"])


def test_repro_runs_every_stage(repo):
    dst, _, log = repo
    p = reduced_params()
    assert {"slca", "backbone"} <= set(p["models"]["classify"]), "the SLCA vs backbone comparison must be there"
    assert {"autosam", "cnn"} <= set(p["models"]["segment"])
    for name in stage_names():
        assert f"Running stage '{name}'" in log, f"stage {name} did not run:\n{log[-3000:]}"
    lock = yaml.safe_load((dst / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(stage_names())
    assert (dst / "stores" / "synthetic.zarr" / "zarr.json").is_file()
    for m in p["models"]["classify"]:
        assert (dst / "runs" / "classify" / m / "model.pt").is_file()
    for h in p["models"]["segment"]:
        assert (dst / "runs" / "segment" / h / "model.pt").is_file()


def test_metrics_are_sane(repo):
    dst, _, log = repo
    p = reduced_params()
    m = json.loads((dst / "reports" / "metrics.json").read_text())
    assert set(m["classify"]) == set(p["models"]["classify"])
    assert set(m["segment"]) == set(p["models"]["segment"])
    for name, s in m["classify"].items():
        assert 0.0 <= s["test_accuracy"] <= 1.0, name
        assert s["test_auc"] is None or 0.0 <= s["test_auc"] <= 1.0, name
        assert s["n_test"] == 3, name  # 4 phantoms per class -> 1 test image per class
    for name, s in m["segment"].items():
        assert 0.0 <= s["test_dice"] <= 1.0, name
        assert 0.0 <= s["val_dice"] <= 1.0, name
    table = (dst / "reports" / "report.md").read_text()
    for name in [*m["classify"], *m["segment"]]:
        assert f"| {name} |" in table
    assert "| slca |" in log  # the report stage printed its table
    summary = json.loads((dst / "reports" / "scores" / "classify" / "slca.json").read_text())
    assert summary["test_accuracy"] == m["classify"]["slca"]["test_accuracy"]
    shown = json.loads(dvc(repo, "metrics", "show", "--json", stdout_only=True))
    (rev,) = shown.values()
    data = rev["data"]["reports/metrics.json"]["data"]
    assert data["classify"]["slca"]["test_accuracy"] == m["classify"]["slca"]["test_accuracy"]


def test_plots_show_curves_and_confusion(repo):
    dst, _, _ = repo
    shown = json.loads(dvc(repo, "plots", "show", "--json", stdout_only=True))
    assert not shown.get("errors"), shown["errors"]
    ids = set(shown["data"])
    for f in ("curves/classify/slca.csv", "curves/classify/backbone.csv", "confusion/slca.csv",
              "confusion/backbone.csv", "curves/segment/autosam.csv", "curves/segment/cnn.csv"):
        assert f"reports/{f}" in ids, sorted(ids)
    rows = (dst / "reports" / "confusion" / "slca.csv").read_text().splitlines()
    assert rows[0] == "actual,predicted" and len(rows) == 1 + 3  # the 3 test images
    history = (dst / "reports" / "curves" / "segment" / "cnn.csv").read_text().splitlines()
    assert history[0] == "epoch,train_loss,val_dice" and len(history) == 1 + 1  # one epoch


def test_summaries_are_kept_in_git_not_in_the_cache(repo):
    """cache: false outputs outside the git-ignored run folders: experiments commit them."""
    dst, env, _ = repo
    ignored = run(["git", "status", "--porcelain", "--ignored", "reports", "runs", "stores", "data"], dst, env)
    assert "!! reports" not in ignored
    for path in ("runs/", "stores/", "data/"):
        assert f"!! {path}" in ignored, ignored


def test_second_repro_does_nothing(repo):
    out = dvc(repo, "repro")
    assert "Running stage" not in out, out
    assert "Data and pipelines are up to date" in out
    assert "Data and pipelines are up to date" in dvc(repo, "status")


def test_report_names_a_missing_run(repo):
    from typer.testing import CliRunner

    from pipeline.cli import app

    dst, _, _ = repo
    with pytest.raises(ReportError, match="runs/classify/nosuch/metrics.json: missing"):
        collect(dst / "runs", classify=["nosuch"])
    r = CliRunner().invoke(app, ["report", "--runs", str(dst / "runs"), "--out", str(dst / "other"),
                                 "--classify", "slca", "--segment", "nosuch"])
    assert r.exit_code == 2
    assert "runs/segment/nosuch/metrics.json: missing" in r.output
