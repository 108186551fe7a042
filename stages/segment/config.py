"""Configuration of a segmentation run (``pipeline train --task segment``)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from stages.common.training import check_schedule
from stages.models.heads import list_heads


@dataclass
class SegmentConfig:
    """Everything a segmentation training run takes.

    store/dataset/data_root: the feature store and the dataset it was extracted from
    (joined by sample id). head: autosam | cnn | linear (read the cached features) or
    unet (from scratch on the raw images; the store then only supplies the listing).
    epochs: at most this many epochs; steps_per_epoch: optimizer steps per epoch (0: one
    pass over the labelled training samples). patience: stop after this many validations
    without a better val Dice (0: never); val_every: validate every N epochs (and after
    the last). labeled_volumes: train on the first N training volumes (0: all; volumetric
    data); train_fraction: or on this fraction of them (of samples for 2D data).
    sam_checkpoint: a SAM-family checkpoint whose mask decoder initialises the autosam
    head, or "encoder" for the checkpoint the store was extracted with. in_memory: load
    the embeddings into RAM first (2 MiB per sample at float16). resume: continue from
    ``out/last.pt`` (settings other than how the run executes must be unchanged, as for
    classification: ``stages.common.trainer.RESUME_FREE``). workers: DataLoader processes
    (-1: automatic, as for classification). overlays: how many validation overlay PNGs to write.
    """

    store: str
    data_root: str
    dataset: str
    out: str
    head: str = "autosam"
    epochs: int = 50
    batch_size: int = 8
    lr: float = 5e-4
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    train_fraction: float = 1.0
    labeled_volumes: int = 0
    sam_checkpoint: str | None = None
    in_memory: bool = False
    resume: bool = False
    overwrite: bool = False
    workers: int = -1
    steps_per_epoch: int = 0
    patience: int = 10
    val_every: int = 1
    overlays: int = 6
    head_options: dict[str, Any] = field(default_factory=dict)
    dataset_options: dict[str, Any] = field(default_factory=dict)
    storage_options: dict[str, Any] | None = None
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain data, as saved in model.pt and last.pt; without
        ``storage_options`` (connection details, possibly credentials)."""
        d = asdict(self)
        d.pop("storage_options")
        return d

    def check(self) -> None:
        """Refuse impossible values with a one-line ValueError naming the option."""
        if self.head not in list_heads():
            raise ValueError(f"--head {self.head!r}: choose one of {', '.join(list_heads())}")
        check_schedule(self.epochs, self.batch_size, self.lr)
        if self.workers < -1:
            raise ValueError(f"--workers {self.workers}: must be -1 (automatic) or 0 or more")
        for name in ("steps_per_epoch", "patience", "overlays", "labeled_volumes"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be 0 or more")
        if self.val_every < 1:
            raise ValueError(f"--val-every {self.val_every}: must be at least 1")
        if self.sam_checkpoint and self.head != "autosam":
            raise ValueError(f"--sam-checkpoint initialises the autosam head only, not {self.head!r}; drop it")

