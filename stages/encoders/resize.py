"""``cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)`` re-implemented in numpy.

OpenCV is only a test dependency, yet LiteMedSAM's reference preprocessing resizes with
``INTER_AREA``. This module follows OpenCV's ``resize.cpp`` step by step, in the same
floating-point precision and order of operations, so its output equals cv2's bit for bit
(the tests check this against cv2 on many sizes):

- both scale factors >= 1 (shrinking): true area averaging. Integer factors take cv2's
  "fast" block-sum path; other factors use fractional box weights (float32 weights,
  float32 accumulation; float64 for float64 input).
- otherwise (enlarging along at least one axis): cv2 falls back to a two-tap linear filter
  whose coefficients are ``fx = (dx+1) - (sx+1)/scale`` (wrapped to [0,1)), with
  ``sx = floor(dx*scale)``. uint8 uses cv2's 11-bit fixed point arithmetic.

Results are rounded back to the input's integer dtype like cv2's ``saturate_cast``
(round half to even, clipped). Supported dtypes are cv2's: uint8, uint16, int16,
float32, float64.
"""
from __future__ import annotations

import math

import numpy as np

SUPPORTED = (np.uint8, np.uint16, np.int16, np.float32, np.float64)
_DBL_EPS = 2.220446049250313e-16
_COEF_BITS = 11  # INTER_RESIZE_COEF_BITS
_COEF_ONE = 1 << _COEF_BITS


def longest_side_shape(h: int, w: int, target: int) -> tuple[int, int]:
    """(newh, neww) with the long side scaled to ``target``, rounded as SAM/LiteMedSAM do."""
    scale = target * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def resize_area(img: np.ndarray, size: tuple[int, int], cv_channels: int | None = None) -> np.ndarray:
    """img (H,W) or (H,W,C) -> (h,w) or (h,w,C) of the same dtype, ``size=(h, w)``; equals
    ``cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)`` (which drops a trailing
    channel axis of length 1; this function keeps the input's ndim).

    cv2 picks some SIMD kernels by channel count, which changes float32 results in the
    last bit; ``cv_channels`` reproduces cv2 run on an array with that many (identical)
    channels, e.g. 3 for a gray image that the reference repeats to RGB before resizing.
    """
    if img.dtype.type not in SUPPORTED:
        raise TypeError(f"resize_area supports {[t.__name__ for t in SUPPORTED]}, got {img.dtype}")
    h, w = int(size[0]), int(size[1])
    if h <= 0 or w <= 0 or img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"cannot resize an image of shape {img.shape} to {(h, w)}")
    gray = img.ndim == 2
    x = img[:, :, None] if gray else img
    if (h, w) == x.shape[:2]:
        out = x.copy()
    else:
        out = _resize(x, h, w, cv_channels or x.shape[2])
    return out[:, :, 0] if gray else out


def _resize(x: np.ndarray, h: int, w: int, cn: int) -> np.ndarray:
    sh, sw = x.shape[:2]
    inv_x, inv_y = w / sw, h / sh
    scale_x, scale_y = 1.0 / inv_x, 1.0 / inv_y
    if scale_x >= 1 and scale_y >= 1:
        ix, iy = round(scale_x), round(scale_y)
        if abs(scale_x - ix) < _DBL_EPS and abs(scale_y - iy) < _DBL_EPS:
            return _area_fast(x, ix, iy, h, w, cn)
        return _area(x, scale_x, scale_y, h, w)
    return _linear(x, scale_x, scale_y, inv_x, inv_y, h, w)


def _cast(acc: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """saturate_cast<T>: round half to even, clip to the integer range."""
    if np.issubdtype(dtype, np.floating):
        return acc.astype(dtype)
    info = np.iinfo(dtype)
    return np.clip(np.rint(acc), info.min, info.max).astype(dtype)


# -- shrinking by integer factors (resizeAreaFast_) ------------------------------------

def _area_fast(x: np.ndarray, ix: int, iy: int, h: int, w: int, cn: int) -> np.ndarray:
    c, area = x.shape[2], ix * iy
    blocks = x[: h * iy, : w * ix].reshape(h, iy, w, ix, c)
    if x.dtype.kind in "ui" and ix == 2 and iy == 2 and cn in (1, 3, 4):
        # the SIMD kernel for 2x2 integers: (sum + 2) >> 2, i.e. rounding half up
        return _cast((blocks.sum(axis=(1, 3), dtype=np.int64) + 2) >> 2, x.dtype)
    if x.dtype == np.uint8:  # the scalar kernel: an int sum times (float)(1/area)
        s = blocks.sum(axis=(1, 3), dtype=np.int64).astype(np.float32)
        return _cast(s * np.float32(1.0 / area), x.dtype)
    # other dtypes: each block summed in row-major order, four pixels at a time, into a
    # float accumulator (float64 for float64 images), then times (float)(1/area)
    wt = np.float64 if x.dtype == np.float64 else np.float32
    src = blocks.astype(np.int64 if x.dtype.kind in "ui" else wt)
    terms = src.transpose(1, 3, 0, 2, 4).reshape(area, h, w, c)
    acc = np.zeros((h, w, c), wt)
    for t in range(0, area // 4 * 4, 4):  # integer pixels add up exactly within a group
        acc = acc + (((terms[t] + terms[t + 1]) + terms[t + 2]) + terms[t + 3]).astype(wt)
    for t in range(area // 4 * 4, area):
        acc = acc + terms[t].astype(wt)
    acc = acc * wt(np.float32(1.0 / area))
    if ix == 2 and iy == 2 and cn in (1, 4) and wt == np.float32 and x.dtype == np.float32:
        # 128-bit SIMD kernel for 2x2 float32: (a+b)+(c+d), 4 floats at a time; the
        # remainder of a row (single channel only) is left to the scalar loop
        simd = ((terms[0] + terms[1]) + (terms[2] + terms[3])) * np.float32(0.25)
        n = w if cn == 4 else w // 4 * 4
        acc[:, :n] = simd[:, :n]
    return _cast(acc, x.dtype)


# -- shrinking by fractional factors (ResizeArea_Invoker) -------------------------------

def _area_tab(ssize: int, dsize: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """computeResizeAreaTab as (dsize, K) source indexes and float32 weights, terms in
    cv2's order, zero-weight padding."""
    rows: list[list[tuple[int, float]]] = []
    for dx in range(dsize):
        fsx1 = dx * scale
        fsx2 = fsx1 + scale
        cell = min(scale, ssize - fsx1)
        sx1, sx2 = math.ceil(fsx1), math.floor(fsx2)
        sx2 = min(sx2, ssize - 1)
        sx1 = min(sx1, sx2)
        terms = []
        if sx1 - fsx1 > 1e-3:
            terms.append((sx1 - 1, (sx1 - fsx1) / cell))
        for sx in range(sx1, sx2):
            terms.append((sx, 1.0 / cell))
        if fsx2 - sx2 > 1e-3:
            terms.append((sx2, min(min(fsx2 - sx2, 1.0), cell) / cell))
        rows.append(terms)
    k = max(len(r) for r in rows)
    idx = np.zeros((dsize, k), np.int64)
    wgt = np.zeros((dsize, k), np.float32)
    for d, terms in enumerate(rows):
        for j, (s, a) in enumerate(terms):
            idx[d, j], wgt[d, j] = s, a
    return idx, wgt


def _area(x: np.ndarray, scale_x: float, scale_y: float, h: int, w: int) -> np.ndarray:
    sh, sw, _ = x.shape
    wt = np.float64 if x.dtype == np.float64 else np.float32
    xi, xw = _area_tab(sw, w, scale_x)
    yi, yw = _area_tab(sh, h, scale_y)
    src = x.astype(wt)
    xw, yw = xw.astype(wt), yw.astype(wt)
    buf = np.zeros((sh, w, x.shape[2]), wt)
    for j in range(xi.shape[1]):  # horizontal pass, per source row
        buf = buf + src[:, xi[:, j]] * xw[None, :, j, None]
    acc = np.zeros((h, w, x.shape[2]), wt)
    for j in range(yi.shape[1]):  # vertical pass
        acc = acc + yw[:, j, None, None] * buf[yi[:, j]]
    return _cast(acc, x.dtype)


# -- enlarging (linear interpolation with INTER_AREA coefficients) ---------------------

def _linear_tab(ssize: int, dsize: int, scale: float, inv: float):
    d = np.arange(dsize)
    s = np.floor(d * scale).astype(np.int64)
    f = ((d + 1) - (s + 1) * inv).astype(np.float32)
    f = np.where(f <= 0, np.float32(0), f - np.floor(f)).astype(np.float32)
    return s, f


def _linear(x, scale_x, scale_y, inv_x, inv_y, h, w) -> np.ndarray:
    sh, sw, _ = x.shape
    sx, fx = _linear_tab(sw, w, scale_x, inv_x)
    sy, fy = _linear_tab(sh, h, scale_y, inv_y)
    edge = sx >= sw - 1  # cv2 copies the last column there (xmax)
    sx = np.where(edge, sw - 1, sx)
    fx = np.where(edge, np.float32(0), fx)
    sx1 = np.minimum(sx + 1, sw - 1)
    sy1 = np.minimum(sy + 1, sh - 1)
    ax = np.stack([np.float32(1) - fx, fx], 1)
    ay = np.stack([np.float32(1) - fy, fy], 1)
    if x.dtype == np.uint8:
        return _linear_u8(x, sx, sx1, edge, sy, sy1, ax, ay)
    wt = np.float64 if x.dtype == np.float64 else np.float32
    src = x.astype(wt)
    ax, ay = ax.astype(wt), ay.astype(wt)
    buf = src[:, sx] * ax[None, :, 0, None] + src[:, sx1] * ax[None, :, 1, None]
    buf[:, edge] = src[:, sx[edge]]
    acc = buf[sy] * ay[:, 0, None, None] + buf[sy1] * ay[:, 1, None, None]
    return _cast(acc, x.dtype)


def _fix(a: np.ndarray) -> np.ndarray:
    return np.rint(a * np.float32(_COEF_ONE)).astype(np.int64)


def _linear_u8(x, sx, sx1, edge, sy, sy1, ax, ay) -> np.ndarray:
    ia, ib = _fix(ax).astype(np.int32), _fix(ay).astype(np.int32)
    src = x.astype(np.int32)  # every intermediate stays below 2**31
    buf = src[:, sx] * ia[None, :, 0, None] + src[:, sx1] * ia[None, :, 1, None]
    buf[:, edge] = src[:, sx[edge]] * _COEF_ONE
    b0, b1 = ib[:, 0, None, None], ib[:, 1, None, None]
    # cv2's SIMD vertical pass (VResizeLinearVec_32s8u): drop 4 bits, 16x16->high-16
    # multiply, then round off the last 2 bits; this is not (b0*S0 + b1*S1 + 2^21) >> 22
    acc = (((buf[sy] >> 4) * b0 >> 16) + ((buf[sy1] >> 4) * b1 >> 16) + 2) >> 2
    return np.clip(acc, 0, 255).astype(np.uint8)
