"""Image decoding (stages/datasets/imageio.py): bit depths, modes, and bad files."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.datasets import BadImageError, DatasetError, open_dataset
from stages.datasets.imageio import image_shape, read_image, read_mask


def save(path: Path, im: Image.Image, **kw: object) -> Path:
    im.save(path, **kw)
    return path


def test_bit_depths_and_modes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (20, 24), dtype=np.uint8)
    u16 = rng.integers(0, 65536, (20, 24), dtype=np.uint16)
    f32 = rng.standard_normal((20, 24)).astype(np.float32) * 1000
    i32 = rng.integers(-(2**31), 2**31 - 1, (20, 24), dtype=np.int32)
    rgba = rng.integers(0, 256, (20, 24, 4), dtype=np.uint8)

    cases = {
        "g8.png": (Image.fromarray(u8), u8),
        "g16.png": (Image.fromarray(u16), u16),
        "g16.tif": (Image.fromarray(u16), u16),
        "f32.tiff": (Image.fromarray(f32), f32),
        "i32.tif": (Image.fromarray(i32), i32),
        "rgba.png": (Image.fromarray(rgba), rgba),
        "rgb.bmp": (Image.fromarray(rgba[:, :, :3].copy()), rgba[:, :, :3]),
        "la.png": (Image.fromarray(rgba[:, :, :2].copy(), mode="LA"), rgba[:, :, 0]),
    }
    for name, (im, want) in cases.items():
        got = read_image(save(tmp_path / name, im))
        assert got.dtype == want.dtype, name
        np.testing.assert_array_equal(got, want, err_msg=name)

    pal = Image.fromarray((u8 % 3).astype(np.uint8), mode="P")
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    rgb = read_image(save(tmp_path / "pal.png", pal))
    assert rgb.shape == (20, 24, 3)
    np.testing.assert_array_equal(rgb[u8 % 3 == 1], np.tile([0, 255, 0], ((u8 % 3 == 1).sum(), 1)))
    np.testing.assert_array_equal(read_mask(tmp_path / "pal.png"), u8 % 3)  # masks keep indices

    bits = read_image(save(tmp_path / "b.png", Image.fromarray(u8 > 128)))
    np.testing.assert_array_equal(bits, np.where(u8 > 128, 255, 0))
    np.testing.assert_array_equal(read_mask(tmp_path / "b.png"), (u8 > 128).astype(np.uint8))

    jpg = read_image(save(tmp_path / "c.JPG", Image.fromarray(rgba[:, :, :3].copy()), format="JPEG"))
    assert jpg.shape == (20, 24, 3) and jpg.dtype == np.uint8

    np.save(tmp_path / "a.npy", f32[:, :, None])
    np.testing.assert_array_equal(read_image(tmp_path / "a.npy"), f32)  # (H,W,1) squeezed
    assert image_shape(tmp_path / "g16.png") == (20, 24) == image_shape(tmp_path / "a.npy")


def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A tiny valid-looking PNG whose header claims ``width`` x ``height`` pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def _bad_files(tmp: Path) -> dict[str, tuple[Path, str, dict]]:
    good = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    full = save(tmp / "full.png", Image.fromarray(good))
    cut = tmp / "truncated.png"
    cut.write_bytes(full.read_bytes()[: len(full.read_bytes()) // 2])
    (tmp / "text.png").write_text("this is not an image\n")
    (tmp / "empty.png").write_bytes(b"")
    save(tmp / "one.png", Image.fromarray(np.zeros((1, 1), np.uint8)))
    nan = np.ones((16, 16), np.float32)
    nan[3, 3] = np.nan
    np.save(tmp / "nan.npy", nan)
    inf = np.ones((16, 16), np.float32)
    inf[0, 0] = np.inf
    save(tmp / "inf.tif", Image.fromarray(inf))
    frames = [Image.fromarray(good), Image.fromarray(good)]
    frames[0].save(tmp / "pages.tif", save_all=True, append_images=frames[1:])
    np.save(tmp / "vec.npy", np.arange(100))
    np.save(tmp / "obj.npy", np.array([["a"] * 16] * 16))
    (tmp / "junk.npy").write_bytes(b"\x93NUMPY garbage")
    _png_claiming(tmp / "bomb.png", 30000, 30000)
    return {
        "truncated": (cut, "truncated or corrupt", {}),
        "text": (tmp / "text.png", "not a readable image", {}),
        "empty": (tmp / "empty.png", "file is empty", {}),
        "1x1": (tmp / "one.png", "1x1 pixels, smaller than the 8x8 minimum", {}),
        "limit": (full, "4096 pixels, over the limit of 1000", {"max_pixels": 1000}),
        "bomb": (tmp / "bomb.png", "over the pixel limit|over the limit", {}),
        "nan": (tmp / "nan.npy", "1 NaN/inf pixel", {}),
        "inf": (tmp / "inf.tif", "1 NaN/inf pixel", {}),
        "pages": (tmp / "pages.tif", "2 frames/pages", {}),
        "vec": (tmp / "vec.npy", r"shape \(100,\) is not an image", {}),
        "obj": (tmp / "obj.npy", "not numeric", {}),
        "junk": (tmp / "junk.npy", "not a readable .npy", {}),
        "missing": (tmp / "gone.png", "file not found", {}),
    }


@pytest.mark.parametrize("case", ["truncated", "text", "empty", "1x1", "limit", "bomb", "nan", "inf",
                                  "pages", "vec", "obj", "junk", "missing"])
def test_bad_image_files(tmp_path: Path, case: str) -> None:
    path, match, kw = _bad_files(tmp_path)[case]
    with pytest.raises(BadImageError, match=match) as e:
        read_image(path, **kw)
    msg = str(e.value)
    assert msg.startswith(str(path)) and "\n" not in msg and ";" in msg  # file named, fix given
    assert isinstance(e.value, DatasetError)


def test_colour_and_fractional_masks_refused(tmp_path: Path) -> None:
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[2:5, 2:5] = [255, 0, 0]
    with pytest.raises(BadImageError, match="colour mask"):
        read_mask(save(tmp_path / "m.png", Image.fromarray(rgb)))
    gray_rgb = np.repeat(np.arange(16, dtype=np.uint8)[None, :, None], 16, 0).repeat(3, 2)
    np.testing.assert_array_equal(read_mask(save(tmp_path / "g.png", Image.fromarray(gray_rgb))), gray_rgb[:, :, 0])
    np.save(tmp_path / "f.npy", np.full((16, 16), 0.5, np.float32))
    with pytest.raises(BadImageError, match="fractional"):
        read_mask(tmp_path / "f.npy")


def test_bad_image_inside_dataset_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "a" / "ok.png")
    (tmp_path / "a" / "broken.png").write_text("not a png")
    ds = open_dataset("imagefolder", tmp_path, max_pixels=10_000)  # listing reads no pixel
    assert ds.ids == ["a/broken.png", "a/ok.png"]
    with pytest.raises(BadImageError, match=r"broken\.png: not a readable image"):
        ds.load_image(0)
    assert ds.load_image(1).shape == (16, 16)
    Image.fromarray(np.zeros((128, 128), np.uint8)).save(tmp_path / "a" / "big.png")
    with pytest.raises(BadImageError, match=r"big\.png: image is 128x128 = 16384 pixels, over the limit of 10000"):
        open_dataset("imagefolder", tmp_path, max_pixels=10_000).load_image(0)
