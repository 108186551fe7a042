"""Stage-two segmentation data: a feature store joined with its dataset by sample id.

Geometry. The encoder resized each (H,W) image so its long side is ``img_size`` (256 for
LiteMedSAM, 1024 for SAM's ViTs) and padded it bottom/right to a square; the 64x64
embedding covers that canvas, and every head predicts logits on a 256x256 canvas
(``img_size / 256`` canvas pixels per logit pixel). The valid part of the encoder canvas
is ``(h', w') = longest_side_shape(H, W, img_size)``.

- Training (``label_to_canvas``): the (H,W) label is resized (nearest) into the top-left
  ``round(h' * 256 / img_size) x round(w' * 256 / img_size)`` of a 256x256 canvas; the
  padding is ``IGNORE`` and excluded from the loss. For LiteMedSAM stores of images whose
  long side is already 256 (ACDC) this is the identity.
- Metrics (``logits_to_raw``): exactly SAM's ``postprocess_masks``: logits upsampled
  (bilinear) to ``img_size``, cropped to ``(h', w')``, resized (bilinear) to (H,W); the
  argmax is taken there, so metrics are computed in the raw label geometry.

The UNet baseline reads raw images prepared like LiteMedSAM's input (canvas 256), so its
logits go through the same two functions with ``img_size = 256``.

A SAM 2 store (``geometry == STRETCH``, see ``stages.geometry``) stretched the whole image
to the square: the valid region is the whole canvas, labels fill it (no ``IGNORE``), and
logits go straight to (H,W) (bilinear, as ``SAM2Transforms.postprocess_masks``). The UNet
then gets its images stretched to 256x256 too, so both see the same field of view.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cache import SignatureMismatchError, StoreError
from stages.common.geometry import PAD, STRETCH, check_geometry, input_geometry
from stages.common.joined import open_joined
from stages.datasets import DatasetError
from stages.encoders.preprocess import gray_or_rgb, prepare_litemedsam, resizable
from stages.encoders.resize import longest_side_shape, resize_area

CANVAS = 256
IGNORE = 255
UNET_IMG_SIZE = 256  # the UNet's images are prepared on a 256 canvas, whatever the store's encoder


def canvas_shape(h: int, w: int, img_size: int, geometry: str = PAD) -> tuple[int, int]:
    """Valid (rows, cols) of an (h,w) image on the 256 logit canvas (all of it when stretched)."""
    if check_geometry(geometry) == STRETCH:
        return CANVAS, CANVAS
    nh, nw = longest_side_shape(h, w, img_size)
    return max(1, round(nh * CANVAS / img_size)), max(1, round(nw * CANVAS / img_size))


def resize_nearest(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(H,W) labels -> ``shape``, nearest neighbour at pixel centres (no new label values)."""
    h, w = mask.shape
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * h / shape[0]).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * w / shape[1]).astype(np.int64), w - 1)
    return mask[rows[:, None], cols[None, :]]


def label_to_canvas(mask: np.ndarray, img_size: int, geometry: str = PAD) -> np.ndarray:
    """(H,W) integer labels -> (256,256) uint8 training target, padding = IGNORE."""
    out = np.full((CANVAS, CANVAS), IGNORE, np.uint8)
    ch, cw = canvas_shape(mask.shape[0], mask.shape[1], img_size, geometry)
    out[:ch, :cw] = resize_nearest(mask, (ch, cw))
    return out


def logits_to_raw(logits: torch.Tensor, size: tuple[int, int], img_size: int, geometry: str = PAD
                  ) -> torch.Tensor:
    """(B,C,256,256) canvas logits -> (B,C,H,W) logits in the image geometry (SAM's
    ``postprocess_masks``: upsample to img_size, crop the valid region, resize to H,W;
    stretched: SAM 2's, one bilinear resize of the whole canvas to H,W)."""
    if check_geometry(geometry) == STRETCH:
        if logits.shape[-2:] == tuple(size):
            return logits
        return F.interpolate(logits, tuple(size), mode="bilinear", align_corners=False)
    if logits.shape[-1] != img_size:
        logits = F.interpolate(logits, (img_size, img_size), mode="bilinear", align_corners=False)
    nh, nw = longest_side_shape(size[0], size[1], img_size)
    logits = logits[..., :nh, :nw]
    if (nh, nw) != tuple(size):
        logits = F.interpolate(logits, tuple(size), mode="bilinear", align_corners=False)
    return logits


def unet_image(image: np.ndarray, geometry: str = PAD) -> torch.Tensor:
    """(H,W[,C]) raw pixels -> the UNet's (3,256,256) input: LiteMedSAM's preparation
    (padded), or for a stretched store the same INTER_AREA resize and min-max to [0,1]
    of the whole image stretched to 256x256."""
    if check_geometry(geometry) == PAD:
        return prepare_litemedsam(image, UNET_IMG_SIZE)
    img = resizable(gray_or_rgb(image))
    r = resize_area(img, (UNET_IMG_SIZE, UNET_IMG_SIZE), cv_channels=3)
    r = (r[:, :, None] if r.ndim == 2 else r).astype(np.float64)
    norm = (r - r.min()) / max(float(r.max() - r.min()), 1e-8)
    out = np.empty((3, UNET_IMG_SIZE, UNET_IMG_SIZE), np.float32)
    out[:] = norm.transpose(2, 0, 1)  # broadcasts a gray channel to three
    return torch.from_numpy(out)


@dataclass
class Item:
    """One sample of a segmentation split: dataset index, store row, raw size."""

    index: int
    row: int
    height: int
    width: int


class SegmentData:
    """The dataset of ``kind`` at ``data_root`` joined with the store at ``store`` by id.

    Refuses (StoreError / SignatureMismatchError, one line) a store made from another
    dataset kind, a dataset sample missing from the store, a changed image (content hash
    differs from the one stored at extraction, checked by ``verify``) and a size that
    differs from the stored one. Samples whose extraction failed are left out.
    """

    def __init__(self, store: str, dataset: str, data_root: str, dataset_options: dict[str, Any] | None = None,
                 storage_options: dict[str, Any] | None = None) -> None:
        joined = open_joined(store, None, dataset, data_root, dataset_options, verify=False, labelled=False,
                             storage_options=storage_options)
        self.store, self.dataset = joined.store, joined.dataset
        ds = self.dataset
        if len(ds.mask_classes) < 2:
            raise DatasetError(f"{data_root}: dataset {dataset!r} has no masks; segmentation needs a reader "
                               "with masks (acdc-h5, synthetic, imagefolder or csv with masks)")
        stored_classes = self.store.mask_classes
        if stored_classes and stored_classes != ds.mask_classes:
            raise SignatureMismatchError(f"{store}: store lists mask classes {stored_classes}, the dataset "
                                         f"{ds.mask_classes}; pass the dataset the store was made from")
        self.rows = np.arange(len(ds.ids))  # one listing (open_joined checked it): sample i is store row i
        self.img_size = int(self.store.attrs["img_size"])
        self.geometry = input_geometry(self.store.attrs.get("preprocessing"))
        self.mask_classes = list(ds.mask_classes)
        self.num_classes = len(ds.mask_classes)
        usable = self.store.done & ~self.store.failed
        self.ok = usable[self.rows]
        self.splits = np.array([s.split for s in ds.samples], dtype=object)
        self.groups = np.array([s.group for s in ds.samples], dtype=object)
        self.slices = np.array([s.index_in_group for s in ds.samples], dtype=np.int64)
        self.ids = ds.ids
        self._verified: set[int] = set()
        self._features: dict[int, np.ndarray] | None = None

    @property
    def volumetric(self) -> bool:
        return bool(len(self.groups)) and all(g != "" for g in self.groups) and bool((self.slices >= 0).all())

    def item(self, i: int) -> Item:
        r = int(self.rows[i])
        return Item(i, r, int(self.store.heights[r]), int(self.store.widths[r]))

    def split_indices(self, split: str) -> list[int]:
        return [i for i in np.flatnonzero(self.splits == split).tolist() if self.ok[i]]

    def verify(self, indices: Sequence[int]) -> None:
        """Content hash of each image == the hash stored at extraction, else StoreError."""
        for i in indices:
            if i in self._verified:
                continue
            r = int(self.rows[i])
            if self.dataset.content_hash(i) != self.store.hashes[r]:
                raise StoreError(f"{self.store.url}: image {self.ids[i]!r} changed since it was extracted; "
                                 f"refresh the store with `pipeline extract ... --out {self.store.url} --refresh-changed`")
            self._verified.add(i)

    # --- loading ------------------------------------------------------------------
    def load_in_memory(self, indices: Sequence[int]) -> None:
        """Keep the float16 embeddings of ``indices`` in RAM (2 MiB each); repeated calls
        add what is missing."""
        have = self._features if self._features is not None else {}
        idx = sorted(set(int(i) for i in indices) - set(have))
        if idx:
            emb = self.store.load([int(self.rows[i]) for i in idx], dtype=np.float16)
            have.update({i: emb[k] for k, i in enumerate(idx)})
        self._features = have

    def features(self, indices: Sequence[int]) -> torch.Tensor:
        """(B,256,64,64) float32 embeddings."""
        if self._features is not None and all(i in self._features for i in indices):
            return torch.from_numpy(np.stack([self._features[i] for i in indices]).astype(np.float32))
        return torch.from_numpy(self.store.read([int(self.rows[i]) for i in indices]))

    def image(self, i: int) -> np.ndarray:
        return self.dataset.load_image(i)

    def mask(self, i: int) -> np.ndarray:
        """(H,W) int64 labels; its size must equal the size stored at extraction."""
        m = self.dataset.load_mask(i)
        it = self.item(i)
        if m is None or m.shape[:2] != (it.height, it.width):
            got = None if m is None else m.shape
            raise StoreError(f"{self.store.url}: mask of {self.ids[i]!r} is {got}, the store recorded an image of "
                             f"{(it.height, it.width)}; re-extract the store or fix the mask")
        return m.astype(np.int64)

    def unet_images(self, indices: Sequence[int]) -> torch.Tensor:
        """(B,3,256,256) images prepared like LiteMedSAM's input (the UNet's input), in
        the store's geometry."""
        return torch.stack([unet_image(self.image(i), self.geometry) for i in indices])

    def inputs(self, indices: Sequence[int], kind: str) -> torch.Tensor:
        return self.features(indices) if kind == "features" else self.unet_images(indices)

    def targets(self, indices: Sequence[int], img_size: int) -> torch.Tensor:
        """(B,256,256) int64 canvas targets (IGNORE outside the image), in the store's geometry."""
        return torch.from_numpy(np.stack([label_to_canvas(self.mask(i), img_size, self.geometry)
                                          for i in indices]).astype(np.int64))


class Batches(torch.utils.data.Dataset):
    """Map-style dataset whose items are whole batches: ``ds[list of indices]`` ->
    (inputs, targets). Used with ``DataLoader(sampler=..., batch_size=None)`` so one
    store read serves a batch."""

    def __init__(self, data: SegmentData, kind: str, img_size: int) -> None:
        self.data, self.kind, self.img_size = data, kind, img_size

    def __len__(self) -> int:
        return len(self.data.ids)

    def __getitem__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        indices = sorted(indices)  # sorted rows read faster (one read per run of a shard)
        return self.data.inputs(indices, self.kind), self.data.targets(indices, self.img_size)
