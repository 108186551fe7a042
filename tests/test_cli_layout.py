"""The CLI's layout rules that tests/test_dvc_deps.py and the error handling rely on."""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from pipeline.app import user_errors
from pipeline.cli import ORDER, app

PIPELINE = Path(__file__).resolve().parents[1] / "pipeline"


def command_name(info) -> str:
    return (info.name or info.callback.__name__).replace("_", "-")


def test_every_command_has_its_own_module_and_help_lists_them_in_workflow_order() -> None:
    names = [command_name(c) for c in app.registered_commands]
    assert names == list(ORDER)
    for info in app.registered_commands:
        fn = inspect.unwrap(info.callback)
        assert fn.__module__ == "pipeline.cmd_" + command_name(info).replace("-", "_")


def test_command_modules_import_stages_and_cache_only_inside_their_command() -> None:
    # a top-level import would land in every DVC stage's code deps (the entry point imports all)
    for path in sorted(PIPELINE.glob("*.py")):
        top = [n for n in ast.parse(path.read_text()).body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in top if isinstance(n, ast.ImportFrom) and not n.level]
        bad = [m for m in names if m.split(".")[0] in ("stages", "cache", "torch", "numpy", "zarr")]
        assert not bad, f"{path.name} imports {bad} at top level; import them inside the command"


def test_dataset_and_encoder_errors_are_user_errors_without_importing_them_in_the_app() -> None:
    from cache import StoreError
    from stages.datasets import BadImageError, DatasetError
    from stages.encoders import EncoderError

    for error in (DatasetError, BadImageError, EncoderError, StoreError, FileNotFoundError):
        assert issubclass(error, user_errors()), error
    assert not issubclass(RuntimeError, user_errors())  # a bug still shows its traceback


def test_a_bad_dataset_kind_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["extract", "--dataset", "nosuch", "--data-root", str(tmp_path),
                                      "--out", str(tmp_path / "s.zarr")])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nosuch" in lines[0]
    assert not (tmp_path / "s.zarr").exists()


def _help(command: str, param: str) -> str:
    import typer.main

    from pipeline.cli import app

    cmd = typer.main.get_command(app).commands[command]
    return next(p.help for p in cmd.params if p.name == param)


def test_help_names_every_registered_choice() -> None:
    """The choices a command's --help names are exactly the registries' (validation is the
    registries' own), so a new encoder, reader, classifier or head cannot go unlisted."""
    import re

    from stages.datasets import list_datasets
    from stages.encoders import list_encoders
    from stages.models import model_choices
    from stages.models.heads import list_heads

    for (command, param), names in {("extract", "dataset"): list_datasets(), ("extract", "encoder"): list_encoders(),
                                    ("train", "model"): model_choices(), ("train", "head"): list_heads(),
                                    ("compare", "models"): model_choices()}.items():
        text = _help(command, param)
        listed = set(re.findall(r"[a-z][a-z0-9_+-]*[a-z0-9+]", text))
        missing = [n for n in names if n not in listed]
        assert not missing, f"`pipeline {command} --{param}` help does not name {missing}: {text!r}"


@pytest.mark.parametrize("args, flags", [
    (["--task", "segment", "--model", "probe", "--augment", "rot"], "--augment, --model"),
    (["--task", "classify", "--head", "cnn"], "--head"),
    (["--head", "unet", "--labeled-volumes", "2"], "--head, --labeled-volumes"),
])
def test_train_refuses_an_option_of_the_other_task(tmp_path, args, flags):
    """Options one task does not have are refused, not silently ignored; before the store
    is opened (it need not exist) and before anything is written."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["train", "--from-cache", str(tmp_path / "none.zarr"), "--out", str(out), *args])
    task = "segment" if "segment" in args else "classify"
    assert r.exit_code == 2 and f"error: {flags}: not an option of --task {task}" in r.output, r.output
    assert not out.exists()


def test_every_train_option_reaches_the_config_of_its_tasks() -> None:
    """Each `pipeline train` option is a field of ClassifyConfig, SegmentConfig or both (per
    CLASSIFY_ONLY / SEGMENT_ONLY), so no option can be accepted and then dropped."""
    import dataclasses

    import typer.main

    from pipeline import cmd_train
    from stages.classify.config import ClassifyConfig
    from stages.segment.config import SegmentConfig

    params = {p.name for p in typer.main.get_command(app).commands["train"].params} - {"task", "quiet", "ctx"}
    classify = {f.name for f in dataclasses.fields(ClassifyConfig)}
    segment = {f.name for f in dataclasses.fields(SegmentConfig)}
    for name in sorted(params):
        field = cmd_train.RENAMED.get(name, name)
        if name not in cmd_train.SEGMENT_ONLY:
            assert field in classify, f"--{name} is not a ClassifyConfig field ({field})"
        if name not in cmd_train.CLASSIFY_ONLY:
            assert field in segment, f"--{name} is not a SegmentConfig field ({field})"


def test_train_help_shows_the_defaults_the_configs_use() -> None:
    """Only the options given reach the config (its own defaults fill the rest), so a default
    written in both places must agree there, or --help would state a value no run uses.
    A None in --help stands for a per-task default (e.g. --epochs); it is stated in words."""
    import dataclasses

    import typer.main

    from pipeline import cmd_train
    from stages.classify.config import ClassifyConfig
    from stages.segment.config import SegmentConfig

    configs = {"classify": ClassifyConfig, "segment": SegmentConfig}
    defaults = {task: {f.name: f.default for f in dataclasses.fields(c) if f.default is not dataclasses.MISSING}
                for task, c in configs.items()}
    checked = 0
    for p in typer.main.get_command(app).commands["train"].params:
        if p.name in ("task", "quiet", "ctx") or p.default is None:
            continue
        field = cmd_train.RENAMED.get(p.name, p.name)
        tasks = ["classify"] if p.name in cmd_train.CLASSIFY_ONLY else \
            ["segment"] if p.name in cmd_train.SEGMENT_ONLY else ["classify", "segment"]
        for task in tasks:
            if field in defaults[task]:
                want = defaults[task][field]
                assert p.default == want, f"--{p.name.replace('_', '-')}: --help says {p.default!r}, " \
                                          f"{configs[task].__name__} uses {want!r}"
                checked += 1
    assert checked >= 40
