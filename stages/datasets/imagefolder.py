"""Folder-per-class datasets.

Layouts (detected):
  root/<class>/**/<image>                 classification; images may sit in subfolders
  root/<split>/<class>/**/<image>         split = train | val | test (valid/validation -> val)
  root/<class>/images/x.png + root/<class>/mask(s)/x_mask.png   segmentation (BUSI-like)
  root/<class>/x.png + root/<class>/x_mask.png                   BUSI original
The two mask layouts also work under split folders. Masks are named ``x_mask.png``,
``x_mask_1.png``, ... (several masks of one image are merged by union) or, in a mask
folder, ``x.png`` like the image. With masks, ``mask_classes`` is
["background", "lesion"] and masks are binary (non-zero = lesion).

Sample id = the image path relative to root (posix); samples are sorted by id.
Hidden files/folders (".*") and "__MACOSX"-style folders are skipped.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from stages.datasets.base import DatasetError, Sample
from stages.datasets.files import SPLIT_ALIASES, FileDataset
from stages.datasets.imageio import IMAGE_EXTS, MAX_PIXELS, is_image_file, mask_base
from stages.datasets.registry import register_dataset

_Entry = tuple[Path, tuple[Path, ...]]  # image, its masks (empty when none)


def _visible(p: Path) -> bool:
    return not p.name.startswith((".", "__"))


def _subdirs(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_dir() and _visible(p))


def _images(d: Path, recursive: bool) -> list[Path]:
    found = d.rglob("*") if recursive else d.iterdir()
    out = []
    for p in found:
        rel = p.relative_to(d).parts
        if p.is_file() and is_image_file(p) and all(_visible(Path(x)) for x in rel):
            out.append(p)
    return sorted(out, key=lambda p: p.as_posix())


def _mask_dir(cdir: Path) -> Path | None:
    found = [cdir / n for n in ("mask", "masks") if (cdir / n).is_dir()]
    if len(found) > 1:
        raise DatasetError(f"{cdir}: has both mask/ and masks/ folders; keep one")
    return found[0] if found else None


def _scan_images_masks(cdir: Path, mdir: Path) -> list[_Entry]:
    """root/<class>/images/* with masks in root/<class>/mask(s)/."""
    images = _images(cdir / "images", recursive=False)
    by_stem: dict[str, Path] = {}
    for p in images:
        if p.stem in by_stem:
            raise DatasetError(f"{p}: two images share the name {p.stem!r} ({by_stem[p.stem].name}); "
                               "rename one so that masks are unambiguous")
        by_stem[p.stem] = p
    masks: dict[str, list[Path]] = defaultdict(list)
    for m in _images(mdir, recursive=False):
        base = mask_base(m.stem)
        key = base if base is not None and base in by_stem else m.stem
        if key not in by_stem:
            raise DatasetError(f"{m}: mask without an image (expected {cdir / 'images'}/{key}.*); "
                               "remove it or add the image")
        masks[key].append(m)
    out = []
    for p in images:
        if not masks[p.stem]:
            raise DatasetError(f"{p}: image has no mask (expected {mdir}/{p.stem}_mask.png); "
                               "add the mask or remove the image")
        out.append((p, tuple(sorted(masks[p.stem], key=lambda m: m.name))))
    return out


def _scan_plain(cdir: Path) -> list[_Entry]:
    """root/<class>/**: images, with BUSI-original masks (x_mask*.png beside x.png) split off."""
    files = _images(cdir, recursive=True)
    names = {(p.parent, p.stem) for p in files}
    masks: dict[tuple[Path, str], list[Path]] = defaultdict(list)
    images = []
    for p in files:
        base = mask_base(p.stem)
        if base is not None and (p.parent, base) in names:
            masks[(p.parent, base)].append(p)
        else:
            images.append(p)
    if not masks:
        return [(p, ()) for p in images]
    out = []
    for p in images:
        ms = masks.pop((p.parent, p.stem), [])
        if not ms:
            raise DatasetError(f"{p}: image has no mask (expected {p.parent}/{p.stem}_mask.png) while "
                               "other images in the folder have one; add the mask or remove the image")
        out.append((p, tuple(sorted(ms, key=lambda m: m.name))))
    return out


def _scan_class(cdir: Path) -> list[_Entry]:
    mdir = _mask_dir(cdir)
    if (cdir / "images").is_dir() and mdir is not None:
        entries = _scan_images_masks(cdir, mdir)
    else:
        entries = _scan_plain(cdir)
    if not entries:
        raise DatasetError(f"{cdir}: class folder holds no images ({', '.join(IMAGE_EXTS)}); "
                           "add images or remove the folder")
    return entries


@register_dataset("imagefolder")
def open_imagefolder(root: str | Path, max_pixels: int = MAX_PIXELS) -> FileDataset:
    """Open a folder-per-class dataset (see module docstring for the layouts)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder; --data-root must be a folder with one subfolder "
                           "per class (root/<class>/*.png)")
    top = _subdirs(root)
    splits = [d for d in top if d.name.lower() in SPLIT_ALIASES]
    if splits:
        others = [d.name for d in top if d not in splits]
        if others:
            raise DatasetError(f"{root}: mixes split folders ({', '.join(d.name for d in splits)}) with "
                               f"other folders ({', '.join(others)}); use root/<split>/<class>/ or root/<class>/")
        bases = [(SPLIT_ALIASES[d.name.lower()], d) for d in splits]
        if len({s for s, _ in bases}) < len(bases):
            raise DatasetError(f"{root}: several folders name the same split "
                               f"({', '.join(d.name for d in splits)}); keep one per split")
    else:
        bases = [("", root)]

    found: list[tuple[str, str, _Entry]] = []  # split, class, entry
    for split, base in bases:
        cdirs = _subdirs(base)
        if not cdirs:
            raise DatasetError(f"{base}: no class folders; put images in {base}/<class>/ "
                               "(or use --dataset csv with a manifest)")
        for cdir in cdirs:
            found += [(split, cdir.name, e) for e in _scan_class(cdir)]

    with_masks = sorted({f"{s}/{c}".lstrip("/") for s, c, (_, m) in found if m})
    without = sorted({f"{s}/{c}".lstrip("/") for s, c, (_, m) in found if not m})
    if with_masks and without:
        raise DatasetError(f"{root}: class folders {with_masks} have masks but {without} do not; "
                           "give every image a mask or remove the masks")

    classes = sorted({c for _, c, _ in found})
    index = {c: k for k, c in enumerate(classes)}
    rows = sorted(((p.relative_to(root).as_posix(), s, c, p, m) for s, c, (p, m) in found))
    ds = FileDataset(
        root=root,
        kind="imagefolder",
        samples=[Sample(id=i, label=index[c], split=s) for i, s, c, _, _ in rows],
        classes=classes,
        mask_classes=["background", "lesion"] if with_masks else [],
        paths=[p for _, _, _, p, _ in rows],
        masks=[m for _, _, _, _, m in rows] if with_masks else [],
        max_pixels=max_pixels,
    )
    ds.check_unique_ids()
    return ds
