"""One training workflow for every stage-two task (after micro-sam's ``DefaultTrainer`` and
MONAI's ``engines``): the task trainers (``stages.classify.train.ClassifyTrainer``,
``stages.segment.train.SegmentTrainer``) supply only their optimizer, batches, batch step,
validation and epoch line; everything else lives here once:

- the epoch loop with a progress bar, the NaN stop (``check_finite``), mixed precision and
  gradient clipping (``Amp``), a per-step schedule when the task has one;
- early stopping on the task's validation value (higher is better) and ``model.pt`` written
  atomically whenever it improves;
- ``history.csv``, one row per epoch (``dvc plots`` reads it);
- ``last.pt`` after every finished epoch: weights, optimizer, schedule, GradScaler, early
  stopping and RNG states, and ``epoch`` = the number of finished epochs, so ``--resume``
  starts at epoch ``ck["epoch"]`` (0-based) and a finished run is not trained again;
- resuming refuses (``TrainingError``) a run whose settings differ in anything but
  ``RESUME_FREE``, whose store signature changed, or whose split assignment differs.

Seeding happens before the network is built (``seed_everything`` in the task's entry
function), so that a network's initial weights depend on the seed alone.
"""
from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from stages.common.progress import progress_bar
from stages.common.training import (
    Amp,
    EarlyStopping,
    History,
    TrainingError,
    check_finite,
    check_resumable,
    load_checkpoint,
    rng_state,
    save_atomic,
    set_rng_state,
)

# settings that may change between an interrupted run and its --resume (how it runs, not what it learns)
RESUME_FREE = ("resume", "overwrite", "workers", "in_memory", "device", "progress", "plots", "attention_images",
               "overlays")


def log(msg: str, enabled: bool = True) -> None:
    if enabled:
        print(msg, file=sys.stderr, flush=True)


class Trainer:
    """The shared workflow; subclasses override the hooks marked "task" below.

    ``record``: what model.pt and last.pt carry besides the weights (format, task, config,
    ``store`` with its ``signature``, ``splits`` as sample ids, ...); ``config``: the run's
    settings as plain data, compared on resume."""

    history_fields: Sequence[str] = ("epoch", "train_loss", "lr", "seconds")

    def __init__(self, net: nn.Module, out: Path, record: dict[str, Any], config: Mapping[str, Any], *,
                 epochs: int, patience: int, amp: Amp, device: torch.device, resume: bool = False,
                 clip: float = 0.0, progress: bool = True):
        self.net, self.out, self.record, self.config = net, Path(out), record, dict(config)
        self.epochs, self.amp, self.device, self.clip, self.progress = epochs, amp, device, clip, progress
        self.resume_requested = resume
        self.early = EarlyStopping(patience)
        self.params = [p for p in net.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = self.configure_optimizers()
        self.epochs_run = 0
        self.stopped = "epochs done"

    # --- task hooks -----------------------------------------------------------------
    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, Any]:
        """(optimizer, per-step scheduler or None)."""
        raise NotImplementedError

    def train_batches(self, epoch: int) -> Iterable[Any]:
        """The batches of one epoch, seeded by epoch so that a resumed run draws the same ones."""
        raise NotImplementedError

    def steps_per_epoch(self) -> int:
        raise NotImplementedError

    def train_step(self, batch: Any, epoch: int) -> tuple[torch.Tensor, int, dict[str, float]]:
        """Forward one batch: (loss with grad, samples in the batch, extra loss parts to average)."""
        raise NotImplementedError

    def after_epoch(self, epoch: int) -> None:
        """After the optimizer steps of an epoch, before validation (precise BN)."""

    def validate(self, epoch: int) -> tuple[float, dict[str, Any], dict[str, float]] | None:
        """(value to maximise, history fields, monitor record for model.pt), or None when this
        epoch is not validated."""
        raise NotImplementedError

    def epoch_line(self, row: Mapping[str, Any]) -> str:
        return f"epoch {row['epoch']}/{self.epochs}  loss {row['train_loss']:.4f}"

    # --- the workflow ---------------------------------------------------------------
    @property
    def last_path(self) -> Path:
        return self.out / "last.pt"

    @property
    def model_path(self) -> Path:
        return self.out / "model.pt"

    @property
    def best_epoch(self) -> int:
        """1-based epoch of the best validation (the last epoch run when none was validated)."""
        return self.early.best_epoch + 1 if self.early.best_epoch >= 0 else self.epochs_run

    def fit(self) -> int:
        """Train (or resume) to the end or an early stop; returns ``best_epoch``."""
        start, finished = self.restore()
        self.epochs_run = start
        if finished:
            return self.best_epoch
        history = History(self.out / "history.csv", self.history_fields, keep_epochs=start)
        for epoch in range(start, self.epochs):
            t = time.perf_counter()
            row: dict[str, Any] = {"epoch": epoch + 1, **self.train_epoch(epoch)}
            self.after_epoch(epoch)
            improved, monitor = False, None
            val = self.validate(epoch)
            if val is not None:
                value, fields, monitor = val
                improved = self.early.step(value, epoch)
                row.update(fields)
                if improved:
                    self.on_improved(epoch)
            if improved or not self.model_path.exists():
                self.save(self.model_path, epoch + 1, {"monitor": monitor or {}})
            row.update(lr=self.optimizer.param_groups[0]["lr"], seconds=time.perf_counter() - t)
            history.append(row)
            self.epochs_run = epoch + 1
            self.save(self.last_path, epoch + 1, {**self.training_state(), "finished": self.early.stop or
                                                  epoch + 1 == self.epochs})
            log(self.epoch_line(row) + ("  *" if improved else ""), self.progress)
            if self.early.stop:
                self.stopped = (f"early stop: no better validation for {self.early.patience} validations; "
                                f"best epoch {self.best_epoch}")
                log(self.stopped, self.progress)
                break
        return self.best_epoch

    def on_improved(self, epoch: int) -> None:
        """Called after a validation that early stopping counted as the best so far."""

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass of optimizer steps; the sample-weighted means of the loss and its parts."""
        self.net.train()
        sums: dict[str, float] = {}
        count, steps = 0, 0
        with progress_bar(f"epoch {epoch + 1}", total=self.steps_per_epoch(), enabled=self.progress,
                          unit="batch") as advance:
            for step, batch in enumerate(self.train_batches(epoch)):
                loss, n, parts = self.train_step(batch, epoch)
                check_finite(loss.detach(), epoch, step, self.last_path)
                self.amp.backward_step(loss, self.optimizer, self.params, self.clip)
                if self.scheduler is not None:
                    self.scheduler.step()
                for k, v in {"train_loss": float(loss.detach()), **parts}.items():
                    sums[k] = sums.get(k, 0.0) + v * n
                count, steps = count + n, steps + 1
                advance(1, description=f"epoch {epoch + 1} loss {sums['train_loss'] / count:.4f}")
        if steps == 0:
            raise TrainingError(f"{self.out}: no training batch in epoch {epoch + 1}; raise --train-fraction")
        return {**{k: v / count for k, v in sums.items()}, "steps": steps}

    def save(self, path: Path, epoch: int, extra: Mapping[str, Any]) -> None:
        """``record`` + weights + ``extra``, written atomically (a kill never leaves half a file)."""
        state = {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()}
        save_atomic({**self.record, "config": self.config, "state_dict": state, "epoch": epoch, **extra}, path)

    def training_state(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.amp.scaler.state_dict(), "early": self.early.state_dict(), "rng": rng_state()}

    def restore(self) -> tuple[int, bool]:
        """With --resume and a last.pt: load every state and return (finished epochs, finished?)."""
        if not self.resume_requested:
            return 0, False
        if not self.last_path.exists():
            log(f"--resume: {self.last_path} not found, starting a new run", self.progress)
            return 0, False
        ck = load_checkpoint(self.last_path)
        self.check_same_run(ck)
        self.net.load_state_dict(ck["state_dict"])
        self.optimizer.load_state_dict(ck["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(ck["scheduler"])
        self.amp.scaler.load_state_dict(ck["scaler"])
        self.early.load_state_dict(ck["early"])
        set_rng_state(ck["rng"])
        start, finished = int(ck["epoch"]), bool(ck.get("finished"))
        log(f"resuming {self.out} after epoch {start}" + (" (already finished)" if finished else ""), self.progress)
        return start, finished

    def check_same_run(self, ck: Mapping[str, Any]) -> None:
        """Refuse to resume with other settings, another store or other splits."""
        if "store" not in ck or "splits" not in ck or "config" not in ck:
            raise TrainingError(f"{self.last_path}: written by an older version; start a new run with another --out")
        keys = sorted(set(ck["config"]) | set(self.config))
        check_resumable(ck["config"], self.config, [k for k in keys if k not in RESUME_FREE], self.last_path)
        if ck["store"].get("signature") != self.record["store"]["signature"]:
            raise TrainingError(f"{self.last_path}: the store changed since this run started (its signature "
                                "differs); use another --out")
        if ck["splits"] != self.record["splits"]:
            raise TrainingError(f"{self.last_path}: the split assignment changed since this run started; "
                                "use another --out")


@contextlib.contextmanager
def run_folder(out: str | Path, outputs: Sequence[str], overwrite: bool = False,
               resume: bool = False) -> Iterator[Path]:
    """The run folder, held by this process for the whole run: refused (TrainingError) when
    it holds anything this project did not write or while another process trains into it
    (two `pipeline train` into one --out, two compares reaching one run); ``overwrite``
    removes only ``outputs`` of an earlier run (``cache.ownership``), and only once the
    folder is held."""
    from cache.io import FolderLock
    from cache.ownership import RUN_MARKERS, ForeignPathError, check_folder_target, prepare_run_folder

    try:
        folder = check_folder_target(out)
    except ForeignPathError as e:
        raise TrainingError(str(e)) from None
    folder.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(folder)
    if not lock.acquire():
        raise TrainingError(f"{folder}: another process is training into this folder; nothing was changed, "
                            "wait for it to finish or choose another --out")
    try:
        try:
            prepared = prepare_run_folder(folder, outputs=outputs, markers=RUN_MARKERS, is_marker=is_run_file,
                                          overwrite=overwrite, resume=resume)
        except ForeignPathError as e:
            raise TrainingError(str(e)) from None
        yield prepared
    finally:
        lock.release()


def is_run_file(path: Path) -> bool:
    """A run's config.json (the training configuration: ``store``, ``out``, ``seed``) or
    checkpoint (``Trainer.save``: a dict with ``state_dict``, ``config``, ``epoch`` and ``store``),
    told from a user's file of the same name by its content. Checkpoints are memory-mapped,
    so only the pickled header is read, not the weights; a file that is not a plain
    weights-only checkpoint is not ours."""
    if path.suffix == ".json":
        from cache.ownership import is_json_with_keys

        return is_json_with_keys(path, ("store", "out", "seed"))
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # truncated, foreign pickles, not a zip archive: someone else's file
        return False
    return isinstance(ck, dict) and all(k in ck for k in ("state_dict", "config", "epoch", "store"))


def evaluation_folder(out: str | Path, outputs: Sequence[str], overwrite: bool = False) -> Path:
    """The ``--out`` folder of `pipeline evaluate`, ready to write ``outputs`` into: new or
    empty, or (with ``overwrite``) emptied of an earlier evaluation, recognised by its
    metrics.json naming a model and a store; anything else is refused (TrainingError) and
    left as it is (``cache.ownership.prepare_output_folder``)."""
    from cache.ownership import ForeignPathError, is_json_with_keys, prepare_output_folder

    try:
        return prepare_output_folder(out, outputs=outputs, marker="metrics.json", overwrite=overwrite,
                                     is_ours=lambda p: is_json_with_keys(p, ("model", "store")),
                                     command="pipeline evaluate")
    except ForeignPathError as e:
        raise TrainingError(str(e)) from None
