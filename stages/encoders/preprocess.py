"""CPU preprocessing of raw pixels for each encoder family (no network weights here, so
DataLoader workers can import and pickle it cheaply).

Channels, for every encoder: (H,W) and (H,W,1) are grayscale and repeated to RGB;
(H,W,2) is grayscale + alpha and (H,W,4) RGBA: the alpha channel is dropped.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import numpy as np
import torch
from segment_anything.utils.transforms import ResizeLongestSide
from torch.nn import functional as F

from stages.encoders.resize import longest_side_shape, resize_area

SAM_PIXEL_MEAN = [123.675, 116.28, 103.53]
SAM_PIXEL_STD = [58.395, 57.12, 57.375]

LITEMEDSAM_PREPROCESSING = {
    "channels": "gray_to_rgb_drop_alpha",
    "resize": "longest_side_area",
    "target": 256,
    "normalize": "minmax",
    "pad": "bottom_right_zero",
}
#: ``--resize`` of the SAM ViT encoders -> the ``resize`` their preprocessing records. exact:
#: ``ResizeLongestSide.apply_image``, PIL's antialiased bilinear in 8-bit fixed point (the
#: reference, and every store made before the choice existed); fast: torch's antialiased
#: bilinear uint8 kernel, several times cheaper on the host (the limit on a GPU). Same filter,
#: other fixed-point rounding and (for tall images Pillow >= 13 shrinks vertically first)
#: another pass order: values differ by 1 level in 0-0.5% of them (~20% for those tall
#: images; 2 levels in ~1e-7 of a downscaled image's values), so it is a different
#: preprocessing, recorded as such.
SAM_RESIZES = {"exact": "longest_side_pil_bilinear", "fast": "longest_side_torch_bilinear_antialias_u8"}
SAM_PREPROCESSING = {
    "channels": "gray_to_rgb_drop_alpha",
    "to_uint8": "minmax_round_unless_uint8",
    "resize": SAM_RESIZES["exact"],
    "target": 1024,
    "normalize": "mean_std",
    "pixel_mean": SAM_PIXEL_MEAN,
    "pixel_std": SAM_PIXEL_STD,
    "pad": "bottom_right_zero",
}


def check_resize(resize: str) -> str:
    """``resize`` if it is a ``--resize`` choice, else ValueError naming the choices."""
    if resize not in SAM_RESIZES:
        raise ValueError(f"--resize {resize!r}: unknown; use exact (the reference's PIL resize, the default) or fast "
                         "(torch's uint8 kernel, SAM ViT encoders only)")
    return resize


def resize_choice(preprocessing: Mapping[str, Any] | None) -> str:
    """The ``--resize`` a recorded preprocessing was made with: fast only where it names
    torch's kernel; exact for every other (LiteMedSAM, SAM 2, stores made before)."""
    return "fast" if (preprocessing or {}).get("resize") == SAM_RESIZES["fast"] else "exact"


def sam_preprocessing(size: int = 1024, resize: str = "exact") -> dict[str, Any]:
    """The preprocessing a SAM ViT encoder of input ``size`` records (with ``resize``)."""
    return dict(SAM_PREPROCESSING, target=size, resize=SAM_RESIZES[check_resize(resize)])


def gray_or_rgb(image: np.ndarray) -> np.ndarray:
    """(H,W[,C]) of any dtype -> (H,W) grayscale or (H,W,3) RGB, same dtype, alpha
    dropped; refuses other shapes, empty and non-finite images."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] in (1, 2):
        a = a[:, :, 0]
    elif a.ndim == 3 and a.shape[2] == 4:
        a = a[:, :, :3]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)):
        raise ValueError(f"expected an image (H,W), (H,W,1), (H,W,2), (H,W,3) or (H,W,4), "
                         f"got shape {np.shape(image)}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"empty image of shape {a.shape}")
    if a.dtype.kind not in "biuf":
        raise ValueError(f"unsupported image dtype {a.dtype}")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise ValueError("image contains NaN or infinite values")
    return a


def to_rgb(image: np.ndarray) -> np.ndarray:
    """(H,W[,C]) of any dtype -> (H,W,3), same dtype (gray repeated, alpha dropped)."""
    a = gray_or_rgb(image)
    return np.repeat(a[:, :, None], 3, axis=2) if a.ndim == 2 else a


def to_uint8_minmax(image: np.ndarray) -> np.ndarray:
    """uint8 stays as is; any other dtype is min-max scaled to 0..255 over the whole image
    and rounded (half to even); a constant image becomes 0."""
    if image.dtype == np.uint8:
        return image
    x = image.astype(np.float64)
    lo, hi = x.min(), x.max()
    if hi <= lo:
        return np.zeros(image.shape, np.uint8)
    return np.rint((x - lo) * (255.0 / (hi - lo))).clip(0, 255).astype(np.uint8)


def resizable(image: np.ndarray) -> np.ndarray:
    """Dtypes cv2's INTER_AREA resize lacks become the nearest one it has: bool -> uint8,
    int8 -> int16, float16 -> float32, 32/64-bit integers -> float64."""
    kind, size = image.dtype.kind, image.dtype.itemsize
    if kind == "b":
        return image.astype(np.uint8)
    if kind == "i" and size == 1:
        return image.astype(np.int16)
    if kind == "f" and size == 2:
        return image.astype(np.float32)
    if kind in "iu" and size >= 4:
        return image.astype(np.float64)
    return image


def prepare_litemedsam(image: np.ndarray, size: int = 256) -> torch.Tensor:
    """(H,W[,C]) any dtype -> (3,size,size) float32, as LiteMedSAM's reference inference
    (CVPR24_LiteMedSAM_infer.py): RGB, INTER_AREA resize of the long side to ``size``,
    min-max to [0,1] over the resized image, zero padding at the bottom/right."""
    img = resizable(gray_or_rgb(image))
    newh, neww = longest_side_shape(img.shape[0], img.shape[1], size)
    # the reference repeats gray to RGB first; resizing one channel is the same, given
    # cv2's channel-dependent kernel choice (cv_channels)
    r = resize_area(img, (newh, neww), cv_channels=3)
    if r.ndim == 2:
        r = r[:, :, None]
    if r.dtype.kind in "iu":  # exact (uint8 matches the reference's uint8 arithmetic)
        r = r.astype(np.float64)
    norm = (r - r.min()) / np.clip(r.max() - r.min(), a_min=1e-8, a_max=None)
    out = np.zeros((3, size, size), np.float32)  # numpy: tiny torch ops are slow in workers
    out[:, :newh, :neww] = norm.transpose(2, 0, 1)  # broadcasts a gray channel to three
    return torch.from_numpy(out)


_MEAN = np.array(SAM_PIXEL_MEAN, np.float32)
_STD = np.array(SAM_PIXEL_STD, np.float32)


# (x - mean) / std of every uint8 value, per channel, in float32 exactly as Sam.preprocess
# computes it: a lookup gives the same bits at a quarter of the cost of the arithmetic
_SAM_LUT = (np.arange(256, dtype=np.float32)[None, :] - _MEAN[:, None]) / _STD[:, None]  # (3,256)


def resize_u8_torch(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """uint8 (h,w) or (h,w,3) -> (shape[0],shape[1][,3]) uint8 by torch's antialiased
    bilinear uint8 kernel (fixed point, AVX2 on x86; horizontal pass first): PIL's filter,
    not quite PIL's rounding (see ``SAM_RESIZES``)."""
    if not a.flags.writeable:  # torch warns on read-only arrays (decoded images are writable)
        a = a.copy()
    t = torch.from_numpy(a)
    # HWC viewed as a channels-last (1,3,h,w): the layout the uint8 kernel works in, no copy
    x = t[None, None] if a.ndim == 2 else t.permute(2, 0, 1)[None]
    y = F.interpolate(x, size=tuple(shape), mode="bilinear", antialias=True, align_corners=False)
    return y[0, 0].numpy() if a.ndim == 2 else y[0].permute(1, 2, 0).numpy()


def resize_sam_u8(image: np.ndarray, size: int = 1024, resize: str = "exact") -> np.ndarray:
    """(H,W[,C]) any dtype -> the uint8 (h,w) or (h,w,3) image ``SamPredictor.set_image``
    feeds its normaliser: min-max to 0..255 unless uint8, ``ResizeLongestSide(size)``
    (``resize`` fast: the same shape by ``resize_u8_torch`` instead of PIL).
    Grayscale, and RGB whose three channels are equal (gray stored as RGB, common for
    X-rays), is resized as one channel: PIL and torch resize channels independently, so
    this is the RGB result's every channel, bit for bit, at a third of the cost."""
    a = to_uint8_minmax(gray_or_rgb(image))
    if a.ndim == 3 and (a[:, :, 0] == a[:, :, 1]).all() and (a[:, :, 0] == a[:, :, 2]).all():
        a = a[:, :, 0]
    if check_resize(resize) == "fast":
        return resize_u8_torch(a, ResizeLongestSide.get_preprocess_shape(a.shape[0], a.shape[1], size))
    return ResizeLongestSide(size).apply_image(a)


def prepare_sam(image: np.ndarray, size: int = 1024, resize: str = "exact") -> torch.Tensor:
    """(H,W[,C]) any dtype -> (3,size,size) float32, exactly as ``SamPredictor.set_image``:
    uint8 RGB (other dtypes: min-max to 0..255 and rounded), ``ResizeLongestSide(size)``
    (PIL bilinear; ``resize`` fast: torch's kernel), ``(x - pixel_mean) / pixel_std``, zero
    padding at the bottom/right."""
    r = resize_sam_u8(image, size, resize)
    out = np.zeros((3, size, size), np.float32)
    for c in range(3):
        np.take(_SAM_LUT[c], r if r.ndim == 2 else r[:, :, c], out=out[c, : r.shape[0], : r.shape[1]])
    return torch.from_numpy(out)


def prepare_sam_reference(image: np.ndarray, size: int = 1024) -> np.ndarray:
    """``prepare_sam`` written plainly (RGB resize, float32 ``(x - mean) / std``), the way
    ``SamPredictor`` does it: the definition the faster path (grey resized as one channel,
    a lookup table, or the uint8 canvas finished on the device) must equal bit for bit.
    Tests and the host-path benchmark compare against it; extraction does not call it."""
    r = ResizeLongestSide(size).apply_image(to_uint8_minmax(to_rgb(image)))
    x = (r.astype(np.float32) - _MEAN) / _STD
    out = np.zeros((3, size, size), np.float32)
    out[:, : x.shape[0], : x.shape[1]] = x.transpose(2, 0, 1)
    return out


def prepare_sam_u8(image: np.ndarray, size: int = 1024, resize: str = "exact") -> torch.Tensor:
    """The host half of ``prepare_sam`` for a GPU: the resized uint8 image on a zero
    (3,size,size) uint8 canvas (a quarter of the float32 bytes to move and pin);
    ``finish_sam`` normalises it on the device to exactly ``prepare_sam``'s values (of the
    same ``resize``)."""
    r = resize_sam_u8(image, size, resize)
    out = np.zeros((3, size, size), np.uint8)
    out[:, : r.shape[0], : r.shape[1]] = r if r.ndim == 2 else r.transpose(2, 0, 1)
    return torch.from_numpy(out)


@functools.lru_cache(maxsize=None)
def _sam_lut(device: str) -> torch.Tensor:
    # once per device: a copy from pageable memory per batch would wait for the GPU's queue
    return torch.from_numpy(_SAM_LUT).to(device)


def finish_sam(batch: torch.Tensor, heights, widths, size: int = 1024) -> torch.Tensor:
    """(B,3,size,size) uint8 canvases of ``prepare_sam_u8`` (images of the original
    ``heights`` x ``widths``), on any device -> ``prepare_sam``'s float32 batch there:
    the same float32 lookup table, and zeros outside each resized image."""
    lut = _sam_lut(str(batch.device))
    x = torch.stack([lut[c][batch[:, c].long()] for c in range(3)], dim=1)
    rows = torch.arange(size, device=batch.device)
    for k, (h, w) in enumerate(zip(heights, widths)):
        nh, nw = ResizeLongestSide.get_preprocess_shape(int(h), int(w), size) if h and w else (0, 0)
        inside = (rows[:, None] < nh) & (rows[None, :] < nw)
        x[k] = torch.where(inside, x[k], 0.0)  # +0.0 outside, as np.zeros (a product could give -0.0)
    return x
