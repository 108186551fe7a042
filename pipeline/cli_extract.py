"""Stage-one commands: extract, info, make-synthetic."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from .app import app, handle_errors


def parse_options(pairs: list[str] | None, flag: str) -> dict:
    """``KEY=VALUE`` pairs -> dict; values parsed as JSON when they are JSON (numbers, lists)."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"{flag} {pair!r}: expected KEY=VALUE")
        key, value = pair.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


@app.command()
@handle_errors
def extract(
    dataset: str = typer.Option(..., "--dataset", "-d", help="Dataset reader: imagefolder, csv, medmnist, acdc-h5, synthetic."),
    data_root: Path = typer.Option(..., "--data-root", "-r", help="Dataset folder or file (MedMNIST .npz, CSV manifest)."),
    out: str = typer.Option(..., "--out", "-o", help="Store to write: a folder like cache/NAME.zarr or an fsspec URL (s3://...)."),
    encoder: str = typer.Option("litemedsam", "--encoder", "-e", help="litemedsam (embedded weights), vit_b, vit_l, vit_h, sam (architecture read from --checkpoint), or SAM 2/2.1: sam2_hiera_t, sam2_hiera_s, sam2_hiera_b+, sam2_hiera_l (need the sam2 extra)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Weights file: an official SAM checkpoint for vit_*, SAM 2/2.1 checkpoint for sam2_hiera_*, optional for litemedsam."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda, cuda:1, ..."),
    batch_size: int = typer.Option(0, "--batch-size", "-b", help="Images per encoder call (0: 1 on CPU, where --streams run in parallel; 32 on GPU); batches never cross a shard."),
    workers: int = typer.Option(-1, "--workers", help="DataLoader processes decoding and resizing images (-1: automatic)."),
    dtype: str = typer.Option("float16", "--dtype", help="Stored dtype: float16 (default), float32, or int8 (per-channel quantised)."),
    precision: str = typer.Option("auto", "--precision", help="Encoder compute: auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16."),
    shard_size: int = typer.Option(32, "--shard-size", help="Samples per shard file (divides 4096)."),
    compression: str = typer.Option("none", "--compression", help="Embedding shards: none (default; read at plain-file speed) or lz4 (blosc, ~11% smaller, 4-6x slower to read)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a store made with another encoder, checkpoint, preprocessing or dataset."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Record unreadable images as failed and go on, instead of stopping."),
    option: Optional[List[str]] = typer.Option(None, "--option", help="Dataset reader option KEY=VALUE (repeatable), e.g. max_pixels=200000000."),
    storage_option: Optional[List[str]] = typer.Option(None, "--storage-option", help="fsspec option KEY=VALUE for remote stores (repeatable), e.g. endpoint_url=..."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    threads: int = typer.Option(0, "--threads", help="Torch CPU threads per process (0: all cores; with dask: the cores of a worker's host shared by its workers)."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Run on the dask.distributed cluster at this scheduler address (tcp://HOST:8786); workers write their own shards."),
    dask_workers: int = typer.Option(0, "--dask-workers", help="Run on a local dask cluster of N worker processes (0: no dask)."),
    streams: int = typer.Option(0, "--streams", help="Batches encoded at once, in threads (0: one per core on CPU, each with one torch thread; 1 on GPU)."),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile the encoder (frozen graph on CPU): a static batch, compiled once per run (~20-60 s on CPU, minutes on GPU); for long runs."),
    fast: bool = typer.Option(True, "--fast/--exact", help="--fast (default): fused encoder kernels (SDPA attention, folded BatchNorm), ~1.3x faster on CPU, equal to the reference within float16 rounding; --exact: the reference code's own kernels."),
    refresh_changed: bool = typer.Option(False, "--refresh-changed", help="Re-encode the images changed since extraction (content hash; their shards are recomputed whole) instead of refusing the store."),
) -> None:
    """Stage one: encode every image once with a frozen SAM-family encoder into a Zarr store.

    Re-running the same command resumes an interrupted store; a store made differently is
    refused unless --overwrite.
    """
    from cache.ownership import check_store_target
    from stages.extract import ExtractConfig, extract as run

    storage = parse_options(storage_option, "--storage-option")
    if "endpoint_url" in storage:
        storage = {"client_kwargs": {"endpoint_url": storage.pop("endpoint_url")}, **storage}
    check_store_target(out, storage or None)  # refuse a foreign --out before loading anything (again in the writer)
    cfg = ExtractConfig(
        dataset=dataset, data_root=str(data_root), out=out, encoder=encoder,
        checkpoint=str(checkpoint) if checkpoint else None, device=device, batch_size=batch_size,
        workers=workers, dtype=dtype, precision=precision, shard_size=shard_size, compression=compression,
        overwrite=overwrite,
        skip_bad=skip_bad, dataset_options=parse_options(option, "--option"), storage_options=storage or None,
        threads=threads, scheduler=scheduler, dask_workers=dask_workers, streams=streams, fast=fast, compile=compile_, refresh_changed=refresh_changed,
    )
    result = run(cfg, progress=not quiet)
    print(result.summary())


@app.command()
@handle_errors
def info(
    store: str = typer.Argument(..., help="A feature store made by `pipeline extract`."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Summarise a feature store: samples, classes, encoder, size on disk, completeness."""
    from cache.summary import describe, format_summary

    summary = describe(store)
    print(json.dumps(summary, indent=2) if as_json else format_summary(summary))
    if not summary["complete"]:
        raise typer.Exit(1)


@app.command("make-synthetic")
@handle_errors
def make_synthetic(
    out: Path = typer.Argument(..., help="Folder to write the phantom dataset into."),
    per_class: int = typer.Option(100, "--per-class", help="Images per class."),
    size: int = typer.Option(256, "--size", help="Image side in pixels."),
    seed: int = typer.Option(0, "--seed", help="Random seed: same seed, same bytes."),
) -> None:
    """Write the deterministic ultrasound-like phantom dataset (3 lesion classes, masks)."""
    from stages.datasets import make_synthetic as make

    path = make(out, n_per_class=per_class, size=size, seed=seed)
    print(f"{path}: {3 * per_class} images, {size}x{size}, seed {seed}")
