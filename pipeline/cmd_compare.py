"""`pipeline compare`: models x labelled fractions x seeds on one store, one table."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from . import options as opt
from .app import app, fail, handle_errors


def _split(text: str, kind: type, flag: str) -> list:
    try:
        return [kind(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected a comma list of {kind.__name__} values") from None


def _settings(settings: list[str] | None, option: list[str] | None, given: dict, plots: bool) -> dict:
    """``--set KEY=VALUE`` pairs, then the explicit options that were given (they win)."""
    from stages.classify.compare import parse_settings

    opts: dict = parse_settings(settings or [])
    opts.update({k: v for k, v in given.items() if v is not None})
    if option:
        opts["dataset_options"] = opt.parse_options(option, "--option")
    opts["plots"] = plots
    return opts


# The training settings here default to None, not to train's defaults: an option that was
# not given must not override a --set of the same setting.
@app.command()
@handle_errors
def compare(
    from_cache: opt.FromCache,
    out: Annotated[Path, opt.out("Comparison folder: compare.md/.json/.png and runs/<model>/f<fraction>/s<seed>/ (new, empty, or an earlier comparison).")],
    models: str = typer.Option("backbone,slca,probe,sam-head", "--models", "-m", help="Comma list of slca, backbone, probe, sam-head; variants as slca/window=0/gate=mul (keys: `pipeline train` option names with underscores, or window, gate, stages, hidden, act, fuse, norm, branch, spatial, add, prior, prior_folds, blend, distill, branch_sup, branch_detach, image_sup, independent, lr_mult, img)."),
    fractions: str = typer.Option("0.1,1.0", "--fractions", help="Comma list of labelled fractions of the training split (stratified, seeded)."),
    seeds: str = typer.Option("0,1,2", "--seeds", help="Comma list of seeds (initialisation, order, augmentation, fraction subset)."),
    backbone: Annotated[Optional[str], opt.backbone("timm model for slca/backbone (default resnet18).")] = None,
    pretrained: bool = typer.Option(False, "--pretrained", help="slca/backbone runs start from timm's pretrained weights (see `pipeline train --help`); probe and sam-head runs are unaffected."),
    backbone_weights: Annotated[Optional[Path], opt.backbone_weights("Local timm checkpoint for the slca/backbone runs' backbone.")] = None,
    img_size: Annotated[Optional[int], opt.img_size("Backbone input side in px (default 64; 0: automatic).")] = None,
    epochs: Annotated[Optional[int], opt.epochs("Most epochs per run (default 30).")] = None,
    batch_size: Annotated[Optional[int], opt.batch_size("Batch size (default 32).")] = None,
    lr: Annotated[Optional[float], opt.lr("Peak AdamW learning rate (default 1e-3).")] = None,
    patience: Annotated[Optional[int], opt.patience("Early stopping patience (default 10; 0: never).")] = None,
    dataset: opt.StoreDataset = None,
    data_root: opt.StoreDataRoot = None,
    option: Annotated[Optional[List[str]], opt.dataset_option("Dataset reader option KEY=VALUE (repeatable), as in `pipeline train`.")] = None,
    settings: Optional[List[str]] = typer.Option(None, "--set", help="Any other `pipeline train` setting for every run, KEY=VALUE with the option name in underscores (repeatable): --set label_smoothing=0.1 --set augment=flip,rot."),
    device: Annotated[Optional[str], opt.device("auto (default), cpu, cuda, cuda:1.")] = None,
    workers: Annotated[Optional[int], opt.workers("DataLoader processes (default -1: automatic).")] = None,
    in_memory: opt.InMemory = False,
    plots: Annotated[bool, opt.plots("Write each run's own PNG figures too.")] = False,
    jobs: int = typer.Option(1, "--jobs", "-j", help="Runs trained at once, each in its own process with the torch threads split between them (pays where one run leaves cores idle; benchmarks/bench_jobs.py measures it; memory grows with it)."),
    overwrite: Annotated[bool, opt.overwrite("Retrain run folders made with other settings (only their own files are deleted).")] = False,
    quiet: opt.Quiet = False,
) -> None:
    """Train every model x fraction x seed through the normal training path and compare them.

    Finished runs whose settings match are reused, an interrupted one is resumed, so the
    same command can be re-run after an interruption or with more seeds. Writes
    compare.md (printed), compare.json and compare.png to --out.
    """
    from stages.classify.compare import CompareConfig, format_table, run_compare

    given = dict(backbone=backbone, backbone_weights=str(backbone_weights.resolve()) if backbone_weights else None,
                 pretrained=pretrained or None, img_size=img_size, epochs=epochs, batch_size=batch_size, lr=lr,
                 patience=patience, dataset=dataset, data_root=str(data_root.resolve()) if data_root else None,
                 device=device, workers=workers, in_memory=in_memory or None)
    opts = _settings(settings, option, given, plots)
    store = str(Path(from_cache).resolve()) if Path(from_cache).exists() else from_cache
    cc = CompareConfig(store=store, out=str(out), models=_split(models, str, "--models"),
                       fractions=_split(fractions, float, "--fractions"), seeds=_split(seeds, int, "--seeds"),
                       options=opts, overwrite=overwrite, jobs=jobs)
    try:
        report = run_compare(cc, progress=not quiet)
    except KeyboardInterrupt:
        fail(f"interrupted; re-run the same command to reuse the finished runs and resume the rest ({out})", 130)
    print(format_table(report["summary"], "backbone" in cc.models))
    print(f"wrote {out}/compare.md, compare.json, compare.png")
