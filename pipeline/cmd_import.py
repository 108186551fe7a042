"""`pipeline import`: an HDF5 export back into a feature store."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import options as opt
from .app import app, handle_errors


@app.command("import")
@handle_errors
def import_(
    source: Annotated[Path, typer.Argument(help="An HDF5 file made by `pipeline export`.")],
    out: Annotated[str, opt.out("Store to create: a folder like cache/NAME.zarr or an fsspec URL.")],
    overwrite: Annotated[bool, opt.overwrite("Replace an existing store.")] = False,
    storage_option: opt.StorageOption = None,
) -> None:
    """Import an HDF5 export back into a feature store (values, dtypes and attributes exact)."""
    from cache.hdf5 import import_hdf5

    url = import_hdf5(source, out, overwrite=overwrite, storage_options=opt.storage_options(storage_option))
    print(f"{url}: imported {source}")
