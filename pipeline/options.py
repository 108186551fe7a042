"""Options and helpers shared by several commands, each written once.

Each shared option is a factory (``out("Run folder ...")``) that fixes its flag names and
takes the command's own help text where the option means something command-specific;
options that read the same everywhere also have a ready ``Annotated`` alias (``FromCache``,
``Device``, ...). Defaults stay in the command signatures, where ``--help`` shows them.

Command modules import only typer, the standard library and ``pipeline.*`` at top level
(``stages`` lazily, inside the command), and so does this module: tests/test_dvc_deps.py
counts every CLI module's top-level imports in every DVC stage's dependencies.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, List, Optional

import typer
from typer.models import OptionInfo

# --- helpers ---------------------------------------------------------------------------


def parse_options(pairs: list[str] | None, flag: str) -> dict:
    """``KEY=VALUE`` pairs -> dict; values parsed as JSON when they are JSON (numbers, lists)."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"{flag} {pair!r}: expected KEY=VALUE")
        key, value = pair.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def storage_options(pairs: list[str] | None) -> dict | None:
    """``--storage-option`` pairs -> fsspec storage options (None when there are none).

    ``endpoint_url`` is moved into ``client_kwargs``, where s3fs expects it, so users can
    write the short form."""
    storage = parse_options(pairs, "--storage-option")
    if "endpoint_url" in storage:
        storage = {"client_kwargs": {"endpoint_url": storage.pop("endpoint_url")}, **storage}
    return storage or None


# --- option factories (flag names written once; help per command where it differs) ------


def out(help: str) -> OptionInfo:
    return typer.Option("--out", "-o", help=help)


def overwrite(help: str) -> OptionInfo:
    return typer.Option("--overwrite", help=help)


def as_json(help: str) -> OptionInfo:
    return typer.Option("--json", help=help)


def fmt(help: str) -> OptionInfo:
    return typer.Option("--format", "-f", help=help)


def checkpoint(help: str) -> OptionInfo:
    return typer.Option("--checkpoint", help=help)


def compression(help: str) -> OptionInfo:
    return typer.Option("--compression", help=help)


def seed(help: str) -> OptionInfo:
    return typer.Option("--seed", help=help)


def batch_size(help: Optional[str] = None) -> OptionInfo:
    return typer.Option("--batch-size", "-b", help=help)


def plots(help: str) -> OptionInfo:
    return typer.Option("--plots/--no-plots", help=help)


# training settings that `pipeline compare` passes through to every `pipeline train` run
def backbone(help: str) -> OptionInfo:
    return typer.Option("--backbone", help=help)


def backbone_weights(help: str) -> OptionInfo:
    return typer.Option("--backbone-weights", help=help)


def img_size(help: str) -> OptionInfo:
    return typer.Option("--img-size", help=help)


def epochs(help: str) -> OptionInfo:
    return typer.Option("--epochs", help=help)


def lr(help: str) -> OptionInfo:
    return typer.Option("--lr", help=help)


def patience(help: str) -> OptionInfo:
    return typer.Option("--patience", help=help)


def from_cache(help: str = "Feature store made by `pipeline extract`.", alias: Optional[str] = None) -> OptionInfo:
    return typer.Option(*((alias,) if alias else ()), "--from-cache", "-s", help=help)


# The dataset reader kinds named in a help text (extract's --dataset) are written out by
# hand; a registry listing (stages' list_datasets) can fill them in once it exists.
def dataset(help: str = "Dataset reader kind (default: the one recorded in the store).") -> OptionInfo:
    return typer.Option("--dataset", "-d", help=help)


def data_root(help: str = "Dataset location (default: the one recorded in the store).") -> OptionInfo:
    return typer.Option("--data-root", "-r", help=help)


def dataset_option(help: str = "Dataset reader option KEY=VALUE (repeatable).") -> OptionInfo:
    return typer.Option("--option", help=help)


def storage_option(help: str = "fsspec option KEY=VALUE for a remote store (repeatable).") -> OptionInfo:
    return typer.Option("--storage-option", help=help)


def device(help: Optional[str] = "auto (CUDA when present), cpu, cuda, cuda:1.") -> OptionInfo:
    return typer.Option("--device", help=help)


def precision(help: str = "auto (bf16/fp16 autocast on GPU, fp32 on CPU), fp32, bf16, fp16.") -> OptionInfo:
    return typer.Option("--precision", help=help)


def workers(help: str = "DataLoader processes (-1: automatic).") -> OptionInfo:
    return typer.Option("--workers", help=help)


def in_memory(help: str = "Load the embeddings into RAM first (2 MiB per sample); refused if they do not fit.") -> OptionInfo:
    return typer.Option("--in-memory", help=help)


def tta(help: str = "Classifiers: average the logits over the flips (with --augment rot, also the 90-degree "
        "rotations) the model was trained on, applied to the image and the SAM grid together "
        "(test-time augmentation; 4 or 8 forward passes per image).") -> OptionInfo:
    return typer.Option("--tta", help=help)


def quiet(help: Optional[str] = "No progress on stderr.") -> OptionInfo:
    return typer.Option("--quiet", "-q", help=help)


# --- options that read the same in every command that takes them -------------------------

FromCache = Annotated[str, from_cache()]
StoreDataset = Annotated[Optional[str], dataset()]  # default: the store's own reader
StoreDataRoot = Annotated[Optional[Path], data_root()]
DatasetOption = Annotated[Optional[List[str]], dataset_option()]
StorageOption = Annotated[Optional[List[str]], storage_option()]
Device = Annotated[str, device()]
Precision = Annotated[str, precision()]
Workers = Annotated[int, workers()]
InMemory = Annotated[bool, in_memory()]
Quiet = Annotated[bool, quiet()]
Tta = Annotated[bool, tta()]
