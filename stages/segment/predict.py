"""Segment new files end to end: image -> frozen encoder -> saved head -> label mask.

``pipeline predict MODEL.pt INPUTS... --out DIR`` with a ``--task segment`` model.pt.
Inputs are 2D image files (PNG, JPEG, TIFF, BMP, .npy, read like the file datasets read
them) or ACDC-style HDF5 files whose ``image`` is (H,W) or (slices,H,W) (read like the
``acdc-h5`` reader reads them; every slice is one 2D sample, as at extraction).

- Encoder: rebuilt from what model.pt records (name, checkpoint path, fused kernels or
  not, as at extraction; ``--checkpoint`` overrides the path) and refused unless its
  signature (checkpoint sha256, preprocessing, input size) equals the training store's, as
  for classification (``stages.common.joined.store_encoder``).
  Embeddings are rounded to the store's dtype (float16, or int8 with its per-channel scale),
  so the head sees exactly the numbers the cache would hold for that image. The UNet
  baseline reads the raw image and needs no encoder.
- Labels: ``evaluate.head_labels``, the same code as ``pipeline evaluate``: 256x256 canvas
  logits cropped to the image's region, resized (bilinear) to the input's own size, argmax;
  padded or stretched as the training store was (model.pt's ``geometry``, ``stages.geometry``).
- Outputs per input stem, in ``--out``: ``<stem>_mask.png`` (uint8 class index, 2D
  images) or ``<stem>_mask.h5`` (dataset ``label`` uint8 of the input's ``image`` shape,
  attribute ``mask_classes``; ``spacing`` copied when the input has it), and
  ``<stem>_overlay.png`` (image | prediction with a class legend; for volumes a montage of
  up to 8 evenly spaced slices).
- Safety: nothing is written until every input was read and every prediction made. An
  output file that already exists is refused (one line, exit 2) unless ``overwrite``; even
  then only those output names of these inputs are replaced, and only where the file there
  is predict's own (a PNG carrying ``cache.ownership.PNG_TEXT``, an HDF5 mask whose
  ``format`` attribute is ``MASK_FORMAT``): a ground-truth ``<stem>_mask.png`` beside the
  images, or a link, is refused with or without ``overwrite``.
"""
from __future__ import annotations

import io
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np
import torch
from torch import nn

from cache import quantize
from cache.ownership import PNG_TEXT, is_marked_png
from stages.common.geometry import saved_geometry
from stages.common.joined import saved_store, store_encoder
from stages.common.runtime import amp_dtype_for, resolve_device, resolve_precision
from stages.datasets.base import BadImageError
from stages.datasets.imageio import IMAGE_EXTS, MAX_PIXELS, check_array, read_image
from stages.segment.data import unet_image
from stages.segment.evaluate import (
    class_colormap,
    display_image,
    head_img_size,
    head_labels,
    load_model,
)

H5_EXTS = (".h5", ".hdf5")
MASK_FORMAT = "sam-feature-pipeline/mask"  # the ``format`` attribute of predict's HDF5 masks
FORMATS = ("table", "csv", "json")
MONTAGE_SLICES = 8


@dataclass
class SegInput:
    """One input file: its 2D samples (one, or one per volume slice) and its image shape."""

    path: Path
    slices: list[np.ndarray]
    shape: tuple[int, ...]
    spacing: Any = None
    labels: list[np.ndarray] = field(default_factory=list)

    @property
    def volume(self) -> bool:
        return self.path.suffix.lower() in H5_EXTS

    def mask(self) -> np.ndarray:
        """Predicted labels in the input's ``image`` shape ((slices,H,W) or (H,W))."""
        return np.stack(self.labels) if len(self.shape) == 3 else self.labels[0]


def read_input(path: str | Path, max_pixels: int = MAX_PIXELS) -> SegInput:
    """An image file or an ACDC-style HDF5 file -> SegInput (BadImageError naming the file)."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext in IMAGE_EXTS:
        image = read_image(path, max_pixels)
        return SegInput(path, [image], tuple(image.shape[:2]))
    if ext not in H5_EXTS:
        raise BadImageError(f"{path}: not an input predict reads; pass image files ({', '.join(IMAGE_EXTS)}) "
                            "or ACDC-style .h5 files with an 'image' dataset")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; check the path")
    try:
        with h5py.File(path, "r") as f:
            if "image" not in f or not isinstance(f["image"], h5py.Dataset):
                raise BadImageError(f"{path}: no 'image' dataset (found {sorted(f)}); ACDC-style files hold "
                                    "'image' (H,W) or (slices,H,W)")
            ds = f["image"]
            if ds.ndim not in (2, 3) or ds.size == 0:
                raise BadImageError(f"{path}: 'image' has shape {ds.shape}; expected (H,W) or (slices,H,W)")
            a = ds[()]
            spacing = f.attrs.get("spacing")
            if spacing is None and "spacing" in f:
                spacing = f["spacing"][()]
    except OSError as e:
        raise BadImageError(f"{path}: cannot open HDF5 file ({e}); the file is corrupt, re-create it") from None
    if a.ndim == 2:
        return SegInput(path, [check_array(a, f"{path}[image]", max_pixels)], a.shape, spacing)
    slices = [check_array(a[k], f"{path}[image][{k}]", max_pixels) for k in range(a.shape[0])]
    return SegInput(path, slices, tuple(a.shape), spacing)


def output_paths(inp: SegInput, out: Path) -> tuple[Path, Path]:
    """(mask file, overlay file) of one input in ``out``."""
    stem = inp.path.stem
    return out / f"{stem}_mask{'.h5' if inp.volume else '.png'}", out / f"{stem}_overlay.png"


def check_outputs(inputs: Sequence[SegInput], out: Path, overwrite: bool) -> None:
    """Refuse an output folder that is a file, two inputs writing the same output name, an
    output that is one of the inputs, an output name taken by anything predict did not write
    (with or without ``overwrite``), and (without ``overwrite``) an output that exists."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder; pass a new or existing folder as --out")
    sources = {p.resolve() for p in (i.path for i in inputs)}
    seen: dict[str, Path] = {}
    for inp in inputs:
        for target in output_paths(inp, out):
            key = target.name.lower()  # case-insensitive file systems collide on case alone
            if key in seen and seen[key] != inp.path:
                raise ValueError(f"{inp.path}: writes {target.name}, as {seen[key]} does (same file stem); "
                                 "rename one of them or predict them into different --out folders")
            seen[key] = inp.path
            if target.resolve() in sources:
                raise ValueError(f"{target}: is one of the inputs; choose another --out")
            if target.is_symlink() or target.is_dir() or (target.exists() and not is_prediction(target)):
                raise ValueError(f"{target}: exists and was not written by `pipeline predict`; nothing was "
                                 "changed, choose another --out")
            if target.exists() and not overwrite:
                raise ValueError(f"{target}: already exists; pass --overwrite to replace predict's own outputs "
                                 "for these inputs, or choose another --out")


def is_prediction(path: Path) -> bool:
    """A mask or overlay that `pipeline predict` wrote (by content, not by name)."""
    if path.suffix.lower() != ".h5":
        return is_marked_png(path)
    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("format") == MASK_FORMAT
    except OSError:
        return False


def as_stored(emb: np.ndarray, dtype: str) -> np.ndarray:
    """float32 embeddings -> the float32 values a store of ``dtype`` hands back for them."""
    if dtype == "float16":
        return emb.astype(np.float16).astype(np.float32)
    if dtype == "int8":
        q, scale = quantize(emb)
        return q.astype(np.float32) * scale[:, :, None, None]
    return emb


@torch.inference_mode()
def run_head(model: nn.Module, saved: dict[str, Any], encoder, inputs: Sequence[SegInput],
             device: torch.device, batch_size: int, amp) -> None:
    """Fill ``inp.labels`` of every input, batching 2D samples across inputs."""
    features = getattr(model, "input_kind", "features") == "features"
    img_size = head_img_size(model, int(saved["img_size"]))
    geometry = saved_geometry(saved)
    dtype = str(saved_store(saved)["signature"].get("dtype", "float32"))
    units = [(inp, k) for inp in inputs for k in range(len(inp.slices))]
    for a in range(0, len(units), batch_size):
        chunk = units[a:a + batch_size]
        raw = [inp.slices[k] for inp, k in chunk]
        if features:
            emb = encoder.forward(torch.stack([encoder.prepare(r) for r in raw]).to(device), amp_dtype=amp)
            x = torch.from_numpy(as_stored(emb.float().cpu().numpy(), dtype))
        else:
            x = torch.stack([unet_image(r, geometry) for r in raw])
        labels = head_labels(model, x.to(device), [r.shape[:2] for r in raw], img_size, geometry=geometry)
        for (inp, _), lab in zip(chunk, labels):
            inp.labels.append(lab)


def _replace_into(target: Path, write) -> None:
    """``write(tmp)`` then rename onto ``target``: a failed write leaves no half file."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_mask(inp: SegInput, target: Path, class_names: Sequence[str]) -> None:
    mask = inp.mask()
    if inp.volume:
        def write(tmp: Path) -> None:
            with h5py.File(tmp, "w") as f:
                f.create_dataset("label", data=mask, dtype=np.uint8, compression="gzip")
                f.attrs["format"] = MASK_FORMAT
                f.attrs["mask_classes"] = list(class_names)
                f.attrs["source"] = str(inp.path)
                if inp.spacing is not None:
                    f.attrs["spacing"] = np.asarray(inp.spacing, dtype=np.float64)
    else:
        def write(tmp: Path) -> None:
            from PIL import Image, PngImagePlugin

            info = PngImagePlugin.PngInfo()
            for key, value in PNG_TEXT.items():
                info.add_text(key, value)
            Image.fromarray(mask.astype(np.uint8)).save(tmp, format="PNG", pnginfo=info)  # 2D uint8: mode L
    _replace_into(target, write)


def montage_slices(n: int, limit: int = MONTAGE_SLICES) -> list[int]:
    """Up to ``limit`` evenly spaced slice positions of an n-slice volume (all when n <= limit)."""
    return list(range(n)) if n <= limit else sorted({int(round(x)) for x in np.linspace(0, n - 1, limit)})


def save_overlay(inp: SegInput, target: Path, class_names: Sequence[str]) -> None:
    """2D (also a 2D .h5): image | prediction; (slices,H,W) volume: a montage of up to
    ``MONTAGE_SLICES`` evenly spaced slices with the prediction over them.
    The legend names each foreground class in its colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    k = len(class_names)
    cmap = class_colormap(k)
    stacked = len(inp.shape) == 3
    if stacked:
        panels = [(inp.slices[s], inp.labels[s], f"slice {s}") for s in montage_slices(len(inp.slices))]
    else:
        panels = [(inp.slices[0], None, "image"), (inp.slices[0], inp.labels[0], "prediction")]
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (img, lab, title) in zip(axes.flat, panels):
        img = display_image(img)
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
        if lab is not None:
            ax.imshow(lab, cmap=cmap, vmin=0, vmax=max(k - 1, 1), interpolation="nearest")
        ax.set_title(title, fontsize=9)
    handles = [Patch(color=cmap(c)[:3], label=class_names[c]) for c in range(1, k)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6) or 1, fontsize=9, frameon=False)
    shown = f": {len(panels)} of {len(inp.slices)} slices" if stacked else ""
    fig.suptitle(f"{inp.path.name}{shown}", fontsize=10)
    fig.tight_layout(rect=(0, 0.6 / (3 * rows + 0.6), 1, 1))
    _replace_into(target, lambda tmp: fig.savefig(tmp, dpi=90, format="png", metadata=PNG_TEXT))
    plt.close(fig)


def class_counts(mask: np.ndarray, num_classes: int) -> list[int]:
    return np.bincount(mask.ravel(), minlength=num_classes)[:num_classes].astype(int).tolist()


def predict_segmentation(model_path: str | Path, paths: Sequence[str | Path], out: str | Path,
                         overwrite: bool = False, device: str = "auto", checkpoint: str | None = None,
                         batch_size: int = 8, precision: str = "auto") -> list[dict[str, Any]]:
    """Masks and overlays of ``paths`` in ``out``; returns per input {"path", "shape",
    "mask", "overlay", "counts": {class name: pixels/voxels}, "labels": the mask array}."""
    if not paths:
        raise ValueError("no input files given; pass images or ACDC-style .h5 files")
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size}: must be at least 1")
    dev = resolve_device(device)
    model, saved = load_model(model_path, dev)
    k = int(saved["num_classes"])
    names = list(saved.get("mask_classes") or [f"class_{c}" for c in range(k)])
    if k > 256:
        raise ValueError(f"{model_path}: {k} classes do not fit a uint8 mask; predict supports up to 256")
    inputs = [read_input(p) for p in paths]
    out = Path(out)
    check_outputs(inputs, out, overwrite)
    uses_encoder = getattr(model, "input_kind", "features") == "features"
    encoder = store_encoder(saved_store(saved), dev, checkpoint) if uses_encoder else None
    amp = amp_dtype_for(resolve_precision(precision, dev))
    run_head(model, saved, encoder, inputs, dev, batch_size, amp)
    check_outputs(inputs, out, overwrite)  # again: the folder may have changed while the model ran
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for inp in inputs:
        mask_path, overlay_path = output_paths(inp, out)
        write_mask(inp, mask_path, names)
        save_overlay(inp, overlay_path, names)
        mask = inp.mask()
        results.append({"path": str(inp.path), "shape": list(mask.shape), "mask": str(mask_path),
                        "overlay": str(overlay_path), "counts": dict(zip(names, class_counts(mask, k))),
                        "labels": mask})
    print(f"wrote {2 * len(results)} files ({len(results)} masks + overlays) to {out}", file=sys.stderr)
    return results


def format_counts(results: Sequence[dict[str, Any]], fmt: str = "table") -> str:
    """Per input, per class pixel (voxel) counts: an aligned table, CSV or JSON."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown --format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt == "json":
        return json.dumps([{k: v for k, v in r.items() if k != "labels"} for r in results], indent=2)
    names = list(results[0]["counts"]) if results else []
    header = ["path", "shape", "mask", *names]
    rows = [[r["path"], "x".join(map(str, r["shape"])), Path(r["mask"]).name, *map(str, r["counts"].values())]
            for r in results]
    if fmt == "csv":
        import csv

        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerows([header, *rows])
        return buf.getvalue().rstrip("\n")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) if i >= 3 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     .rstrip() for r in [header, *rows])
