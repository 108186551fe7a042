"""`pipeline` command line. Each command module registers its commands on ``app``."""
from __future__ import annotations

from . import cli_extract  # noqa: F401  (registers extract, info, make-synthetic)
from . import cli_store  # noqa: F401  (registers export, import)
from . import cli_train  # noqa: F401
from . import cli_report  # noqa: F401  (registers report)
from . import cli_compare  # noqa: F401  (registers compare)
from .app import app

__all__ = ["app"]

if __name__ == "__main__":
    app()
