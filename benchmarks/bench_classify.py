"""PneumoniaMNIST: ``backbone`` vs ``slca`` vs ``probe`` at several training fractions and
seeds, and the cost of one training epoch from the cache vs recomputing the encoder.

    python benchmarks/bench_classify.py --train-per-class 40 --val-per-class 20 --test-limit 40

1. Takes a stratified, seeded subset of ``--data`` (``--train-per-class``,
   ``--val-per-class``, ``--test-limit``; 0 = the whole split) and writes it as a MedMNIST
   .npz in ``--work`` (the official splits are kept).
2. Extracts it once with the default encoder (``pipeline extract``; resumed if interrupted).
3. Trains every model x fraction x seed with ``stages.compare.run_compare``, the code of
   ``pipeline compare`` (runs in the subset's ``compare/runs/<model>/f<fraction>/s<seed>``;
   a finished run is reused when its config matches, an interrupted one resumed) and prints
   its table: test AUC / accuracy / balanced accuracy as mean +- sample std over seeds and
   the paired difference to ``backbone``. ``--models`` also takes SLCA variants such as
   ``slca/gate=mul``, ``slca/window=0``, ``slca/stages=last2`` (the design measurement).
4. Times one training epoch of ``slca`` reading the cached embeddings, and one epoch
   that runs the encoder on every batch instead (same model, same batches), and prints
   the ratio.

Results also go to ``--work/bench_classify.json`` (and compare.md/.json/.png in the
subset's ``compare/`` folder). Progress goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._util import scratch_folder  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "pneumoniamnist" / "pneumoniamnist.npz"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_subset(src: Path, dst: Path, per_class: dict[str, int], test_limit: int, seed: int) -> Path:
    """Stratified, seeded subset of a MedMNIST .npz: ``per_class[split]`` images per class,
    or for test ``test_limit`` images in the split's class proportions (0 = whole split)."""
    rng = np.random.default_rng(seed)
    out = {}
    with np.load(src) as z:
        for split in ("train", "val", "test"):
            y = z[f"{split}_labels"].reshape(-1)
            n = per_class.get(split, 0)
            if split == "test" and test_limit and not n:
                frac = min(1.0, test_limit / len(y))
                keep = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:max(1, round(frac * (y == c).sum()))]
                                       for c in np.unique(y)])
            elif n:
                keep = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:n] for c in np.unique(y)])
            else:
                keep = np.arange(len(y))
            keep = np.sort(keep)
            out[f"{split}_images"] = z[f"{split}_images"][keep]
            out[f"{split}_labels"] = z[f"{split}_labels"][keep]
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        with np.load(dst) as old:
            if all(np.array_equal(old[k], v) for k, v in out.items()):
                return dst
    np.savez(dst, **out)
    return dst


def run_models(args, store: str, out: Path) -> dict:
    """Every model x fraction x seed through ``pipeline compare``'s implementation (finished
    runs in ``out`` reused, an interrupted one resumed)."""
    from stages.classify.compare import run_compare

    return run_compare(compare_config(args, store, out), progress=True)


def compare_config(args, store: str, out: Path):
    """The ``pipeline compare`` configuration of this benchmark's arguments (``--set`` pairs
    go to every run, as they do in ``pipeline compare``)."""
    from stages.classify.compare import CompareConfig, parse_settings

    options = dict(backbone=args.backbone, img_size=args.img_size, epochs=args.epochs, patience=args.patience,
                   batch_size=args.batch_size, in_memory=args.in_memory)
    try:
        options.update(parse_settings(args.settings))
    except ValueError as e:
        sys.exit(f"error: {e} (a `pipeline train` option name with underscores)")
    return CompareConfig(store=store, out=str(out), models=args.models, fractions=args.fractions, seeds=args.seeds,
                         options=options, overwrite=args.overwrite, jobs=args.jobs)


def time_epochs(args, store: str) -> dict:
    """Seconds of one slca training epoch: embeddings from the cache vs from the encoder."""
    from stages.classify.config import ClassifyConfig, model_kwargs
    from stages.classify.data import ClassifyData, make_loader
    from stages.classify.train import ClassifyTrainer, model_record, prepare
    from stages.common.runtime import amp_dtype_for, resolve_device, resolve_precision
    from stages.common.training import Amp, seed_everything
    from stages.encoders import build_encoder
    from stages.models import create_model

    cfg = ClassifyConfig(store=store, out="", model="slca", backbone=args.backbone, img_size=args.img_size,
                         batch_size=args.batch_size, augment="none", epochs=1, warmup_epochs=0)
    prep = prepare(cfg)
    rows = prep.splits["train"][: args.timing_samples or None]
    device = resolve_device("auto")
    precision = resolve_precision("auto", device)
    amp = Amp(device, precision)
    st = prep.joined.store
    enc = build_encoder(st.attrs["encoder"], None, device=device)
    enc_amp = amp_dtype_for(precision)
    ds = prep.joined.dataset

    def recompute(batch) -> torch.Tensor:
        raw = [ds.load_image(int(r)) for r in rows[batch["pos"].numpy()]]
        return enc.forward(torch.stack([enc.prepare(x) for x in raw]).to(device), amp_dtype=enc_amp)

    out = {}
    for name, need_sam, fn in (("cache", True, None), ("recompute", False, recompute)):
        seed_everything(0)
        net = create_model("slca", **model_kwargs(cfg, len(prep.classes), prep.img_size)).to(device)
        data = ClassifyData(prep.joined, rows, prep.img_size, True, need_sam)
        loader = make_loader(data, cfg.batch_size, True, 0, 0, st.shard_size)
        # the training step of `pipeline train` itself; nothing is written (no fit(), no out)
        trainer = ClassifyTrainer(cfg, net, prep, loader, loader, Path("."), model_record(cfg, prep), amp, device,
                                  progress=False, sam_fn=fn)
        t = time.perf_counter()
        trainer.train_epoch(0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        out[name] = time.perf_counter() - t
        log(f"one epoch ({len(rows)} images) with embeddings from {name}: {out[name]:.1f}s")
    out["samples"] = int(len(rows))
    out["ratio"] = out["recompute"] / out["cache"]
    out["device"] = str(device)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="PneumoniaMNIST .npz")
    p.add_argument("--work", type=Path, default=ROOT / "results" / "bench_classify", help="subset, store and runs")
    p.add_argument("--train-per-class", type=int, default=40, help="training images per class (0: all)")
    p.add_argument("--val-per-class", type=int, default=20, help="validation images per class (0: all)")
    p.add_argument("--test-limit", type=int, default=40, help="test images, class proportions kept (0: all)")
    p.add_argument("--test-per-class", type=int, default=0, help="test images per class instead of --test-limit")
    p.add_argument("--subset-seed", type=int, default=0)
    p.add_argument("--fractions", type=lambda s: [float(x) for x in s.split(",")], default=[0.1, 1.0])
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    p.add_argument("--models", type=lambda s: s.split(","), default=["backbone", "slca", "probe"],
                   help="comma list of backbone, slca, probe, sam-head; variants as slca/gate=mul/window=0/stages=last2")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="any other `pipeline train` setting for every run, as `pipeline compare --set` "
                        "(e.g. slca_branch_sup=0, which the rounds before that option ran with)")
    p.add_argument("--img-size", type=int, default=64, help="backbone input side (28px images are upsampled)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--patience", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--in-memory", action="store_true", help="hold the embeddings in RAM during training")
    p.add_argument("--timing-samples", type=int, default=0, help="images in the timed epochs (0: the training split)")
    p.add_argument("--no-timing", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="retrain runs made with other settings")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once (`pipeline compare --jobs`)")
    args = p.parse_args()

    from stages.extract import ExtractConfig, extract

    if not args.data.is_file():
        sys.exit(f"error: {args.data} not found; pass --data path/to/pneumoniamnist.npz")
    # subsets, stores, compare folders and bench_classify.json all live in it
    args.work = scratch_folder(args.work, "bench_classify_")
    whole = not (args.train_per_class or args.val_per_class or args.test_limit or args.test_per_class)
    if whole:
        src = args.data
        store = args.work / "pneumoniamnist_full.zarr"
    else:
        test = f"x{args.test_limit}" if not args.test_per_class else f"xc{args.test_per_class}"
        tag = f"t{args.train_per_class}_v{args.val_per_class}_{test}_s{args.subset_seed}"
        src = make_subset(args.data, args.work / tag / "pneumoniamnist.npz",
                          {"train": args.train_per_class, "val": args.val_per_class, "test": args.test_per_class},
                          args.test_limit, args.subset_seed)
        store = args.work / tag / "store.zarr"
    t = time.perf_counter()
    res = extract(ExtractConfig(dataset="medmnist", data_root=str(src), out=str(store)), progress=True)
    log(res.summary() + f" [{time.perf_counter() - t:.0f}s]")
    compared = run_models(args, str(store), store.parent / "compare")
    timing = None if args.no_timing else time_epochs(args, str(store))

    print(f"PneumoniaMNIST {'full' if whole else 'subset ' + src.parent.name}, backbone {args.backbone} at "
          f"{args.img_size}px, {args.epochs} epochs (patience {args.patience}), encoder {res.encoder} on {res.device}")
    from stages.classify.compare import format_table

    print(format_table(compared["summary"], "backbone" in args.models))
    if timing:
        print(f"one slca training epoch ({timing['samples']} images, {timing['device']}): cache {timing['cache']:.2f}s, "
              f"recompute encoder {timing['recompute']:.2f}s, ratio {timing['ratio']:.1f}x")
    report = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "store": str(store), "compare": str(store.parent / "compare"), "runs": compared["runs"],
              "summary": compared["summary"], "timing": timing}
    (args.work / "bench_classify.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
