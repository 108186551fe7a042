"""What each part of a trained ``slca`` contributes, and would another rule on validation choose better?

    python benchmarks/bench_parts.py results/slca/chest_xray_full results/slca/blood_pbc_full

Each argument is a ``pipeline compare --out`` folder. The default ``slca``'s logits are a
sum of three parts: the SLCA-steered backbone (the image part), the sam-head branch on the
SAM grid, and the probe's logits times the blend weight w chosen on validation. Per slca
run this re-scores validation and test with each part alone and in combination, and
applies three selection rules, each choosing on validation only:

- ``auc``: w with the best validation AUC (ties: lower loss), what training does;
- ``loss``: w with the lowest validation log loss;
- ``drop``: the better, by validation log loss, of the whole model and the model without
  its image part (branch + w * prior): whether validation could tell when the image part
  does not carry over to test.

Rules are compared without test: each also chooses on one stratified half of validation and
is scored on the other (both ways, averaged: "val half AUC"). Per folder and fraction it
prints mean ± std over seeds of those, of the test AUC of each part and rule, and of the
folder's ``backbone``, ``sam-head`` and ``probe`` runs. Reads only; one process, CPU.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._util import compare_store  # noqa: E402

RULES = ("auc", "loss", "drop")
PARTS = ("image", "branch", "sam parts")


def _softmax(z: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.as_tensor(z, dtype=torch.float64), 1).numpy()


def _score(y: np.ndarray, z: np.ndarray, classes: list[str]) -> tuple[float, float]:
    """(macro one-vs-rest AUC, log loss) of logits ``z``."""
    from sklearn.metrics import log_loss

    from stages.classify.metrics import classification_metrics

    p = _softmax(z)
    return classification_metrics(y, p, classes)["auc"], float(log_loss(y, p, labels=list(range(len(classes)))))


def load_slca(run: Path):
    """(network, saved dict) of a default slca run: with a sam-head branch and a probe prior."""
    from stages.classify.evaluate import load_classifier

    net, saved = load_classifier(run / "model.pt")
    if net.branch is None or net.prior is None:
        raise ValueError(f"{run}: not a slca with a sam-head branch and a probe prior (the default)")
    net.prior_weight = 0.0  # the prior is scored on its own, at weight 1
    return net, saved


@torch.no_grad()
def logit_parts(net, saved: dict[str, Any], joined, split: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Labels and the (N,K) logits of the image part, the branch and the prior (weight 1) on
    ``split``, for a network of ``load_slca``."""
    from stages.classify.data import ClassifyData, make_loader
    from stages.classify.evaluate import _rows
    from stages.common.geometry import saved_geometry

    rows = _rows(saved, joined.store, joined.rows, split)
    data = ClassifyData(joined, rows, int(saved["img_size"]), True, True, False, False,
                        geometry=saved_geometry(saved))
    k = len(saved["classes"])
    z = {name: np.zeros((len(rows), k)) for name in ("image", "branch", "prior")}
    for batch in make_loader(data, 64, False, 0, 0, joined.store.shard_size, pin=False):
        sam, pos = batch["sam"].float(), batch["pos"].numpy()
        _, extra = net(batch["image"], sam, aux=True)
        z["branch"][pos] = extra["branch"].numpy()
        z["image"][pos] = extra["image"].numpy()
        z["prior"][pos] = net.prior(None, sam).numpy()
    return joined.store.labels[rows], z


Spec = tuple[float, bool]  # (prior weight w, with the image part)


def choose(rule: str, y: np.ndarray, z: dict[str, np.ndarray], classes: list[str],
           weights: tuple[float, ...]) -> Spec:
    """The combination ``rule`` picks from labels ``y`` and parts ``z`` (rows of one split);
    ``sam``: the best w, by loss, without the image part (what the SAM parts do alone)."""
    options = {"auc": (True,), "loss": (True,), "drop": (True, False), "sam": (False,)}[rule]
    specs = [(w, image) for image in options for w in weights]
    scores = {sp: _score(y, combine(z, *sp), classes) for sp in specs}
    if rule == "auc":
        return max(specs, key=lambda sp: (scores[sp][0], -scores[sp][1], -sp[0]))
    return min(specs, key=lambda sp: (scores[sp][1], not sp[1], sp[0]))


def combine(z: dict[str, np.ndarray], w: float, image: bool) -> np.ndarray:
    return z["branch"] + w * z["prior"] + (z["image"] if image else 0.0)


def _rows_of(z: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[idx] for k, v in z.items()}


def split_half(y: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Validation positions cut in two halves, stratified by class."""
    rng = np.random.default_rng(seed)
    a = np.concatenate([rng.permutation(np.flatnonzero(y == c))[::2] for c in np.unique(y)])
    return np.sort(a), np.setdiff1d(np.arange(len(y)), a)


def run_parts(run: Path, joined, weights: tuple[float, ...]) -> dict[str, float]:
    """For one slca run: test AUC of each part alone and of each rule's choice on validation,
    and each rule's split-half validation AUC (choose on one half, score the other, both ways:
    how a rule is compared without looking at test)."""
    net, saved = load_slca(run)
    classes = list(saved["classes"])
    (yv, zv), (yt, zt) = (logit_parts(net, saved, joined, s) for s in ("val", "test"))
    out = {"image": _score(yt, zt["image"], classes)[0], "branch": _score(yt, zt["branch"], classes)[0],
           "sam parts": _score(yt, combine(zt, *choose("sam", yv, zv, classes, weights)), classes)[0]}
    halves = split_half(yv)
    for rule in RULES:
        w, image = choose(rule, yv, zv, classes, weights)
        out[rule] = _score(yt, combine(zt, w, image), classes)[0]
        out[f"w_{rule}"], out[f"image_{rule}"] = w, float(image)
        held = []
        for a, b in (halves, halves[::-1]):
            sp = choose(rule, yv[a], _rows_of(zv, a), classes, weights)
            held.append(_score(yv[b], combine(_rows_of(zv, b), *sp), classes)[0])
        out[f"val half {rule}"] = float(np.mean(held))
    return out


def folder_table(folder: Path, model: str = "slca") -> dict[str, dict[str, Any]]:
    """Fraction folder name (f0.1, f1) -> {column: [values over seeds]}, with the reference models."""
    from stages.classify.probe import BLEND_WEIGHTS

    joined = compare_store(folder)
    out: dict[str, dict[str, Any]] = {}
    for run in sorted((folder / "runs" / model).glob("f*/s*")):
        if not (run / "metrics.json").is_file():
            continue
        cols = out.setdefault(run.parent.name, {})
        print(f"[bench] {run}", file=sys.stderr, flush=True)
        parts = run_parts(run, joined, BLEND_WEIGHTS)
        saved = json.loads((run / "metrics.json").read_text())["test"]["auc"]
        if abs(parts["auc"] - saved) > 1e-3:  # the auc rule is what training chose
            print(f"[bench] warning: {run}: re-scored test AUC {parts['auc']:.4f}, metrics.json {saved:.4f}",
                  file=sys.stderr)
        for key, value in parts.items():
            cols.setdefault(key, []).append(value)
        for ref in ("backbone", "sam-head", "probe"):
            metrics = folder / "runs" / ref / run.parent.name / run.name / "metrics.json"
            if metrics.is_file():
                cols.setdefault(ref, []).append(json.loads(metrics.read_text())["test"]["auc"])
    return out


def _cell(xs: list[float]) -> str:
    return f"{np.mean(xs):.3f} ± {np.std(xs, ddof=1):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", type=Path)
    p.add_argument("--model", default="slca", help="the slca variant's run folder name (e.g. 'slca+branch_sup=1')")
    args = p.parse_args()
    columns = [*(f"test AUC: {c}" for c in (*PARTS, *RULES, "backbone", "sam-head", "probe")),
               *(f"val half AUC: {r}" for r in RULES)]
    keys = [c.split(": ")[1] if c.startswith("test") else c.replace(" AUC:", "") for c in columns]
    print("| folder, fraction | seeds | " + " | ".join(columns) + " | w (auc / loss) | drop chose sam parts |")
    print("|---|---:|" + "---:|" * (len(columns) + 2))
    for folder in args.folders:
        for frac, cols in folder_table(folder, args.model).items():
            cells = " | ".join(_cell(cols[k]) if cols.get(k) else "-" for k in keys)
            ws = " ".join(f"{a:g}/{b:g}" for a, b in zip(cols["w_auc"], cols["w_loss"]))
            dropped = sum(1 - x for x in cols["image_drop"])
            print(f"| {folder.name} {frac} | {len(cols['auc'])} | {cells} | {ws} | {dropped:g} |")


if __name__ == "__main__":
    main()
