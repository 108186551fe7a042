"""A run folder is held by the process training into it: a second `pipeline train` (or a
compare reaching the same run) is refused in one line before it changes anything, even
with --overwrite, and the hold ends with the holder, however it ends (SIGKILL included)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from cli_run import cli, snapshot


REPO = Path(__file__).resolve().parents[1]


class Holder:
    """Another process inside ``run_folder(folder)``, as a training run would be."""

    def __init__(self, folder: Path):
        code = (f"import sys, time; sys.path.insert(0, {str(REPO)!r})\n"
                "from stages.common.trainer import run_folder\n"
                f"with run_folder({str(folder)!r}, (), resume=True):\n"
                "    print('held', flush=True); time.sleep(120)\n")
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "held"

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def refused_as_busy(res, folder: Path) -> None:
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1, (res.exit_code, res.stderr)
    assert lines[0] == (f"error: {folder}: another process is training into this folder; nothing was changed, "
                        "wait for it to finish or choose another --out")


@pytest.mark.parametrize("task", [["--model", "probe"], ["--task", "segment", "--head", "linear"]])
def test_a_run_folder_in_use_is_refused_until_its_holder_ends(synthetic_store, tmp_path, task):
    run = tmp_path / "run"
    args = ("train", "--from-cache", synthetic_store, *task, "--out", run, "--epochs", "1", "--device", "cpu", "-q")
    assert cli(*args).exit_code == 0
    before = snapshot(run)
    holder = Holder(run)
    try:
        for extra in ([], ["--overwrite"], ["--resume"]):
            refused_as_busy(cli(*args, *extra), run)
        assert snapshot(run) == before
    finally:
        holder.kill()
    res = cli(*args, "--overwrite")
    assert res.exit_code == 0, res.stderr
    assert (run / "model.pt").is_file()


def test_compare_stops_at_a_run_another_process_trains(synthetic_store, tmp_path):
    out = tmp_path / "cmp"
    args = ("compare", "--from-cache", synthetic_store, "--out", out, "--models", "probe", "--fractions", "1",
            "--seeds", "0,1", "-q")
    assert cli(*args).exit_code == 0
    busy = out / "runs" / "probe" / "f1" / "s2"
    busy.mkdir()
    holder = Holder(busy)  # a second compare, adding seed 2, is training this run right now
    try:
        refused_as_busy(cli(*args[:-3], "--seeds", "0,1,2", "-q"), busy)
        assert not any(busy.iterdir())
    finally:
        holder.kill()
    res = cli(*args[:-3], "--seeds", "0,1,2", "-q")
    assert res.exit_code == 0, res.stderr
    assert (busy / "metrics.json").is_file()
