"""What every image encoder of the registry provides.

An ``Encoder`` bundles a frozen ``nn.Module`` (B,3,S,S) -> (B,256,64,64) with the
preprocessing that must run before it. Preprocessing is split in two so extraction can
overlap it with compute:

- ``prepare(image)`` runs on the CPU, in DataLoader workers: raw (H,W[,C]) pixels of any
  dtype -> a float32 tensor (3,S,S), resized, normalised and padded exactly as the
  encoder's reference code does. It is deterministic and per image.
- ``forward(batch)`` runs the network on the target device under autocast when asked.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from cache.schema import EMBED_SHAPE  # noqa: F401  (the store's contract, defined once; re-exported)


@contextlib.contextmanager
def flush_denormals(enabled: bool = True) -> Iterator[None]:
    """Flush denormal floats to zero (FTZ/DAZ) on this thread while the block runs.

    GELU's erf goes through denormal intermediates for strongly negative inputs, and x86
    cores handle denormals in microcode, ~100x slower: without this, GELU alone takes a
    third of LiteMedSAM's CPU time. Only values below 1.2e-38 change (float16 stores
    cannot even hold them). The setting is per thread: each encoding stream sets it for
    itself (CPU streams run one torch thread each by default; the OpenMP helpers of a
    stream given more threads keep the default)."""
    if not enabled or not torch.set_flush_denormal(True):
        yield
        return
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


class EncoderError(ValueError):
    """Bad encoder or checkpoint input (one line naming the file and the fix)."""


@dataclass
class Encoder:
    """name: registry key; net: the frozen image encoder; img_size: S (1024 or 256);
    checkpoint_sha256: sha256 of the weights file; preprocessing: the parameters of
    ``prepare``, recorded in the store so a store made differently is refused;
    arch: the network's hyper-parameters (JSON-able, informative); fast: the net runs
    the optimised kernels of ``stages.encoders.fast`` (same results within float16
    rounding, not bit-identical)."""

    name: str
    net: nn.Module
    img_size: int
    checkpoint_sha256: str
    checkpoint_path: str
    preprocessing: dict[str, Any] = field(default_factory=dict)
    arch: dict[str, Any] = field(default_factory=dict)
    fast: bool = False

    def prepare(self, image: np.ndarray) -> torch.Tensor:
        """(H,W[,C]) raw pixels -> (3,S,S) float32 on the CPU."""
        raise NotImplementedError

    def preprocessor(self) -> Callable[[np.ndarray], torch.Tensor]:
        """``prepare`` as a small picklable callable without the network, for DataLoader
        workers started with spawn."""
        return self.prepare

    def prepare_host(self) -> Callable[[np.ndarray], torch.Tensor] | None:
        """The host half of ``prepare`` when the encoder can finish preprocessing on its
        device (``finish``), returning a smaller tensor to move (SAM: the uint8 canvas);
        None: ``prepare`` runs whole on the host. Used on GPUs, where the host path is the
        limit; both halves together give ``prepare``'s exact values."""
        return None

    def finish(self, batch: torch.Tensor, heights, widths) -> torch.Tensor:
        """A batch of ``prepare_host`` outputs (of images ``heights`` x ``widths``), on the
        device -> what ``prepare`` would have given; a ``prepare`` batch passes unchanged."""
        return batch

    def to(self, device: torch.device | str) -> "Encoder":
        self.net.to(device)
        return self

    @torch.inference_mode()
    def forward(self, batch: torch.Tensor, amp_dtype: torch.dtype | None = None,
                out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """batch (B,3,S,S) float32 on the net's device -> (B,256,64,64) ``out_dtype``
        (contiguous, on the same device). ``amp_dtype`` (e.g. torch.bfloat16) runs the net
        under autocast; None keeps the reference float32 numerics. ``out_dtype`` float16
        casts on the device (extraction on a GPU: half the bytes to copy back); the cast
        runs after the denormal flush is lifted, so it rounds exactly as numpy's would."""
        if self.fast:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with flush_denormals(batch.device.type == "cpu"):
            if amp_dtype is None:
                out = self.net(batch)
            else:
                with torch.autocast(device_type=batch.device.type, dtype=amp_dtype):
                    out = self.net(batch)
        return out.to(out_dtype).contiguous()

    def signature(self) -> dict[str, Any]:
        return {
            "encoder": self.name,
            "checkpoint_sha256": self.checkpoint_sha256,
            "img_size": self.img_size,
            "preprocessing": self.preprocessing,
            "arch": self.arch,
        }
