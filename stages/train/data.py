"""Stage-two data: a feature store joined with the dataset it was extracted from.

- ``open_joined``: open both (the dataset from the store's recorded kind and root unless
  given), refuse a store made from another dataset listing, refuse samples whose image
  changed since extraction (content hash), keep usable labelled rows.
- ``assign_splits``: the dataset's own splits where present; otherwise (and for missing
  val/test) stratified, seeded, group-aware (slices of one volume stay together).
- ``subsample``: stratified, seeded ``--train-fraction``; subsets of one seed are nested
  (the 10% subset is inside the 50% one).
- ``ClassifyData`` + ``ShardBatchSampler``: batches of (image, SAM embedding, label),
  embeddings read lazily per batch (one zarr read per run of consecutive rows) in an
  order that keeps a few shards hot, or held in memory.
Augmentation lives in ``augment``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler
from torch.utils.data import Dataset as TorchDataset

from cache import FeatureStore, SignatureMismatchError, StoreError

from ..datasets import open_dataset
from ..datasets.base import Dataset
from ..geometry import PAD, STRETCH, check_geometry, input_geometry

SPLIT_NAMES = ("train", "val", "test")
IMAGE_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)  # timm/ImageNet statistics, so that
IMAGE_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)  # local timm checkpoints see familiar input


# --- store + dataset -----------------------------------------------------------------

@dataclass
class Joined:
    """A store and its dataset; ``rows``: store rows usable for classification."""

    store: FeatureStore
    dataset: Dataset
    rows: np.ndarray

    @property
    def classes(self) -> list[str]:
        return list(self.store.classes) or [str(c) for c in range(int(self.store.labels.max()) + 1)]

    @property
    def labels(self) -> np.ndarray:
        return self.store.labels


@dataclass
class Prepared:
    """A joined store/dataset with splits, classes and the backbone input size."""

    joined: Joined
    splits: dict[str, np.ndarray]
    classes: list[str]
    img_size: int


def open_joined(store: str | FeatureStore, dataset: Dataset | None = None, kind: str | None = None,
                data_root: str | None = None, options: dict[str, Any] | None = None,
                verify: bool = True) -> Joined:
    """Open ``store`` and its dataset and check they belong together (see module doc)."""
    fs = store if isinstance(store, FeatureStore) else FeatureStore(store)
    if dataset is None:
        kind = kind or fs.attrs.get("dataset_kind")
        root = data_root or fs.attrs.get("dataset_root")
        if not kind or not root:
            raise StoreError(f"{fs.url}: the store does not record its dataset; pass --dataset and --data-root")
        dataset = open_dataset(kind, root, **(options or {}))
    check_match(fs, dataset)
    usable = np.zeros(fs.n, bool)
    usable[fs.usable()] = True
    rows = np.flatnonzero(usable & (fs.labels >= 0))
    if len(rows) == 0:
        raise StoreError(f"{fs.url}: no labelled, successfully extracted sample; classification needs image labels")
    if verify:
        check_fresh(fs, dataset, rows)
    return Joined(fs, dataset, rows)


def check_match(store: FeatureStore, dataset: Dataset) -> None:
    """Refuse a store whose listing (kind, ids, labels, splits, groups, classes) is not the dataset's."""
    why = []
    if store.attrs.get("dataset_kind") != dataset.kind:
        why.append(f"dataset kind: store {store.attrs.get('dataset_kind')!r}, dataset {dataset.kind!r}")
    if store.attrs.get("dataset_signature") != dataset.signature():
        ids = set(dataset.ids)
        missing = sum(1 for i in store.ids if i not in ids)
        extra = len(ids) - (store.n - missing)
        detail = f"{missing} store ids not in the dataset, {extra} dataset ids not in the store"
        if not missing and not extra:
            detail = "same ids, different labels/splits/groups/classes"
        why.append(f"listing differs ({detail})")
    if why:
        raise SignatureMismatchError(
            f"{store.url}: store was not extracted from {dataset.root} ({'; '.join(why)}); point --data-root at "
            f"the dataset it was made from, or re-run `pipeline extract` for this dataset")


def check_fresh(store: FeatureStore, dataset: Dataset, rows: Sequence[int]) -> None:
    """Refuse samples whose image bytes changed after extraction, naming them."""
    stale = [int(i) for i in rows if dataset.content_hash(int(i)) != store.hashes[int(i)]]
    if stale:
        names = ", ".join(repr(str(store.ids[i])) for i in stale[:3]) + (f" and {len(stale) - 3} more" if len(stale) > 3 else "")
        raise StoreError(f"{store.url}: image {names} changed since it was extracted; refresh the store with "
                         f"`pipeline extract ... --out {store.url} --refresh-changed`")


# --- splits ------------------------------------------------------------------------

def _units(rows: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Rows grouped into units (a volume's slices, or single rows) and each unit's majority label."""
    keys = [str(groups[r]) or f"\0{r}" for r in rows]
    order: dict[str, list[int]] = {}
    for k, r in zip(keys, rows):
        order.setdefault(k, []).append(int(r))
    units = [np.asarray(v) for v in order.values()]
    ulab = np.asarray([np.bincount(labels[u]).argmax() for u in units])
    return units, ulab


def _carve(rows: np.ndarray, labels: np.ndarray, groups: np.ndarray, fraction: float,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split ``rows`` into (rest, taken) with ~``fraction`` of each class's units taken."""
    units, ulab = _units(rows, labels, groups)
    taken: list[np.ndarray] = []
    for c in np.unique(ulab):
        idx = rng.permutation(np.flatnonzero(ulab == c))
        k = int(round(fraction * len(idx)))
        k = min(max(k, 1 if len(idx) >= 2 else 0), len(idx) - 1) if fraction > 0 else 0
        taken += [units[i] for i in idx[:k]]
    t = np.sort(np.concatenate(taken)) if taken else np.empty(0, np.int64)
    return np.setdiff1d(rows, t), t


def assign_splits(rows: np.ndarray, labels: np.ndarray, splits: np.ndarray, groups: np.ndarray,
                  seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2) -> dict[str, np.ndarray]:
    """train/val/test store rows (see module doc). Deterministic for a given ``seed``."""
    rng = np.random.default_rng(seed)
    given = np.asarray([str(s) for s in splits[rows]], dtype=object)
    out = {s: rows[given == s] for s in SPLIT_NAMES}
    free = rows[~np.isin(given, SPLIT_NAMES)]
    if len(free):
        rest, test = _carve(free, labels, groups, test_fraction, rng)
        rest, val = _carve(rest, labels, groups, val_fraction / max(1 - test_fraction, 1e-9), rng)
        out = {"train": np.union1d(out["train"], rest), "val": np.union1d(out["val"], val),
               "test": np.union1d(out["test"], test)}
    for s, frac in (("test", test_fraction), ("val", val_fraction)):
        if len(out[s]) == 0:
            out["train"], out[s] = _carve(out["train"], labels, groups, frac, rng)
    if len(out["train"]) == 0:
        raise StoreError("no training samples after splitting; the dataset is too small or has no train split")
    return out


def subsample(rows: np.ndarray, labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A stratified, seeded ``fraction`` of ``rows`` (by unit; at least one per class).
    For one seed, a smaller fraction gives a subset of a larger one."""
    if not 0 < fraction <= 1:
        raise ValueError(f"--train-fraction {fraction}: must be in (0, 1]")
    if fraction == 1:
        return rows
    rng = np.random.default_rng([seed, 7])
    units, ulab = _units(rows, labels, groups)
    keep: list[np.ndarray] = []
    for c in np.unique(ulab):
        idx = np.flatnonzero(ulab == c)
        idx = idx[rng.permutation(len(idx))]
        keep += [units[i] for i in idx[:max(1, int(round(fraction * len(idx))))]]
    return np.sort(np.concatenate(keep))


# --- images --------------------------------------------------------------------------

def prepare_image(image: np.ndarray, size: int, geometry: str = PAD) -> torch.Tensor:
    """Raw (H,W[,C]) pixels of any dtype -> (3,size,size) float32 for the backbone.

    uint8 is scaled by 1/255, other dtypes min-max to [0,1]; the image is zero-padded to
    a square at the bottom/right (the SAM encoders pad the same way, so the 64x64 SAM
    grid and this image share their field of view), resized (bilinear, antialiased),
    grey repeated to RGB, and normalised with the ImageNet mean/std. ``geometry``
    ``STRETCH`` (a SAM 2 store, ``stages.geometry``): no padding, the whole image is
    stretched to the square, as SAM 2 stretched it."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] in (1, 2):
        a = a[:, :, 0]
    elif a.ndim == 3 and a.shape[2] == 4:
        a = a[:, :, :3]
    x = a.astype(np.float32)
    if a.dtype == np.uint8:
        x /= 255.0
    else:
        lo, hi = float(x.min()), float(x.max())
        x = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    t = torch.from_numpy(np.ascontiguousarray(x))
    t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
    h, w = t.shape[1:]
    side = max(h, w)
    if h != w and check_geometry(geometry) == PAD:
        t = F.pad(t, (0, side - w, 0, side - h))
    if tuple(t.shape[1:]) != (size, size):  # STRETCH: the aspect ratio goes here
        t = F.interpolate(t[None], size=(size, size), mode="bilinear", align_corners=False,
                          antialias=side > size)[0]
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    return ((t - IMAGE_MEAN) / IMAGE_STD).contiguous()


def auto_img_size(heights: np.ndarray, widths: np.ndarray) -> int:
    """Backbone input side when --img-size is 0: the median long side of the images,
    rounded up to a multiple of 32 and kept in [64, 224] (28x28 MedMNIST -> 64)."""
    side = float(np.median(np.maximum(heights, widths))) if len(heights) else 224.0
    return int(min(max(32 * int(np.ceil(side / 32)), 64), 224))


# --- torch data ----------------------------------------------------------------------

class ClassifyData(TorchDataset):
    """Position ``p`` -> sample ``rows[p]`` of the store/dataset. Batched access only
    (``__getitems__``): a dict of ``image`` (B,3,S,S) float32 or None, ``sam``
    (B,256,64,64) float16 or None, ``label`` (B,) int64, ``pos`` (B,) int64.

    ``in_memory`` loads all embeddings (and caches prepared images) up front. Images are
    padded or stretched to the square as the store's encoder input was (``geometry``:
    None = the store's recorded preprocessing), also for models that read no embeddings,
    so that every model compared on a store sees one field of view."""

    def __init__(self, joined: Joined, rows: np.ndarray, img_size: int, need_image: bool = True,
                 need_sam: bool = True, in_memory: bool = False, progress: bool = False,
                 geometry: str | None = None):
        self.store, self.dataset = joined.store, joined.dataset
        self.rows = np.asarray(rows, dtype=np.int64)
        self.labels = joined.store.labels[self.rows]
        self.img_size, self.need_image, self.need_sam = img_size, need_image, need_sam
        self.geometry = geometry or input_geometry(joined.store.attrs.get("preprocessing"))
        self.sam_mem: np.ndarray | None = None
        self.img_mem: torch.Tensor | None = None
        if in_memory:
            check_fits(len(self.rows), need_sam, need_image, img_size, joined.store.url)
            if need_sam:
                self.sam_mem = load_features(joined.store, self.rows, progress)
            if need_image:
                self.img_mem = torch.stack([self._image(r) for r in self.rows]).half()

    def __len__(self) -> int:
        return len(self.rows)

    def _image(self, row: int) -> torch.Tensor:
        return prepare_image(self.dataset.load_image(int(row)), self.img_size, self.geometry)

    def __getitem__(self, p: int) -> dict[str, Any]:
        return self.__getitems__([p])

    def __getitems__(self, pos: Sequence[int]) -> dict[str, Any]:
        pos = np.asarray(pos, dtype=np.int64)
        rows = self.rows[pos]
        image = sam = None
        if self.need_image:
            image = (self.img_mem[pos].float() if self.img_mem is not None
                     else torch.stack([self._image(r) for r in rows]))
        if self.need_sam:
            arr = self.sam_mem[pos] if self.sam_mem is not None else self.store.read(rows, np.float16)
            sam = torch.from_numpy(np.ascontiguousarray(arr))
        return {"image": image, "sam": sam, "label": torch.from_numpy(self.labels[pos].copy()),
                "pos": torch.from_numpy(pos)}


def _passthrough(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


def load_features(store: FeatureStore, rows: np.ndarray, progress: bool = False) -> np.ndarray:
    """Embeddings of ``rows`` as one float16 array, read a shard-sized block at a time."""
    from ..progress import progress_bar

    out = np.empty((len(rows), *store.embeddings.shape[1:]), np.float16)
    step = max(store.shard_size, 32)
    with progress_bar("load features", total=len(rows), enabled=progress, unit="img") as advance:
        for a in range(0, len(rows), step):
            out[a:a + step] = store.read(rows[a:a + step], np.float16)
            advance(min(step, len(rows) - a))
    return out


def check_fits(n: int, sam: bool, image: bool, img_size: int, where: str) -> None:
    """Refuse --in-memory when the data would take more than 80% of the available memory."""
    need = n * ((256 * 64 * 64 * 2 if sam else 0) + (3 * img_size * img_size * 2 if image else 0))
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return
    if need > 0.8 * avail:
        raise ValueError(f"{where}: --in-memory needs {need / 2**30:.1f} GiB but {avail / 2**30:.1f} GiB are free; "
                         "drop --in-memory to read features lazily")


class ShardBatchSampler(Sampler[list[int]]):
    """Batches of positions. Training order: shards in a seeded random order, the samples of
    ``mix`` shards shuffled together and cut into batches, so a batch touches few shards
    (a remote or cold store reads whole shard files) while the order stays well mixed.
    Evaluation order (``shuffle=False``): positions in store order. ``set_epoch`` changes
    the order reproducibly. A last batch of one sample is dropped when training
    (BatchNorm cannot train on it)."""

    def __init__(self, rows: np.ndarray, shard_size: int, batch_size: int, shuffle: bool, seed: int = 0,
                 mix: int = 8):
        self.rows, self.shard_size, self.batch_size = np.asarray(rows), shard_size, batch_size
        self.shuffle, self.seed, self.mix, self.epoch = shuffle, seed, mix, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return np.argsort(self.rows, kind="stable")
        rng = np.random.default_rng([self.seed, self.epoch])
        shard = self.rows // self.shard_size
        ids = rng.permutation(np.unique(shard))
        parts = []
        for a in range(0, len(ids), self.mix):
            pool = np.flatnonzero(np.isin(shard, ids[a:a + self.mix]))
            parts.append(rng.permutation(pool))
        return np.concatenate(parts) if parts else np.empty(0, np.int64)

    def __iter__(self) -> Iterator[list[int]]:
        order = self._order()
        for a in range(0, len(order), self.batch_size):
            b = order[a:a + self.batch_size]
            if self.shuffle and len(b) == 1 and len(order) > 1:
                continue
            yield b.tolist()

    def __len__(self) -> int:
        n, full = len(self.rows), len(self.rows) // self.batch_size
        rest = n - full * self.batch_size
        return full + (1 if rest > 1 or (rest == 1 and (not self.shuffle or n == 1)) else 0)


def make_loader(data: ClassifyData, batch_size: int, shuffle: bool, seed: int, workers: int,
                shard_size: int, pin: bool = False) -> DataLoader:
    sampler = ShardBatchSampler(data.rows, shard_size, batch_size, shuffle, seed)
    return DataLoader(data, batch_sampler=sampler, num_workers=workers, collate_fn=_passthrough,
                      pin_memory=pin, persistent_workers=False, prefetch_factor=2 if workers else None)


def default_workers(device: torch.device, in_memory: bool) -> int:
    """Loader processes: none when everything is in memory or on 1 core; else up to 4."""
    cores = os.cpu_count() or 1
    if in_memory or cores < 2:
        return 0
    return min(4, cores - 1) if device.type == "cuda" else 1
