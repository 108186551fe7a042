"""The shared stage-two trainer (stages/common/trainer.py) on a tiny task of its own: what
both the classification and the segmentation trainer inherit (resume meaning, what last.pt
holds, what a resume refuses, early stopping, history) is tested once, here."""
from __future__ import annotations

import csv

import pytest
import torch
from torch import nn

from stages.common.trainer import Trainer
from stages.common.training import Amp, TrainingError, load_checkpoint, seed_everything


class Regression(Trainer):
    """y = x @ w on 32 fixed samples, batches of 8, SGD with momentum (so a resume must restore
    the optimizer state, not only the weights), validation = minus the MSE."""

    history_fields = ("epoch", "train_loss", "val_mse", "lr", "seconds")

    def __init__(self, out, record, config, epochs=4, patience=0, resume=False):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(32, 3, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5])
        self.seed = config.get("seed", 0)
        net = nn.Linear(3, 1)
        super().__init__(net, out, record, config, epochs=epochs, patience=patience,
                         amp=Amp(torch.device("cpu"), "fp32"), device=torch.device("cpu"), resume=resume,
                         progress=False)

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=self.config.get("lr", 0.05), momentum=0.9), None

    def steps_per_epoch(self) -> int:
        return 4

    def train_batches(self, epoch):
        order = torch.randperm(32, generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
        return [order[a:a + 8] for a in range(0, 32, 8)]

    def train_step(self, idx, epoch):
        loss = nn.functional.mse_loss(self.net(self.x[idx]).squeeze(1), self.y[idx])
        return loss, len(idx), {}

    def validate(self, epoch):
        with torch.no_grad():
            mse = float(nn.functional.mse_loss(self.net(self.x).squeeze(1), self.y))
        return -mse, {"val_mse": mse}, {"mse": mse}


RECORD = {"task": "toy", "store": {"signature": {"encoder": "e", "n": 1}}, "splits": {"train": ["a", "b"]}}


def run(out, epochs=4, resume=False, record=RECORD, config=None, **kw) -> Regression:
    seed_everything(0)
    t = Regression(out, record, {"seed": 0, "lr": 0.05, "epochs": epochs, **(config or {})}, epochs=epochs,
                   resume=resume, **kw)
    t.fit()
    return t


def history(out) -> list[dict[str, str]]:
    with open(out / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_last_pt_counts_finished_epochs_and_holds_every_state(tmp_path):
    t = run(tmp_path / "a", epochs=3)
    last = load_checkpoint(tmp_path / "a" / "last.pt")
    assert last["epoch"] == 3 and last["finished"] and t.epochs_run == 3
    assert {"optimizer", "scaler", "early", "rng", "state_dict", "config", "store", "splits"} <= set(last)
    best = load_checkpoint(tmp_path / "a" / "model.pt")
    assert best["epoch"] == t.best_epoch and best["monitor"]["mse"] == pytest.approx(
        float(history(tmp_path / "a")[t.best_epoch - 1]["val_mse"]), rel=1e-5)
    assert [r["epoch"] for r in history(tmp_path / "a")] == ["1", "2", "3"]


def test_an_interrupted_run_resumed_equals_the_uninterrupted_one(tmp_path):
    ref = run(tmp_path / "ref", epochs=4)
    # an interruption after epoch 2: the same settings, stopped there, last.pt not finished
    two = run(tmp_path / "two", epochs=2, config={"epochs": 4})
    state = load_checkpoint(tmp_path / "two" / "last.pt")
    assert two.epochs_run == 2 and state["epoch"] == 2
    state["finished"] = False
    torch.save(state, tmp_path / "two" / "last.pt")
    resumed = run(tmp_path / "two", epochs=4, resume=True)
    assert resumed.epochs_run == 4 and [r["epoch"] for r in history(tmp_path / "two")] == ["1", "2", "3", "4"]
    assert [r["train_loss"] for r in history(tmp_path / "two")] == [r["train_loss"] for r in history(tmp_path / "ref")]
    for k, v in ref.net.state_dict().items():
        torch.testing.assert_close(resumed.net.state_dict()[k], v, rtol=0, atol=0)


def test_a_finished_run_is_not_trained_again(tmp_path):
    run(tmp_path / "a", epochs=2)
    before = (tmp_path / "a" / "last.pt").read_bytes()
    again = run(tmp_path / "a", epochs=2, resume=True)
    assert again.epochs_run == 2 and (tmp_path / "a" / "last.pt").read_bytes() == before


@pytest.mark.parametrize("change, message", [
    (dict(config={"lr": 0.5}), "other settings .*lr: checkpoint has 0.05, asked for 0.5"),
    (dict(record={**RECORD, "store": {"signature": {"encoder": "e", "n": 2}}}), "the store changed"),
    (dict(record={**RECORD, "splits": {"train": ["a"]}}), "split assignment changed"),
])
def test_resume_refuses_other_settings_store_or_splits(tmp_path, change, message):
    run(tmp_path / "a", epochs=2)
    with pytest.raises(TrainingError, match=message):
        run(tmp_path / "a", epochs=2, resume=True, **change)


def test_how_a_run_executes_may_change_on_resume(tmp_path):
    run(tmp_path / "a", epochs=2, config={"workers": 0, "device": "cpu"})
    again = run(tmp_path / "a", epochs=2, resume=True, config={"workers": 3, "device": "auto", "progress": False})
    assert again.epochs_run == 2


def test_early_stopping_ends_the_run_and_says_why(tmp_path):
    t = run(tmp_path / "a", epochs=50, config={"lr": 2.5}, patience=2)  # lr too high: the MSE blows up
    assert t.epochs_run < 50 and t.stopped.startswith("early stop") and t.best_epoch <= t.epochs_run - 2
