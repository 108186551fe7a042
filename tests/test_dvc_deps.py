"""dvc.yaml's code ``deps`` cover every project module a stage's command can import.

DVC re-runs a stage only when one of its ``deps`` changed, so a module missing from a
stage's list means an edit to it leaves stale results that ``dvc repro`` calls up to date.
The closure is computed statically (``ast``), conservatively: the ``pipeline`` entry point
imports every CLI module (their top-level imports count), each stage adds the imports
inside its command's function, and every other module reached adds all its imports
(top-level and inside functions) and its parent packages' ``__init__``.
"""
from __future__ import annotations

import ast
import inspect
import os
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages", "cache")


def module_file(name: str) -> Path | None:
    """The source file of a project module (None for third-party ones)."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None  # a name imported from a module, not a module


def imports_of(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Absolute names of the modules ``tree`` imports anywhere (``from x import y``: x and,
    where y is a submodule, x.y)."""
    base = module if is_package else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base.split(".")
                parent = ".".join(parts[:len(parts) - node.level + 1])
                name = f"{parent}.{node.module}" if node.module else parent
            else:
                name = node.module or ""
            out.add(name)
            out.update(f"{name}.{a.name}" for a in node.names)
    return {n for n in out if n and module_file(n) is not None}


def with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def is_command_module(name: str) -> bool:
    return name.startswith("pipeline.cmd_")  # pipeline/cmd_<command>.py, one per command


def closure(roots: set[str]) -> set[Path]:
    seen: set[str] = set()
    todo = [p for r in roots for p in with_parents(r)]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = module_file(name)
        if path is None:
            continue
        tree = ast.parse(path.read_text())
        if is_command_module(name):  # its commands' own imports run only for that command
            tree = ast.Module(body=[n for n in tree.body if not isinstance(n, ast.FunctionDef)], type_ignores=[])
        todo.extend(p for m in imports_of(tree, name, path.name == "__init__.py") for p in with_parents(m))
    return {module_file(n).resolve().relative_to(ROOT) for n in seen if module_file(n) is not None}


def command_roots(command: str) -> set[str]:
    """What running ``pipeline <command>`` can import: the entry module (which imports every
    CLI module's top level) plus every import anywhere in the command's own module (one
    module per command: its helpers run for it alone)."""
    from pipeline.cli import app

    match = [c for c in app.registered_commands if (c.name or c.callback.__name__.replace("_", "-")) == command]
    assert match, f"dvc.yaml runs `pipeline {command}`, which the CLI does not have"
    module = inspect.unwrap(match[0].callback).__module__
    tree = ast.parse(module_file(module).read_text())
    return {"pipeline.cli"} | imports_of(tree, module, False)


def stage_commands(stage: dict) -> list[str]:
    cmds = stage["cmd"] if isinstance(stage["cmd"], list) else [stage["cmd"]]
    found = [m for c in cmds for m in re.findall(r"\$\{pipeline\}\s+([a-z][a-z-]*)", c)]
    assert found, f"stage command {cmds} does not run `${{pipeline}} <command>`"
    return found


def stages() -> list[tuple[str, dict]]:
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return [(name, s.get("do", s)) for name, s in spec.items()]


@pytest.mark.parametrize("name,stage", stages(), ids=[n for n, _ in stages()])
def test_stage_deps_cover_the_import_closure(name: str, stage: dict) -> None:
    deps = [Path(d) for d in stage.get("deps", []) if "${" not in d]
    roots = set().union(*(command_roots(c) for c in stage_commands(stage)))
    needed = closure(roots)
    missing = sorted(str(f) for f in needed if not any(f == d or d in f.parents for d in deps))
    assert not missing, f"dvc.yaml stage {name!r}: deps lack modules its command imports: {missing}"


def test_closure_follows_lazy_and_relative_imports() -> None:
    # the train command imports stages.classify lazily, and through it stages.common
    files = closure(command_roots("train"))
    assert Path("stages/classify/train.py") in files
    assert Path("cache/writer.py") in files  # through `from cache import ...` in a lazily imported module
    assert Path("pipeline/cmd_report.py") in files  # the entry point imports every CLI module
    assert Path("stages/common/training.py") in files


def test_a_command_depends_only_on_what_it_runs() -> None:
    # the report reads JSON summaries: no dataset reader, encoder or torch model code
    files = closure(command_roots("report"))
    assert Path("stages/report.py") in files
    heavy = sorted(str(f) for f in files if f.parts[:2] in (("stages", "datasets"), ("stages", "encoders"),
                                                              ("stages", "classify"), ("stages", "models")))
    assert not heavy, f"`pipeline report` imports {heavy}"
    assert Path("stages/classify/train.py") not in closure(command_roots("extract"))


@pytest.mark.dvc
def test_committed_lock_matches_the_code(tmp_path: Path) -> None:
    """A fresh clone's `dvc status` finds no stage whose code, command or params changed
    since dvc.lock was written (missing data and outputs are expected in a clone)."""
    import io
    import json
    import shutil
    import subprocess
    import sys
    import tarfile

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    # the committed tree, as a fresh clone has it (dvc repro rewrites the working copy's lock)
    archive = subprocess.run(["git", "archive", "--format=tar", "HEAD"], cwd=ROOT, capture_output=True)
    if archive.returncode != 0:
        pytest.skip(f"{ROOT} is not a git checkout with a commit")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(tmp_path, filter="data")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True, env=env)
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, check=True)
    changed = {}
    for stage, entries in json.loads(status.stdout or "{}").items():
        for entry in entries:
            if isinstance(entry, str):  # "changed command", "always changed"
                changed.setdefault(stage, []).append(entry)
                continue
            for path, what in entry.get("changed deps", {}).items():
                if what != "deleted":  # data and upstream outputs are absent in a clone
                    changed.setdefault(stage, []).append(f"{path}: {what}")
    assert not changed, f"dvc.lock is stale (run `dvc repro` and commit dvc.lock and reports/): {changed}"
