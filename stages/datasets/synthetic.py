"""Deterministic ultrasound-like phantoms: a learnable 3-class lesion dataset with masks.

``make_synthetic(out, n_per_class)`` writes
  out/images/<id>.png   8-bit grayscale B-mode-like image (size x size)
  out/masks/<id>.png    lesion mask, 0 = background, 1 = lesion
  out/manifest.csv      id,path,label,split,mask (read by the csv reader)
  out/synthetic.json    generation parameters
and ``open_synthetic(out)`` reads it back (mask_classes background, lesion).

Classes (breast-ultrasound lexicon, with overlapping random ranges):
  cyst       round, smooth sharp margin, anechoic, posterior acoustic enhancement
  benign     oval, wider than tall, smooth margin (mild lobulation), hypoechoic,
             homogeneous, thin echogenic capsule, little posterior effect
  malignant  irregular spiculated margin, taller than wide, heterogeneous hypoechoic
             interior, indistinct edge with echogenic halo, posterior shadowing,
             sometimes microcalcifications
Background: skin line, hypoechoic fat layer, echogenic glandular tissue, smooth
echogenicity variation, depth attenuation, correlated (Rayleigh) speckle, log compression;
optionally a sector (fan) field of view. Pure numpy without BLAS calls (fast under load,
no thread-count effects): same parameters -> byte-identical files on one machine.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from stages.datasets.base import DatasetError
from stages.datasets.files import FileDataset
from stages.datasets.imageio import MAX_PIXELS
from stages.datasets.manifest import open_csv
from stages.datasets.registry import register_dataset

CLASSES = ("benign", "cyst", "malignant")
VERSION = 1
MIN_SIZE = 32


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


@lru_cache(maxsize=16)
def _bspline(size: int, cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Cubic B-spline node indices (size,4) and weights (size,4), ``cells`` spans per side."""
    t = np.arange(size) / (size - 1) * cells
    i = np.minimum(np.floor(t).astype(np.int64), cells - 1)
    f = t - i
    w = np.stack([(1 - f) ** 3, 3 * f**3 - 6 * f**2 + 4, -3 * f**3 + 3 * f**2 + 3 * f + 1, f**3], axis=1) / 6
    return i[:, None] + np.arange(4), w.astype(np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """(size,size) smooth random field, unit variance, about ``cells`` bumps per side.

    Separable B-spline interpolation of a coarse random grid (gathers, no BLAS: fast
    and free of thread-count effects)."""
    g = rng.standard_normal((cells + 3, cells + 3), dtype=np.float32)
    idx, w = _bspline(size, cells)
    tmp = (g[idx] * w[:, :, None]).sum(axis=1)  # (size, cells+3)
    f = (tmp[:, idx] * w[None]).sum(axis=2)  # (size, size)
    return f / (f.std() + 1e-9)


def _box(a: np.ndarray, r: int, axis: int) -> np.ndarray:
    """Box filter of width 2r+1 along ``axis`` (edge padding), via cumulative sums."""
    if r <= 0:
        return a
    a = np.moveaxis(a, axis, 0)
    c = np.cumsum(np.concatenate([np.repeat(a[:1], r + 1, axis=0), a, np.repeat(a[-1:], r, axis=0)]), axis=0)
    return np.moveaxis((c[2 * r + 1:] - c[: -2 * r - 1]) / (2 * r + 1), 0, axis)


def _binomial(a: np.ndarray, axis: int, passes: int) -> np.ndarray:
    """``passes`` x [1,2,1]/4 smoothing along ``axis`` (edge padding); sigma ~ sqrt(passes/2)."""
    n = a.shape[axis]
    lo = [slice(None)] * a.ndim
    mid, hi = list(lo), list(lo)
    lo[axis], mid[axis], hi[axis] = slice(0, n), slice(1, n + 1), slice(2, n + 2)
    first, last = list(lo), list(lo)
    first[axis], last[axis] = slice(0, 1), slice(n - 1, n)
    for _ in range(passes):
        p = np.concatenate([a[tuple(first)], a, a[tuple(last)]], axis=axis)
        a = p[tuple(mid)] * 2
        a += p[tuple(lo)]
        a += p[tuple(hi)]
        a *= 0.25
    return a


def _speckle(rng: np.random.Generator, size: int) -> np.ndarray:
    """Correlated Rayleigh speckle amplitude, mean 1; cells wider laterally than axially."""
    k = (size / 256) ** 2
    z = rng.standard_normal((2, size, size), dtype=np.float32)
    z = _binomial(_binomial(z, 1, max(1, round(3 * k))), 2, max(1, round(8 * k)))
    amp = np.sqrt(z[0] ** 2 + z[1] ** 2)
    return amp / amp.mean()


def _angdiff(a: np.ndarray, b: float) -> np.ndarray:
    return (a - b + np.pi) % (2 * np.pi) - np.pi


def _lesion_params(rng: np.random.Generator, cls: str, size: int) -> dict:
    u = rng.uniform
    if cls == "cyst":
        r = u(0.06, 0.12) * size
        debris = rng.random() < 0.25  # complicated cyst: low-level internal echoes
        p = dict(a=r * u(0.95, 1.15), b=r * u(0.9, 1.05), angle=u(-0.3, 0.3),
                 echo=u(0.1, 0.22) if debris else u(0.0, 0.06), hetero=u(0.1, 0.3) if debris else 0.0,
                 edge=u(0.7, 1.2), post=u(1.5, 2.5), halo=0.0, capsule=0.0, lobes=[], spikes=[])
    elif cls == "benign":
        a = u(0.09, 0.16) * size
        p = dict(a=a, b=a * u(0.5, 0.8), angle=u(-0.4, 0.4), echo=u(0.2, 0.5), hetero=u(0.0, 0.15),
                 edge=u(0.8, 1.5), post=u(0.8, 1.3), halo=0.0, capsule=u(0.15, 0.35),
                 lobes=[(k, u(0.02, 0.07), u(0, 2 * np.pi)) for k in (2, 3, 4)], spikes=[])
    else:  # malignant
        b = u(0.08, 0.14) * size
        n = int(rng.integers(3, 14))
        p = dict(a=b * u(0.6, 0.95), b=b, angle=u(-0.4, 0.4), echo=u(0.15, 0.45), hetero=u(0.25, 0.6),
                 edge=u(1.5, 3.0), post=u(0.35, 0.8), halo=u(0.0, 0.4) if rng.random() < 0.6 else 0.0,
                 capsule=0.0,
                 lobes=[(k, u(0.03, 0.09), u(0, 2 * np.pi)) for k in (2, 3, 5, 7)],
                 spikes=[(u(0, 2 * np.pi), u(0.08, 0.4), u(0.04, 0.1)) for _ in range(n)],
                 calc=int(rng.integers(0, 7)) if rng.random() < 0.5 else 0)
    ext = max(p["a"], p["b"]) * 1.5
    p["cy"] = u(max(0.38 * size, ext + 0.12 * size), max(0.62 * size, ext + 0.12 * size))
    p["cx"] = u(max(0.3 * size, ext), min(0.7 * size, size - ext))
    return p


def _tissue(rng: np.random.Generator, yy: np.ndarray, s: int) -> np.ndarray:
    """Tissue echogenicity: skin line, fat layer, glandular tissue, smooth variation."""
    wave = 0.02 * s * _smooth_noise(rng, s, 3)
    skin, fat = rng.uniform(0.03, 0.05) * s, rng.uniform(0.14, 0.24) * s
    echo = 0.6 * np.exp(0.2 * _smooth_noise(rng, s, 6))
    echo = np.where(yy + wave < fat, echo * rng.uniform(0.45, 0.6), echo)
    return echo + 0.8 * np.exp(-0.5 * ((yy - skin) / (0.008 * s + 0.5)) ** 2)


def _lesion_shape(p: dict, yy: np.ndarray, xx: np.ndarray, s: int) -> tuple[tuple[slice, slice], np.ndarray]:
    """(window around the lesion, sd) with sd ~ signed distance to the margin in pixels.

    The polar boundary r(phi) lives in the rotated, axis-normalised frame; only a window
    around the lesion is computed."""
    reach = 2.4 * max(p["a"], p["b"]) + 0.06 * s + 4
    y0, y1 = max(0, int(p["cy"] - reach)), min(s, int(p["cy"] + reach) + 1)
    x0, x1 = max(0, int(p["cx"] - reach)), min(s, int(p["cx"] + reach) + 1)
    win = (slice(y0, y1), slice(x0, x1))
    wy, wx = yy[win], xx[win]
    dy, dx = wy - p["cy"], wx - p["cx"]
    c, sn = math.cos(p["angle"]), math.sin(p["angle"])
    u, v = (dx * c + dy * sn) / p["a"], (-dx * sn + dy * c) / p["b"]
    rho, phi = np.sqrt(u * u + v * v), np.arctan2(v, u)
    grid = np.linspace(-np.pi, np.pi, 4097)  # r(phi) is 1D: tabulate, then look up
    r = np.ones_like(grid)
    for k, amp, ph in p["lobes"]:
        r += amp * np.cos(k * grid + ph)
    for at, length, width in p["spikes"]:
        r += length * np.exp(-0.5 * (_angdiff(grid, at) / width) ** 2)
    lut = np.minimum(r, 2.2).astype(np.float32)
    bound = lut[np.clip(((phi + np.pi) * (4096 / (2 * np.pi))).astype(np.intp), 0, 4096)]
    return win, (bound - rho) * min(p["a"], p["b"])


def _lesion_echo(rng: np.random.Generator, p: dict, background: np.ndarray, win: tuple[slice, slice],
                 wy: np.ndarray, wx: np.ndarray, sd: np.ndarray, s: int) -> tuple[np.ndarray, np.ndarray]:
    """(echo on the window with the lesion blended in, lesion fraction ``inside`` 0..1)."""
    inside = np.clip(0.5 + sd / p["edge"], 0.0, 1.0)
    lesion = p["echo"] * 0.6 * np.exp(p["hetero"] * _smooth_noise(rng, s, 24)[win])
    if p.get("calc"):
        idx = np.flatnonzero(sd.ravel() > 2)
        for j in rng.choice(idx, size=min(p["calc"], idx.size), replace=False):
            cy, cx = divmod(int(j), sd.shape[1])
            lesion = lesion + 2.5 * np.exp(-((wy - wy[cy, cx]) ** 2 + (wx - wx[cy, cx]) ** 2)
                                           / (2 * (0.004 * s + 0.4) ** 2))
    e = background * (1 - inside) + lesion * inside
    if p["halo"]:
        e = e + p["halo"] * np.exp(-0.5 * ((sd + 0.02 * s) / (0.012 * s + 0.5)) ** 2) * (sd < 0)
    if p["capsule"]:
        e = e + p["capsule"] * np.exp(-0.5 * sd ** 2)
    return e, inside


def _posterior(echo: np.ndarray, mask: np.ndarray, full: np.ndarray, yy: np.ndarray, post: float,
               s: int) -> np.ndarray:
    """Posterior enhancement / shadow below the lesion, strongest behind its centre."""
    cols = full.max(axis=0)
    cols = _box(_box(cols, max(1, s // 64), axis=0), max(1, s // 64), axis=0)
    rows = np.where(mask.any(axis=0), s - 1 - np.argmax(mask[::-1], axis=0), s)
    below = np.clip((yy - rows[None, :]) / (0.02 * s), 0.0, 1.0)
    return echo * (1 + (post - 1) * cols[None, :] * below * np.exp(-(yy - rows[None, :]).clip(0) / (0.8 * s)))


def _scan(rng: np.random.Generator, echo: np.ndarray, yy: np.ndarray, xx: np.ndarray, s: int,
          fan: bool) -> tuple[np.ndarray, np.ndarray]:
    """(8-bit image, field-of-view mask): field of view, depth attenuation, speckle, log compression."""
    if fan:
        ay, half = -0.15 * s, rng.uniform(0.5, 0.65)
        r = np.sqrt((yy - ay) ** 2 + (xx - s / 2) ** 2)
        theta = np.arctan2(xx - s / 2, yy - ay)
        depth = (r + ay) / s
        fov = (np.abs(theta) < half) & (r < 1.12 * s)
    else:
        depth, fov = yy / s, np.ones((s, s), bool)
    echo = echo * np.exp(-rng.uniform(0.3, 1.0) * depth)
    env = echo * _speckle(rng, s)
    db = 20 * np.log10(env + 1e-3) + rng.uniform(-2, 2)
    img = np.clip((db + 40) / 46, 0, 1) * 255 * fov
    return np.round(img).astype(np.uint8), fov


def phantom(rng: np.random.Generator, cls: str, size: int = 256, fan: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One phantom of class ``cls``: image (size,size) uint8 and mask (size,size) uint8 0/1."""
    if cls not in CLASSES:
        raise ValueError(f"unknown phantom class {cls!r}; use one of {CLASSES}")
    yy, xx = _grid(size)
    s = size
    p = _lesion_params(rng, cls, s)
    echo = _tissue(rng, yy, s)
    win, sd = _lesion_shape(p, yy, xx, s)
    echo[win], inside = _lesion_echo(rng, p, echo[win], win, yy[win], xx[win], sd, s)
    mask = np.zeros((s, s), bool)
    mask[win] = sd > 0
    full = np.zeros((s, s), np.float32)
    full[win] = inside
    echo = _posterior(echo, mask, full, yy, p["post"], s)
    img, fov = _scan(rng, echo, yy, xx, s, fan)
    return img, (mask & fov).astype(np.uint8)


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


_OUR_NAME = re.compile(r"(%s)_\d{4,}\.png" % "|".join(CLASSES))


def _is_ours(meta_path: Path) -> bool:
    """synthetic.json written by make_synthetic (its ``generator`` field), not a look-alike."""
    try:
        return json.loads(meta_path.read_text()).get("generator") == "stages.datasets.synthetic"
    except (OSError, ValueError, AttributeError):
        return False


def make_synthetic(
    out: str | Path,
    n_per_class: int,
    size: int = 256,
    seed: int = 0,
    splits: tuple[float, float, float] = (0.6, 0.2, 0.2),
    fan: bool = False,
) -> Path:
    """Write ``n_per_class`` phantoms per class to ``out`` (see module docstring); returns ``out``.

    Image ``j`` of class ``c`` depends only on (seed, c, j, size, fan). Splits are
    stratified per class and seeded (train/val/test fractions ``splits``)."""
    out = Path(out)
    if n_per_class < 1 or size < MIN_SIZE:
        raise DatasetError(f"{out}: need n_per_class >= 1 and size >= {MIN_SIZE} (got {n_per_class}, {size})")
    if len(splits) != 3 or min(splits) < 0 or abs(sum(splits) - 1) > 1e-6:
        raise DatasetError(f"{out}: splits {tuple(splits)} must be three fractions >= 0 summing to 1")
    meta_path = out / "synthetic.json"
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out}: is a file, not a folder; nothing was changed, pick an empty or new folder")
    if out.exists() and any(out.iterdir()) and not _is_ours(meta_path):
        raise DatasetError(f"{out}: folder exists and is not a synthetic dataset; pick an empty or new folder")
    linked = [n for n in ("images", "masks", "manifest.csv", "synthetic.json") if (out / n).is_symlink()]
    if linked:  # writing (or deleting earlier phantoms) through it would reach someone else's folder
        raise DatasetError(f"{out / linked[0]}: is a link; nothing was changed, pick an empty or new folder")
    for sub in ("images", "masks"):
        (out / sub).mkdir(parents=True, exist_ok=True)
        for old in (out / sub).glob("*.png"):
            if _OUR_NAME.fullmatch(old.name):  # only the phantoms an earlier run wrote
                old.unlink()

    rows = []
    for ci, cls in enumerate(CLASSES):
        order = np.random.default_rng([seed, ci, 1 << 20]).permutation(n_per_class)
        n_train = round(splits[0] * n_per_class)
        n_val = round(splits[1] * n_per_class)
        split_of = {}
        for rank, j in enumerate(order):
            split_of[int(j)] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
        for j in range(n_per_class):
            sid = f"{cls}_{j:04d}"
            image, mask = phantom(np.random.default_rng([seed, ci, j]), cls, size, fan)
            (out / "images" / f"{sid}.png").write_bytes(_png(image))
            (out / "masks" / f"{sid}.png").write_bytes(_png(mask))
            rows.append([sid, f"images/{sid}.png", cls, split_of[j], f"masks/{sid}.png"])
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", "path", "label", "split", "mask"])
    w.writerows(rows)
    (out / "manifest.csv").write_text(buf.getvalue())
    meta = {"generator": "stages.datasets.synthetic", "version": VERSION, "n_per_class": n_per_class,
            "size": size, "seed": seed, "splits": list(splits), "fan": fan, "classes": list(CLASSES)}
    meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out


@register_dataset("synthetic")
def open_synthetic(root: str | Path, max_pixels: int = MAX_PIXELS) -> FileDataset:
    """Read a folder written by ``make_synthetic``."""
    root = Path(root)
    meta_path = root / "synthetic.json"
    if not meta_path.is_file():
        raise DatasetError(f"{root}: no synthetic.json; create the dataset first with make_synthetic(out, n_per_class)")
    try:
        meta = json.loads(meta_path.read_text())
        classes = list(meta["classes"])
    except (ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"{meta_path}: unreadable ({e}); re-create the dataset with make_synthetic") from None
    ds = open_csv(root / "manifest.csv", classes=classes, mask_classes=["background", "lesion"],
                  max_pixels=max_pixels)
    ds.kind, ds.root = "synthetic", root
    return ds
