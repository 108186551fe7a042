"""`pipeline compare --jobs 2` against `--jobs 1`: the same runs (models x seeds at one
fraction) from one store, each setting in a fresh output folder, alternated `--repeats`
times; median wall seconds, their ratio, the peak RSS of the largest process, and whether
the two settings' test AUCs agree (they may differ slightly: CPU sums depend on the thread
count).

    .venv/bin/python benchmarks/bench_jobs.py STORE [--models backbone,slca] [--seeds 0,1]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine, median, mib, note, peak_rss, spread, table  # noqa: E402


def compare_cmd(store: str, out: Path, a: argparse.Namespace, jobs: int) -> list[str]:
    return [sys.executable, "-m", "pipeline", "compare", "--from-cache", store, "--out", str(out),
            "--models", a.models, "--fractions", a.fraction, "--seeds", a.seeds, "--img-size", str(a.img_size),
            "--epochs", str(a.epochs), "--patience", "0", "--in-memory", "--jobs", str(jobs), "-q"]


def run_aucs(out: Path) -> list[float]:
    report = json.loads((out / "compare.json").read_text())
    return [r["metrics"]["test"]["auc"] for r in report["runs"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store")
    ap.add_argument("--models", default="backbone,slca")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--fraction", default="0.1")
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    n_runs = len(a.models.split(",")) * len(a.seeds.split(","))
    print(f"# `pipeline compare --jobs`: {n_runs} runs ({a.models}; seeds {a.seeds}; fraction {a.fraction}; "
          f"{a.img_size} px, {a.epochs} epochs) from {a.store}\n# {machine()}")
    walls: dict[int, list[float]] = {1: [], 2: []}
    rss: dict[int, int] = {1: 0, 2: 0}
    aucs: dict[int, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(a.repeats):
            for jobs in (1, 2):
                out = Path(tmp) / f"j{jobs}_r{rep}"
                note(f"repeat {rep + 1}/{a.repeats}: --jobs {jobs}")
                peak, wall = peak_rss(compare_cmd(a.store, out, a, jobs))
                walls[jobs].append(wall)
                rss[jobs] = max(rss[jobs], peak)
                aucs[jobs] = run_aucs(out)
    rows = [[f"--jobs {j}", spread(walls[j]), f"{median(walls[1]) / median(walls[j]):.2f}x", mib(rss[j]),
             " ".join(f"{x:.3f}" for x in aucs[j])] for j in (1, 2)]
    print(table(rows, ["setting", "wall (median, min-max)", "speed vs --jobs 1", "peak RSS (largest process)",
                       "test AUC per run"]))


if __name__ == "__main__":
    main()
