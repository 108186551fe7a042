"""How far is each set's test split from the images its models are trained and chosen on?

    python benchmarks/bench_shift.py results/slca/chest_xray_full results/slca/blood_pbc_full ...

Each argument is a ``pipeline compare --out`` folder; the splits are the ones a run of it at
fraction 1 was trained on (model.pt's record, sample ids). A domain classifier (standardised logistic
regression, 5-fold stratified cross-validation) tells the test images from the train+val
images, within each class, so that a test split with another class balance is not counted
as a shift; the table gives its AUC (mean over classes; 0.5: indistinguishable) on three
views of an image:

- ``SAM``: the spatially averaged cached embedding (256 values; what ``probe`` sees),
- ``pixels``: the image as 32x32 grey levels (1024 values; a coarse backbone's view),
- ``intensity``: 7 grey-level statistics (mean, std, 1/5/50/95/99th percentiles).

``null`` is the same classifier on the SAM view with train+val cut at random into two parts
of the same sizes: the AUC that sample noise alone reaches. Reads only; CPU, a minute per set.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._util import compare_store  # noqa: E402

VIEWS = ("SAM", "pixels", "intensity")


def run_splits(folder: Path) -> dict[str, list[str]]:
    """Split -> sample ids of a run of the folder trained on every label (at a lower fraction
    the training split is a subset)."""
    from stages.common.training import load_checkpoint

    for model in sorted((folder / "runs").glob("*/f1/s*/model.pt")):
        return load_checkpoint(model)["splits"]
    sys.exit(f"error: {folder}: no run at fraction 1 (--fractions 1.0); the splits come from one")


def views(joined, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The three (N, D) views of the store rows ``rows`` of a ``Joined`` store and dataset."""
    import torch
    import torch.nn.functional as F

    sam = np.concatenate([joined.store.read(rows[i:i + 64], np.float32).mean(axis=(2, 3))
                          for i in range(0, len(rows), 64)])
    pixels, stats = [], []
    for r in rows:
        img = np.asarray(joined.dataset.load_image(int(r)), np.float32)
        grey = img.mean(axis=2) if img.ndim == 3 else img
        t = torch.from_numpy(grey)[None, None]
        pixels.append(F.interpolate(t, (32, 32), mode="area").flatten().numpy())
        stats.append([grey.mean(), grey.std(), *np.percentile(grey, [1, 5, 50, 95, 99])])
    return {"SAM": sam, "pixels": np.asarray(pixels), "intensity": np.asarray(stats)}


def domain_auc(x: np.ndarray, domain: np.ndarray, labels: np.ndarray, seed: int = 0) -> float:
    """Cross-validated AUC of telling ``domain`` 1 from 0 by ``x``, within each class, averaged."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    aucs = []
    for c in np.unique(labels):
        sel = labels == c
        d = domain[sel]
        k = int(min(5, d.sum(), (1 - d).sum()))
        if k < 2:  # a class with fewer than 2 images on one side has no fold split
            continue
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=5000, class_weight="balanced"))
        folds = StratifiedKFold(k, shuffle=True, random_state=seed)
        p = cross_val_predict(clf, x[sel], d, cv=folds, method="predict_proba")[:, 1]
        aucs.append(roc_auc_score(d, p))
    if not aucs:
        raise ValueError("no class has 2 images on each side; too few images to tell the splits apart")
    return float(np.mean(aucs))


def folder_row(folder: Path, dataset=None) -> dict[str, float]:
    """Domain AUC per view, the null, and the image counts, for one compare folder (its
    dataset reopened from the store's provenance unless given)."""
    joined = compare_store(folder, dataset)
    splits = run_splits(folder)
    store = joined.store
    seen = store.index(splits["train"] + splits["val"])
    test = store.index(splits["test"])
    rows = np.concatenate([seen, test])
    domain = np.r_[np.zeros(len(seen), int), np.ones(len(test), int)]
    labels = store.labels[rows]
    print(f"[bench] {folder}: {len(seen)} train+val / {len(test)} test images", file=sys.stderr, flush=True)
    x = views(joined, rows)
    out = {v: domain_auc(x[v], domain, labels) for v in VIEWS}
    rng = np.random.default_rng(0)
    fake = np.zeros(len(seen), int)
    fake[rng.permutation(len(seen))[:min(len(test), len(seen) // 2)]] = 1
    out["null"] = domain_auc(x["SAM"][:len(seen)], fake, labels[:len(seen)])
    out.update(seen=len(seen), test=len(test))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", type=Path)
    args = p.parse_args()
    print("| set (compare folder) | train+val / test images | domain AUC: SAM | pixels | intensity | null (SAM, random halves) |")
    print("|---|---:|---:|---:|---:|---:|")
    for folder in args.folders:
        r = folder_row(folder)
        print(f"| {folder} | {r['seen']} / {r['test']} | {r['SAM']:.3f} | {r['pixels']:.3f} | "
              f"{r['intensity']:.3f} | {r['null']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
