"""Classification data: batches of (image, SAM embedding, label) from a joined store.

- ``prepare_image``: raw pixels -> the backbone's normalised square input, padded or
  stretched as the store's encoder input was.
- ``ClassifyData`` + ``ShardBatchSampler``: embeddings read lazily per batch (one zarr
  read per run of consecutive rows) in an order that keeps a few shards hot, or held in
  memory.
The store/dataset join is ``stages.common.joined``, the splits ``stages.common.splits``,
augmentation ``augment``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler
from torch.utils.data import Dataset as TorchDataset

from cache import FeatureStore
from cache.schema import EMBED_SHAPE
from stages.common.geometry import PAD, check_geometry, input_geometry
from stages.common.joined import Joined
from stages.common.runtime import available_memory

IMAGE_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)  # timm/ImageNet statistics, so that
IMAGE_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)  # local timm checkpoints see familiar input


@dataclass
class Prepared:
    """A joined store/dataset with splits, classes and the backbone input size."""

    joined: Joined
    splits: dict[str, np.ndarray]
    classes: list[str]
    img_size: int


# --- images --------------------------------------------------------------------------

def prepare_image(image: np.ndarray, size: int, geometry: str = PAD) -> torch.Tensor:
    """Raw (H,W[,C]) pixels of any dtype -> (3,size,size) float32 (at float16 precision)
    for the backbone.

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
    # rounded to float16 precision (still float32): ``--in-memory`` holds images as float16,
    # so the lazy path, --in-memory, evaluate and predict all feed the same numbers; float16
    # keeps 8-bit levels apart (their normalised step ~0.017 vs float16's ~0.002 at 2.6)
    return ((t - IMAGE_MEAN) / IMAGE_STD).half().float().contiguous()


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
    from stages.common.progress import progress_bar

    out = np.empty((len(rows), *store.embeddings.shape[1:]), np.float16)
    step = max(store.shard_size, 32)
    with progress_bar("load features", total=len(rows), enabled=progress, unit="img") as advance:
        for a in range(0, len(rows), step):
            out[a:a + step] = store.read(rows[a:a + step], np.float16)
            advance(min(step, len(rows) - a))
    return out


def check_fits(n: int, sam: bool, image: bool, img_size: int, where: str) -> None:
    """Refuse --in-memory when the data would take more than 80% of the available memory."""
    need = n * ((int(np.prod(EMBED_SHAPE)) * 2 if sam else 0) + (3 * img_size * img_size * 2 if image else 0))
    avail = available_memory()
    if avail is None:
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
