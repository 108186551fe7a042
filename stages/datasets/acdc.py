"""ACDC cardiac MRI in the common preprocessed HDF5 layout.

  root/data/patientNNN_frameMM_slice_K.h5   2D training slice: ``image`` (H,W) float32 0..1,
                                            ``label`` (H,W) uint8 0..3
  root/data/patientNNN_frameMM.h5           3D volume: ``image``/``label`` (slices,H,W)
  root/train_slices.list                    training slice names (one per line)
  root/train.list, val.list, test.list      volume names (test.list optional)

Samples: the slices of ``train_slices.list`` (split train; when that list is absent, all
slice files of the volumes in ``train.list``, or the volume file itself), then every
slice of each volume of ``val.list`` (val) and ``test.list`` (test). Group = volume id
(``patient028_frame01``), index_in_group = slice position (slice file ``_slice_K`` is
position K-1: the files count from 1; if any listed K is 0 they count from 0). Sample id =
``<volume>/slice_<index, 2 digits>``, so one anatomical slice has the same id whether it
comes from a slice file or a volume. Sorted by split (train, val, test), volume, index.

mask_classes = background, RV, Myo, LV; no image-level classes (labels -1). Spacing (z,y,x
mm) is read from a ``spacing`` attribute or dataset of the volume files (val/test) when
present. Files are opened lazily; the last opened one stays open (slices of one volume
are read in order).
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from stages.datasets.base import BadImageError, Dataset, DatasetError, Sample
from stages.datasets.imageio import MAX_PIXELS, check_array
from stages.datasets.registry import register_dataset

MASK_CLASSES = ["background", "RV", "Myo", "LV"]
_SLICE = re.compile(r"^(?P<vol>.+)_slice_(?P<k>\d+)$")


def _read_list(path: Path) -> list[tuple[int, str]]:
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        name = line.strip()
        if name and not name.startswith("#"):
            out.append((n, name.removesuffix(".h5")))
    return out


def _spacing(f: h5py.File, path: Path) -> tuple[float, float, float] | None:
    value = f.attrs.get("spacing")
    if value is None and "spacing" in f:
        value = f["spacing"][()]
    if value is None:
        return None
    v = np.asarray(value, dtype=np.float64).reshape(-1)
    if v.size != 3 or not (np.isfinite(v).all() and (v > 0).all()):
        raise DatasetError(f"{path}: spacing {v.tolist()} is not 3 positive numbers (z, y, x mm); fix or remove it")
    return (float(v[0]), float(v[1]), float(v[2]))


@dataclass
class AcdcDataset(Dataset):
    """``entries[i]`` = (h5 file, slice position in the file, or -1 for a 2D slice file)."""

    entries: list[tuple[Path, int]] = field(default_factory=list)
    max_pixels: int = MAX_PIXELS
    _open: tuple[Path, h5py.File] | None = field(default=None, init=False, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def _file(self, path: Path) -> h5py.File:
        if self._open is not None and self._open[0] == path:
            return self._open[1]
        self.close()
        try:
            f = h5py.File(path, "r")
        except OSError as e:
            raise BadImageError(f"{path}: cannot open HDF5 file ({e}); the file is corrupt, re-create it") from None
        self._open = (path, f)
        return f

    def close(self) -> None:
        """Close the cached HDF5 file (reopened on the next load)."""
        if self._open is not None:
            self._open[1].close()
            self._open = None

    def _read(self, i: int, key: str) -> tuple[np.ndarray, tuple[int, ...], str]:
        path = self.entries[i][0]
        try:
            return self._read_unchecked(i, key)
        except DatasetError:
            raise
        except (OSError, RuntimeError, KeyError, ValueError, TypeError) as e:  # what h5py raises on a damaged file
            try:
                self.close()
            except Exception:  # closing a damaged file may fail too; it is dropped either way
                self._open = None
            raise BadImageError(f"{path}: cannot read {key!r} ({type(e).__name__}: {e}); the file is corrupt, "
                                "re-create it") from None

    def _read_unchecked(self, i: int, key: str) -> tuple[np.ndarray, tuple[int, ...], str]:
        path, k = self.entries[i]
        with self._lock:
            f = self._file(path)
            if key not in f or "image" not in f:
                raise BadImageError(f"{path}: no {key!r} dataset; ACDC files need 'image' and 'label'")
            ds = f[key]
            want = 2 if k < 0 else 3
            if ds.ndim != want:
                raise BadImageError(f"{path}: {key!r} has shape {ds.shape}, expected {want}D; "
                                    "slice files hold (H,W), volume files (slices,H,W)")
            if k >= ds.shape[0] and k >= 0:
                raise BadImageError(f"{path}: {key!r} has {ds.shape[0]} slices, slice {k} requested; "
                                    "the file changed since the dataset was opened")
            a = ds[()] if k < 0 else ds[k]
            image_shape = f["image"].shape[-2:]
        return a, image_shape, f"{path}[{key}]" + ("" if k < 0 else f"[{k}]")

    def load_image(self, i: int) -> np.ndarray:
        """(H,W) float32 intensities (0..1 in the preprocessed files)."""
        a, _, where = self._read(i, "image")
        return check_array(a, where, self.max_pixels)

    def load_mask(self, i: int) -> np.ndarray:
        """(H,W) uint8 labels 0..3 (background, RV, Myo, LV)."""
        a, shape, where = self._read(i, "label")
        if a.shape != tuple(shape):
            raise BadImageError(f"{where}: label is {a.shape} but image is {tuple(shape)}; fix the file")
        if a.dtype.kind == "f":
            if not (np.isfinite(a).all() and (a == np.round(a)).all()):
                raise BadImageError(f"{where}: non-integer label values; labels must be 0..3")
        if a.size and (a.min() < 0 or a.max() >= len(self.mask_classes)):
            raise BadImageError(f"{where}: label values {int(a.min())}..{int(a.max())} outside 0..3 "
                                f"{self.mask_classes}; fix the file")
        return a.astype(np.uint8)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_open"], state["_lock"] = None, None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _volume_info(path: Path) -> tuple[int, tuple[float, float, float] | None]:
    """(number of slices, spacing) of a volume file, checking its datasets."""
    try:
        with h5py.File(path, "r") as f:
            if "image" not in f or "label" not in f:
                raise DatasetError(f"{path}: needs 'image' and 'label' datasets (found {sorted(f)}); "
                                   "use the preprocessed ACDC layout")
            im, lab = f["image"], f["label"]
            if im.ndim != 3 or lab.shape != im.shape:
                raise DatasetError(f"{path}: volume 'image' {im.shape} / 'label' {lab.shape} must both be "
                                   "(slices,H,W) of one shape")
            return im.shape[0], _spacing(f, path)
    except OSError as e:
        raise DatasetError(f"{path}: cannot open HDF5 file ({e}); re-create or remove it") from None


def _layout(root: Path) -> tuple[Path, dict[str, Path]]:
    """(data folder, list files by name) of an ACDC folder, refusing a folder that is not one."""
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder; --data-root must be the ACDC folder holding data/ "
                           "and the .list files")
    data = root / "data"
    if not data.is_dir():
        raise DatasetError(f"{root}: no data/ folder; the ACDC layout is root/data/*.h5 plus train_slices.list, "
                           "train.list, val.list")
    lists = {n: root / f"{n}.list" for n in ("train_slices", "train", "val", "test")}
    if not any(p.is_file() for p in lists.values()):
        raise DatasetError(f"{root}: none of train_slices.list, train.list, val.list, test.list exist; "
                           "add the list files")
    return data, lists


@dataclass
class _Listing:
    """What the list files name: found slices, missing files (all reported at once), spacing."""

    data: Path
    missing: list[str] = field(default_factory=list)
    found: list[tuple[str, str, int, Path, int]] = field(default_factory=list)  # split, volume, index, file, pos
    spacing: dict[str, tuple[float, float, float]] = field(default_factory=dict)

    def add_volume(self, split: str, vol: str, where: str) -> None:
        path = self.data / f"{vol}.h5"
        if not path.is_file():
            self.missing.append(f"{path.name} ({where})")
            return
        n, sp = _volume_info(path)
        self.found.extend((split, vol, k, path, k) for k in range(n))
        if sp is not None:
            self.spacing[vol] = sp


def _add_train_slices(listing: _Listing, list_path: Path) -> None:
    """The slice files ``train_slices.list`` names (split train)."""
    parsed = []
    for n, name in _read_list(list_path):
        m = _SLICE.match(name)
        if not m:
            raise DatasetError(f"{list_path}: line {n} {name!r} is not a slice name "
                               "(<volume>_slice_<K>); fix the list")
        parsed.append((n, name, m["vol"], int(m["k"])))
    first = 0 if any(k == 0 for *_, k in parsed) else 1
    for n, name, vol, k in parsed:
        path = listing.data / f"{name}.h5"
        if path.is_file():
            listing.found.append(("train", vol, k - first, path, -1))
        else:
            listing.missing.append(f"{path.name} (train_slices.list line {n})")


def _add_train_volumes(listing: _Listing, list_path: Path) -> None:
    """The volumes ``train.list`` names: their slice files, or the volume file itself."""
    for n, vol in _read_list(list_path):
        files = [(int(m["k"]), p) for p in listing.data.glob(f"{vol}_slice_*.h5")
                 if (m := _SLICE.match(p.stem)) and m["vol"] == vol]
        if files:
            first = min(k for k, _ in files)
            first = 0 if first == 0 else 1
            listing.found.extend(("train", vol, k - first, p, -1) for k, p in files)
        else:
            listing.add_volume("train", vol, f"train.list line {n}")


def _check_splits(root: Path, listing: _Listing) -> None:
    """No missing file, and no volume in two splits (that would leak it across train/val/test)."""
    missing = listing.missing
    if missing:
        raise DatasetError(f"{root}: {len(missing)} listed file(s) missing in data/, first {missing[0]}; "
                           "fix the lists or restore the files")
    splits_of: dict[str, set[str]] = {}
    for split, vol, *_ in listing.found:
        splits_of.setdefault(vol, set()).add(split)
    leaks = sorted(v for v, s in splits_of.items() if len(s) > 1)
    if leaks:
        raise DatasetError(f"{root}: volume {leaks[0]} is listed in several splits {sorted(splits_of[leaks[0]])} "
                           f"({len(leaks)} volume(s)); each volume belongs to one split")


@register_dataset("acdc-h5")
def open_acdc(root: str | Path, max_pixels: int = MAX_PIXELS) -> AcdcDataset:
    """Open a preprocessed ACDC folder (see module docstring)."""
    root = Path(root)
    data, lists = _layout(root)
    listing = _Listing(data)
    if lists["train_slices"].is_file():
        _add_train_slices(listing, lists["train_slices"])
    elif lists["train"].is_file():
        _add_train_volumes(listing, lists["train"])
    for split in ("val", "test"):
        if lists[split].is_file():
            for n, vol in _read_list(lists[split]):
                listing.add_volume(split, vol, f"{split}.list line {n}")
    _check_splits(root, listing)

    found = listing.found
    order = {"train": 0, "val": 1, "test": 2}
    found.sort(key=lambda e: (order[e[0]], e[1], e[2]))
    width = max(2, max((len(str(e[2])) for e in found), default=2))
    ds = AcdcDataset(
        root=root,
        kind="acdc-h5",
        samples=[Sample(id=f"{vol}/slice_{k:0{width}d}", split=s, group=vol, index_in_group=k)
                 for s, vol, k, _, _ in found],
        classes=[],
        mask_classes=list(MASK_CLASSES),
        spacing=listing.spacing,
        entries=[(p, pos) for *_, p, pos in found],
        max_pixels=max_pixels,
    )
    ds.check_unique_ids()
    return ds
