"""benchmarks/gpu_check.sh, as far as a machine without a GPU can run it: it runs, says
what it skips, and writes its JSON into $OUT."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_reports_skips_and_writes_json_into_out(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable)
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--host-n", "0", "--skip-gpu-bench",
                        "--tests", "tests/test_hostpath.py", "--work", str(tmp_path / "work")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    result = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert result["complete"] is True and result["cores"] == os.cpu_count()
    tests = result["tests"]
    assert tests["ok"] and "-m cuda" in tests["cmd"]
    import torch

    if torch.cuda.is_available():
        assert tests["counts"].get("passed", 0) >= 1
    else:
        assert result["cuda"] is False and result["gpu"] is None
        assert tests["counts"].get("skipped", 0) >= 1 and not tests["counts"].get("passed")
        assert "needs a CUDA GPU" in "\n".join(tests["tail"])  # pytest's skip reason, shown
        assert "no CUDA device" in p.stderr and "no CUDA device" in result["bench"]["skipped"]
