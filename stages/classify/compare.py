"""Side-by-side comparison of classifiers on one store: every model x labelled fraction x seed
trained through ``train_classifier`` (the path ``pipeline train`` takes), then one table.

Layout of the output folder ``DIR``::

    compare.json                      marker + every run's metrics + the aggregates
    compare.md                        the table (mean +- sample std over seeds)
    compare.png                       test AUC against labelled fraction
    runs/<model>/f<fraction>/s<seed>/ one ordinary training run each (model.pt, metrics.json, ...)

A model is a kind (``slca``, ``backbone``, ``probe``, ``sam-head``) optionally followed by
``/KEY=VALUE`` overrides of ``ClassifyConfig`` fields, e.g. ``slca/window=0/gate=mul``; short
keys are in ``ALIASES``. A run folder is reused when it holds model.pt and metrics.json and
its config.json equals what is asked now (settings that do not change results, such as
``workers`` or ``device``, are ignored), resumed through ``--resume`` when it was interrupted,
and refused when it was made with other settings (``overwrite`` retrains it, deleting only
that run's own output files). ``DIR`` must be new, empty, or a comparison folder of ours:
compare.json is written first, so an interrupted comparison is still recognised.

``jobs`` > 1 trains that many runs at once in spawned processes (``stages.common.jobs``),
each with this process's torch threads divided by ``jobs``. CPU results depend slightly on
the thread count, so a run may differ a little from the same seed trained with another
``jobs``; reuse does not look at it. Each job holds its own data (``in_memory`` loads the
features once per job), so memory grows with ``jobs``; on one GPU keep 1.

Spread: the sample standard deviation over seeds (ddof=1), None with one seed. The
difference to ``backbone`` is paired: per seed, model minus backbone at the same fraction.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cache.ownership import is_png, is_text_with_header
from stages.common.jsonio import write_json
from stages.classify.config import BEFORE_OPTION, ClassifyConfig, is_model_kind, model_kinds, moot
from stages.classify.train import OUTPUT_FILES, train_classifier
from stages.common.jobs import job_threads, run_jobs
from stages.common.trainer import RESUME_FREE
from stages.models.registry import canonical

COMPARE_FORMAT = "sam-feature-pipeline/compare"
ALIASES = {"gate": "slca_gate", "window": "slca_window", "stages": "slca_stages", "hidden": "slca_hidden",
           "act": "slca_act", "fuse": "slca_fuse", "norm": "slca_norm", "branch": "slca_branch",
           "spatial": "slca_spatial", "add": "slca_add", "prior": "slca_prior", "prior_folds": "slca_prior_folds",
           "blend": "slca_prior_blend", "distill": "slca_distill", "branch_sup": "slca_branch_sup",
           "branch_detach": "slca_branch_detach", "image_sup": "slca_image_sup", "independent": "slca_independent",
           "lr_mult": "slca_lr_mult", "img": "img_size"}
# set by the comparison itself, per run
CONTROLLED = ("store", "out", "model", "train_fraction", "seed", "resume", "overwrite")
# config.json keys that may differ between a reused run and the request (no effect on the result)
FREE = (*RESUME_FREE, "out")
METRICS = ("auc", "accuracy", "balanced_accuracy")
DONE = {"train": "trained", "reuse": "reused", "resume": "resumed", "overwrite": "retrained"}
# backbone weights only mean something for models with a timm backbone; a comparison applies
# them there and trains probe / sam-head as usual instead of refusing the whole command
BACKBONE_ONLY = ("pretrained", "backbone_weights")
STD = "sample standard deviation over seeds (ddof=1); None (not shown) with one seed"
_FIELDS = {f.name: f for f in dataclasses.fields(ClassifyConfig)}


@dataclass
class CompareConfig:
    """What ``pipeline compare`` takes; ``options`` are ``ClassifyConfig`` fields for every run."""

    store: str
    out: str
    models: list[str] = field(default_factory=lambda: ["backbone", "slca"])
    fractions: list[float] = field(default_factory=lambda: [1.0])
    seeds: list[int] = field(default_factory=lambda: [0])
    options: dict[str, Any] = field(default_factory=dict)
    overwrite: bool = False
    jobs: int = 1


@dataclass
class Run:
    model: str  # the spec as given, e.g. "slca/window=0"
    fraction: float
    seed: int
    cfg: ClassifyConfig
    status: str = "train"  # train | reuse | resume | overwrite


def log(msg: str, enabled: bool = True) -> None:
    if enabled:
        print(msg, file=sys.stderr, flush=True)


def coerce(key: str, value: Any, where: str) -> Any:
    """A ``ClassifyConfig`` field value from its command-line text (typed by the field's default)."""
    if key not in _FIELDS:
        raise ValueError(f"{where}: unknown setting {key!r}; use a `pipeline train` option name with underscores "
                         f"(e.g. slca_window, label_smoothing) or a short key ({', '.join(ALIASES)})")
    if key in CONTROLLED:
        raise ValueError(f"{where}: {key!r} is set by the comparison itself (use --models/--fractions/--seeds)")
    if not isinstance(value, str):
        return value
    f = _FIELDS[key]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    try:
        if isinstance(default, bool):
            low = value.lower()
            if low not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise ValueError
            return low in ("1", "true", "yes", "on")
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, dict):
            out = json.loads(value)
            if not isinstance(out, dict):
                raise ValueError
            return out
    except ValueError:
        kind = "a JSON object" if isinstance(default, dict) else type(default).__name__
        raise ValueError(f"{where}: {key}={value!r} is not {kind}") from None
    return value


def parse_settings(pairs: Sequence[str]) -> dict[str, str]:
    """``--set`` pairs, ``["label-smoothing=0.1", "augment=flip,rot"]`` -> {"label_smoothing":
    "0.1", "augment": "flip,rot"}: option names in underscores, values still text (coerced
    per run by ``build_runs``)."""
    opts: dict[str, str] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set {pair!r}: expected KEY=VALUE")
        key, value = pair.split("=", 1)
        opts[key.strip().replace("-", "_")] = value
    return opts


def parse_variant(spec: str) -> tuple[str, dict[str, Any]]:
    """``slca/gate=mul/window=0`` -> ("slca", {"slca_gate": "mul", "slca_window": 0})."""
    model, *opts = spec.strip().split("/")
    if not is_model_kind(model):
        raise ValueError(f"--models {spec!r}: unknown model {model!r}; choose one of: {', '.join(model_kinds())}")
    kw: dict[str, Any] = {}
    for o in opts:
        if "=" not in o:
            raise ValueError(f"--models {spec!r}: {o!r} is not KEY=VALUE (e.g. slca/window=0)")
        k, v = o.split("=", 1)
        key = ALIASES.get(k, k.replace("-", "_"))
        kw[key] = coerce(key, v, f"--models {spec!r}")
    return model, kw


def run_name(spec: str) -> str:
    """Folder name of a model spec: ``slca/window=0`` -> ``slca+window=0``."""
    name = spec.strip().replace("/", "+")
    if not name or name in (".", "..") or os.sep in name:
        raise ValueError(f"--models {spec!r}: not usable as a folder name")
    return name


def run_dir(out: str | Path, spec: str, fraction: float, seed: int) -> Path:
    return Path(out) / "runs" / run_name(spec) / f"f{fraction:g}" / f"s{seed}"


def _same(old: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """Keys whose values differ (options added since the old run count as what runs did before
    them, ``BEFORE_OPTION``, else as their defaults; SLCA settings only for slca runs, so a
    new SLCA default keeps the other runs reusable; settings without effect in both, ``moot``,
    neither)."""
    defaults = dataclasses.asdict(ClassifyConfig(store="", out=""))
    old = {**defaults, **BEFORE_OPTION, **old}
    slca_run = canonical(str(want.get("model"))) == "slca"
    skip = {*FREE, *(moot(old) & moot(want))}
    return [k for k in want if k not in skip and (slca_run or not k.startswith("slca_")) and old.get(k) != want[k]]


def plan_run(run: Run, overwrite: bool) -> Run:
    """Decide reuse / resume / train / overwrite for one run folder, or refuse it."""
    d = Path(run.cfg.out)
    present = [f for f in OUTPUT_FILES if (d / f).exists()]
    if not present:
        return run
    want = dataclasses.asdict(run.cfg)
    cfg_file = d / "config.json"
    try:
        diff = _same(json.loads(cfg_file.read_text()), want) if cfg_file.is_file() else ["config.json missing"]
    except (OSError, ValueError):
        diff = ["config.json unreadable"]
    if not diff:
        done = (d / "model.pt").is_file() and (d / "metrics.json").is_file()
        run.status = "reuse" if done else "resume"
        run.cfg = dataclasses.replace(run.cfg, resume=not done)
    elif overwrite:
        run.status = "overwrite"
        run.cfg = dataclasses.replace(run.cfg, overwrite=True)
    else:
        raise ValueError(f"{d}: holds a run made with other settings ({', '.join(diff[:4])}); pass --overwrite to "
                         "retrain it or use another --out")
    return run


def check_out(out: str | Path) -> Path:
    """``out``: absent, empty, or a comparison folder of ours (compare.json; compare.md/.png ours, no links)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not is_compare_dir(out):
        raise ValueError(f"{out}: is not empty and not a `pipeline compare` folder (no compare.json of ours); "
                         "choose a new or empty --out")
    for name, ours in (("compare.md", lambda p: is_text_with_header(p, "| model | fraction |")),
                       ("compare.png", is_png)):
        f = out / name  # rewritten at the end: refuse now what is not ours, before any training
        if f.is_symlink() or (f.exists() and not (f.is_file() and ours(f))):
            raise ValueError(f"{f}: not written by `pipeline compare`; nothing was changed, move it away or "
                             "choose a new --out")
    return out


def is_compare_dir(out: str | Path) -> bool:
    try:
        return json.loads((Path(out) / "compare.json").read_text()).get("format") == COMPARE_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def build_runs(cc: CompareConfig) -> list[Run]:
    """Every model x fraction x seed as a ``ClassifyConfig`` (fractions outermost)."""
    if cc.jobs < 1:
        raise ValueError(f"--jobs {cc.jobs}: must be at least 1")
    if not cc.models or not cc.fractions or not cc.seeds:
        raise ValueError("--models, --fractions and --seeds each need at least one value")
    for what, values in (("--models", cc.models), ("--fractions", cc.fractions), ("--seeds", cc.seeds)):
        if len(set(values)) != len(values):
            raise ValueError(f"{what} {','.join(map(str, values))}: a value is repeated")
    bad = [f for f in cc.fractions if not 0 < f <= 1]
    if bad:
        raise ValueError(f"--fractions {bad[0]:g}: must be in (0, 1]")
    common = {k: coerce(k, v, "--set") for k, v in cc.options.items()}
    specs = [(spec, *parse_variant(spec)) for spec in cc.models]
    names = [run_name(s) for s in cc.models]
    if len(set(names)) != len(names):
        raise ValueError(f"--models {','.join(cc.models)}: two models map to the same folder name")
    runs = []
    for frac in cc.fractions:
        for seed in cc.seeds:
            for spec, model, extra in specs:
                mine = common if model in ("slca", "backbone") else \
                    {k: v for k, v in common.items() if k not in BACKBONE_ONLY}
                cfg = ClassifyConfig(**{"plots": False, **mine, **extra, "store": cc.store, "model": model,
                                        "out": str(run_dir(cc.out, spec, frac, seed)), "train_fraction": frac,
                                        "seed": seed})
                runs.append(Run(spec, frac, seed, cfg))
    return runs


def run_compare(cc: CompareConfig, dataset=None, progress: bool = True) -> dict[str, Any]:
    """Train (or reuse / resume) every run, then write compare.json, compare.md and compare.png.

    ``dataset`` overrides the store's recorded dataset (tests, notebooks). Every run's
    settings are checked before anything is trained. Returns the content of compare.json."""
    out = check_out(cc.out)
    runs = build_runs(cc)
    for r in runs:
        r.cfg.check()
        plan_run(r, cc.overwrite)  # every refusal comes before any training
    todo = [r.cfg for r in runs if r.status != "reuse"]
    if todo:  # a missing store or dataset is one error before anything is written
        from stages.common.joined import open_joined

        open_joined(todo[0].store, dataset, todo[0].dataset, todo[0].data_root, todo[0].dataset_options, verify=False)
    report: dict[str, Any] = {
        "format": COMPARE_FORMAT, "version": 1, "store": cc.store, "models": list(cc.models),
        "fractions": list(cc.fractions), "seeds": list(cc.seeds), "options": cc.options, "std": STD,
        "complete": False, "runs": [], "summary": []}
    out.mkdir(parents=True, exist_ok=True)
    write_json(report, out / "compare.json")  # the marker first: an interrupted comparison stays ours
    train_runs(runs, cc.jobs, dataset, progress)
    for i, r in enumerate(runs, 1):
        m = json.loads((Path(r.cfg.out) / "metrics.json").read_text())
        gates_file = Path(r.cfg.out) / "slca_gates.json"
        gates = json.loads(gates_file.read_text()) if gates_file.exists() else None
        if r.status == "reuse":
            log(f"{_where(i, len(runs), r)}: reused, {_scores(m)}", progress)
        report["runs"].append({"model": r.model, "fraction": r.fraction, "seed": r.seed, "status": DONE[r.status],
                               "dir": str(Path(r.cfg.out).relative_to(out)), "n_train": m.get("n_train"),
                               "metrics": m, "gates": gates})
    report["summary"] = summarize(report["runs"], cc.models, cc.fractions)
    report["complete"] = True
    write_json(report, out / "compare.json")
    (out / "compare.md").write_text(format_table(report["summary"], "backbone" in cc.models) + "\n")
    from stages.classify.compare_plot import plot_compare

    plot_compare(report["summary"], out / "compare.png")
    return report


def _where(i: int, n: int, r: Run) -> str:
    return f"[{i}/{n}] {r.model} fraction {r.fraction:g} seed {r.seed}"


def _scores(m: dict[str, Any]) -> str:
    return f"test auc {_fmt(m['test'].get('auc'))} accuracy {_fmt(m['test'].get('accuracy'))}"


def train_runs(runs: Sequence[Run], jobs: int, dataset=None, progress: bool = True) -> None:
    """Train every run that is not reused, here one after another or ``jobs`` at a time in
    spawned processes (their progress bars off; one line per run start and end here)."""
    todo = [(i, r) for i, r in enumerate(runs, 1) if r.status != "reuse"]

    def started(k: int) -> None:
        i, r = todo[k]
        log(f"{_where(i, len(runs), r)}: {'resuming' if r.status == 'resume' else 'training'} in {r.cfg.out}",
            progress)

    def finished(k: int, m: dict[str, Any]) -> None:
        i, r = todo[k]
        log(f"{_where(i, len(runs), r)}: {DONE[r.status]}, {_scores(m)}", progress)

    if jobs <= 1 or len(todo) <= 1:
        for k, (_, r) in enumerate(todo):
            started(k)
            finished(k, train_classifier(r.cfg, dataset=dataset, progress=progress))
        return
    log(f"{len(todo)} runs to train, {min(jobs, len(todo))} at a time, {job_threads(jobs)} thread(s) each", progress)
    run_jobs(train_classifier, [(r.cfg, dataset, False) for _, r in todo], jobs, started, finished)


def mean_std(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and sample std (ddof=1) of the finite values; std None with fewer than two."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    return {"mean": float(v.mean()) if len(v) else None, "std": float(v.std(ddof=1)) if len(v) > 1 else None,
            "n": int(len(v))}


def summarize(runs: Sequence[dict[str, Any]], models: Sequence[str], fractions: Sequence[float]) -> list[dict]:
    """One row per model and fraction: test metrics over seeds, and the paired AUC difference
    to ``backbone`` (per seed, this model minus backbone) when backbone was run."""
    def test(r: dict, key: str) -> float | None:
        return r["metrics"]["test"].get(key)

    rows = []
    for frac in fractions:
        base = {r["seed"]: test(r, "auc") for r in runs if r["model"] == "backbone" and r["fraction"] == frac}
        for model in models:
            rs = [r for r in runs if r["model"] == model and r["fraction"] == frac]
            if not rs:
                continue
            row: dict[str, Any] = {"model": model, "fraction": frac, "seeds": [r["seed"] for r in rs],
                                   "n_train": sorted({r["n_train"] for r in rs})}
            for key in METRICS:
                row[key] = mean_std([test(r, key) for r in rs])
            row["val_auc"] = mean_std([r["metrics"].get("val", {}).get("auc") for r in rs])
            # per run, the stage whose gates depart most from the identity
            row["gate_max_dev"] = mean_std([max(g["max_abs_dev"] for g in r["gates"].values())
                                            for r in rs if r.get("gates")])
            if base and model != "backbone":
                diffs = [test(r, "auc") - base[r["seed"]] for r in rs if r["seed"] in base
                         and test(r, "auc") is not None and base[r["seed"]] is not None]
                row["delta_auc_vs_backbone"] = mean_std(diffs)
            rows.append(row)
    return rows


def _fmt(x: float | None, sign: bool = False) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:+.3f}" if sign else f"{x:.3f}"


def _pm(s: dict[str, Any], sign: bool = False) -> str:
    if s["mean"] is None:
        return "-"
    return _fmt(s["mean"], sign) if s["std"] is None else f"{_fmt(s['mean'], sign)} ± {_fmt(s['std'])}"


def format_table(summary: Sequence[dict[str, Any]], with_delta: bool) -> str:
    """Markdown table of ``summarize``'s rows, with the spread convention under it."""
    head = ["model", "fraction", "train images", "test AUC", "test accuracy", "test balanced accuracy"]
    head += ["Δ AUC vs backbone (paired)"] if with_delta else []
    head += ["val AUC", "gate max abs(g-1)"]
    lines = ["| " + " | ".join(head + ["seeds"]) + " |", "|---|" + "---:|" * len(head)]
    for row in summary:
        n = "-".join(str(v) for v in row["n_train"][::max(1, len(row["n_train"]) - 1)])
        cells = [row["model"], f"{row['fraction']:g}", n] + [_pm(row[k]) for k in METRICS]
        if with_delta:
            d = row.get("delta_auc_vs_backbone")
            cells.append(_pm(d, sign=True) if d else "(reference)")
        cells += [_pm(row["val_auc"]), _pm(row["gate_max_dev"])]
        lines.append("| " + " | ".join(cells + [str(len(row["seeds"]))]) + " |")
    lines.append("")
    lines.append("Test split; AUC is macro one-vs-rest. mean ± sample std over seeds (ddof=1; no spread with one seed). "
                 "Δ: per seed, model minus backbone at the same fraction. Choose a setting by val AUC, "
                 "never by a test column. gate: the largest departure of an SLCA gate from the identity "
                 "on the test split, per run (its most-moved stage).")
    return "\n".join(lines)
