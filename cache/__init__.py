"""The Zarr feature-store format of stage one: schema, writer, reader, signature.

This package depends on nothing else in the project (stages/ and pipeline/ build on it).
"""
from .reader import FeatureStore
from .schema import DEFAULT_SHARD, EMBED_SHAPE, FORMAT, SCHEMA_VERSION, SIGNATURE_KEYS
from .signature import (
    IncompleteStoreError,
    SignatureMismatchError,
    StoreError,
    check_signature,
    make_signature,
)
from .writer import Listing, StoreWriter, quantize, shard_ranges, write_shard

__all__ = [
    "DEFAULT_SHARD",
    "EMBED_SHAPE",
    "FORMAT",
    "SCHEMA_VERSION",
    "SIGNATURE_KEYS",
    "FeatureStore",
    "IncompleteStoreError",
    "Listing",
    "SignatureMismatchError",
    "StoreError",
    "StoreWriter",
    "check_signature",
    "make_signature",
    "quantize",
    "shard_ranges",
    "write_shard",
]
