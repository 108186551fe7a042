"""`pipeline evaluate`: re-score a saved classifier or segmentation head on a store."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import options as opt
from .app import app, handle_errors


@app.command()
@handle_errors
def evaluate(
    model: Path = typer.Argument(..., help="model.pt written by `pipeline train`."),
    store: Annotated[Optional[str], opt.from_cache("Feature store to score on (default: the training store).", alias="--store")] = None,
    out: Annotated[Optional[Path], opt.out("Folder for metrics.json, predictions.csv and figures (optional for classification): new or empty, or an earlier evaluation with --overwrite.")] = None,
    overwrite: Annotated[bool, opt.overwrite("Replace an earlier evaluation in --out (its own files only); a folder holding anything else is refused either way.")] = False,
    split: str = typer.Option("test", "--split", help="train, val, test, or all. On the training store, the training run's own split."),
    dataset: opt.StoreDataset = None,
    data_root: opt.StoreDataRoot = None,
    option: opt.DatasetOption = None,
    device: opt.Device = "auto",
    batch_size: Annotated[int, opt.batch_size()] = 64,
    in_memory: opt.InMemory = False,
    tta: opt.Tta = False,
    as_json: Annotated[bool, opt.as_json("Print metrics as JSON.")] = False,
    quiet: opt.Quiet = False,
) -> None:
    """Re-score a saved model on a store: a classifier, or a segmentation head (by the task
    recorded in model.pt)."""
    from cache import StoreError
    from stages.common.joined import saved_store
    from stages.common.training import load_checkpoint

    if split not in ("train", "val", "test", "all"):
        raise ValueError(f"--split {split!r}: use train, val, test or all")
    saved = load_checkpoint(model)
    task = saved.get("task")
    store = store or saved_store(saved).get("url") or saved.get("config", {}).get("store")
    if not store:
        raise ValueError(f"{model}: no training store recorded; pass --store")
    common = dict(split=split, kind=dataset, data_root=str(data_root) if data_root else None, device=device,
                  dataset_options=opt.parse_options(option, "--option"))
    if tta and task != "classify":
        raise ValueError(f"{model}: --tta is for classifiers; this model.pt holds a {task!r} model")
    if task == "segment":
        from stages.segment.evaluate import evaluate_saved, format_scores

        metrics = evaluate_saved(model, store, out, **common, overwrite=overwrite)
        text = format_scores(metrics)
    elif task == "classify":
        from stages.classify.evaluate import evaluate_classifier, format_metrics

        metrics = evaluate_classifier(model, store, out, **common, batch_size=batch_size, in_memory=in_memory,
                                      progress=not quiet, tta=tta, overwrite=overwrite)
        text = format_metrics({k: v for k, v in metrics.items() if isinstance(v, dict)})
    else:
        raise StoreError(f"{model}: unknown task {task!r}; not a model.pt written by `pipeline train`")
    if as_json:
        from stages.common.jsonio import jsonable

        text = json.dumps(jsonable(metrics), indent=2, default=str)
    print(text)
