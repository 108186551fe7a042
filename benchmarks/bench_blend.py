"""Would a wider blend grid help? The validation curves of blended ``slca`` runs at the grid's edge.

    python benchmarks/bench_blend.py results/slca/chest_xray results/bench_classify/.../compare

Each argument is a folder searched for run folders holding a ``blend.csv`` (what
``--slca-prior-blend`` writes: validation AUC at every weight w of the probe's logits,
``stages/classify/probe.py: BLEND_WEIGHTS``). Per folder and labelled fraction it prints the
runs, the weights chosen, how many chose the largest weight, and the rise of validation AUC
over the grid's last step (second-largest to largest w): a curve still rising there says a
wider grid could choose better; a flat or falling end says it would not. It also gives what
blending adds on validation over the network alone (best w against w = 0). Reads only.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np


def curves(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """Fraction (as its run folder names it, e.g. "f0.1") -> one record per blended run."""
    out: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(folder.rglob("blend.csv")):
        rows = list(csv.DictReader(path.open()))
        w = np.array([float(r["prior_weight"]) for r in rows])
        auc = np.array([float(r["val_auc"]) for r in rows])
        metrics = json.loads((path.parent / "metrics.json").read_text()) if (path.parent / "metrics.json").is_file() \
            else {}
        order = np.argsort(w)
        w, auc = w[order], auc[order]
        out.setdefault(path.parent.parent.name, []).append({
            "run": str(path.parent.relative_to(folder)), "chosen": metrics.get("prior_weight"), "top": float(w[-1]),
            "last_step": float(auc[-1] - auc[-2]), "gain": float(auc.max() - auc[w == 0][0])})
    return out


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    steps = [r["last_step"] for r in runs]
    chosen = Counter(r["chosen"] for r in runs if r["chosen"] is not None)
    return {"runs": len(runs), "chosen": {f"{w:g}": n for w, n in sorted(chosen.items())},
            "at_top": sum(r["chosen"] == r["top"] for r in runs), "last_step_max": max(steps),
            "last_step_median": float(np.median(steps)), "gain_median": float(np.median([r["gain"] for r in runs]))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", type=Path)
    p.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    args = p.parse_args()
    table = {}
    for folder in args.folders:
        found = curves(folder)
        if not found:
            sys.exit(f"error: {folder}: no blend.csv below it; pass a `pipeline compare --out` folder with slca runs")
        table.update({f"{folder} {frac}": summary(runs) for frac, runs in found.items()})
    if args.json:
        print(json.dumps(table, indent=2))
        return
    print("| folder, fraction | runs | w chosen (runs) | at the largest w | last step max | last step median | "
          "blend gain median |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for key, s in table.items():
        chosen = ", ".join(f"{w} ({n})" for w, n in s["chosen"].items())
        print(f"| {key} | {s['runs']} | {chosen} | {s['at_top']} | {s['last_step_max']:+.4f} | "
              f"{s['last_step_median']:+.4f} | {s['gain_median']:+.4f} |")


if __name__ == "__main__":
    main()
