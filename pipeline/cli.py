"""`pipeline` command line: one ``pipeline/cmd_<name>.py`` module per command, each registering
itself on ``app``; options shared by several commands live in ``pipeline/options.py``."""
from __future__ import annotations

from typer.models import CommandInfo

from . import (  # noqa: F401  (each module registers its one command on ``app``)
    cmd_compare,
    cmd_evaluate,
    cmd_export,
    cmd_extract,
    cmd_import,
    cmd_info,
    cmd_make_synthetic,
    cmd_predict,
    cmd_report,
    cmd_summarize,
    cmd_train,
)
from .app import app

# `pipeline --help` lists the commands in the order of the workflow, whatever order the
# imports above are sorted in.
ORDER = ("extract", "info", "make-synthetic", "export", "import", "train", "evaluate", "predict", "summarize",
         "report", "compare")


def _position(command: CommandInfo) -> int:
    name = (command.name or command.callback.__name__).replace("_", "-")  # type: ignore[union-attr]
    return ORDER.index(name) if name in ORDER else len(ORDER)


app.registered_commands.sort(key=_position)

__all__ = ["app"]

if __name__ == "__main__":
    app()
