"""`pipeline report`: the runs (or their summaries) side by side in one table."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from . import options as opt
from .app import app, handle_errors


@app.command()
@handle_errors
def report(
    runs: Path = typer.Option(Path("runs"), "--runs", help="Folder of classify/NAME/ and segment/NAME/ run folders, or of their summaries (reports/scores)."),
    out: Annotated[Path, opt.out("Folder for report.md and metrics.json.")] = Path("reports"),
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
