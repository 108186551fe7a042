"""How stage one reports what went wrong: a full disk as one line that says finished shards
are kept (``disk_full_error``, ``loud_disk_full``), and the samples skipped as bad
(``--skip-bad``) in a CSV beside the store (``write_failures_report``)."""
from __future__ import annotations

import contextlib
import errno
import os
import sys
from typing import Any, Iterator, Sequence

from cache import StoreError

DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
FAILURES_HEADER = "row,id,error"


def disk_full_error(e: OSError, url: str, what: str) -> StoreError | None:
    """A one-line StoreError for an out-of-space OSError (None for other errors)."""
    if getattr(e, "errno", None) not in DISK_FULL:
        return None
    err = StoreError(f"{url}: disk full while {what} ({e.strerror or e}); finished shards are kept, "
                     "free space and re-run the same command to resume")
    err.__cause__ = e
    return err


@contextlib.contextmanager
def loud_disk_full(url: str) -> Iterator[None]:
    """Turn an out-of-space OSError anywhere in a run into ``disk_full_error``."""
    try:
        yield
    except OSError as e:
        err = disk_full_error(e, url, "writing the store")
        if err is None:
            raise
        raise err from e


def failures_report_path(url: str | os.PathLike) -> str:
    """``<store>.failures.csv`` beside the store (outside it: DVC hashes the store)."""
    from cache import io as store_io

    if store_io.is_remote(url):
        return str(url).rstrip("/") + ".failures.csv"
    return str(store_io.local_path(url)).rstrip("/") + ".failures.csv"


def _is_failures_report(fs, fpath: str) -> bool:
    try:
        with fs.open(fpath, "rb") as fh:
            return fh.readline().decode("utf-8", "replace").strip() == FAILURES_HEADER
    except (OSError, IsADirectoryError):
        return False


def write_failures_report(url: str | os.PathLike, store_rows: Sequence[int], failures: Sequence[dict[str, str]],
                          storage_options: dict[str, Any] | None = None) -> str | None:
    """Write the failed samples (row, id, error) as CSV beside the store and return its
    path; with no failures remove a stale report and return None."""
    import csv
    import io as _io

    import fsspec

    path = failures_report_path(url)
    fs, fpath = fsspec.core.url_to_fs(path, **(storage_options or {}))
    if fs.exists(fpath) and not _is_failures_report(fs, fpath):
        # a file of the user's that happens to have our name: never replaced or deleted
        print(f"note: {path}: exists and is not a failures report of this project; left as it is", file=sys.stderr)
        return None
    if not failures:
        if fs.exists(fpath):
            fs.rm_file(fpath)  # our own stale report (header checked above)
        return None
    text = _io.StringIO()
    w = csv.writer(text)
    w.writerow(["row", "id", "error"])
    for row, f in zip(store_rows, failures):
        w.writerow([int(row), f["id"], f["error"]])
    with fs.open(fpath, "w") as fh:
        fh.write(text.getvalue())
    return path
