"""SLCA across the development sets: several ``pipeline compare`` folders (one per dataset)
in one table, the SLCA variant chosen by validation AUC, and the targets checked.

    python benchmarks/bench_slca.py pneumoniamnist=DIR blood_pbc=DIR chest_xray=DIR --out results/bench_slca

Each DIR is a finished ``pipeline compare --out DIR`` (README, Benchmarks, lists the
commands that made ours). Prints per dataset, and as the mean over datasets, every model's
validation AUC, test AUC, accuracy, balanced accuracy and paired test AUC difference to
``backbone`` at each labelled fraction (mean over seeds); then the SLCA variant with the
best validation AUC averaged over datasets and fractions (never a test column), and, for
the default ``slca`` and that variant, the targets: at least +0.02 test AUC over backbone
at the smallest fraction and +0.01 at the largest, never below backbone, and at least the
better of the SAM-only models (``probe``, ``sam-head``) -- on the mean and per dataset.
Writes bench_slca.json, bench_slca.md and bench_slca.png (one panel per dataset) to --out.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SAM_ONLY = ("probe", "sam-head")
GAIN = {"low": 0.02, "high": 0.01}  # the targets' margins over backbone


def load(spec: str) -> tuple[str, dict[str, Any]]:
    name, _, folder = spec.partition("=")
    path = Path(folder) / "compare.json"
    if not name or not folder or not path.is_file():
        sys.exit(f"error: {spec!r}: expected NAME=DIR with DIR a finished `pipeline compare --out DIR`")
    report = json.loads(path.read_text())
    if not report.get("complete"):
        sys.exit(f"error: {path}: the comparison is not finished; re-run its `pipeline compare` command")
    return name, report


def cells(summary: list[dict[str, Any]]) -> dict[tuple[str, float], dict[str, float | None]]:
    """(model, fraction) -> mean over seeds of each figure (None where missing)."""
    out = {}
    for row in summary:
        delta = row.get("delta_auc_vs_backbone") or {}
        out[(row["model"], row["fraction"])] = {
            "val_auc": row["val_auc"]["mean"], "auc": row["auc"]["mean"], "accuracy": row["accuracy"]["mean"],
            "balanced_accuracy": row["balanced_accuracy"]["mean"], "delta": delta.get("mean"),
            "delta_std": delta.get("std"), "auc_std": row["auc"]["std"], "seeds": len(row["seeds"])}
    return out


def mean_over(tables: dict[str, dict], key: tuple[str, float], field: str) -> float | None:
    v = [t[key][field] for t in tables.values() if key in t and t[key][field] is not None]
    return float(np.mean(v)) if len(v) == len(tables) else None


def choose(tables: dict[str, dict], models: list[str], fractions: list[float]) -> str | None:
    """The SLCA variant with the best validation AUC averaged over datasets and fractions."""
    score = {}
    for m in models:
        v = [mean_over(tables, (m, f), "val_auc") for f in fractions]
        if m.startswith("slca") and all(x is not None for x in v):
            score[m] = float(np.mean(v))
    return max(score, key=score.get) if score else None


def targets(table: dict, model: str, fractions: list[float]) -> dict[str, Any]:
    """The targets for ``model`` on one table (a dataset's, or the mean over datasets)."""
    out: dict[str, Any] = {}
    for f in fractions:
        key, base = (model, f), ("backbone", f)
        if table.get(key, {}).get("auc") is None or table.get(base, {}).get("auc") is None:
            continue
        sam = [table[(m, f)]["auc"] for m in SAM_ONLY if (m, f) in table and table[(m, f)]["auc"] is not None]
        gain = GAIN["low"] if f == min(fractions) else GAIN["high"]
        d = table[key]["auc"] - table[base]["auc"]
        out[f"{f:g}"] = {"delta": d, "gain_ok": d >= gain, "sam_only_best": max(sam) if sam else None,
                         "sam_ok": (table[key]["auc"] >= max(sam)) if sam else None}
    out["all_ok"] = bool(out) and all(v["gain_ok"] and v["sam_ok"] is not False for v in out.values())
    return out


def fmt(x: float | None, sign: bool = False) -> str:
    return "-" if x is None else (f"{x:+.3f}" if sign else f"{x:.3f}")


def table_md(title: str, table: dict, models: list[str], fractions: list[float]) -> list[str]:
    lines = [f"### {title}", "", "| model | fraction | val AUC | test AUC | Δ AUC vs backbone | accuracy | "
             "balanced accuracy |", "|---|---:|---:|---:|---:|---:|---:|"]
    for f in fractions:
        for m in models:
            c = table.get((m, f))
            if c is None:
                continue
            delta = "(reference)" if m == "backbone" else fmt(c["delta"], sign=True)
            lines.append(f"| {m} | {f:g} | {fmt(c['val_auc'])} | {fmt(c['auc'])} | {delta} | "
                         f"{fmt(c['accuracy'])} | {fmt(c['balanced_accuracy'])} |")
    return lines + [""]


def plot(reports: dict[str, dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    from stages.classify.compare_plot import draw_compare

    fig, axes = plt.subplots(1, len(reports), figsize=(5.0 * len(reports), 4.0), squeeze=False)
    for ax, (name, report) in zip(axes[0], reports.items()):
        draw_compare(ax, report["summary"])
        ax.set_title(f"{name} (mean ± std over seeds)")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


FORMAT = "sam-feature-pipeline/bench_slca"
OUTPUTS = ("bench_slca.json", "bench_slca.md", "bench_slca.png")


def check_out(out: Path) -> None:
    """Replace only our own earlier outputs: files of these names without our JSON beside
    them are someone else's, and the run stops before writing anything."""
    present = [n for n in OUTPUTS if (out / n).exists()]
    if not present:
        return
    try:
        ours = json.loads((out / OUTPUTS[0]).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        sys.exit(f"error: {out}: holds {', '.join(present)} not written by bench_slca.py; nothing was changed, "
                 "choose another --out")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("compares", nargs="+", help="NAME=DIR, one finished `pipeline compare` folder per dataset")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "bench_slca")
    args = p.parse_args()
    check_out(args.out)
    reports = dict(load(s) for s in args.compares)
    tables = {name: cells(r["summary"]) for name, r in reports.items()}
    models = list(dict.fromkeys(m for r in reports.values() for m in r["models"]))
    fractions = sorted({f for r in reports.values() for f in r["fractions"]})
    mean = {(m, f): {k: mean_over(tables, (m, f), k) for k in ("val_auc", "auc", "accuracy", "balanced_accuracy",
                                                               "delta")}
            for m in models for f in fractions}
    chosen = choose(tables, models, fractions)
    checked = {m: {"mean": targets(mean, m, fractions), **{n: targets(t, m, fractions) for n, t in tables.items()}}
               for m in dict.fromkeys(["slca", chosen]) if m}
    md = []
    for name, t in tables.items():
        seeds = sorted({c["seeds"] for c in t.values()})
        md += table_md(f"{name} (seeds per cell: {'/'.join(map(str, seeds))})", t, models, fractions)
    md += table_md(f"mean over {len(tables)} datasets", mean, models, fractions)
    md.append(f"Chosen by validation AUC (mean over datasets and fractions): **{chosen}**")
    for m, per in checked.items():
        held = [n for n in tables if per[n]["all_ok"]]
        md.append(f"- {m}: targets {'hold' if per['mean']['all_ok'] else 'do not hold'} on the mean; "
                  f"singly on {len(held)} of {len(tables)} ({', '.join(held) or 'none'})")
    text = "\n".join(md)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    keyed = {n: {f"{m}@{f:g}": c for (m, f), c in t.items()} for n, t in {**tables, "mean": mean}.items()}
    (args.out / "bench_slca.json").write_text(json.dumps(  # first: it marks the folder as ours
        {"format": FORMAT, "compares": args.compares, "tables": keyed, "chosen": chosen, "targets": checked},
        indent=2) + "\n")
    (args.out / "bench_slca.md").write_text(text + "\n")
    plot(reports, args.out / "bench_slca.png")


if __name__ == "__main__":
    main()
