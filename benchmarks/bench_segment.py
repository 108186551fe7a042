"""ACDC label-efficiency benchmark: prompt-free heads on cached LiteMedSAM features vs a
UNet trained from scratch on the raw images.

For 1, 2, 4 and all labelled training volumes (patient/frame volumes of the train split,
chosen by ``--labeled-volumes``: patients in a seeded order, nested), every head is
trained for the same number of optimizer steps and scored on the validation volumes
with the ACDC protocol (slices stacked into volumes, 3D Dice per volume, averaged).
Prints per-class mean 3D Dice side by side (stdout); progress goes to stderr.

    python benchmarks/bench_segment.py                       # full setting (~15 min on 2 CPU cores, plus extraction)
    python benchmarks/bench_segment.py --quick               # reduced setting, end to end
    python benchmarks/bench_segment.py --store cache/acdc.zarr  # reuse a store

The store is extracted first (LiteMedSAM, CPU, ~600 slices, 10+ minutes) when
``--store`` does not exist yet. The autosam head starts from LiteMedSAM's own mask
decoder (``--sam-checkpoint encoder``), as AutoSAM starts from SAM's.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._util import check_out_json  # noqa: E402


def ensure_store(store: str, data_root: str) -> None:
    from cache import FeatureStore, StoreError
    from cache.io import exists

    if exists(store):
        try:
            FeatureStore(store)  # complete: use it as it is
            return
        except StoreError:
            pass  # half-written: extract resumes it
    from stages.extract import ExtractConfig, extract

    print(f"extracting {data_root} into {store} with litemedsam (CPU, about 10+ minutes)", file=sys.stderr)
    t0 = time.perf_counter()
    r = extract(ExtractConfig(dataset="acdc-h5", data_root=data_root, out=store, encoder="litemedsam",
                              device="cpu"), progress=True)
    print(f"{r.summary()} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)


def parse() -> argparse.Namespace:
    from stages.models.heads import list_heads

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "datasets" / "acdc_subset"))
    p.add_argument("--store", default=str(ROOT / "runs" / "stores" / "acdc_litemedsam.zarr"),
                   help="feature store of the dataset (extracted here if missing)")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_segment"), help="run folders and results.json")
    p.add_argument("--heads", default=",".join(list_heads()))
    p.add_argument("--volumes", default="1,2,4,all", help="labelled training volumes per setting")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps per run (every head, every setting)")
    p.add_argument("--epochs", type=int, default=2, help="the steps are split into this many epochs")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sam-checkpoint", default="encoder",
                   help="autosam initialisation: 'encoder' (LiteMedSAM's decoder), a path, or 'none'")
    p.add_argument("--reuse", action="store_true",
                   help="keep runs already in --out whose model.pt was trained with the same settings")
    p.add_argument("--quick", action="store_true",
                   help="reduced setting: volumes 1,all, 6 steps, 1 epoch (checks the whole path)")
    a = p.parse_args()
    if a.quick:
        a.volumes, a.steps, a.epochs = "1,all", 6, 1
    return a


def table(results: list[dict], heads: list[str], classes: list[str]) -> str:
    """Rows: labelled volumes x class (and their mean); columns: the heads side by side."""
    lines = [f"{'volumes':<10}{'class':<7}" + "".join(f"{h:>9}" for h in heads)]
    for vol in dict.fromkeys(r["volumes"] for r in results):
        for c in classes + ["mean"]:
            row = f"{vol:<10}{c:<7}"
            for h in heads:
                r = next((r for r in results if r["volumes"] == vol and r["head"] == h), None)
                v = (r["mean_dice"] if c == "mean" else r["dice"][c]) if r else float("nan")
                row += f"{v:>9.3f}"
            lines.append(row)
    return "\n".join(lines)


def timing(results: list[dict], heads: list[str]) -> str:
    lines = [f"{'seconds':<17}" + "".join(f"{h:>9}" for h in heads)]
    for vol in dict.fromkeys(r["volumes"] for r in results):
        row = f"{vol:<17}"
        for h in heads:
            r = next((r for r in results if r["volumes"] == vol and r["head"] == h), None)
            row += f"{r['seconds']:>9.0f}" if r else f"{'-':>9}"
        lines.append(row)
    return "\n".join(lines)


SAME = ("store", "head", "labeled_volumes", "epochs", "steps_per_epoch", "batch_size", "lr", "seed", "sam_checkpoint")


def reusable(cfg, folder: Path) -> dict | None:
    """metrics.json of a finished run in ``folder`` trained with ``cfg``'s settings, else None."""
    import torch

    if not (folder / "metrics.json").is_file() or not (folder / "model.pt").is_file():
        return None
    saved = torch.load(folder / "model.pt", map_location="cpu", weights_only=True).get("config", {})
    now = cfg.to_dict()
    if any(saved.get(k) != now.get(k) for k in SAME):
        return None
    return json.loads((folder / "metrics.json").read_text())


def main() -> None:
    a = parse()
    results_json = check_out_json(Path(a.out) / "results.json", ("args", "results", "seconds"))
    import torch

    from stages.segment.config import SegmentConfig
    from stages.segment.data import SegmentData
    from stages.segment.train import train_segmentation

    t_start = time.perf_counter()
    ensure_store(a.store, a.data_root)
    heads = [h.strip() for h in a.heads.split(",") if h.strip()]
    data = SegmentData(a.store, "acdc-h5", a.data_root)
    val = data.split_indices("val")
    train = data.split_indices("train")
    data.load_in_memory(train + val)
    n_vols = len({data.groups[i] for i in train})
    settings = [0 if v == "all" else int(v) for v in a.volumes.split(",")]
    classes = data.mask_classes[1:]
    print(f"ACDC: {len(train)} training slices in {n_vols} volumes, {len(val)} validation slices in "
          f"{len({data.groups[i] for i in val})} volumes; {a.steps} steps x batch {a.batch_size}, lr {a.lr}, "
          f"{torch.get_num_threads()} threads", file=sys.stderr)
    results = []
    for n in settings:
        for head in heads:
            ckpt = None if head != "autosam" or a.sam_checkpoint == "none" else a.sam_checkpoint
            name = f"{head}_v{n or 'all'}"
            cfg = SegmentConfig(
                store=a.store, data_root=a.data_root, dataset="acdc-h5", out=str(Path(a.out) / name), head=head,
                epochs=a.epochs, steps_per_epoch=max(1, a.steps // a.epochs), val_every=a.epochs, patience=0,
                batch_size=a.batch_size, lr=a.lr, seed=a.seed, device="cpu", labeled_volumes=n,
                sam_checkpoint=ckpt, in_memory=True, overlays=2, progress=False,
                overwrite=True)  # its own run folders: a run not reused is retrained in place
            m = reusable(cfg, Path(cfg.out)) if a.reuse else None
            if m is None:
                m = train_segmentation(cfg, data=data)
            v = m["splits"]["val"]
            r = {"volumes": str(n or f"all ({n_vols})"), "head": head, "dice": v["dice"], "mean_dice": v["mean_dice"],
                 "hd95": v["hd95"], "train_samples": m["train_samples"], "train_volumes": m["train_volumes"],
                 "seconds": m["seconds"]}
            results.append(r)
            print(f"{name}: mean 3D Dice {v['mean_dice']:.3f} "
                  f"({', '.join(f'{c} {d:.3f}' for c, d in v['dice'].items())}) in {r['seconds']:.0f} s",
                  file=sys.stderr)
    total = time.perf_counter() - t_start
    Path(a.out).mkdir(parents=True, exist_ok=True)
    results_json.write_text(json.dumps({"args": vars(a), "results": results, "seconds": total}, indent=2))
    print(f"ACDC validation, mean 3D Dice per class ({len({data.groups[i] for i in val})} volumes); "
          f"{a.steps} steps x batch {a.batch_size} per run, lr {a.lr}")
    print(table(results, heads, classes))
    print()
    print(timing(results, heads))
    print(f"\ntotal {total / 60:.1f} min")


if __name__ == "__main__":
    main()
