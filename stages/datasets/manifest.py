"""CSV manifest datasets.

``root`` is the CSV file or a folder holding ``manifest.csv``. Header required; columns
(case-insensitive, extra columns ignored):
  path   image file, relative to the CSV's folder (required)
  label  class name; empty = unlabelled (-1) (required column)
  split  train | val | test | empty (valid/validation -> val) (optional)
  mask   mask file, relative like ``path`` (optional; all rows or none)
  id     sample id (optional; default = the normalised relative path)
  group  patient/volume id; stage two keeps a group inside one split (optional)

Paths may not leave the CSV's folder (``..``, absolute paths elsewhere, symlinks that
resolve outside) unless ``allow_outside_root=True``. Every problem (missing file,
duplicate id, unknown split or label, ...) is a DatasetError raised before any pixel is
read. Classes are the sorted label names (numerically when all are integers) unless
``classes`` fixes the list. Samples are sorted by id.
"""
from __future__ import annotations

import csv
import io
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from stages.datasets.base import DatasetError, Sample
from stages.datasets.files import SPLIT_ALIASES, FileDataset, natural_classes
from stages.datasets.imageio import MAX_PIXELS
from stages.datasets.registry import register_dataset

REQUIRED = ("path", "label")
_SHOW = 3  # how many offending rows an error message lists


def _rows_text(rows: list[int]) -> str:
    more = f" and {len(rows) - _SHOW} more" if len(rows) > _SHOW else ""
    return ", ".join(str(r) for r in rows[:_SHOW]) + more


def _read_csv(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text ({e}); save the manifest as UTF-8 CSV") from None
    reader = csv.reader(io.StringIO(text))
    header: list[str] | None = None
    rows: list[tuple[int, dict[str, str]]] = []
    for cells in reader:
        if not any(c.strip() for c in cells):
            continue
        if header is None:
            header = [c.strip().lower() for c in cells]
            dup = sorted({c for c in header if header.count(c) > 1})
            if dup:
                raise DatasetError(f"{path}: duplicate column(s) {dup} in the header; keep one of each")
            missing = [c for c in REQUIRED if c not in header]
            if missing:
                raise DatasetError(f"{path}: missing required column(s) {missing} (header is {header}); "
                                   "the first line must name the columns, e.g. path,label,split,mask")
            continue
        if len(cells) > len(header):
            raise DatasetError(f"{path}: line {reader.line_num} has {len(cells)} fields but the header has "
                               f"{len(header)}; quote values that contain commas")
        rows.append((reader.line_num, {k: v.strip() for k, v in zip(header, cells)}))
    if header is None or not rows:
        raise DatasetError(f"{path}: the manifest is empty; add a header (path,label[,split][,mask]) "
                           "and one row per image")
    return header, rows


def _resolve(cell: str, base: Path, base_real: Path, allow_outside: bool) -> tuple[Path, str] | None:
    """(file path, id-like relative path), or None when the path escapes ``base``."""
    p = Path(cell)
    full = p if p.is_absolute() else base / p
    real = full.resolve()
    inside = real.is_relative_to(base_real)
    if not inside and not allow_outside:
        return None
    norm = Path(os.path.normpath(full))
    try:
        rel = PurePosixPath(norm.relative_to(base)).as_posix()
    except ValueError:
        rel = norm.as_posix()
    return full, rel


def _refuse_nul(csv_path: Path, rows) -> None:
    """A path holding a NUL byte cannot even be looked up by the OS: name it, with its line."""
    for line, r in rows:
        for col in ("path", "mask"):
            if "\x00" in (r.get(col) or ""):
                raise DatasetError(f"{csv_path}: {col} {r[col]!r} on line {line} holds a NUL byte; fix the manifest")


@dataclass
class _Problems:
    """Row problems collected over the whole manifest, so one error can count them all."""

    escaped: list[tuple[int, str]] = field(default_factory=list)
    missing: list[tuple[int, Path]] = field(default_factory=list)
    bad_split: list[tuple[int, str]] = field(default_factory=list)
    no_path: list[int] = field(default_factory=list)
    no_mask: list[int] = field(default_factory=list)


# (line, id, label name, split, group, image, masks); split is None when unknown
_Entry = tuple[int, str, str, str | None, str, Path, tuple[Path, ...]]


def _manifest_path(root: Path) -> Path:
    """The CSV file ``root`` names: itself, or the ``manifest.csv`` in the folder."""
    if root.is_dir():
        csv_path = root / "manifest.csv"
        if not csv_path.is_file():
            raise DatasetError(f"{root}: no manifest.csv in this folder; pass the CSV file as --data-root "
                               "or create manifest.csv with columns path,label[,split][,mask]")
        return csv_path
    if root.is_file():
        return root
    raise DatasetError(f"{root}: no such file or folder; --data-root must be a CSV manifest "
                       "or a folder with manifest.csv")


def _check_mask_classes(csv_path: Path, has_mask: bool, mask_classes: list[str] | None) -> None:
    if mask_classes is not None and not has_mask:
        raise DatasetError(f"{csv_path}: mask_classes given but the manifest has no mask column; add a mask column")
    if mask_classes is not None and len(mask_classes) < 2:
        raise DatasetError(f"{csv_path}: mask_classes needs background plus at least one class, got {mask_classes}")


def _row_masks(line: int, mcell: str, base: Path, base_real: Path, allow_outside: bool,
               problems: _Problems) -> tuple[Path, ...]:
    """The mask of one row (a 1-tuple), or () after recording why it has none."""
    mgot = _resolve(mcell, base, base_real, allow_outside) if mcell else None
    if not mcell:
        problems.no_mask.append(line)
    elif mgot is None:
        problems.escaped.append((line, mcell))
    else:
        if not mgot[0].is_file():
            problems.missing.append((line, mgot[0]))
        return (mgot[0],)
    return ()


def _entries(rows: list[tuple[int, dict[str, str]]], base: Path, base_real: Path, has_mask: bool,
             allow_outside: bool, problems: _Problems) -> list[_Entry]:
    """One entry per row with a usable image path; every row problem goes to ``problems``."""
    entries: list[_Entry] = []
    for line, r in rows:
        cell = r.get("path", "")
        if not cell:
            problems.no_path.append(line)
            continue
        got = _resolve(cell, base, base_real, allow_outside)
        if got is None:
            problems.escaped.append((line, cell))
            continue
        image, rel = got
        if not image.is_file():
            problems.missing.append((line, image))
        masks: tuple[Path, ...] = ()
        if has_mask:
            masks = _row_masks(line, r.get("mask", ""), base, base_real, allow_outside, problems)
        split_cell = r.get("split", "").lower()
        split = SPLIT_ALIASES.get(split_cell, "" if not split_cell else None)
        if split is None:
            problems.bad_split.append((line, split_cell))
        entries.append((line, r.get("id") or rel, r.get("label", ""), split, r.get("group", ""), image, masks))
    return entries


def _raise_problems(csv_path: Path, base_real: Path, problems: _Problems) -> None:
    """The first kind of row problem, in a fixed order, as one DatasetError."""
    if problems.no_path:
        raise DatasetError(f"{csv_path}: empty path on line(s) {_rows_text(problems.no_path)}; "
                           "every row needs an image path")
    if problems.escaped:
        escaped = problems.escaped
        line, cell = escaped[0]
        raise DatasetError(f"{csv_path}: path(s) lead outside {base_real}: {cell!r} on line {line} "
                           f"({len(escaped)} such path(s), line(s) {_rows_text([e[0] for e in escaped])}); "
                           "keep files inside the manifest's folder (or pass allow_outside_root=True)")
    if problems.bad_split:
        line, value = problems.bad_split[0]
        raise DatasetError(f"{csv_path}: unknown split {value!r} on line {line} ({len(problems.bad_split)} row(s)); "
                           "use train, val, test or leave it empty")
    if problems.no_mask:
        raise DatasetError(f"{csv_path}: no mask on line(s) {_rows_text(problems.no_mask)} while other rows have "
                           "one; give every row a mask or drop the mask column")
    if problems.missing:
        line, p = problems.missing[0]
        raise DatasetError(f"{csv_path}: {len(problems.missing)} listed file(s) do not exist, first {p} "
                           f"(line {line}); fix the paths or remove the rows")


def _check_duplicate_ids(csv_path: Path, entries: list[_Entry]) -> None:
    lines_by_id: dict[str, list[int]] = defaultdict(list)
    for e in entries:
        lines_by_id[e[1]].append(e[0])
    dups = {k: v for k, v in lines_by_id.items() if len(v) > 1}
    if dups:
        k, v = next(iter(dups.items()))
        raise DatasetError(f"{csv_path}: duplicate id {k!r} on lines {_rows_text(v)} ({len(dups)} duplicated id(s)); "
                           "every row needs a unique path or id")


def _class_list(csv_path: Path, entries: list[_Entry], classes: list[str] | None) -> list[str]:
    """``classes`` as given (every label must be in it), else the natural order of the labels."""
    names = {e[2] for e in entries if e[2]}
    if classes is None:
        return natural_classes(names)
    class_list = list(classes)
    unknown = sorted(names - set(class_list))
    if unknown:
        line = next(e[0] for e in entries if e[2] == unknown[0])
        raise DatasetError(f"{csv_path}: unknown label {unknown[0]!r} on line {line} (unknown: {unknown[:5]}); "
                           f"labels must be one of {class_list}")
    return class_list


@register_dataset("csv")
def open_csv(
    root: str | Path,
    classes: list[str] | None = None,
    mask_classes: list[str] | None = None,
    max_pixels: int = MAX_PIXELS,
    allow_outside_root: bool = False,
) -> FileDataset:
    """Open a CSV manifest dataset (see module docstring). ``mask_classes`` defaults to
    ["background", "lesion"] (binary masks, non-zero = lesion) when there is a mask column."""
    csv_path = _manifest_path(Path(root))
    base = csv_path.parent
    base_real = base.resolve()
    header, rows = _read_csv(csv_path)
    has_mask = "mask" in header and any(r.get("mask", "") for _, r in rows)
    _check_mask_classes(csv_path, has_mask, mask_classes)
    _refuse_nul(csv_path, rows)
    problems = _Problems()
    entries = _entries(rows, base, base_real, has_mask, allow_outside_root, problems)
    _raise_problems(csv_path, base_real, problems)
    _check_duplicate_ids(csv_path, entries)
    class_list = _class_list(csv_path, entries, classes)
    index = {c: k for k, c in enumerate(class_list)}
    entries.sort(key=lambda e: e[1])
    ds = FileDataset(
        root=csv_path,
        kind="csv",
        samples=[Sample(id=e[1], label=index[e[2]] if e[2] else -1, split=e[3], group=e[4]) for e in entries],
        classes=class_list,
        mask_classes=(list(mask_classes) if mask_classes else ["background", "lesion"]) if has_mask else [],
        paths=[e[5] for e in entries],
        masks=[e[6] for e in entries] if has_mask else [],
        max_pixels=max_pixels,
    )
    ds.check_unique_ids()
    return ds
