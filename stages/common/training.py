"""Task-independent training utilities (classification and segmentation share them):
seeding, AdamW + cosine schedule, class weights, early stopping, mixed precision, the
NaN guard, precise BN, atomic checkpoints, the resume check and the per-epoch history CSV.
The workflow that uses them is ``stages.common.trainer``."""
from __future__ import annotations

import contextlib
import csv
import math
import os
import random
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from stages.common.runtime import amp_dtype_for


class TrainingError(ValueError):
    """Training cannot go on as asked (NaN loss, a run that cannot be resumed); the one-line
    message says what happened and the fix (exit code 2)."""


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and CUDA); CPU runs with the same seed and thread
    count are then bit-reproducible."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, keys.tolist(), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_schedule(epochs: int, batch_size: int, lr: float) -> None:
    """Refuse a training schedule that cannot run, with a one-line ValueError naming the
    option; shared by every task's config so the messages agree."""
    for name, value in (("epochs", epochs), ("batch-size", batch_size)):
        if value < 1:
            raise ValueError(f"--{name} {value}: must be at least 1")
    if not lr > 0:
        raise ValueError(f"--lr {lr}: must be positive")


def make_optimizer(model: nn.Module, lr: float, weight_decay: float,
                   lr_mult: Mapping[str, float] | None = None) -> torch.optim.AdamW:
    """AdamW; biases, norm weights and other 1-D parameters get no decay. ``lr_mult``:
    parameter-name prefix -> learning-rate factor (e.g. ``{"slca.": 10}``, so that blocks
    starting at the identity can move within a short run); the schedule scales every group."""
    groups: dict[tuple[bool, float], list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            mult = next((m for prefix, m in (lr_mult or {}).items() if name.startswith(prefix)), 1.0)
            groups.setdefault((p.ndim > 1, mult), []).append(p)
    order = sorted(groups, key=lambda k: (k[1] != 1.0, k[1], not k[0]))  # plain groups first: decay, no decay
    return torch.optim.AdamW([{"params": groups[k], "weight_decay": weight_decay if k[0] else 0.0, "lr": lr * k[1]}
                              for k in order], lr=lr)


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                    min_ratio: float = 0.01) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule: linear warmup, then cosine from the base lr to ``min_ratio`` x lr."""
    total = max(int(total_steps), 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = min((step - warmup_steps) / max(total - warmup_steps, 1), 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights n / (K * n_c), as scikit-learn's ``class_weight="balanced"``;
    classes absent from ``labels`` get weight 0."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    w = np.where(counts > 0, counts.sum() / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


class EarlyStopping:
    """Tracks the best value of a metric (higher is better); ``step`` returns True when it
    improved. ``stop`` turns True after ``patience`` epochs without improvement (0: never)."""

    def __init__(self, patience: int = 10, min_delta: float = 0.0):
        self.patience, self.min_delta = patience, min_delta
        self.best = -math.inf
        self.best_epoch = -1
        self.bad = 0

    def step(self, value: float, epoch: int) -> bool:
        if math.isfinite(value) and value > self.best + self.min_delta:
            self.best, self.best_epoch, self.bad = value, epoch, 0
            return True
        self.bad += 1
        return False

    @property
    def stop(self) -> bool:
        return self.patience > 0 and self.bad >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad": self.bad}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best, self.best_epoch, self.bad = float(state["best"]), int(state["best_epoch"]), int(state["bad"])


class Amp:
    """Mixed precision for one device and precision name ("fp32", "bf16", "fp16"):
    ``with amp.autocast():`` around the forward, ``amp.backward_step(loss, opt, clip)``."""

    def __init__(self, device: torch.device, precision: str):
        self.device, self.precision = device, precision
        self.dtype = amp_dtype_for(precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def backward_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor],
                      clip: float = 0.0) -> None:
        self.scaler.scale(loss).backward()
        if clip > 0:
            self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, clip)
        self.scaler.step(optimizer)
        self.scaler.update()
        optimizer.zero_grad(set_to_none=True)


def check_finite(loss: torch.Tensor, epoch: int, step: int, checkpoint: Path | str | None) -> None:
    """Stop with a TrainingError when the loss is NaN/inf, naming the checkpoint kept."""
    if torch.isfinite(loss).all():
        return
    kept = (f"the last good checkpoint is {checkpoint}" if checkpoint and Path(checkpoint).exists()
            else "no checkpoint was written yet")
    raise TrainingError(f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; training stopped and "
                        f"{kept}. Lower --lr or use --precision fp32, then re-run with --resume")


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file, then rename: a kill never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by ``save_atomic``: plain containers and tensors only
    (``weights_only``: a checkpoint file cannot run code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint; train a model first (pipeline train ... --out DIR)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated or foreign files
        raise TrainingError(f"{path}: not a readable checkpoint ({type(e).__name__}); re-run the training") from None


def check_resumable(saved: Mapping[str, Any], current: Mapping[str, Any], keys: Sequence[str], path: Path | str) -> None:
    """Refuse to resume a run whose configuration differs in one of ``keys``."""
    diff = [k for k in keys if saved.get(k) != current.get(k)]
    if diff:
        what = "; ".join(f"{k}: checkpoint has {saved.get(k)!r}, asked for {current.get(k)!r}" for k in diff)
        raise TrainingError(f"{path}: cannot resume a run made with other settings ({what}); "
                            "use the original options or another --out")


class History:
    """history.csv, one row per epoch, flushed as written (``dvc plots`` reads it).

    Resuming keeps the rows of the epochs before the resume point."""

    def __init__(self, path: str | Path, fields: Sequence[str], keep_epochs: int = 0):
        self.path, self.fields = Path(path), list(fields)
        rows = []
        if keep_epochs and self.path.is_file():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r.get("epoch", 0)) <= keep_epochs]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, self.fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    def append(self, row: Mapping[str, Any]) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.fields, extrasaction="ignore").writerow(
                {k: _fmt(row.get(k)) for k in self.fields})

    def rows(self) -> list[dict[str, str]]:
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return "" if v is None else v


@torch.no_grad()
def precise_bn(net: nn.Module, batches: Iterable[Any], forward: Callable[[Any], int], amp: Amp,
               max_samples: int) -> int:
    """Re-estimate every BatchNorm's running mean/variance as the plain average over up to
    ``max_samples`` training samples with the current weights (pycls' "precise BN");
    ``forward(batch)`` runs the network on one batch and returns its sample count.

    Why: eval mode uses running statistics that trail the weights by an exponential
    average of momentum 0.1. With few labels (one or two batches per epoch) they never
    catch up: on PneumoniaMNIST with 30 training images the best-AUC model scored val AUC
    0.96 but accuracy 0.59 (one class predicted everywhere), 0.88 after this pass.
    Returns the samples seen (0: no BatchNorm, nothing done)."""
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns or max_samples <= 0:
        return 0
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    net.train()
    seen = 0
    try:
        for batch in batches:
            with amp.autocast():
                seen += forward(batch)
            if seen >= max_samples:
                break
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
    return seen
