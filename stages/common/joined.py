"""A feature store joined with the dataset it was extracted from, for both stage-two tasks.

``open_joined`` opens both (the dataset from the store's recorded kind and root unless
given) and refuses, with one line naming the store and the fix, a store made from another
dataset listing (``check_match``) and samples whose image changed since extraction
(``check_fresh``, by content hash). ``check_encoder`` refuses scoring a model on
embeddings of another encoder, checkpoint, preprocessing or store schema.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from cache import FeatureStore, SignatureMismatchError, StoreError
from stages.datasets import open_dataset
from stages.common.geometry import input_geometry
from stages.datasets.base import Dataset

# signature fields that decide what the embeddings mean (the dataset may differ): an encoder's,
# and a store's (its encoder's plus the layout of what is stored)
ENCODER_KEYS = ("encoder", "checkpoint_sha256", "img_size", "preprocessing")
STORE_KEYS = (*ENCODER_KEYS, "schema_version")


@dataclass
class Joined:
    """A store and its dataset; ``rows``: the store rows a task can use (extracted without
    failure; for classification also labelled). Store row ``r`` is dataset sample ``r``:
    ``check_match`` guarantees one listing."""

    store: FeatureStore
    dataset: Dataset
    rows: np.ndarray

    @property
    def classes(self) -> list[str]:
        return list(self.store.classes) or [str(c) for c in range(int(self.store.labels.max()) + 1)]

    @property
    def labels(self) -> np.ndarray:
        return self.store.labels


def open_joined(store: str | FeatureStore, dataset: Dataset | None = None, kind: str | None = None,
                data_root: str | None = None, options: dict[str, Any] | None = None,
                verify: bool = True, labelled: bool = True,
                storage_options: dict[str, Any] | None = None) -> Joined:
    """Open ``store`` and its dataset and check they belong together (see module doc).

    ``labelled``: keep only rows with an image label (classification); ``verify``: check
    every kept row's content hash now (segmentation checks the rows it uses, lazily)."""
    fs = store if isinstance(store, FeatureStore) else FeatureStore(store, storage_options=storage_options)
    if dataset is None:
        kind = kind or fs.attrs.get("dataset_kind")
        root = data_root or fs.attrs.get("dataset_root")
        if not kind or not root:
            raise StoreError(f"{fs.url}: the store does not record its dataset; pass --dataset and --data-root")
        dataset = open_dataset(kind, root, **(options or {}))
    check_match(fs, dataset)
    usable = np.zeros(fs.n, bool)
    usable[fs.usable()] = True
    rows = np.flatnonzero(usable & (fs.labels >= 0)) if labelled else np.flatnonzero(usable)
    if len(rows) == 0:
        what = "labelled, successfully extracted" if labelled else "successfully extracted"
        need = "; classification needs image labels" if labelled else ""
        raise StoreError(f"{fs.url}: no {what} sample{need}")
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


def check_encoder(saved: Mapping[str, Any], store: FeatureStore, model_path: str | Path) -> None:
    """Refuse scoring a model on a store whose embeddings come from another encoder,
    checkpoint, preprocessing or store schema than its training store (``STORE_KEYS``)."""
    want, have = saved_store(saved)["signature"], store.signature
    diff = [k for k in STORE_KEYS if want.get(k) != have.get(k)]
    if diff:
        raise SignatureMismatchError(
            f"{store.url}: embeddings made differently from the store {model_path} was trained on ({', '.join(diff)} "
            f"differ: trained with {want.get('encoder')!r}, store has {have.get('encoder')!r}); extract the dataset "
            "with the training encoder")


def store_record(store: FeatureStore, splits: Mapping[str, Sequence[int]]) -> dict[str, Any]:
    """What a model.pt (either task) records of its training data: the store (url, signature,
    how to rebuild its encoder), the input geometry, and the split assignment as sample ids
    (store rows ``splits``), so evaluation reuses the same test set and --resume can check it."""
    attrs = store.attrs
    return {
        "store": {"url": store.url, "signature": store.signature, "encoder": attrs.get("encoder"),
                  "checkpoint_path": attrs.get("checkpoint_path"),
                  "fast_kernels": bool(attrs.get("fast_kernels", False))},
        "geometry": input_geometry(attrs.get("preprocessing")),  # padded or stretched input, for predict
        "splits": {s: [str(store.ids[int(r)]) for r in rows] for s, rows in splits.items()},
    }


def saved_store(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A model.pt's ``store`` record (segmentation models before version 2 kept it flat)."""
    if "store" in saved:
        return dict(saved["store"])
    return {"url": saved.get("config", {}).get("store"), "signature": saved.get("store_signature", {}),
            "encoder": saved.get("store_signature", {}).get("encoder"),
            "checkpoint_path": saved.get("checkpoint_path"), "fast_kernels": saved.get("fast_kernels")}


def store_encoder(record: Mapping[str, Any], device: Any, checkpoint: str | None = None):
    """The encoder a store was extracted with (``record``: a model.pt's ``saved_store``),
    with the same kernels and resize (``--resize``, read off the recorded preprocessing;
    stores made before it have PIL's, exact), verified by signature; ``checkpoint``
    replaces the recorded weights path (a store made on another machine)."""
    from stages.encoders import build_encoder
    from stages.encoders.preprocess import resize_choice

    path = checkpoint or record.get("checkpoint_path")
    if checkpoint is None and path and not Path(path).is_file():
        path = None  # e.g. a store made on another machine; the builder's default may still match
    resize = resize_choice(record["signature"].get("preprocessing"))
    enc = build_encoder(record["encoder"], path, device=device, fast=bool(record.get("fast_kernels")), resize=resize)
    have, want = enc.signature(), record["signature"]
    diff = [k for k in ENCODER_KEYS if have.get(k) != want.get(k)]
    if diff:
        # other weights are the user's to point at; other preprocessing (or input size) with
        # the same weights means this installation's code differs from the one that made the store
        fix = ("pass --checkpoint with the training encoder's weights" if "checkpoint_sha256" in diff else
               "this installation preprocesses differently from the one that made the store; predict with that "
               "version, or re-extract the store and retrain")
        raise SignatureMismatchError(
            f"encoder {record['encoder']!r} ({path or 'default weights'}) differs from the one the model's store was "
            f"made with ({', '.join(diff)}); {fix}")
    return enc
