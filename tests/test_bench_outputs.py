"""The benchmark scripts follow the CLI's rule: they write and delete only in a scratch folder
they made, and replace a result JSON only when it is one of theirs. Refusals happen before
any work, in one line naming the path, and leave the user's files as they were."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_run import snapshot

from benchmarks._util import SCRATCH_MARK, check_out_json, scratch_folder

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *args, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def one_error_line(p: subprocess.CompletedProcess, path: Path) -> None:
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1, (p.returncode, p.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], p.stderr


@pytest.fixture()
def user_folder(tmp_path):
    d = tmp_path / "thesis"
    d.mkdir()
    (d / "codec.zarr").write_text("my draft, under a name the benchmark uses")
    return d


def test_scratch_folder_is_new_empty_or_marked(tmp_path, user_folder):
    fresh = scratch_folder(None, "t_")
    assert fresh.is_dir() and sorted(p.name for p in fresh.iterdir()) == [SCRATCH_MARK]
    made = scratch_folder(tmp_path / "a" / "work", "t_")
    (made / "codec.zarr").mkdir()
    assert scratch_folder(made, "t_") == made  # its own, reused with what it wrote
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (scratch_folder(empty, "t_") / SCRATCH_MARK).is_file()
    link = tmp_path / "link"
    link.symlink_to(empty)
    (tmp_path / "file").write_text("keep")
    for bad in (user_folder, link, tmp_path / "file"):
        before = snapshot(bad)
        with pytest.raises(SystemExit, match=f"error: {bad}"):
            scratch_folder(bad, "t_")
        assert snapshot(bad) == before
    assert not (user_folder / SCRATCH_MARK).exists()


def test_result_json_is_replaced_only_when_it_is_the_benchmarks(tmp_path):
    keys = ("args", "results", "seconds")
    ours = tmp_path / "results.json"
    assert check_out_json(ours, keys) == ours  # absent
    ours.write_text(json.dumps({"args": {}, "results": [], "seconds": 1.0}))
    assert check_out_json(ours, keys) == ours
    theirs = tmp_path / "notes.json"
    theirs.write_text(json.dumps({"results": "my own"}))
    link = tmp_path / "link.json"
    link.symlink_to(ours)
    for bad in (theirs, link, tmp_path):
        with pytest.raises(SystemExit, match=f"error: {bad}: exists and is not a result"):
            check_out_json(bad, keys)


def test_bench_compressors_refuses_a_users_work_folder_before_writing(tmp_path, user_folder):
    before = snapshot(user_folder)
    one_error_line(run_script("bench_compressors.py", "--work", user_folder, "--samples", "2", cwd=tmp_path),
                   user_folder)
    assert snapshot(user_folder) == before


def test_gpu_check_refuses_a_users_json_and_work_folder_before_the_tests(tmp_path, user_folder):
    mine = tmp_path / "gpu_check.json"
    mine.write_text('{"my": "results"}')
    p = run_script("gpu_check.py", "--out", mine, "--tests", "tests/test_structure.py", "--work", tmp_path / "w",
                   cwd=tmp_path)
    one_error_line(p, mine)
    assert mine.read_text() == '{"my": "results"}' and not (tmp_path / "w").exists()
    p = run_script("gpu_check.py", "--out", tmp_path / "new.json", "--work", user_folder, cwd=tmp_path)
    one_error_line(p, user_folder)
    assert not (tmp_path / "new.json").exists() and sorted(snapshot(user_folder)) == ["codec.zarr"]


def test_bench_segment_refuses_a_users_results_json_before_training(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("[1, 2, 3]")
    p = run_script("bench_segment.py", "--out", out, "--store", tmp_path / "none.zarr", "--data-root",
                   tmp_path / "nowhere", cwd=tmp_path)
    one_error_line(p, out / "results.json")
    assert (out / "results.json").read_text() == "[1, 2, 3]" and not (tmp_path / "none.zarr").exists()


def test_bench_classify_refuses_a_users_work_folder_before_writing(tmp_path, user_folder):
    data = tmp_path / "pneumoniamnist.npz"
    data.write_bytes(b"")  # refused before it is read
    before = snapshot(user_folder)
    one_error_line(run_script("bench_classify.py", "--data", data, "--work", user_folder, cwd=tmp_path), user_folder)
    assert snapshot(user_folder) == before


def test_bench_extract_refuses_a_users_work_folder_before_writing(tmp_path, user_folder):
    before = snapshot(user_folder)
    one_error_line(run_script("bench_extract.py", "--work", user_folder, "--sections", "3", cwd=tmp_path),
                   user_folder)
    assert snapshot(user_folder) == before
