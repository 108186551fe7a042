"""Decode one image file into a numpy array in its own dtype (no scaling, no resizing).

Supported: PNG, JPEG, TIFF, BMP through Pillow and ``.npy`` through numpy.

Pixel modes -> arrays (``read_image``):
  1 (bilevel) -> (H,W) uint8 0/255;  L -> (H,W) uint8;  I;16 -> (H,W) uint16;
  I -> (H,W) int32;  F -> (H,W) float32;  LA -> (H,W) (alpha dropped);
  RGB -> (H,W,3);  RGBA -> (H,W,4);  P/PA (palette) -> (H,W,3) RGB;  CMYK/YCbCr/... -> RGB.
  ``.npy``: (H,W), (H,W,1) (squeezed), (H,W,3) or (H,W,4), any real dtype (bool -> uint8).

Refused with ``BadImageError`` (message names the file and the fix): empty file, a file
that is not an image, truncated/corrupt data, multi-frame files (multi-page TIFF, GIF),
images with a side below ``MIN_SIDE`` pixels (a 1x1 image is almost always a placeholder
or a broken export, and no encoder input can be made from it), more than ``max_pixels``
pixels (decompression-bomb guard, checked from the header before decoding), and NaN/inf
pixels in float images.

Known limits: Pillow reads 16-bit-per-channel RGB PNGs as 8-bit and cannot read 12-bit
JPEG; convert such files to 16-bit grayscale PNG/TIFF or ``.npy``.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from stages.datasets.base import BadImageError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".npy")
MAX_PIXELS = 100_000_000  # default decompression-bomb limit (pixels per image)
MIN_SIDE = 8  # smallest accepted height/width

_KEEP = {"L", "I", "F", "RGB", "RGBA", "I;16", "I;16L", "I;16B", "I;16N"}
_TO_RGB = {"P", "PA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
_MASK_NAME = re.compile(r"^(?P<base>.+)_mask(?:_\d+)?$")


def is_image_file(path: Path) -> bool:
    """True for visible files with one of ``IMAGE_EXTS`` (case-insensitive)."""
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTS


def mask_base(stem: str) -> str | None:
    """``x_mask`` / ``x_mask_3`` -> ``x``; None when ``stem`` is not a mask name."""
    m = _MASK_NAME.match(stem)
    return m["base"] if m else None


def _bad(where: object, what: str, fix: str) -> BadImageError:
    return BadImageError(f"{where}: {what}; {fix}")


def check_array(
    image: np.ndarray, where: object, max_pixels: int = MAX_PIXELS, min_side: int = MIN_SIDE
) -> np.ndarray:
    """Validate decoded pixels: (H,W) or (H,W,C) with C in {1,3,4} ((H,W,1) is squeezed),
    a real dtype (bool -> uint8), sides >= ``min_side``, H*W <= ``max_pixels``, finite
    floats. ``where`` names the source in error messages. Returns the (possibly squeezed)
    array, native byte order."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise _bad(where, f"array of shape {a.shape} is not an image",
                   "store (H,W) grayscale or (H,W,3)/(H,W,4) colour pixels")
    if a.dtype == bool:
        a = a.astype(np.uint8)
    if a.dtype.kind not in "uif":
        raise _bad(where, f"pixel dtype {a.dtype} is not numeric", "store integer or float pixels")
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    _check_size(where, a.shape[0], a.shape[1], max_pixels, min_side)
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        n = int(a.size - np.isfinite(a).sum())
        raise _bad(where, f"{n} NaN/inf pixel value(s)", "fix or remove the image (pixels must be finite)")
    return a


def _check_size(where: object, h: int, w: int, max_pixels: int, min_side: int) -> None:
    if h * w > max_pixels:
        raise _bad(where, f"image is {w}x{h} = {h * w} pixels, over the limit of {max_pixels}",
                   "downscale it, or raise max_pixels if the file is trusted")
    if min(h, w) < min_side:
        raise _bad(where, f"image is {w}x{h} pixels, smaller than the {min_side}x{min_side} minimum",
                   "remove the placeholder/broken image or re-export it")


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise _bad(path, "file not found", "check the dataset listing and --data-root")
    if path.stat().st_size == 0:
        raise _bad(path, "file is empty (0 bytes)", "re-export or remove it")


def _open_pil(path: Path, max_pixels: int) -> Image.Image:
    """Open (header only) with the decompression-bomb guard; the caller closes it."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and max_pixels > limit:
        # Pillow's own guard is process-global; lift it so that ours decides.
        Image.MAX_IMAGE_PIXELS = max_pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(path)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            raise _bad(path, f"over the pixel limit ({e})",
                       "downscale it, or raise max_pixels if the file is trusted") from None
        except UnidentifiedImageError:
            raise _bad(path, "not a readable image (unknown or corrupt format)",
                       "check the file type, or remove it from the dataset") from None
        except Exception as e:  # Pillow raises many types on broken headers
            raise _bad(path, f"cannot read image header ({type(e).__name__}: {e})",
                       "the file is corrupt; re-export or remove it") from None
    try:
        if getattr(im, "n_frames", 1) > 1:
            raise _bad(path, f"file holds {im.n_frames} frames/pages",
                       "save one 2D image per file (or use .npy)")
        _check_size(path, im.height, im.width, max_pixels, MIN_SIDE)
    except BadImageError:
        im.close()
        raise
    return im


def _decode(path: Path, im: Image.Image, mask: bool) -> np.ndarray:
    mode = im.mode
    try:
        if mode == "1":
            im = im.convert("L")
            a = np.array(im)
            return (a > 0).astype(np.uint8) if mask else a
        if mode in ("LA", "La"):
            im = im.convert("L")
        elif mode == "RGBa":
            im = im.convert("RGBA")
        elif mode in ("P", "PA") and mask:
            im = im.convert("P") if mode == "PA" else im  # palette indices are the labels
        elif mode in _TO_RGB:
            im = im.convert("RGB")
        elif mode not in _KEEP:
            raise _bad(path, f"unsupported pixel mode {mode!r}",
                       "convert it to 8/16-bit grayscale, RGB or float TIFF")
        return np.array(im)
    except BadImageError:
        raise
    except Exception as e:  # truncated data: OSError; broken chunks: SyntaxError, zlib errors
        raise _bad(path, f"cannot decode image ({type(e).__name__}: {e})",
                   "the file is truncated or corrupt; re-export or remove it") from None


def _load_npy(path: Path, max_pixels: int) -> np.ndarray:
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:
        raise _bad(path, f"not a readable .npy array ({type(e).__name__}: {e})",
                   "save it with numpy.save, or remove it") from None
    if a.ndim >= 2:  # size check before reading the pixels
        _check_size(path, a.shape[0], a.shape[1], max_pixels, MIN_SIDE)
    try:
        a = np.array(a)
    except Exception as e:
        raise _bad(path, f"cannot read .npy data ({type(e).__name__}: {e})",
                   "the file is truncated or corrupt; re-save it") from None
    return a


def read_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Pixels of one image file: (H,W) or (H,W,C), C in {3,4}, in the file's own dtype
    (uint8, uint16, int32, float32, ...). Raises BadImageError naming the file."""
    path = Path(path)
    _check_file(path)
    if path.suffix.lower() == ".npy":
        return check_array(_load_npy(path, max_pixels), path, max_pixels)
    with _open_pil(path, max_pixels) as im:
        a = _decode(path, im, mask=False)
    return check_array(a, path, max_pixels)


def read_mask(path: str | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """(H,W) integer pixel labels of one mask file, values as stored.

    Palette PNGs give palette indices; bilevel images 0/1; RGB(A) masks must be gray
    (R == G == B, alpha ignored); float masks must hold whole numbers."""
    path = Path(path)
    _check_file(path)
    if path.suffix.lower() == ".npy":
        a = _load_npy(path, max_pixels)
    else:
        with _open_pil(path, max_pixels) as im:
            a = _decode(path, im, mask=True)
    a = check_array(a, path, max_pixels)
    if a.ndim == 3:
        if not ((a[:, :, 0] == a[:, :, 1]).all() and (a[:, :, 0] == a[:, :, 2]).all()):
            raise _bad(path, "colour mask (R, G, B differ)",
                       "save masks as single-channel class indices (grayscale or palette PNG)")
        a = a[:, :, 0]
    if a.dtype.kind == "f":
        if not (a == np.round(a)).all():
            raise _bad(path, "float mask with fractional values", "save masks as integer class indices")
        a = a.astype(np.int64)
    if a.dtype.kind == "i" and a.size and a.min() < 0:
        raise _bad(path, "negative mask values", "save masks as class indices >= 0")
    return a


def image_shape(path: str | Path, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(H, W) of an image file from its header only (no pixel decoding)."""
    path = Path(path)
    _check_file(path)
    if path.suffix.lower() == ".npy":
        try:
            a = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as e:
            raise _bad(path, f"not a readable .npy array ({type(e).__name__}: {e})",
                       "save it with numpy.save, or remove it") from None
        if a.ndim < 2:
            raise _bad(path, f"array of shape {a.shape} is not an image", "store (H,W) or (H,W,C) pixels")
        return int(a.shape[0]), int(a.shape[1])
    with _open_pil(path, max_pixels) as im:
        return im.height, im.width
