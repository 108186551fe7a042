"""`pipeline export`: a feature store to one HDF5 file."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import options as opt
from .app import app, handle_errors


@app.command()
@handle_errors
def export(
    store: Annotated[str, typer.Argument(help="A complete feature store (folder or fsspec URL).")],
    out: Annotated[Path, opt.out("File to write, e.g. features.h5.")],
    fmt: Annotated[str, opt.fmt("Output format: hdf5 (h5py).")] = "hdf5",
    compression: Annotated[str, opt.compression("HDF5 compression: none (default), lzf or gzip.")] = "none",
    overwrite: Annotated[bool, opt.overwrite("Replace an existing output file.")] = False,
    storage_option: opt.StorageOption = None,
) -> None:
    """Export a feature store to one HDF5 file (same dataset names; `pipeline import` reads it back exactly)."""
    from cache.hdf5 import export_hdf5

    if fmt != "hdf5":
        raise ValueError(f"--format {fmt!r}: only hdf5 is supported")
    path = export_hdf5(store, out, compression=compression, overwrite=overwrite,
                       storage_options=opt.storage_options(storage_option))
    print(f"{path}: exported {store}")
