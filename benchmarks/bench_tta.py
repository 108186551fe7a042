"""Test-time augmentation on the runs of ``pipeline compare`` folders: does ``--tta`` help, and whom?

    python benchmarks/bench_tta.py results/bench_classify/t150_v50_xc100_s0/compare_full \\
        results/slca/chest_xray_full results/slca/blood_pbc_full --models slca,backbone,sam-head

Each run's ``model.pt`` is scored on validation and test twice through the code of
``pipeline evaluate``: as trained, and with ``--tta`` (logits averaged over the symmetries
the run was trained on, image and SAM grid together). Per folder, fraction and model it
prints the mean over seeds of validation and test AUC both ways and the paired test change;
then, for the first model against each other one, its paired test-AUC margin without and
with TTA on both models (a margin that exists only because one model is less symmetric than
the other shrinks). Reads only; one process, CPU.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._util import compare_store  # noqa: E402


def score_run(run: Path, joined, cache: dict) -> dict[str, float]:
    """{"val", "val_tta", "test", "test_tta"}: macro AUC of one run, as trained and with TTA."""
    from stages.classify.data import ClassifyData, make_loader
    from stages.classify.evaluate import _rows, load_classifier, saved_views
    from stages.classify.metrics import classification_metrics
    from stages.classify.scoring import predict_loader
    from stages.common.geometry import saved_geometry
    from stages.common.training import Amp

    net, saved = load_classifier(run / "model.pt")
    amp, views, out = Amp(torch.device("cpu"), "fp32"), saved_views(saved), {}
    for split in ("val", "test"):
        rows = _rows(saved, joined.store, joined.rows, split)
        key = (split, rows.tobytes(), int(saved["img_size"]))
        if key not in cache:  # images and grids once for every model of the folder (each reads its own)
            cache[key] = ClassifyData(joined, rows, int(saved["img_size"]), True, True, True, False,
                                      geometry=saved_geometry(saved))
        loader = make_loader(cache[key], 64, False, 0, 0, joined.store.shard_size, pin=False)
        y = joined.store.labels[rows]
        for name, v in ((split, ()), (f"{split}_tta", views)):
            probs, _ = predict_loader(net, loader, torch.device("cpu"), amp, views=v)
            out[name] = classification_metrics(y, probs, list(saved["classes"]))["auc"]
    return out


def folder_scores(folder: Path, models: list[str], dataset=None) -> dict[tuple[str, str], dict[str, dict[str, float]]]:
    """(fraction folder, model) -> {seed folder: score_run}, over the runs that finished;
    ``dataset`` overrides the store's recorded one (tests)."""
    joined = compare_store(folder, dataset)
    cache: dict = {}
    scores: dict[tuple[str, str], dict[str, dict[str, float]]] = {}
    for model in models:
        for run in sorted((folder / "runs" / model.replace("/", "+")).glob("f*/s*")):
            if not (run / "metrics.json").is_file():
                continue
            print(f"[bench] {run}", file=sys.stderr, flush=True)
            got = score_run(run, joined, cache)
            saved = json.loads((run / "metrics.json").read_text())["test"]["auc"]
            if abs(got["test"] - saved) > 1e-3:
                print(f"[bench] warning: {run}: re-scored test AUC {got['test']:.4f}, metrics.json {saved:.4f}",
                      file=sys.stderr)
            scores.setdefault((run.parent.name, model), {})[run.name] = got
    return scores


def _cell(xs: list[float]) -> str:
    return f"{np.mean(xs):+.3f} ± {np.std(xs, ddof=1):.3f}" if len(xs) > 1 else f"{xs[0]:+.3f}"


def tables(name: str, scores: dict, models: list[str]) -> list[str]:
    """Markdown rows: per model its AUCs; then the first model's paired margin over each other
    one, as trained (in the test AUC column) and with TTA on both (the TTA column)."""
    lines = []
    for (frac, model), runs in sorted(scores.items()):
        mean = {k: np.mean([r[k] for r in runs.values()]) for k in ("val", "val_tta", "test", "test_tta")}
        delta = [r["test_tta"] - r["test"] for r in runs.values()]
        lines.append(f"| {name} | {frac} | {model} | {len(runs)} | {mean['val']:.3f} | {mean['val_tta']:.3f} | "
                     f"{mean['test']:.3f} | {mean['test_tta']:.3f} | {_cell(delta)} |")
    for frac in sorted({f for f, _ in scores}):
        first = scores.get((frac, models[0]), {})
        for other in models[1:]:
            runs = scores.get((frac, other), {})
            seeds = sorted(set(first) & set(runs))
            if not seeds:
                continue
            plain = [first[s]["test"] - runs[s]["test"] for s in seeds]
            tta = [first[s]["test_tta"] - runs[s]["test_tta"] for s in seeds]
            lines.append(f"| {name} | {frac} | {models[0]} - {other} | {len(seeds)} | | | {_cell(plain)} | "
                         f"{_cell(tta)} | |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", type=Path)
    p.add_argument("--models", default="slca,backbone,sam-head",
                   help="comma list of the folders' models; the first is compared with each other one")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    print("| folder | fraction | model | seeds | val AUC | val AUC, TTA | test AUC | test AUC, TTA | "
          "Δ test (paired) |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for folder in args.folders:
        for line in tables(folder.name, folder_scores(folder, models), models):
            print(line, flush=True)


if __name__ == "__main__":
    main()
