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
from typing import Sequence

import numpy as np
import torch

from stages.classify.data import prepare_image
from stages.classify.evaluate import load_classifier, saved_views
from stages.classify.scoring import view_logits
from stages.common.joined import saved_store, store_encoder
from stages.classify.metrics import safe_name
from stages.common.geometry import saved_geometry
from stages.common.runtime import amp_dtype_for, resolve_device, resolve_precision
from stages.datasets.imageio import read_image

FORMATS = ("table", "csv", "json")


@torch.no_grad()
def predict_files(model_path: str | Path, paths: Sequence[str | Path], device: str = "auto",
                  checkpoint: str | None = None, batch_size: int = 8, precision: str = "auto",
                  tta: bool = False) -> tuple[list[str], np.ndarray]:
    """Class names and probabilities (N,K) for the image files ``paths``; ``tta``: averaged
    over the symmetries the model was trained on (``evaluate.saved_views``)."""
    dev = resolve_device(device)
    net, saved = load_classifier(model_path, dev)
    views = saved_views(saved) if tta else ()
    if not paths:
        raise ValueError("no image files given; pass one or more PNG/JPEG/TIFF/BMP/.npy paths")
    enc = store_encoder(saved_store(saved), dev, checkpoint) if net.uses_sam else None
    amp = amp_dtype_for(resolve_precision(precision, dev))
    size, geometry = int(saved["img_size"]), saved_geometry(saved)
    probs = []
    for a in range(0, len(paths), batch_size):
        raw = [read_image(p) for p in paths[a:a + batch_size]]
        image = torch.stack([prepare_image(r, size, geometry) for r in raw]).to(dev) if net.uses_image else None
        sam = enc.forward(torch.stack([enc.prepare(r) for r in raw]).to(dev), amp_dtype=amp) if enc else None
        logits = view_logits(net, image, sam, views)
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
