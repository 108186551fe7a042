"""`pipeline extract`: stage one, every image encoded once into a Zarr feature store."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from . import options as opt
from .app import app, handle_errors


@app.command()
@handle_errors
def extract(
    # choices are named here, not read from the registries, so that the CLI starts without
    # importing every reader and encoder; tests/test_cli_layout.py checks them against the registries
    dataset: Annotated[str, opt.dataset("Dataset reader: imagefolder, csv, medmnist, acdc-h5, synthetic.")],
    data_root: Annotated[Path, opt.data_root("Dataset folder or file (MedMNIST .npz, CSV manifest).")],
    out: Annotated[str, opt.out("Store to write: a folder like cache/NAME.zarr or an fsspec URL (s3://...).")],
    encoder: str = typer.Option("litemedsam", "--encoder", "-e", help="litemedsam (embedded weights), vit_b, vit_l, vit_h, sam (architecture read from --checkpoint), or SAM 2/2.1: sam2_hiera_t, sam2_hiera_s, sam2_hiera_b+, sam2_hiera_l (need the sam2 extra)."),
    checkpoint: Annotated[Optional[Path], opt.checkpoint("Weights file: an official SAM checkpoint for vit_*, SAM 2/2.1 checkpoint for sam2_hiera_*, optional for litemedsam.")] = None,
    device: opt.Device = "auto",
    batch_size: Annotated[int, opt.batch_size("Images per encoder call (0: 1 on CPU, where --streams run in parallel; 32 on GPU); batches never cross a shard.")] = 0,
    workers: Annotated[int, opt.workers("DataLoader processes decoding and resizing images (-1: automatic).")] = -1,
    dtype: str = typer.Option("float16", "--dtype", help="Stored dtype: float16 (default), float32, or int8 (per-channel quantised)."),
    precision: Annotated[str, opt.precision("Encoder compute: auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16.")] = "auto",
    shard_size: int = typer.Option(32, "--shard-size", help="Samples per shard file (divides 4096)."),
    compression: Annotated[str, opt.compression("Embedding shards: none (default; read at plain-file speed) or lz4 (blosc, ~11% smaller, 4-6x slower to read).")] = "none",
    overwrite: Annotated[bool, opt.overwrite("Replace a store made with another encoder, checkpoint, preprocessing or dataset.")] = False,
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Record unreadable images as failed and go on, instead of stopping."),
    option: Annotated[Optional[list[str]], opt.dataset_option("Dataset reader option KEY=VALUE (repeatable), e.g. max_pixels=200000000.")] = None,
    storage_option: Annotated[Optional[list[str]], opt.storage_option("fsspec option KEY=VALUE for remote stores (repeatable), e.g. endpoint_url=...")] = None,
    quiet: Annotated[bool, opt.quiet("No progress bar.")] = False,
    threads: int = typer.Option(0, "--threads", help="Torch CPU threads per process (0: all cores; with dask: the cores of a worker's host shared by its workers)."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Run on the dask.distributed cluster at this scheduler address (tcp://HOST:8786); workers write their own shards."),
    dask_workers: int = typer.Option(0, "--dask-workers", help="Run on a local dask cluster of N worker processes (0: no dask)."),
    streams: int = typer.Option(0, "--streams", help="Batches encoded at once, in threads (0: one per core on CPU, each with one torch thread; 1 on GPU)."),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile the encoder (frozen graph on CPU): a static batch, compiled once per run (~20-60 s on CPU, minutes on GPU); for long runs."),
    fast: bool = typer.Option(True, "--fast/--exact", help="--fast (default): fused encoder kernels (SDPA attention, folded BatchNorm), ~1.3x faster on CPU, equal to the reference within float16 rounding; --exact: the reference code's own kernels."),
    resize: str = typer.Option("exact", "--resize", help="SAM ViT encoders' resize: exact (default): the reference's PIL bilinear, bit for bit; fast: torch's antialiased uint8 bilinear, 1.4-3.4x cheaper on the host (the limit on a GPU), 1 level from PIL's in 0-0.5% of values (~20% for images over 2x taller than wide that are shrunk). Recorded in the store (a store of the other choice is refused); litemedsam and SAM 2 refuse fast."),
    refresh_changed: bool = typer.Option(False, "--refresh-changed", help="Re-encode the images changed since extraction (content hash; their shards are recomputed whole) instead of refusing the store."),
) -> None:
    """Stage one: encode every image once with a frozen SAM-family encoder into a Zarr store.

    Re-running the same command resumes an interrupted store; a store made differently is
    refused unless --overwrite.
    """
    from cache.ownership import check_store_target
    from stages.extract import ExtractConfig
    from stages.extract import extract as run

    storage = opt.storage_options(storage_option)
    check_store_target(out, storage)  # refuse a foreign --out before loading anything (again in the writer)
    cfg = ExtractConfig(
        dataset=dataset, data_root=str(data_root), out=out, encoder=encoder,
        checkpoint=str(checkpoint) if checkpoint else None, device=device, batch_size=batch_size,
        workers=workers, dtype=dtype, precision=precision, shard_size=shard_size, compression=compression,
        overwrite=overwrite,
        skip_bad=skip_bad, dataset_options=opt.parse_options(option, "--option"), storage_options=storage,
        threads=threads, scheduler=scheduler, dask_workers=dask_workers, streams=streams, fast=fast, compile=compile_, resize=resize,
        refresh_changed=refresh_changed,
    )
    result = run(cfg, progress=not quiet)
    print(result.summary())
