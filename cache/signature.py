"""Store signatures: what must be equal for a store to be reused or trusted.

A signature is a plain JSON-able dict with the keys ``schema.SIGNATURE_KEYS``: the
encoder name, the sha256 of its checkpoint, the preprocessing parameters, the compute
precision, the dataset kind and listing signature, and the stored dtype. Two stores with
equal signatures hold the same embeddings (up to float rounding of the precision named).
"""
from __future__ import annotations

import json
from typing import Any, Mapping

from .schema import SCHEMA_VERSION, SIGNATURE_KEYS


class StoreError(RuntimeError):
    """A store cannot be used as asked (exit code 2); the message says why and the fix."""


class IncompleteStoreError(StoreError):
    pass


class SignatureMismatchError(StoreError):
    pass


def make_signature(
    *,
    encoder: str,
    checkpoint_sha256: str,
    img_size: int,
    preprocessing: Mapping[str, Any],
    precision: str,
    dataset_kind: str,
    dataset_signature: str,
    dtype: str,
) -> dict[str, Any]:
    sig = {
        "schema_version": SCHEMA_VERSION,
        "encoder": encoder,
        "checkpoint_sha256": checkpoint_sha256,
        "img_size": int(img_size),
        "preprocessing": dict(preprocessing),
        "precision": precision,
        "dataset_kind": dataset_kind,
        "dataset_signature": dataset_signature,
        "dtype": dtype,
    }
    # JSON round trip so comparisons see what the store will hold (tuples -> lists)
    return json.loads(json.dumps(sig, sort_keys=True))


def differences(stored: Mapping[str, Any], wanted: Mapping[str, Any], keys=SIGNATURE_KEYS) -> list[str]:
    """Names of the signature fields that differ, in ``keys`` order."""
    return [k for k in keys if k in wanted and stored.get(k) != wanted.get(k)]


def describe(stored: Mapping[str, Any], wanted: Mapping[str, Any], fields: list[str]) -> str:
    parts = []
    for k in fields:
        a, b = stored.get(k), wanted.get(k)
        if isinstance(a, str) and isinstance(b, str) and len(a) > 24:
            a, b = a[:12] + "...", b[:12] + "..."
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            # a dict (preprocessing) shows only its entries that differ: the whole of both
            # would bury the one setting (e.g. resize) that makes the stores differ
            keys = [x for x in {**a, **b} if a.get(x) != b.get(x)]
            a, b = {x: a.get(x) for x in keys}, {x: b.get(x) for x in keys}
        parts.append(f"{k}: store has {a!r}, asked for {b!r}")
    return "; ".join(parts)


def check_signature(path: str, stored: Mapping[str, Any], wanted: Mapping[str, Any], keys=SIGNATURE_KEYS) -> None:
    """Raise SignatureMismatchError naming the differing fields."""
    diff = differences(stored, wanted, keys)
    if diff:
        raise SignatureMismatchError(
            f"{path}: store was made differently ({describe(stored, wanted, diff)}); "
            "use another --out, or --overwrite to replace it"
        )
