"""The `pipeline` command run in this process, and a byte snapshot of what a path holds:
what the tests of refused commands compare before and after."""
from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from pipeline.cli import app

runner = CliRunner()


def cli(*args):
    """`pipeline ARGS...` through typer's CliRunner; its Result (exit_code, stdout, stderr)."""
    return runner.invoke(app, [str(a) for a in args])


def snapshot(root: str | Path) -> dict[str, bytes]:
    """Path relative to ``root`` -> bytes of every file below it ({"": bytes} for a file)."""
    root = Path(root)
    if root.is_file():
        return {"": root.read_bytes()}
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
