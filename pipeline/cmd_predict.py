"""`pipeline predict`: a saved model on new image files, end to end (encoder -> model)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from . import options as opt
from .app import app, handle_errors


@app.command()
@handle_errors
def predict(
    model: Path = typer.Argument(..., help="model.pt written by `pipeline train`: a classifier, or a --task segment head."),
    images: List[Path] = typer.Argument(..., help="Image files (PNG, JPEG, TIFF, BMP, .npy); segmentation also reads ACDC-style .h5 files ('image' (H,W) or (slices,H,W))."),
    out: Annotated[Optional[Path], opt.out("Segmentation (required): folder, new or existing, for <stem>_mask.png (or _mask.h5 for .h5 inputs) and <stem>_overlay.png per input.")] = None,
    overwrite: Annotated[bool, opt.overwrite("Segmentation: replace those output files of these inputs if they exist (never any other file); without it an existing one is refused.")] = False,
    fmt: Annotated[str, opt.fmt("table, csv or json.")] = "table",
    device: opt.Device = "auto",
    checkpoint: Annotated[Optional[Path], opt.checkpoint("Encoder weights, when the path recorded at extraction is not on this machine.")] = None,
    batch_size: Annotated[int, opt.batch_size()] = 8,
    tta: opt.Tta = False,
) -> None:
    """Run a saved model on new files end to end (encoder -> model). A classifier prints class
    probabilities; a segmentation head writes a label mask at each input's own size and an
    overlay PNG into --out, and prints per-class pixel (voxel) counts."""
    from stages.common.training import load_checkpoint

    ckpt = str(checkpoint) if checkpoint else None
    if load_checkpoint(model).get("task") == "segment":
        if tta:
            raise ValueError(f"{model}: --tta is for classifiers; this model.pt holds a segmentation head")
        from stages.segment.predict import FORMATS, format_counts, predict_segmentation

        if out is None:
            raise ValueError(f"{model}: a segmentation model writes a mask and an overlay per input; pass --out DIR")
        if fmt not in FORMATS:
            raise ValueError(f"unknown --format {fmt!r}; use one of {', '.join(FORMATS)}")
        results = predict_segmentation(model, [str(p) for p in images], out, overwrite=overwrite, device=device,
                                       checkpoint=ckpt, batch_size=batch_size)
        print(format_counts(results, fmt))
        return
    if out is not None or overwrite:
        raise ValueError(f"{model}: a classifier prints its predictions; --out and --overwrite are for "
                         "segmentation models")
    from stages.classify.predict import format_predictions, predict_files

    classes, probs = predict_files(model, [str(p) for p in images], device=device, checkpoint=ckpt,
                                   batch_size=batch_size, tta=tta)
    print(format_predictions(images, classes, probs, fmt))
