"""Train/val/test assignment and labelled-subset selection, shared by both tasks.

- ``assign_splits``: the dataset's own splits where present; otherwise (and for missing
  val/test) stratified, seeded, group-aware (slices of one volume stay together).
- ``subsample``: stratified, seeded ``--train-fraction``; subsets of one seed are nested
  (the 10% subset is inside the 50% one).
- Segmentation (samples without image labels, often slices of volumes):
  ``select_training`` (``--labeled-volumes`` / ``--train-fraction`` by volume, patients
  spread by ``order_volumes``) and ``carve_validation`` (a val split when the dataset has none).
Both tasks keep the slices of one volume on one side of every split.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from cache import StoreError

SPLIT_NAMES = ("train", "val", "test")


def _units(rows: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Rows grouped into units (a volume's slices, or single rows) and each unit's majority label."""
    keys = [str(groups[r]) or f"\0{r}" for r in rows]
    order: dict[str, list[int]] = {}
    for k, r in zip(keys, rows):
        order.setdefault(k, []).append(int(r))
    units = [np.asarray(v) for v in order.values()]
    ulab = np.asarray([np.bincount(labels[u]).argmax() for u in units])
    return units, ulab


def _carve(rows: np.ndarray, labels: np.ndarray, groups: np.ndarray, fraction: float,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split ``rows`` into (rest, taken) with ~``fraction`` of each class's units taken."""
    units, ulab = _units(rows, labels, groups)
    taken: list[np.ndarray] = []
    for c in np.unique(ulab):
        idx = rng.permutation(np.flatnonzero(ulab == c))
        k = int(round(fraction * len(idx)))
        k = min(max(k, 1 if len(idx) >= 2 else 0), len(idx) - 1) if fraction > 0 else 0
        taken += [units[i] for i in idx[:k]]
    t = np.sort(np.concatenate(taken)) if taken else np.empty(0, np.int64)
    return np.setdiff1d(rows, t), t


def assign_splits(rows: np.ndarray, labels: np.ndarray, splits: np.ndarray, groups: np.ndarray,
                  seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2) -> dict[str, np.ndarray]:
    """train/val/test store rows (see module doc). Deterministic for a given ``seed``."""
    rng = np.random.default_rng(seed)
    given = np.asarray([str(s) for s in splits[rows]], dtype=object)
    out = {s: rows[given == s] for s in SPLIT_NAMES}
    free = rows[~np.isin(given, SPLIT_NAMES)]
    if len(free):
        rest, test = _carve(free, labels, groups, test_fraction, rng)
        rest, val = _carve(rest, labels, groups, val_fraction / max(1 - test_fraction, 1e-9), rng)
        out = {"train": np.union1d(out["train"], rest), "val": np.union1d(out["val"], val),
               "test": np.union1d(out["test"], test)}
    for s, frac in (("test", test_fraction), ("val", val_fraction)):
        if len(out[s]) == 0:
            out["train"], out[s] = _carve(out["train"], labels, groups, frac, rng)
    if len(out["train"]) == 0:
        raise StoreError("no training samples after splitting; the dataset is too small or has no train split")
    return out


def subsample(rows: np.ndarray, labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A stratified, seeded ``fraction`` of ``rows`` (by unit; at least one per class).
    For one seed, a smaller fraction gives a subset of a larger one."""
    if not 0 < fraction <= 1:
        raise ValueError(f"--train-fraction {fraction}: must be in (0, 1]")
    if fraction == 1:
        return rows
    rng = np.random.default_rng([seed, 7])
    units, ulab = _units(rows, labels, groups)
    keep: list[np.ndarray] = []
    for c in np.unique(ulab):
        idx = np.flatnonzero(ulab == c)
        idx = idx[rng.permutation(len(idx))]
        keep += [units[i] for i in idx[:max(1, int(round(fraction * len(idx))))]]
    return np.sort(np.concatenate(keep))


def patient_of(group: str) -> str:
    """ACDC-style volume id ``patient028_frame01`` -> patient ``patient028``."""
    return group.split("_frame")[0]


def order_volumes(groups: Sequence[str], seed: int) -> list[str]:
    """Training volumes in the order they are labelled: patients in a seeded random order,
    then round-robin over each patient's volumes (sorted), so N volumes come from
    min(N, patients) distinct patients and a larger N extends a smaller one."""
    by_patient: dict[str, list[str]] = {}
    for g in sorted(set(groups)):
        by_patient.setdefault(patient_of(g), []).append(g)
    patients = sorted(by_patient)
    perm = np.random.default_rng(seed).permutation(len(patients))
    ordered = [patients[k] for k in perm]
    out: list[str] = []
    for r in range(max(len(v) for v in by_patient.values())):
        out += [by_patient[p][r] for p in ordered if r < len(by_patient[p])]
    return out


def select_training(groups: Sequence[str], train: list[int], labeled_volumes: int, train_fraction: float,
                    seed: int) -> tuple[list[int], list[str]]:
    """The labelled subset of ``train`` -> (indices, chosen volume ids or [] for 2D data).

    ``labeled_volumes`` N > 0: the first N of ``order_volumes`` (volumetric data only).
    ``train_fraction`` f < 1: round(f * units) units (at least one), units being volumes for
    volumetric data and samples otherwise, in a seeded random order."""
    if labeled_volumes < 0:
        raise ValueError(f"--labeled-volumes {labeled_volumes}: must be 0 (all) or a positive count")
    if not 0 < train_fraction <= 1:
        raise ValueError(f"--train-fraction {train_fraction}: must be in (0, 1]")
    if labeled_volumes and train_fraction < 1:
        raise ValueError("--labeled-volumes and --train-fraction both given; use one of them")
    all_groups = groups
    groups = [all_groups[i] for i in train]
    volumetric = all(g != "" for g in groups)
    if labeled_volumes and not volumetric:
        raise ValueError("--labeled-volumes needs a volumetric dataset (samples grouped by volume, e.g. acdc-h5); "
                         "use --train-fraction for 2D datasets")
    if volumetric:
        order = order_volumes(groups, seed)
        if labeled_volumes:
            if labeled_volumes > len(order):
                raise ValueError(f"--labeled-volumes {labeled_volumes}: the training split has only "
                                 f"{len(order)} volumes")
            keep = order[:labeled_volumes]
        else:
            keep = order[:max(1, round(train_fraction * len(order)))]
        chosen = set(keep)
        return [i for i in train if all_groups[i] in chosen], sorted(keep)
    n = max(1, round(train_fraction * len(train)))
    perm = np.random.default_rng(seed).permutation(len(train))[:n]
    return sorted(train[k] for k in perm), []


def carve_validation(units_of: Sequence[str], train: list[int], seed: int, fraction: float = 0.2
                     ) -> tuple[list[int], list[int]]:
    """No val split in the dataset: hold out ``fraction`` of the training volumes (or
    samples), seeded; a volume never straddles train and val. ``units_of[i]``: sample
    i's volume id, or its own id for 2D data."""
    units = sorted({units_of[i] for i in train})
    if len(units) < 2:
        raise ValueError("the dataset has no val split and too few training samples to hold some out; "
                         "add a val split")
    perm = np.random.default_rng(seed + 1).permutation(len(units))
    held = {units[k] for k in perm[:max(1, round(fraction * len(units)))]}
    val = [i for i in train if units_of[i] in held]
    return [i for i in train if units_of[i] not in held], val
