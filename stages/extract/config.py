"""What stage one takes and gives: ``ExtractConfig`` (every option of ``pipeline extract``),
``ExtractResult`` (counts and timing of a run), and what a store records of the run that
made it: the dataset's listing (``listing_of``) and the signature (``store_signature``)
that a resumed or re-run extraction must match.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cache import Listing, make_signature
from cache.schema import DEFAULT_COMPRESSION, DEFAULT_SHARD
from stages.datasets.base import Dataset
from stages.encoders.base import Encoder


@dataclass
class ExtractConfig:
    """Everything ``pipeline extract`` takes (see its --help for each field)."""

    dataset: str
    data_root: str
    out: str
    encoder: str = "litemedsam"
    checkpoint: str | None = None
    device: str = "auto"
    batch_size: int = 0  # 0: 1 on CPU (parallel streams instead), 32 on GPU
    workers: int = -1  # -1: automatic
    dtype: str = "float16"
    precision: str = "auto"
    shard_size: int = DEFAULT_SHARD
    compression: str = DEFAULT_COMPRESSION  # of the embeddings: none (fastest reads) or lz4 (~11% smaller)
    overwrite: bool = False
    skip_bad: bool = False
    dataset_options: dict[str, Any] = field(default_factory=dict)
    storage_options: dict[str, Any] | None = None
    # scale: threads, dask (stages/extract/distributed.py), CPU streams, kernels
    threads: int = 0  # torch intra-op threads per process; 0: torch's default (all cores; dask: cores/worker)
    scheduler: str | None = None  # dask scheduler address: run on that cluster
    dask_workers: int = 0  # > 0: run on a local dask cluster of this many worker processes
    streams: int = 0  # batches encoded at once by as many threads (0: one per core on CPU, 1 on GPU)
    fast: bool = True  # the encoders' fused kernels (SDPA, folded BatchNorm): equal within float16 rounding
    # preprocessing: SAM ViT's resize, exact (PIL, the reference) or fast (torch's uint8 kernel,
    # 1-2 levels from PIL's in a few values; recorded in the store's preprocessing, so part of its signature)
    resize: str = "exact"
    compile: bool = False  # torch.compile the encoder (worth it on GPU for long runs; minutes to compile)
    # reliability
    refresh_changed: bool = False  # re-encode the shards of samples whose image changed, instead of refusing


@dataclass
class ExtractResult:
    """What a run did: ``encoded`` of ``total`` samples (0 when the store was complete)."""

    out: str
    total: int
    encoded: int
    failed: int
    seconds: float
    encoder: str
    device: str
    report: str | None = None  # CSV listing the failed samples, beside the store
    compile_seconds: float = 0.0  # --compile: time spent compiling (part of ``seconds``)

    @property
    def images_per_s(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else float("nan")

    def summary(self) -> str:
        if self.encoded == 0:
            return f"{self.out}: complete, {self.total} samples already extracted, nothing to do"
        fail = f", {self.failed} failed" if self.failed else ""
        if self.failed and self.report:
            fail += f" (listed in {self.report})"
        compiled = f", {self.compile_seconds:.0f} s of it compiling" if self.compile_seconds else ""
        return (f"{self.out}: {self.encoded} of {self.total} samples encoded{fail} with {self.encoder} "
                f"on {self.device} in {self.seconds:.1f} s{compiled} ({self.images_per_s:.2f} img/s)")


def listing_of(dataset: Dataset) -> Listing:
    """The per-sample columns a store keeps of its dataset (ids, labels, splits, groups)."""
    s = dataset.samples
    return Listing(ids=[x.id for x in s], labels=[x.label for x in s], splits=[x.split for x in s],
                   groups=[x.group for x in s], slices=[x.index_in_group for x in s])


def store_signature(encoder: Encoder, dataset: Dataset, precision: str, dtype: str) -> dict[str, Any]:
    """What makes two stores interchangeable: encoder, weights, preprocessing, precision,
    dataset and dtype (a store made with another signature is refused, not resumed)."""
    e = encoder.signature()
    return make_signature(encoder=e["encoder"], checkpoint_sha256=e["checkpoint_sha256"], img_size=e["img_size"],
                          preprocessing=e["preprocessing"], precision=precision, dataset_kind=dataset.kind,
                          dataset_signature=dataset.signature(), dtype=dtype)
