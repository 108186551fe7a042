"""A learnable toy classification dataset held in memory, and a real feature store of it
written with ``StoreWriter`` (embeddings chosen here, no encoder run), for the stage-two
tests. Class c puts a bright square in quadrant c of the image and a matching bump in a
few channels of the 64x64 embedding grid, so every model kind can learn it."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cache import Listing, StoreWriter, make_signature
from stages.datasets.base import Dataset, Sample


@dataclass
class ArrayDataset(Dataset):
    images: list[np.ndarray] = field(default_factory=list)

    def load_image(self, i: int) -> np.ndarray:
        return self.images[i]


def toy_images(n_per_class: int, num_classes: int = 2, size: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for c in range(num_classes):
        for _ in range(n_per_class):
            img = rng.normal(60, 20, (size, size))
            qy, qx = divmod(c % 4, 2)
            h = size // 2
            y0, x0 = qy * h + rng.integers(0, h // 2), qx * h + rng.integers(0, h // 2)
            img[y0:y0 + h // 2, x0:x0 + h // 2] += 120
            images.append(np.clip(img, 0, 255).astype(np.uint8))
            labels.append(c)
    return images, np.asarray(labels)


def toy_embeddings(images: list[np.ndarray], labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """(N,256,64,64) float32: noise plus the image's bright region in channels 8c..8c+7."""
    rng = np.random.default_rng(seed + 1)
    out = rng.normal(0, 0.5, (len(images), 256, 64, 64)).astype(np.float32)
    for i, (img, c) in enumerate(zip(images, labels)):
        s = img.shape[0]
        grid = (img.astype(np.float32) / 255.0).repeat(64 // s, 0).repeat(64 // s, 1) if s <= 64 else \
            img.astype(np.float32)[:: s // 64, :: s // 64] / 255.0
        out[i, 8 * c:8 * c + 8] += 2 * grid[None]
    return out


def make_toy(root: str | Path, n_per_class: int = 12, num_classes: int = 2, size: int = 32, seed: int = 0,
             splits: bool = True, shard: int = 8, kind: str = "toy") -> tuple[ArrayDataset, str]:
    """The dataset and the path of a complete float16 store of it (shard size ``shard``)."""
    images, labels = toy_images(n_per_class, num_classes, size, seed)
    n = len(images)
    order = np.random.default_rng(seed + 2).permutation(n)
    images, labels = [images[i] for i in order], labels[order]
    names = ["train", "train", "train", "val", "test"]
    samples = [Sample(id=f"img{i:04d}", label=int(labels[i]), split=names[i % 5] if splits else "")
               for i in range(n)]
    ds = ArrayDataset(root=Path(root), kind=kind, samples=samples, classes=[f"c{c}" for c in range(num_classes)],
                      images=images)
    url = str(Path(root) / "toy.zarr")
    sig = make_signature(encoder="toy", checkpoint_sha256="0" * 64, img_size=256, preprocessing={},
                         precision="fp32", dataset_kind=ds.kind, dataset_signature=ds.signature(), dtype="float16")
    listing = Listing(ids=ds.ids, labels=[s.label for s in samples], splits=[s.split for s in samples],
                      groups=[""] * n, slices=[-1] * n)
    emb = toy_embeddings(images, labels, seed)
    with StoreWriter.open(url, signature=sig, listing=listing, classes=ds.classes, shard_size=shard,
                          provenance={"dataset_root": str(root)}) as w:
        for a, b in w.shards():
            w.write_shard(a, emb[a:b])
            w.mark_done(a, [size] * (b - a), [size] * (b - a), [ds.content_hash(i) for i in range(a, b)],
                        [False] * (b - a))
        w.commit()
    return ds, url
