"""`pipeline` command line. Each command module registers its commands on ``app``."""
from __future__ import annotations

from . import cli_extract  # noqa: F401  (registers extract, info, make-synthetic)
from .app import app

__all__ = ["app"]

if __name__ == "__main__":
    app()
