"""MedMNIST v2 ``.npz`` files (any resolution: 28/64/128/224; grayscale or RGB).

``root`` is the .npz file or a folder holding exactly one. Arrays ``<split>_images``
(N,H,W) or (N,H,W,3) and ``<split>_labels`` (N,1) for split in train/val/test (at least
one split); the official splits are kept. Sample ids: ``train/000000``, ...

Only single-label files are supported (ChestMNIST-style (N,K>1) labels are refused).
Class names come from the official MedMNIST INFO for a few known files (by file stem,
resolution suffix ignored: ``pneumoniamnist_224.npz``), else "0".."K-1".

Checks: labels at open (shape, count matching the images, whole non-negative finite
numbers -> DatasetError); image arrays by header at open (shape, size) and pixels per
image at load (NaN/inf in float arrays -> BadImageError naming file, split and row).

Loading: members stored uncompressed (``np.savez``) are memory-mapped; compressed members
(``np.savez_compressed``, the official files) are decompressed once per split on first
use and kept in memory (fine for MedMNIST sizes; ~15 GB for PathMNIST-224).
"""
from __future__ import annotations

import re
import struct
import threading
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stages.datasets.base import BadImageError, Dataset, DatasetError, Sample
from stages.datasets.imageio import MAX_PIXELS, MIN_SIDE, check_array
from stages.datasets.registry import register_dataset

SPLIT_ORDER = ("train", "val", "test")

# From the official MedMNIST v2 INFO (medmnist/info.py), label index order.
KNOWN_CLASSES: dict[str, list[str]] = {
    "pneumoniamnist": ["normal", "pneumonia"],
    "breastmnist": ["malignant", "normal, benign"],
    "bloodmnist": ["basophil", "eosinophil", "erythroblast",
                   "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
                   "lymphocyte", "monocyte", "neutrophil", "platelet"],
    "dermamnist": ["actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
                   "benign keratosis-like lesions", "dermatofibroma", "melanoma",
                   "melanocytic nevi", "vascular lesions"],
    "retinamnist": ["0", "1", "2", "3", "4"],
}


# what a damaged archive raises from zipfile / zlib / numpy's .npy reader
# (RuntimeError: a flipped bit can mark a member encrypted; NotImplementedError: an unknown
# compression method)
_CORRUPT = (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError, struct.error, zlib.error, RuntimeError,
            NotImplementedError)


def _header(zf: zipfile.ZipFile, name: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, header length) of one .npy member, without reading data."""
    with zf.open(name) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        return shape, fortran, dtype, f.tell()


def _member_offset(path: Path, info: zipfile.ZipInfo) -> int:
    """Byte offset of a stored member's data inside the zip file."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
    sig, *_, name_len, extra_len = struct.unpack("<4s5H3I2H", local)
    if sig != b"PK\x03\x04":
        raise DatasetError(f"{path}: corrupt zip entry {info.filename}; re-download the file")
    return info.header_offset + 30 + name_len + extra_len


@dataclass
class MedMnistDataset(Dataset):
    """Rows of the npz arrays. ``rows[i]`` = (split, row index) of sample ``i``."""

    npz: Path = Path()
    rows: list[tuple[str, int]] = field(default_factory=list)
    max_pixels: int = MAX_PIXELS
    _arrays: dict[str, np.ndarray] = field(default_factory=dict, init=False, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def _images(self, split: str) -> np.ndarray:
        with self._lock:
            if split not in self._arrays:
                try:
                    self._arrays[split] = self._load_images(split)
                except DatasetError:
                    raise
                except _CORRUPT as e:
                    raise BadImageError(f"{self.npz}: cannot read {split}_images ({type(e).__name__}: {e}); "
                                        "the file is damaged, re-download it") from None
            return self._arrays[split]

    def _load_images(self, split: str) -> np.ndarray:
        name = f"{split}_images.npy"
        with zipfile.ZipFile(self.npz) as zf:
            info = zf.getinfo(name)
            shape, fortran, dtype, hlen = _header(zf, name)
            if info.compress_type == zipfile.ZIP_STORED:
                offset = _member_offset(self.npz, info) + hlen
                return np.memmap(self.npz, dtype=dtype, mode="r", offset=offset, shape=shape,
                                 order="F" if fortran else "C")
        with np.load(self.npz, allow_pickle=False) as z:
            return z[f"{split}_images"]

    def load_image(self, i: int) -> np.ndarray:
        """(H,W) or (H,W,3) in the array's dtype (uint8 for official files)."""
        split, row = self.rows[i]
        image = np.array(self._images(split)[row])
        return check_array(image, f"{self.npz}:{split}_images[{row}]", self.max_pixels)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_arrays"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


def _find_npz(root: Path) -> Path:
    if root.is_dir():
        found = sorted(p for p in root.glob("*.npz") if not p.name.startswith("."))
        if len(found) != 1:
            what = "no .npz file" if not found else f"{len(found)} .npz files ({', '.join(p.name for p in found)})"
            raise DatasetError(f"{root}: {what} in this folder; pass the MedMNIST .npz file itself as --data-root")
        return found[0]
    if not root.is_file():
        raise DatasetError(f"{root}: no such file or folder; --data-root must be a MedMNIST .npz file")
    return root


def _labels(npz: Path, split: str, n: int) -> np.ndarray:
    key = f"{split}_labels"
    try:
        with np.load(npz, allow_pickle=False) as z:
            y = z[key]
    except ValueError as e:
        raise DatasetError(f"{npz}: cannot read {key} ({e}); store labels as a numeric array, or re-download "
                           "a damaged file") from None
    except _CORRUPT as e:
        raise DatasetError(f"{npz}: cannot read {key} ({type(e).__name__}: {e}); the file is damaged, "
                           "re-download it") from None
    where = f"{npz}: {key}"
    if y.ndim == 2 and y.shape[1] > 1:
        raise DatasetError(f"{where} has shape {y.shape} (multi-label, like ChestMNIST); only single-label "
                           "files are supported: convert to one label per image or use --dataset csv")
    if y.ndim not in (1, 2):
        raise DatasetError(f"{where} has shape {y.shape}; expected (N,1) labels")
    y = y.reshape(len(y))
    if len(y) != n:
        raise DatasetError(f"{where} has {len(y)} labels but {split}_images has {n} images; the file is "
                           "inconsistent, re-download or fix it")
    if y.dtype.kind not in "uif":
        raise DatasetError(f"{where} has dtype {y.dtype}; labels must be integers")
    if y.dtype.kind == "f" and not (np.isfinite(y).all() and (y == np.round(y)).all()):
        raise DatasetError(f"{where} holds NaN/inf or fractional labels; labels must be whole numbers")
    if y.size and y.min() < 0:
        raise DatasetError(f"{where} holds negative labels ({int(y.min())}); labels must be >= 0")
    return y.astype(np.int64)


@register_dataset("medmnist")
def open_medmnist(root: str | Path, max_pixels: int = MAX_PIXELS) -> MedMnistDataset:
    """Open a MedMNIST .npz (see module docstring)."""
    npz = _find_npz(Path(root))
    try:
        with zipfile.ZipFile(npz) as zf:
            members = {n.removesuffix(".npy") for n in zf.namelist()}
            headers = {s: _header(zf, f"{s}_images.npy") for s in SPLIT_ORDER if f"{s}_images" in members}
    except _CORRUPT as e:
        raise DatasetError(f"{npz}: not a readable .npz archive ({e}); pass an official MedMNIST .npz") from None
    for s in SPLIT_ORDER:
        if (f"{s}_images" in members) != (f"{s}_labels" in members):
            have, lack = (f"{s}_images", f"{s}_labels") if f"{s}_images" in members else (f"{s}_labels", f"{s}_images")
            raise DatasetError(f"{npz}: has {have} but no {lack}; every split needs both arrays")
    if not headers:
        raise DatasetError(f"{npz}: no train_images/val_images/test_images arrays (found {sorted(members)}); "
                           "expected the official MedMNIST layout")

    labels: dict[str, np.ndarray] = {}
    for s, (shape, _, dtype, _) in headers.items():
        where = f"{npz}: {s}_images"
        if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] not in (1, 3, 4)):
            raise DatasetError(f"{where} has shape {shape}; expected (N,H,W) or (N,H,W,3)")
        if dtype.kind not in "uifb":
            raise DatasetError(f"{where} has dtype {dtype}; expected numeric pixels")
        h, w = shape[1], shape[2]
        if h * w > max_pixels or min(h, w) < MIN_SIDE:
            raise DatasetError(f"{where} holds {w}x{h} images, outside {MIN_SIDE}x{MIN_SIDE} .. {max_pixels} pixels; "
                               "use another resolution variant or raise max_pixels")
        labels[s] = _labels(npz, s, shape[0])

    k = 1 + max((int(y.max()) for y in labels.values() if y.size), default=0)
    stem = re.sub(r"_\d+$", "", npz.stem.lower())
    names = KNOWN_CLASSES.get(stem)
    if names is not None and k > len(names):
        raise DatasetError(f"{npz}: label {k - 1} found but {stem} has {len(names)} classes {names}; "
                           "the file is not the official one (rename it to use numeric class names)")
    classes = list(names) if names is not None else [str(c) for c in range(k)]

    samples: list[Sample] = []
    rows: list[tuple[str, int]] = []
    for s, y in labels.items():
        width = max(6, len(str(len(y) - 1)))
        samples += [Sample(id=f"{s}/{r:0{width}d}", label=int(c), split=s) for r, c in enumerate(y)]
        rows += [(s, r) for r in range(len(y))]
    ds = MedMnistDataset(root=npz, kind="medmnist", samples=samples, classes=classes,
                         npz=npz, rows=rows, max_pixels=max_pixels)
    ds.check_unique_ids()
    return ds
