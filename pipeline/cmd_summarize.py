"""`pipeline summarize`: one run folder -> small score/curve/confusion files for git and DVC."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import options as opt
from .app import app, handle_errors


@app.command()
@handle_errors
def summarize(
    run: Path = typer.Argument(..., help="Run folder written by `pipeline train` (holds metrics.json)."),
    out: Annotated[Path, opt.out("Folder receiving scores/TASK/NAME.json, curves/TASK/NAME.csv, confusion/NAME.csv.")] = Path("reports"),
    name: Optional[str] = typer.Option(None, "--name", help="Name of the run in the report (default: the run folder's name)."),
) -> None:
    """Copy a run's scores, training curves and test confusion pairs into small files (kept in
    git by dvc.yaml, so `dvc exp show`, `dvc plots` and the report work without the run folder)."""
    from stages.report import write_summary

    summary = write_summary(run, out, name)
    print(json.dumps({k: v for k, v in summary.items() if k != "scored_split"}))
    print(f"wrote the summary of {run} into {out}/scores, curves" + (", confusion" if summary["task"] == "classify" else ""),
          file=sys.stderr)
