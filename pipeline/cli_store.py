"""Store commands: export a feature store to HDF5, import it back."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .app import app, handle_errors
from .cli_extract import parse_options


def _storage(pairs: list[str] | None) -> dict | None:
    storage = parse_options(pairs, "--storage-option")
    if "endpoint_url" in storage:
        storage = {"client_kwargs": {"endpoint_url": storage.pop("endpoint_url")}, **storage}
    return storage or None


@app.command()
@handle_errors
def export(
    store: str = typer.Argument(..., help="A complete feature store (folder or fsspec URL)."),
    out: Path = typer.Option(..., "--out", "-o", help="File to write, e.g. features.h5."),
    fmt: str = typer.Option("hdf5", "--format", "-f", help="Output format: hdf5 (h5py)."),
    compression: str = typer.Option("none", "--compression", help="HDF5 compression: none (default), lzf or gzip."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
    storage_option: Optional[List[str]] = typer.Option(None, "--storage-option", help="fsspec option KEY=VALUE for a remote store (repeatable)."),
) -> None:
    """Export a feature store to one HDF5 file (same dataset names; `pipeline import` reads it back exactly)."""
    from cache.hdf5 import export_hdf5

    if fmt != "hdf5":
        raise ValueError(f"--format {fmt!r}: only hdf5 is supported")
    path = export_hdf5(store, out, compression=compression, overwrite=overwrite, storage_options=_storage(storage_option))
    print(f"{path}: exported {store}")


@app.command("import")
@handle_errors
def import_(
    source: Path = typer.Argument(..., help="An HDF5 file made by `pipeline export`."),
    out: str = typer.Option(..., "--out", "-o", help="Store to create: a folder like cache/NAME.zarr or an fsspec URL."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing store."),
    storage_option: Optional[List[str]] = typer.Option(None, "--storage-option", help="fsspec option KEY=VALUE for a remote store (repeatable)."),
) -> None:
    """Import an HDF5 export back into a feature store (values, dtypes and attributes exact)."""
    from cache.hdf5 import import_hdf5

    url = import_hdf5(source, out, overwrite=overwrite, storage_options=_storage(storage_option))
    print(f"{url}: imported {source}")
