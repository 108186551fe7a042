"""The Typer application and its error handling; commands register themselves on ``app``."""
from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

import typer

app = typer.Typer(
    name="pipeline",
    help="Cache frozen SAM-family image embeddings once (extract), then train classifiers and "
    "segmentation heads from the cache (train, evaluate, predict).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

F = TypeVar("F", bound=Callable)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input: one line on stderr, exit code 2, no traceback.

    The dataset and encoder errors (``stages.datasets.DatasetError``,
    ``stages.encoders.EncoderError``) are ValueErrors, so ValueError covers them without
    importing those packages here: that import would load every dataset reader and encoder
    for every command, and make every DVC stage depend on them (tests/test_dvc_deps.py).
    """
    from cache import StoreError

    return (StoreError, ValueError, FileNotFoundError)


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(code)


def handle_errors(fn: F) -> F:
    """Turn user errors into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            fail("interrupted; finished shards are kept, re-run the same command to resume", 130)
        except user_errors() as e:
            fail(str(e).splitlines()[0] if str(e) else type(e).__name__)

    return wrapper  # type: ignore[return-value]
