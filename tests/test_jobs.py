"""`run_jobs`: calls handed to spawned processes a few at a time, results back in the
parent, the first failure stopping the hand-out and raised after the running calls end."""
from __future__ import annotations

import math
import os
import time

import pytest

from stages.common.jobs import run_jobs


def slow_root(x: float) -> tuple[float, int]:
    """sqrt(x) and the process that computed it; negative x fails at once, the others after 0.3 s."""
    if x >= 0:
        time.sleep(0.3)
    return math.sqrt(x), os.getpid()


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
