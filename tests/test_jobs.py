"""`run_jobs`: calls handed to spawned processes a few at a time, results back in the
parent, the first failure stopping the hand-out and raised after the running calls end."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages.common.jobs import run_jobs


def slow_root(x: float) -> tuple[float, int]:
    """sqrt(x) and the process that computed it; negative x fails at once, the others after 0.3 s."""
    if x >= 0:
        time.sleep(0.3)
    return math.sqrt(x), os.getpid()


def sleeper(folder: str) -> None:
    """Leave this process's pid in ``folder``, then sleep for a minute."""
    Path(folder, str(os.getpid())).touch()
    time.sleep(60)


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan's zombie may never be reaped here)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_until(check, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while not check():
        if time.monotonic() > end:
            return False
        time.sleep(0.2)
    return True


def test_calls_run_in_other_processes_at_most_jobs_at_once():
    started, results = [], {}
    run_jobs(slow_root, [(float(x * x),) for x in range(5)], 2, started.append,
             lambda k, r: results.__setitem__(k, r))
    assert started == [0, 1, 2, 3, 4]
    assert {k: r[0] for k, r in results.items()} == {k: float(k) for k in range(5)}
    pids = {r[1] for r in results.values()}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2


def test_first_failure_stops_the_hand_out_and_is_raised():
    started, finished = [], []
    with pytest.raises(ValueError, match="math domain error"):
        run_jobs(slow_root, [(-1.0,), (4.0,), (9.0,), (16.0,)], 2, started.append,
                 lambda k, r: finished.append(k))
    assert started == [0, 1] and finished == []


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")
def test_workers_end_when_their_parent_is_killed(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    code = (f"import sys; sys.path[:0] = [{str(repo / 'tests')!r}, {str(repo)!r}]\n"
            "from test_jobs import sleeper\nfrom stages.common.jobs import run_jobs\n"
            f"run_jobs(sleeper, [({str(tmp_path)!r},)] * 2, 2)\n")
    parent = subprocess.Popen([sys.executable, "-c", code])
    pids: list[int] = []
    try:
        assert wait_until(lambda: len(list(tmp_path.iterdir())) == 2, 120), "the workers never started"
        pids = [int(p.name) for p in tmp_path.iterdir()]
        assert all(alive(p) for p in pids)
        parent.send_signal(signal.SIGKILL)  # no handler of the parent's can run
        parent.wait()
        assert wait_until(lambda: not any(alive(p) for p in pids), 15), "workers outlived their parent"
    finally:
        parent.kill()
        for p in pids:
            if alive(p):
                os.kill(p, signal.SIGKILL)
