"""PneumoniaMNIST: ``backbone`` vs ``slca`` vs ``probe`` at several training fractions and
seeds, and the cost of one training epoch from the cache vs recomputing the encoder.

    python benchmarks/bench_classify.py --train-per-class 40 --val-per-class 20 --test-limit 40

1. Takes a stratified, seeded subset of ``--data`` (``--train-per-class``,
   ``--val-per-class``, ``--test-limit``; 0 = the whole split) and writes it as a MedMNIST
   .npz in ``--work`` (the official splits are kept).
2. Extracts it once with the default encoder (``pipeline extract``; resumed if interrupted).
3. Trains every model x fraction x seed with ``train_classifier`` (a finished run in the
   subset's ``runs/`` folder is reused when its config.json matches) and prints test AUC /
   accuracy as mean +- std over seeds. ``--models`` also takes SLCA variants such as
   ``slca/gate=mul``, ``slca/window=0``, ``slca/stages=last2`` (the design measurement).
4. Times one training epoch of ``slca`` reading the cached embeddings, and one epoch
   that runs the encoder on every batch instead (same model, same batches), and prints
   the ratio.

Results also go to ``--work/bench_classify.json``. Progress goes to stderr.
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


ALIASES = {"gate": "slca_gate", "window": "slca_window", "stages": "slca_stages", "hidden": "slca_hidden",
           "act": "slca_act", "fuse": "slca_fuse", "img": "img_size"}
FREE = ("store", "out", "overwrite", "in_memory", "workers", "plots", "resume", "device")


def variant(spec: str) -> tuple[str, dict]:
    """``slca/gate=mul/window=0`` -> ("slca", {"slca_gate": "mul", "slca_window": 0})."""
    model, *opts = spec.split("/")
    kw = {}
    for o in opts:
        k, v = o.split("=", 1)
        key = ALIASES.get(k, k)
        kw[key] = bool(int(v)) if key == "slca_fuse" else int(v) if v.lstrip("-").isdigit() else v
    return model, kw


def run_models(args, store: str, runs: Path) -> list[dict]:
    import dataclasses

    from stages.train import ClassifyConfig, train_classifier

    results = []
    defaults = dataclasses.asdict(ClassifyConfig(store="", out=""))
    for frac in args.fractions:
        for seed in args.seeds:
            for spec in args.models:
                model, extra = variant(spec)
                out = runs / f"{spec.replace('/', '_').replace('=', '')}_f{frac:g}_s{seed}"
                cfg = ClassifyConfig(store=store, out=str(out), model=model, backbone=args.backbone,
                                     img_size=args.img_size, epochs=args.epochs, patience=args.patience,
                                     batch_size=args.batch_size, train_fraction=frac, seed=seed,
                                     overwrite=True, plots=False, in_memory=args.in_memory, **extra)
                want = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in FREE}
                old = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else {}
                old = {**defaults, **old} if old else old  # options added since that run: their defaults
                if (out / "metrics.json").exists() and not args.fresh and \
                        {k: v for k, v in old.items() if k not in FREE} == want:
                    m = json.loads((out / "metrics.json").read_text())
                    log(f"reusing {out}")
                else:
                    t = time.perf_counter()
                    m = train_classifier(cfg, progress=False)
                    log(f"{model:9s} fraction {frac:g} seed {seed}: test auc {m['test']['auc']:.4f} "
                        f"acc {m['test']['accuracy']:.4f} ({m['n_train']} train, {time.perf_counter() - t:.0f}s)")
                results.append({"model": spec, "fraction": frac, "seed": seed, "n_train": m["n_train"],
                                "test_auc": m["test"]["auc"], "test_accuracy": m["test"]["accuracy"],
                                "seconds": m.get("train_seconds")})
    return results


def time_epochs(args, store: str) -> dict:
    """Seconds of one slca training epoch: embeddings from the cache vs from the encoder."""
    from stages.encoders import build_encoder
    from stages.runtime import amp_dtype_for, resolve_device, resolve_precision
    from stages.train import ClassifyConfig
    from stages.train.classify import model_kwargs, prepare, train_epoch
    from stages.train.data import ClassifyData, make_loader
    from stages.train.loop import Amp, cosine_schedule, make_optimizer, seed_everything
    from stages.models import create_model

    cfg = ClassifyConfig(store=store, out="", model="slca", backbone=args.backbone, img_size=args.img_size,
                         batch_size=args.batch_size)
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
        opt = make_optimizer(net, cfg.lr, cfg.weight_decay)
        sched = cosine_schedule(opt, len(loader))
        crit = torch.nn.CrossEntropyLoss()
        t = time.perf_counter()
        train_epoch(net, loader, opt, sched, amp, crit, device, (), torch.Generator().manual_seed(0), 0, None,
                    sam_fn=fn)
        if device.type == "cuda":
            torch.cuda.synchronize()
        out[name] = time.perf_counter() - t
        log(f"one epoch ({len(rows)} images) with embeddings from {name}: {out[name]:.1f}s")
    out["samples"] = int(len(rows))
    out["ratio"] = out["recompute"] / out["cache"]
    out["device"] = str(device)
    return out


def summarize(results: list[dict], models, fractions) -> str:
    w = max(10, *(len(m) + 2 for m in models))
    lines = [f"{'model':{w}s}{'fraction':>9s}{'n_train':>9s}{'test AUC':>18s}{'test accuracy':>18s}{'seeds':>7s}"]
    for frac in fractions:
        for model in models:
            rs = [r for r in results if r["model"] == model and r["fraction"] == frac]
            if not rs:
                continue
            auc = np.array([np.nan if r["test_auc"] is None else r["test_auc"] for r in rs], float)
            acc = np.array([r["test_accuracy"] for r in rs], float)
            lines.append(f"{model:{w}s}{frac:>9g}{rs[0]['n_train']:>9d}{np.nanmean(auc):>11.4f} +- {np.nanstd(auc):.3f}"
                         f"{acc.mean():>11.4f} +- {acc.std():.3f}{len(rs):>7d}")
    return "\n".join(lines)


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
    p.add_argument("--img-size", type=int, default=64, help="backbone input side (28px images are upsampled)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--patience", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--in-memory", action="store_true", help="hold the embeddings in RAM during training")
    p.add_argument("--timing-samples", type=int, default=0, help="images in the timed epochs (0: the training split)")
    p.add_argument("--no-timing", action="store_true")
    p.add_argument("--fresh", action="store_true", help="retrain runs that already have metrics.json")
    args = p.parse_args()

    from stages.extract import ExtractConfig, extract

    if not args.data.is_file():
        sys.exit(f"error: {args.data} not found; pass --data path/to/pneumoniamnist.npz")
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
    results = run_models(args, str(store), store.parent / "runs")
    timing = None if args.no_timing else time_epochs(args, str(store))

    print(f"PneumoniaMNIST {'full' if whole else 'subset ' + src.parent.name}, backbone {args.backbone} at "
          f"{args.img_size}px, {args.epochs} epochs (patience {args.patience}), encoder {res.encoder} on {res.device}")
    print(summarize(results, args.models, args.fractions))
    if timing:
        print(f"one slca training epoch ({timing['samples']} images, {timing['device']}): cache {timing['cache']:.2f}s, "
              f"recompute encoder {timing['recompute']:.2f}s, ratio {timing['ratio']:.1f}x")
    report = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "store": str(store), "runs": results, "timing": timing}
    (args.work / "bench_classify.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
