"""Classify new image files end to end: image -> frozen encoder -> saved model -> probabilities.

The encoder is rebuilt from what model.pt records about its training store (name and
checkpoint path; ``checkpoint`` overrides the path) and must reproduce the training
store's checkpoint sha256 and preprocessing, so the model sees the embeddings it was
trained on. Models that do not read embeddings (``backbone``) skip the encoder.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from cache import SignatureMismatchError

from .datasets.imageio import read_image
from .evaluate import ENCODER_KEYS, load_classifier
from .geometry import saved_geometry
from .runtime import amp_dtype_for, resolve_device, resolve_precision
from .train.data import prepare_image
from .train.metrics import safe_name

FORMATS = ("table", "csv", "json")


def load_encoder(saved: dict[str, Any], device: torch.device, checkpoint: str | None = None, fast: bool = False):
    """The encoder the model's training store was extracted with, verified by signature.
    ``fast``: the fused kernels (equal within float16 rounding; segmentation predict uses
    the store's choice so its embeddings round to the stored ones)."""
    from .encoders import build_encoder

    st = saved["store"]
    path = checkpoint or st.get("checkpoint_path")
    if checkpoint is None and path and not Path(path).is_file():
        path = None  # e.g. a store made on another machine; the builder's default may still match
    enc = build_encoder(st["encoder"], path, device=device, fast=fast)
    have, want = enc.signature(), st["signature"]
    diff = [k for k in ENCODER_KEYS if have.get(k) != want.get(k)]
    if diff:
        raise SignatureMismatchError(
            f"encoder {st['encoder']!r} ({path or 'default weights'}) differs from the one the model's store was "
            f"made with ({', '.join(diff)}); pass --checkpoint with the training encoder's weights")
    return enc


@torch.no_grad()
def predict_files(model_path: str | Path, paths: Sequence[str | Path], device: str = "auto",
                  checkpoint: str | None = None, batch_size: int = 8, precision: str = "auto"
                  ) -> tuple[list[str], np.ndarray]:
    """Class names and probabilities (N,K) for the image files ``paths``."""
    dev = resolve_device(device)
    net, saved = load_classifier(model_path, dev)
    if not paths:
        raise ValueError("no image files given; pass one or more PNG/JPEG/TIFF/BMP/.npy paths")
    enc = load_encoder(saved, dev, checkpoint) if net.uses_sam else None
    amp = amp_dtype_for(resolve_precision(precision, dev))
    size, geometry = int(saved["img_size"]), saved_geometry(saved)
    probs = []
    for a in range(0, len(paths), batch_size):
        raw = [read_image(p) for p in paths[a:a + batch_size]]
        image = torch.stack([prepare_image(r, size, geometry) for r in raw]).to(dev) if net.uses_image else None
        sam = enc.forward(torch.stack([enc.prepare(r) for r in raw]).to(dev), amp_dtype=amp) if enc else None
        logits = net(image, sam).float()
        probs.append(torch.softmax(logits, dim=1).cpu().numpy())
    return list(saved["classes"]), np.concatenate(probs)


def format_predictions(paths: Sequence[str | Path], classes: Sequence[str], probs: np.ndarray,
                       fmt: str = "table") -> str:
    """Predictions as an aligned table, CSV, or JSON (one object per file)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown --format {fmt!r}; use one of {', '.join(FORMATS)}")
    pred = probs.argmax(axis=1)
    if fmt == "json":
        return json.dumps([{"path": str(p), "pred": classes[k], "probs": {c: float(v) for c, v in zip(classes, pr)}}
                           for p, k, pr in zip(paths, pred, probs)], indent=2)
    header = ["path", "pred", *[f"prob_{safe_name(c)}" for c in classes]]
    rows = [[str(p), classes[k], *[f"{v:.4f}" for v in pr]] for p, k, pr in zip(paths, pred, probs)]
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
        return buf.getvalue().rstrip("\n")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])
