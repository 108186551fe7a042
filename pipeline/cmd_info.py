"""`pipeline info`: what a feature store holds and whether it is complete."""
from __future__ import annotations

import json
from typing import Annotated

import typer

from . import options as opt
from .app import app, handle_errors


@app.command()
@handle_errors
def info(
    store: str = typer.Argument(..., help="A feature store made by `pipeline extract`."),
    as_json: Annotated[bool, opt.as_json("Machine-readable output.")] = False,
) -> None:
    """Summarise a feature store: samples, classes, encoder, size on disk, completeness."""
    from cache.summary import describe, format_summary

    summary = describe(store)
    print(json.dumps(summary, indent=2) if as_json else format_summary(summary))
    if not summary["complete"]:
        raise typer.Exit(1)
