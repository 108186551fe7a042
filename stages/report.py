"""Summaries of stage-two runs and the side-by-side report.

``write_summary(run, out)`` turns one run folder of ``pipeline train`` (large: model.pt,
checkpoints, figures) into small files worth keeping in git, named after the run::

    OUT/scores/<task>/<name>.json   flat scores: test_* (the test split; val if none), val_*
    OUT/curves/<task>/<name>.csv    training curves (epoch, losses, val AUC / val Dice)
    OUT/confusion/<name>.csv        classification only: actual,predicted per test image

``write_report(runs, out, classify, segment)`` reads the runs' scores, from summaries
(``RUNS/<task>/<name>.json``) or run folders (``RUNS/<task>/<name>/metrics.json``), and
writes ``OUT/report.md`` (one table per task) and ``OUT/metrics.json`` ({"classify":
{model: {...}}, "segment": {head: {...}}}, numbers only). Scores are those recorded by the
training runs; nothing is recomputed.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Sequence

from cache.ownership import is_text_with_header

TASKS = ("classify", "segment")
CLASSIFY_KEYS = ("accuracy", "balanced_accuracy", "auc", "f1_macro")
SEGMENT_KEYS = ("mean_dice", "mean_iou", "mean_hd95")
HISTORY_COLUMNS = {
    "classify": ("epoch", "train_loss", "val_loss", "val_auc", "val_accuracy"),
    "segment": ("epoch", "train_loss", "val_dice"),
}
TABLE_COLUMNS = {
    "classify": ("test_accuracy", "test_balanced_accuracy", "test_auc", "test_f1_macro", "val_auc", "best_epoch"),
    "segment": ("test_dice", "test_iou", "test_hd95", "val_dice", "best_epoch"),
}


REPORT_TITLE = "# Stage-two results"


class ReportError(ValueError):
    """A run named for the report is missing or unreadable."""


def _number(v: Any) -> float | None:
    """Finite float, else None (JSON null)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ReportError(f"{path}: missing; train that run first (dvc repro, or pipeline train --out {path.parent})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not valid JSON ({e.msg}); re-run its training") from None


def task_of(metrics: dict[str, Any]) -> str | None:
    """Task of a training run's metrics.json: segment runs keep scores under "splits"."""
    if metrics.get("task") == "segment" or isinstance(metrics.get("splits"), dict):
        return "segment"
    if isinstance(metrics.get("test"), dict) or isinstance(metrics.get("val"), dict):
        return "classify"
    return None


def summarize_run(metrics: dict[str, Any], task: str) -> dict[str, Any]:
    """One run's metrics.json -> flat summary (``test_*``: the test split, val if none)."""
    splits = metrics.get("splits", {}) if task == "segment" else metrics
    scored = next((s for s in ("test", "val") if isinstance(splits.get(s), dict) and splits[s]), None)
    if scored is None:
        raise ReportError(f"metrics.json of a {task} run has neither test nor val scores")
    scores, val = splits[scored], splits.get("val") or {}
    keys = CLASSIFY_KEYS if task == "classify" else SEGMENT_KEYS
    out: dict[str, Any] = {f"test_{k.removeprefix('mean_')}": _number(scores.get(k)) for k in keys}
    if task == "classify":
        out["val_auc"] = _number(val.get("auc"))
        out["n_test"] = scores.get("n")
    else:
        out["val_dice"] = _number(val.get("mean_dice"))
        for cls, d in (scores.get("dice") or {}).items():
            out[f"test_dice_{cls}"] = _number(d)
    out["best_epoch"] = metrics.get("best_epoch")
    out["scored_split"] = scored
    return out


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _ours_json(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and (data.get("task") in ("classify", "segment") or
                                       (bool(data) and set(data) <= {"classify", "segment"}))


def _claim(out: Path, folders: Sequence[str], files: Sequence[tuple[str, Any]]) -> None:
    """Refuse (before writing anything) if OUT, one of its sub-folders, or a file we are about
    to replace is not ours: our own earlier outputs are replaced (recognised by content,
    ``is_ours(path)``), nothing else at those names ever is, nor a link (the write would land
    on its target): ``check_file_target`` with replacement always allowed for our own files."""
    from cache.ownership import check_file_target, check_folder_target

    for sub in ("", *folders):
        check_folder_target(out / sub if sub else out)
    for rel, is_ours in files:
        check_file_target(out / rel, overwrite=True, is_ours=is_ours, what="`pipeline summarize`/`report` output")


def write_summary(run: str | Path, out: str | Path, name: str | None = None) -> dict[str, Any]:
    """Run folder -> OUT/scores/<task>/<name>.json, OUT/curves/<task>/<name>.csv (always,
    perhaps header only) and, for classification, OUT/confusion/<name>.csv; returns the
    summary. ``name`` defaults to the run folder's name."""
    run, out = Path(run), Path(out)
    name = name or run.resolve().name
    metrics = _load(run / "metrics.json")
    task = task_of(metrics)
    if task is None:
        raise ReportError(f"{run}/metrics.json: not written by `pipeline train` (no val/test scores)")
    summary = summarize_run(metrics, task)
    subs = (f"scores/{task}", f"curves/{task}") + (("confusion",) if task == "classify" else ())
    _claim(out, subs, [(f"scores/{task}/{name}.json", _ours_json),
                       (f"curves/{task}/{name}.csv", lambda p: is_text_with_header(p, "epoch,train_loss,")),
                       (f"confusion/{name}.csv", lambda p: is_text_with_header(p, "actual,predicted"))])
    for sub in subs:
        (out / sub).mkdir(parents=True, exist_ok=True)
    (out / "scores" / task / f"{name}.json").write_text(json.dumps({"task": task, **summary}, indent=2) + "\n")
    cols = HISTORY_COLUMNS[task]
    _write_csv(out / "curves" / task / f"{name}.csv", cols,
               [[r.get(c, "") for c in cols] for r in _read_csv(run / "history.csv")])
    if task == "classify":
        rows = _read_csv(run / "predictions.csv")
        split = "test" if any(r.get("split") == "test" for r in rows) else "val"
        _write_csv(out / "confusion" / f"{name}.csv", ("actual", "predicted"),
                   [(r["label_name"], r["pred_name"]) for r in rows if r.get("split") == split])
    return {"task": task, **summary}


def _summary_of(runs: Path, task: str, name: str) -> dict[str, Any]:
    """Scores of one run: its summary RUNS/<task>/<name>.json, else its RUNS/<task>/<name>/metrics.json."""
    summary, folder = runs / task / f"{name}.json", runs / task / name / "metrics.json"
    if not summary.is_file() and not folder.is_file():
        raise ReportError(f"{folder}: missing (and no summary {summary}); train that run first "
                          f"(dvc repro, or pipeline train --out {folder.parent})")
    path = summary if summary.is_file() else folder
    m = _load(path)
    is_summary = "scored_split" in m  # written by write_summary
    found = m.get("task") if is_summary else task_of(m)
    if found != task:
        raise ReportError(f"{path}: not a {task} run (task: {found})")
    return m if is_summary else summarize_run(m, task)


def collect(runs: str | Path, classify: Sequence[str] | None = None,
            segment: Sequence[str] | None = None) -> dict[str, dict[str, dict[str, Any]]]:
    """{task: {name: summary}} of the named runs; with neither list given, of every run
    (or summary) found under RUNS/classify and RUNS/segment."""
    runs = Path(runs)
    if classify is None and segment is None:
        found = {t: sorted({p.parent.name for p in (runs / t).glob("*/metrics.json")}
                           | {p.stem for p in (runs / t).glob("*.json")}) for t in TASKS}
        if not any(found.values()):
            raise ReportError(f"{runs}: no runs found (expected {runs}/classify/NAME/metrics.json or "
                              f"{runs}/segment/NAME/metrics.json); train first or pass --runs")
        classify, segment = found["classify"], found["segment"]
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for task, names in (("classify", classify or []), ("segment", segment or [])):
        if names:
            out[task] = {n: _summary_of(runs, task, n) for n in names}
    return out


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def format_table(summary: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Markdown: one table per task, one row per run."""
    parts = []
    for task, title, first in (("classify", "Classification", "model"), ("segment", "Segmentation", "head")):
        rows = summary.get(task)
        if not rows:
            continue
        cols = TABLE_COLUMNS[task]
        header = [first, *(c.removeprefix("test_") for c in cols), "split"]
        lines = [f"## {title}", "", "| " + " | ".join(header) + " |",
                 "|---|" + "---:|" * len(cols) + "---|"]
        for name, s in rows.items():
            lines.append("| " + " | ".join([name, *(_fmt(s.get(c)) for c in cols), str(s.get("scored_split"))]) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def write_report(runs: str | Path, out: str | Path, classify: Sequence[str] | None = None,
                 segment: Sequence[str] | None = None) -> dict[str, dict[str, dict[str, Any]]]:
    """Collect the runs; write OUT/report.md and OUT/metrics.json; return the summaries."""
    summary = collect(runs, classify, segment)
    out = Path(out)
    _claim(out, ("curves/classify", "curves/segment", "confusion"),
           [("metrics.json", _ours_json), ("report.md", lambda p: is_text_with_header(p, REPORT_TITLE))])
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("curves/classify", "curves/segment", "confusion"):  # dvc.yaml's plots name them all;
        (out / sub).mkdir(parents=True, exist_ok=True)  # a task without runs leaves them empty, not missing
    numbers = {t: {n: {k: v for k, v in s.items() if k not in ("scored_split", "task")} for n, s in rows.items()}
               for t, rows in summary.items()}
    (out / "metrics.json").write_text(json.dumps(numbers, indent=2) + "\n")
    (out / "report.md").write_text(REPORT_TITLE + "\n\nScores on the test split (`split`: the one "
                                   "scored). Generated by `pipeline report`.\n\n" + format_table(summary))
    return summary
