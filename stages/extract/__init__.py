"""Stage one: run a frozen encoder once per image and store its embeddings.

    from stages.extract import ExtractConfig, extract
    result = extract(ExtractConfig(dataset="synthetic", data_root="data/synthetic", out="stores/s.zarr"))

- ``config``: ``ExtractConfig`` (every option of ``pipeline extract``), ``ExtractResult``,
  the store's listing and signature;
- ``steps``: what every run does: build the encoder, open the store, check the images
  already in it, encode the pending shards, record failures, commit;
- ``local``: the run on this machine; ``hostpath``: its decode -> encode -> write path
  (DataLoader of prepared images, CPU streams, shard buffers, writer threads);
- ``distributed``: the run on a dask cluster, shard partitions as tasks;
- ``failures``: the failures report beside the store, disk-full errors.
"""
from __future__ import annotations

from stages.extract.config import ExtractConfig, ExtractResult
from stages.extract.failures import loud_disk_full
from stages.extract.local import extract_local


def extract(cfg: ExtractConfig, progress: bool = True) -> ExtractResult:
    """Run stage one as configured (on a dask cluster with ``cfg.scheduler`` or
    ``cfg.dask_workers``, else here); returns counts and timing. Raises DatasetError,
    EncoderError or StoreError (one line each) on bad input, and StoreError on a full disk."""
    with loud_disk_full(cfg.out):
        if cfg.scheduler or cfg.dask_workers > 0:
            from stages.extract.distributed import extract_distributed

            return extract_distributed(cfg, progress=progress)
        return extract_local(cfg, progress)


__all__ = ["ExtractConfig", "ExtractResult", "extract"]
