"""Is this output path ours? Refuse what is not; delete only what we wrote.

Every command that writes asks here first. A path is one of:

- ``absent`` or ``empty`` (an empty folder / an S3 prefix with no objects): free to use;
- ``ours``: a feature store (a Zarr group whose ``format`` attribute is ``schema.FORMAT``);
- ``foreign``: anything else (a file, a non-empty folder without a store, a Zarr group or
  HDF5 file written by another program, a prefix holding other objects, a store whose
  ``zarr.json`` cannot be read). Foreign paths are refused even with ``--overwrite``:
  nothing the user already has is ever deleted, the way ``git clone`` refuses a non-empty
  folder and zarr's ``mode="w-"`` refuses an existing node.

``remove_store`` deletes only the files a store consists of (its ``zarr.json``, the
arrays named in ``schema`` and their chunks, zarr's ``*.partial`` temporaries); a file
the user put inside the store folder survives, and the folder is removed only if empty.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from . import io
from .schema import EMBEDDINGS, FORMAT, LISTING, RESULTS, SCALE
from .signature import StoreError

# the top-level entries a store of ours is made of (see schema and writer._create)
STORE_ARRAYS = (EMBEDDINGS, SCALE, *LISTING, *RESULTS)


class ForeignPathError(StoreError):
    """The output path holds something this project did not write (exit code 2)."""


def _fs(url: str, storage_options: dict[str, Any] | None):
    import fsspec

    fs, path = fsspec.core.url_to_fs(str(url), **(storage_options or {}))
    return fs, path.rstrip("/")


def _store_kind(text: bytes | str) -> str:
    """``ours`` or ``foreign`` from the bytes of a root ``zarr.json``."""
    try:
        meta = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        return "foreign"
    attrs = meta.get("attributes") if isinstance(meta, dict) else None
    if meta.get("node_type") == "group" and isinstance(attrs, dict) and attrs.get("format") == FORMAT:
        return "ours"
    return "foreign"


def store_state(url: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> tuple[str, str]:
    """(kind, why): kind is absent | empty | ours | foreign; ``why`` describes a foreign path."""
    url = str(url)
    if io.is_remote(url):
        fs, path = _fs(url, storage_options)
        try:
            if fs.isfile(path):
                return "foreign", "it is an object, not a store prefix"
            names = [n.rstrip("/").rsplit("/", 1)[-1] for n in fs.ls(path, detail=False, refresh=True)]
        except FileNotFoundError:
            return "absent", ""
        if not names:
            return "empty", ""
        if "zarr.json" not in names:
            return "foreign", f"the prefix holds {len(names)} object(s) that are not a feature store"
        kind = _store_kind(fs.cat_file(path + "/zarr.json"))
        return kind, "" if kind == "ours" else "it holds a Zarr group not written by this project"
    p = io.local_path(url)
    if not p.exists() and not p.is_symlink():
        return "absent", ""
    if not p.is_dir():
        return "foreign", "it is a file, not a store folder"
    meta = p / "zarr.json"
    if not meta.is_file():
        # zarr's own temporaries (a writer killed while creating zarr.json) do not count
        others = [q for q in p.iterdir() if not io.is_partial(q.name)]
        return ("empty", "") if not others else ("foreign", "the folder is not empty and holds no store")
    kind = _store_kind(meta.read_bytes())
    why = "it holds a Zarr group not written by this project (or its zarr.json is damaged)"
    return kind, "" if kind == "ours" else why


def check_store_target(url: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> str:
    """Refuse (ForeignPathError naming the path) unless ``url`` is absent, empty or ours;
    returns the kind."""
    kind, why = store_state(url, storage_options)
    if kind == "foreign":
        raise ForeignPathError(f"{url}: exists and is not a feature store ({why}); nothing was changed, "
                               "choose another --out (--overwrite replaces only a store this project wrote)")
    return kind


def remove_store(url: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> None:
    """Delete the store at ``url`` after proving it ours: only its own entries."""
    url = str(url)
    kind = check_store_target(url, storage_options)
    if kind in ("absent", "empty"):
        return
    if io.is_remote(url):
        fs, path = _fs(url, storage_options)
        doomed = [f for f in fs.find(path) if _is_store_file(f[len(path) + 1:])]
        if doomed:
            fs.rm(doomed)
        fs.invalidate_cache(path)
        return
    root = io.local_path(url)
    for f in sorted(root.rglob("*"), key=lambda q: len(q.parts), reverse=True):
        rel = f.relative_to(root).as_posix()
        if f.is_dir() and not f.is_symlink():
            if rel.split("/", 1)[0] in STORE_ARRAYS and not any(f.iterdir()):
                f.rmdir()
        elif _is_store_file(rel):
            f.unlink()
    if not any(root.iterdir()):
        root.rmdir()


def _is_store_file(rel: str) -> bool:
    """A path relative to a store's root that the store itself consists of."""
    if rel == "zarr.json" or io.is_partial(rel.rsplit("/", 1)[-1]):
        return True
    head, _, rest = rel.partition("/")
    return head in STORE_ARRAYS and (rest == "zarr.json" or rest.startswith("c/"))


# --- plain output files and run folders --------------------------------------------------
def check_file_target(path: str | os.PathLike, *, overwrite: bool, is_ours, what: str, flag: str = "--out") -> None:
    """Refuse to write the file ``path`` unless it is absent, or ours and ``overwrite``.

    ``is_ours(path) -> bool`` recognises a file this project wrote."""
    p = Path(path)
    if not p.exists() and not p.is_symlink():
        return
    if p.is_symlink():  # the write would land on its target
        raise ForeignPathError(f"{p}: is a link; nothing was changed, choose another {flag}")
    if p.is_dir():
        raise ForeignPathError(f"{p}: is a folder, not a {what} file; nothing was changed, choose another {flag}")
    if not is_ours(p):
        raise ForeignPathError(f"{p}: exists and was not written by this project (not a {what}); nothing was "
                               f"changed, choose another {flag}")
    if not overwrite:
        raise ForeignPathError(f"{p}: exists; choose another {flag} or pass --overwrite to replace it")


def check_folder_target(path: str | os.PathLike, flag: str = "--out") -> Path:
    """An output folder (absent or a folder; never a file): returns it as a Path."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ForeignPathError(f"{p}: is a file, not a folder; nothing was changed, choose another {flag}")
    return p


# files whose presence says "a run of pipeline train lives here"
RUN_MARKERS = ("config.json", "model.pt", "last.pt")


def prepare_run_folder(path: str | os.PathLike, *, outputs: Sequence[str], markers: Iterable[str], is_marker,
                       overwrite: bool, resume: bool, command: str = "pipeline train") -> Path:
    """Make ``path`` ready for a training run and return it.

    A folder holding an earlier run (any of ``markers``, e.g. config.json/model.pt/last.pt,
    each recognised by its content: ``is_marker(path) -> bool``) is resumed with ``resume``,
    replaced with ``overwrite`` (only the files in ``outputs`` are deleted; a name ending in
    "/" is a folder of our PNGs, deleted with them), and otherwise refused. A marker name
    holding something else (a user's own config.json or model.pt) is refused with or without
    either flag, and so is a non-empty folder without a run: names alone would let
    ``--overwrite`` delete a user's file that happens to share a run's file name. Resuming or
    replacing a run is refused, too, where an output name is a link (writes would land
    elsewhere), a PNG without our ``PNG_TEXT``, or a folder holding anything but such PNGs
    (resuming would write over a user's picture of the same name)."""
    out = check_folder_target(path)
    if not out.exists():
        out.mkdir(parents=True)
        return out
    earlier = [m for m in markers if (out / m).exists() or (out / m).is_symlink()]
    foreign = [m for m in earlier if (out / m).is_symlink() or not (out / m).is_file() or not is_marker(out / m)]
    if foreign:
        raise ForeignPathError(f"{out / foreign[0]}: not written by `{command}`; nothing was changed, "
                               "choose another --out")
    if not earlier:
        if any(out.iterdir()):
            raise ForeignPathError(f"{out}: the folder is not empty and holds no run of `{command}` (no "
                                   f"{'/'.join(markers)}); nothing was changed, choose another --out")
        return out
    taken = [name for name in outputs if _present(out / name.rstrip("/"))
             and not _replaceable(out / name.rstrip("/"), name.endswith("/"))]
    if taken and (resume or overwrite):
        raise ForeignPathError(f"{out / taken[0].rstrip('/')}: not written by `{command}`; nothing was changed, "
                               "choose another --out")
    if resume:
        return out
    if not overwrite:
        raise ForeignPathError(f"{out}: holds an earlier training run ({', '.join(earlier)}); pass --resume to "
                               "continue it or --overwrite to start over")
    for target in (out / name.rstrip("/") for name in outputs):
        _remove_output(target)
    return out


def _present(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _replaceable(entry: Path, folder: bool) -> bool:
    """May an output of ours at ``entry`` be replaced? Never a link; a ``folder`` output is a
    folder holding only PNGs with our ``PNG_TEXT``; a file output is a file, and a PNG only
    with that mark (other files are known by the folder's marker files)."""
    if entry.is_symlink():
        return False
    if folder:
        return entry.is_dir() and all(f.suffix == ".png" and is_marked_png(f) for f in entry.iterdir())
    return entry.is_file() and (entry.suffix != ".png" or is_marked_png(entry))


def _remove_output(target: Path) -> None:
    """Delete an output that ``_replaceable`` accepted: a file, or a folder's marked PNGs and
    then the folder once empty."""
    if target.is_dir() and not target.is_symlink():
        for f in target.glob("*.png"):
            if is_marked_png(f):
                f.unlink()
        if not any(target.iterdir()):
            target.rmdir()
    elif target.is_file() and not target.is_symlink():
        target.unlink()


def prepare_output_folder(path: str | os.PathLike, *, outputs: Sequence[str], marker: str, is_ours,
                          overwrite: bool, command: str, flag: str = "--out") -> Path:
    """Make ``path`` ready for a command that writes a few files into a folder of the user's
    choosing, and return it. Used as it is when absent or empty. A folder holding only an
    earlier output of ``command`` (entries named in ``outputs``, where a name ending in "/" is
    a folder of our PNGs, beside a ``marker`` file that ``is_ours`` recognises; every PNG
    carrying ``PNG_TEXT``; no links) is refused, or with ``overwrite`` emptied of those
    entries. Anything else in it is refused, with or without ``overwrite``: nothing is written
    beside a file we did not write, which the command's outputs could replace or (a
    history.csv) read."""
    out = check_folder_target(path, flag)
    entries = sorted(out.iterdir()) if out.exists() else []
    if not entries:
        out.mkdir(parents=True, exist_ok=True)
        return out
    folders = {name.rstrip("/") for name in outputs if name.endswith("/")}
    foreign = [e.name for e in entries
               if not ((e.name in outputs or e.name in folders) and _replaceable(e, e.name in folders))]
    if not foreign and not ((out / marker).is_file() and is_ours(out / marker)):
        foreign = [marker if (out / marker).exists() else entries[0].name]
    if foreign:
        raise ForeignPathError(f"{out / foreign[0]}: not written by `{command}`; nothing was changed, "
                               f"choose a new or empty {flag}")
    if not overwrite:
        raise ForeignPathError(f"{out}: holds an earlier `{command}` output; choose another {flag} or pass "
                               "--overwrite to replace it")
    for entry in entries:
        _remove_output(entry)
    return out


# every PNG this project writes carries this tEXt chunk (matplotlib ``savefig(metadata=PNG_TEXT)``,
# PIL ``PngInfo``), so a user's picture under one of our file names is told apart from ours
PNG_TEXT = {"Software": "sam-feature-pipeline"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def is_png(path: Path) -> bool:
    """A regular file (not a link) starting with the PNG signature, marked or not."""
    try:
        if Path(path).is_symlink():
            return False
        with open(path, "rb") as f:
            return f.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE
    except OSError:
        return False


def is_marked_png(path: Path) -> bool:
    """A PNG file (not a link) carrying ``PNG_TEXT`` in a tEXt chunk before its image data."""
    (key, value), = PNG_TEXT.items()
    want = key.encode("latin-1") + b"\0" + value.encode("latin-1")
    try:
        if Path(path).is_symlink():
            return False
        with open(path, "rb") as f:
            if f.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
                return False
            while True:
                head = f.read(8)
                if len(head) < 8 or head[4:] in (b"IDAT", b"IEND"):
                    return False
                size = int.from_bytes(head[:4], "big")
                body = f.read(size + 4)[:size]
                if head[4:] == b"tEXt" and body == want:
                    return True
    except OSError:
        return False


def is_json_with_keys(path: Path, keys: Iterable[str]) -> bool:
    """A JSON object holding every one of ``keys`` (how we recognise our metrics.json files)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and all(k in data for k in keys)


def is_text_with_header(path: Path, header: str) -> bool:
    """A text file whose first line starts with ``header`` (how we recognise our CSVs/reports)."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().startswith(header)
    except (OSError, UnicodeDecodeError):
        return False


__all__ = ["ForeignPathError", "PNG_SIGNATURE", "PNG_TEXT", "RUN_MARKERS", "check_file_target",
           "check_folder_target", "check_store_target", "is_marked_png", "is_png", "is_text_with_header",
           "prepare_run_folder", "remove_store", "store_state"]
