"""Report commands: summarize (one run -> small files for git/dvc) and report (runs side by side)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .app import app, handle_errors


@app.command()
@handle_errors
def summarize(
    run: Path = typer.Argument(..., help="Run folder written by `pipeline train` (holds metrics.json)."),
    out: Path = typer.Option(Path("reports"), "--out", "-o", help="Folder receiving scores/TASK/NAME.json, curves/TASK/NAME.csv, confusion/NAME.csv."),
    name: Optional[str] = typer.Option(None, "--name", help="Name of the run in the report (default: the run folder's name)."),
) -> None:
    """Copy a run's scores, training curves and test confusion pairs into small files (kept in
    git by dvc.yaml, so `dvc exp show`, `dvc plots` and the report work without the run folder)."""
    from stages.report import write_summary

    summary = write_summary(run, out, name)
    print(json.dumps({k: v for k, v in summary.items() if k != "scored_split"}))
    print(f"wrote the summary of {run} into {out}/scores, curves" + (", confusion" if summary["task"] == "classify" else ""),
          file=sys.stderr)


@app.command()
@handle_errors
def report(
    runs: Path = typer.Option(Path("runs"), "--runs", help="Folder of classify/NAME/ and segment/NAME/ run folders, or of their summaries (reports/scores)."),
    out: Path = typer.Option(Path("reports"), "--out", "-o", help="Folder for report.md and metrics.json."),
    classify: Optional[List[str]] = typer.Option(None, "--classify", help="Classification run to include (repeatable; default: every run found)."),
    segment: Optional[List[str]] = typer.Option(None, "--segment", help="Segmentation run to include (repeatable; default: every run found)."),
) -> None:
    """Tabulate the runs side by side: classifiers' test accuracy/AUC, segmentation heads' Dice.

    Writes OUT/report.md and OUT/metrics.json (for `dvc metrics show`); prints the table.
    """
    from stages.report import format_table, write_report

    named = classify is not None or segment is not None
    summary = write_report(runs, out, (classify or []) if named else None, (segment or []) if named else None)
    print(format_table(summary), end="")
    print(f"wrote {out}/report.md, {out}/metrics.json", file=sys.stderr)
