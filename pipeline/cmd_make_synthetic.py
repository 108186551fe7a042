"""`pipeline make-synthetic`: the deterministic phantom dataset the tests and DVC demo use."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import options as opt
from .app import app, handle_errors


@app.command("make-synthetic")
@handle_errors
def make_synthetic(
    out: Path = typer.Argument(..., help="Folder to write the phantom dataset into."),
    per_class: int = typer.Option(100, "--per-class", help="Images per class."),
    size: int = typer.Option(256, "--size", help="Image side in pixels."),
    seed: Annotated[int, opt.seed("Random seed: same seed, same bytes.")] = 0,
) -> None:
    """Write the deterministic ultrasound-like phantom dataset (3 lesion classes, masks)."""
    from stages.datasets import make_synthetic as make

    path = make(out, n_per_class=per_class, size=size, seed=seed)
    print(f"{path}: {3 * per_class} images, {size}x{size}, seed {seed}")
