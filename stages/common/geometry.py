"""Where an image lies on the encoder's square input: the one question stage two asks of a
store's recorded ``preprocessing``.

- ``PAD`` (SAM 1, LiteMedSAM, and any store whose preprocessing says nothing else): the
  long side is resized to the input size, the aspect ratio kept, and the rest of the
  square is zero padding at the bottom/right. The image covers the top-left of the 64x64
  grid and of the 256x256 logit canvas.
- ``STRETCH`` (SAM 2): the whole image is resized to the square without keeping the aspect
  ratio; it covers the whole grid and canvas, there is no padding.

Stage two follows the store: segmentation targets and logits (``segment.data``), the
classifier's image (``train.data.prepare_image``) and the UNet baseline's input all use
the store's geometry, so a head, SLCA's spatial alignment and the raw-image baselines see
one field of view. A model.pt records it (``"geometry"``) for evaluate/predict.
"""
from __future__ import annotations

from typing import Any, Mapping

PAD = "pad"
STRETCH = "stretch"
GEOMETRIES = (PAD, STRETCH)


def input_geometry(preprocessing: Mapping[str, Any] | None) -> str:
    """A store's ``preprocessing`` attrs -> ``STRETCH`` when its resize fills the square
    without keeping the aspect ratio (``"square_..."``, SAM 2), else ``PAD`` (also for a
    missing record: every store made before SAM 2 was padded)."""
    resize = str((preprocessing or {}).get("resize", ""))
    return STRETCH if resize.startswith("square") else PAD


def check_geometry(geometry: str) -> str:
    if geometry not in GEOMETRIES:
        raise ValueError(f"unknown input geometry {geometry!r}; expected one of {', '.join(GEOMETRIES)}")
    return geometry


def saved_geometry(saved: Mapping[str, Any]) -> str:
    """The geometry a model.pt was trained in: its ``"geometry"`` entry, else (a model
    saved before it was recorded) the one of the store preprocessing it recorded
    (``store.signature``; segmentation models before version 2: ``store_signature``)."""
    if saved.get("geometry"):
        return check_geometry(str(saved["geometry"]))
    sig = saved.get("store_signature") or (saved.get("store") or {}).get("signature") or {}
    return input_geometry(sig.get("preprocessing"))
