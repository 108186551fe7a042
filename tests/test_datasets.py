"""Dataset readers on tiny datasets written to tmp_path (no shared data)."""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from stages.datasets import (
    DATASETS,
    BadImageError,
    DatasetError,
    make_synthetic,
    open_dataset,
)
from stages.datasets.base import split_counts


def png(path: Path, a: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)
    return path


def gray(seed: int, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)


# ---------------------------------------------------------------- registry


def test_registry_and_unknown_kind_and_option(tmp_path: Path) -> None:
    assert set(DATASETS) == {"imagefolder", "csv", "medmnist", "acdc-h5", "synthetic"}
    with pytest.raises(DatasetError, match="known kinds: imagefolder, csv"):
        open_dataset("nifti", tmp_path)
    with pytest.raises(DatasetError, match="unknown option.*'colour'"):
        open_dataset("imagefolder", tmp_path, colour=True)
    with pytest.raises(DatasetError, match="max_pixels must be an integer"):
        open_dataset("csv", tmp_path, max_pixels="lots")


# ---------------------------------------------------------------- imagefolder


def test_imagefolder_classes_ids_and_loading(tmp_path: Path) -> None:
    png(tmp_path / "b_cls" / "z.png", gray(1))
    png(tmp_path / "b_cls" / "sub" / "y.png", gray(2))
    png(tmp_path / "a_cls" / "x.png", gray(3))
    np.save(tmp_path / "a_cls" / "w.npy", np.ones((9, 9), np.float32))
    (tmp_path / "a_cls" / "notes.txt").write_text("ignored")
    png(tmp_path / "a_cls" / ".hidden.png", gray(4))
    png(tmp_path / ".git" / "c" / "q.png", gray(5))

    ds = open_dataset("imagefolder", tmp_path)
    assert ds.classes == ["a_cls", "b_cls"]
    assert ds.ids == ["a_cls/w.npy", "a_cls/x.png", "b_cls/sub/y.png", "b_cls/z.png"]
    assert [s.label for s in ds.samples] == [0, 0, 1, 1]
    assert {s.split for s in ds.samples} == {""}
    assert ds.mask_classes == [] and ds.load_mask(0) is None
    np.testing.assert_array_equal(ds.load_image(3), gray(1))
    assert ds.load_image(0).dtype == np.float32
    assert ds.raw_bytes(1) == (tmp_path / "a_cls" / "x.png").read_bytes()
    assert open_dataset("imagefolder", tmp_path).signature() == ds.signature()


def test_imagefolder_split_layout(tmp_path: Path) -> None:
    png(tmp_path / "train" / "cat" / "1.png", gray(1))
    png(tmp_path / "train" / "dog" / "2.png", gray(2))
    png(tmp_path / "val" / "dog" / "3.png", gray(3))
    png(tmp_path / "test" / "cat" / "4.png", gray(4))
    png(tmp_path / "test" / "eel" / "5.png", gray(5))
    ds = open_dataset("imagefolder", tmp_path)
    assert ds.classes == ["cat", "dog", "eel"]
    assert split_counts(ds.samples) == {"test": 2, "train": 2, "val": 1}
    by_id = {s.id: s for s in ds.samples}
    assert by_id["val/dog/3.png"].split == "val" and by_id["val/dog/3.png"].label == 1
    assert by_id["test/eel/5.png"].label == 2


def test_imagefolder_busi_layout_merges_masks(tmp_path: Path) -> None:
    m1 = np.zeros((16, 16), np.uint8)
    m1[2:6, 2:6] = 255
    m2 = np.zeros((16, 16), np.uint8)
    m2[10:14, 10:14] = 255
    png(tmp_path / "benign" / "images" / "b1.png", gray(1))
    png(tmp_path / "benign" / "masks" / "b1_mask.png", m1)
    png(tmp_path / "benign" / "masks" / "b1_mask_1.png", m2)
    png(tmp_path / "normal" / "images" / "n1.png", gray(2))
    png(tmp_path / "normal" / "mask" / "n1.png", np.zeros((16, 16), np.uint8))  # same-name mask
    ds = open_dataset("imagefolder", tmp_path)
    assert ds.ids == ["benign/images/b1.png", "normal/images/n1.png"]
    assert ds.mask_classes == ["background", "lesion"]
    m = ds.load_mask(0)
    assert m.dtype == np.uint8 and set(np.unique(m)) == {0, 1}
    np.testing.assert_array_equal(m, ((m1 > 0) | (m2 > 0)).astype(np.uint8))
    assert ds.load_mask(1).sum() == 0


def test_imagefolder_busi_original_masks_beside_images(tmp_path: Path) -> None:
    m = np.zeros((16, 16), np.uint8)
    m[4:8, 4:8] = 255
    png(tmp_path / "malignant" / "malignant (1).png", gray(1))
    png(tmp_path / "malignant" / "malignant (1)_mask.png", m)
    png(tmp_path / "malignant" / "malignant (2).png", gray(2))
    png(tmp_path / "malignant" / "malignant (2)_mask.png", m)
    png(tmp_path / "malignant" / "malignant (2)_mask_1.png", m.T.copy())
    png(tmp_path / "benign" / "benign (1).png", gray(3))
    png(tmp_path / "benign" / "benign (1)_mask.png", m)
    ds = open_dataset("imagefolder", tmp_path)
    assert ds.ids == ["benign/benign (1).png", "malignant/malignant (1).png", "malignant/malignant (2).png"]
    assert ds.load_mask(2).sum() == ((m > 0) | (m.T > 0)).sum()


def test_imagefolder_structure_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not a folder"):
        open_dataset("imagefolder", tmp_path / "nope")
    png(tmp_path / "flat.png", gray(1))
    with pytest.raises(DatasetError, match="no class folders"):
        open_dataset("imagefolder", tmp_path)
    png(tmp_path / "a" / "1.png", gray(1))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty: class folder holds no images"):
        open_dataset("imagefolder", tmp_path)
    (tmp_path / "empty").rmdir()
    png(tmp_path / "train" / "a" / "2.png", gray(2))
    with pytest.raises(DatasetError, match="mixes split folders"):
        open_dataset("imagefolder", tmp_path)


def test_imagefolder_mask_errors(tmp_path: Path) -> None:
    png(tmp_path / "a" / "images" / "x.png", gray(1))
    png(tmp_path / "a" / "images" / "y.png", gray(2))
    png(tmp_path / "a" / "masks" / "x_mask.png", gray(3))
    with pytest.raises(DatasetError, match=r"y\.png: image has no mask"):
        open_dataset("imagefolder", tmp_path)
    png(tmp_path / "a" / "masks" / "y_mask.png", gray(4))
    png(tmp_path / "a" / "masks" / "z_mask.png", gray(5))
    with pytest.raises(DatasetError, match=r"z_mask\.png: mask without an image"):
        open_dataset("imagefolder", tmp_path)
    (tmp_path / "a" / "masks" / "z_mask.png").unlink()
    png(tmp_path / "b" / "plain.png", gray(6))
    with pytest.raises(DatasetError, match=r"have masks but \['b'\] do not"):
        open_dataset("imagefolder", tmp_path)


def test_mask_of_other_size_is_bad_image(tmp_path: Path) -> None:
    png(tmp_path / "a" / "images" / "x.png", gray(1))
    png(tmp_path / "a" / "masks" / "x_mask.png", np.zeros((12, 12), np.uint8))
    ds = open_dataset("imagefolder", tmp_path)
    with pytest.raises(BadImageError, match="x_mask.png: mask is 12x12 but its image x.png is 16x16"):
        ds.load_mask(0)


# ---------------------------------------------------------------- csv


def _manifest(root: Path, text: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.csv").write_text(text)
    return root / "manifest.csv"


def test_csv_manifest(tmp_path: Path) -> None:
    for i in range(4):
        png(tmp_path / "img" / f"{i}.png", gray(i))
    mask = np.zeros((16, 16), np.uint8)
    mask[3:9, 3:9] = 255
    for i in range(4):
        png(tmp_path / "msk" / f"{i}.png", mask)
    _manifest(tmp_path, "\ufeffPath, Label ,split,mask,group,extra\n"
                        "img/3.png,10,train,msk/3.png,p1,x\n"
                        "./img/0.png,2,Val,msk/0.png,p2,\n"
                        "img/1.png,,test,msk/1.png,,\n"
                        "img/2.png,2,,msk/2.png,p1,\n")
    for root in (tmp_path, tmp_path / "manifest.csv"):
        ds = open_dataset("csv", root)
        assert ds.classes == ["2", "10"]  # integer labels sort numerically
        assert ds.ids == ["img/0.png", "img/1.png", "img/2.png", "img/3.png"]
        assert [s.label for s in ds.samples] == [0, -1, 0, 1]
        assert [s.split for s in ds.samples] == ["val", "test", "", "train"]
        assert [s.group for s in ds.samples] == ["p2", "", "p1", "p1"]
        np.testing.assert_array_equal(ds.load_image(3), gray(3))
        assert ds.load_mask(0).sum() == 36 and ds.mask_classes == ["background", "lesion"]
    fixed = open_dataset("csv", tmp_path, classes=["10", "2", "99"])
    assert [s.label for s in fixed.samples] == [1, -1, 1, 0]


def test_csv_id_column_and_multiclass_masks(tmp_path: Path) -> None:
    png(tmp_path / "a.png", gray(1))
    m = np.zeros((16, 16), np.uint8)
    m[:4] = 2
    png(tmp_path / "a_seg.png", m)
    _manifest(tmp_path, "id,path,label,mask\ncase-1,a.png,x,a_seg.png\n")
    ds = open_dataset("csv", tmp_path, mask_classes=["bg", "one", "two"])
    assert ds.ids == ["case-1"]
    np.testing.assert_array_equal(ds.load_mask(0), m)
    m[0, 0] = 7
    png(tmp_path / "a_seg.png", m)
    with pytest.raises(BadImageError, match="a_seg.png: mask value 7 but only 3 mask classes"):
        ds.load_mask(0)


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ("path,label\n../outside.png,a\n", "lead outside"),
        ("path,label\n{abs_outside},a\n", "lead outside"),
        ("path,label\nlink.png,a\n", "lead outside"),
        ("path,label\nimg/missing.png,a\n", "do not exist, first .*missing.png"),
        ("path,label\nimg/ok.png,a\nimg/./ok.png,b\n", "duplicate id 'img/ok.png'"),
        ("id,path,label\nk,img/ok.png,a\nk,img/ok2.png,a\n", "duplicate id 'k' on lines 2, 3"),
        ("path,label,split\nimg/ok.png,a,training\n", "unknown split 'training' on line 2"),
        ("path,label\n", "the manifest is empty"),
        ("", "the manifest is empty"),
        ("file,label\nimg/ok.png,a\n", r"missing required column\(s\) \['path'\]"),
        ("path,label\n,a\n", "empty path on line"),
        ("path,label,mask\nimg/ok.png,a,img/ok.png\nimg/ok2.png,a,\n", "no mask on line"),
        ("path,label\nimg/ok.png,a,extra\n", "line 2 has 3 fields"),
    ],
)
def test_csv_bad_manifests(tmp_path: Path, rows: str, match: str) -> None:
    root = tmp_path / "ds"
    png(root / "img" / "ok.png", gray(1))
    png(root / "img" / "ok2.png", gray(2))
    outside = png(tmp_path / "outside.png", gray(3))
    (root / "link.png").symlink_to(outside)
    csv = _manifest(root, rows.format(abs_outside=outside))
    with pytest.raises(DatasetError, match=match) as e:
        open_dataset("csv", root)
    assert str(csv) in str(e.value) and "\n" not in str(e.value)


def test_csv_unknown_label_and_outside_opt_in(tmp_path: Path) -> None:
    outside = png(tmp_path / "outside.png", gray(3))
    root = tmp_path / "ds"
    root.mkdir()
    (root / "link.png").symlink_to(outside)
    _manifest(root, "path,label\nlink.png,b\n")
    with pytest.raises(DatasetError, match=r"unknown label 'b' on line 2.*one of \['a'\]"):
        open_dataset("csv", root, classes=["a"], allow_outside_root=True)
    ds = open_dataset("csv", root, allow_outside_root=True)
    np.testing.assert_array_equal(ds.load_image(0), gray(3))
    with pytest.raises(DatasetError, match="no manifest.csv"):
        open_dataset("csv", tmp_path)


# ---------------------------------------------------------------- medmnist


def _npz(path: Path, compressed: bool = True, **arrays: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def _mnist(n: tuple[int, int, int] = (5, 2, 3), shape: tuple[int, ...] = (28, 28), seed: int = 0,
           k: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for split, m in zip(("train", "val", "test"), n):
        out[f"{split}_images"] = rng.integers(0, 256, (m, *shape), dtype=np.uint8)
        out[f"{split}_labels"] = rng.integers(0, k, (m, 1)).astype(np.uint8)
    return out


def test_medmnist_gray_compressed(tmp_path: Path) -> None:
    arrays = _mnist()
    npz = _npz(tmp_path / "d" / "pneumoniamnist.npz", **arrays)
    for root in (npz, npz.parent):
        ds = open_dataset("medmnist", root)
        assert ds.classes == ["normal", "pneumonia"]
        assert split_counts(ds.samples) == {"train": 5, "val": 2, "test": 3}
        assert ds.ids[:2] == ["train/000000", "train/000001"] and ds.ids[5] == "val/000000"
        assert [s.label for s in ds.samples] == [int(v) for s in ("train", "val", "test")
                                                 for v in arrays[f"{s}_labels"][:, 0]]
        np.testing.assert_array_equal(ds.load_image(6), arrays["val_images"][1])
    assert len(ds.content_hash(0)) == 32 and ds.content_hash(0) != ds.content_hash(1)


def test_medmnist_rgb_uncompressed_is_memory_mapped(tmp_path: Path) -> None:
    arrays = _mnist(shape=(64, 64, 3), k=8)
    npz = _npz(tmp_path / "bloodmnist_64.npz", compressed=False, **arrays)
    with zipfile.ZipFile(npz) as zf:
        assert zf.getinfo("test_images.npy").compress_type == zipfile.ZIP_STORED
    ds = open_dataset("medmnist", npz)
    assert ds.classes[0] == "basophil" and len(ds.classes) == 8
    image = ds.load_image(9)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, arrays["test_images"][2])
    assert isinstance(ds._images("test"), np.memmap)
    clone = pickle.loads(pickle.dumps(ds))  # workers get a copy without the loaded arrays
    np.testing.assert_array_equal(clone.load_image(9), image)


def test_medmnist_unknown_file_numeric_classes(tmp_path: Path) -> None:
    npz = _npz(tmp_path / "mine.npz", **_mnist(k=4, seed=3))
    ds = open_dataset("medmnist", npz)
    assert ds.classes == [str(c) for c in range(max(s.label for s in ds.samples) + 1)]


def test_medmnist_errors(tmp_path: Path) -> None:
    a = _mnist()
    bad = dict(a, train_labels=a["train_labels"][:4])
    with pytest.raises(DatasetError, match="train_labels has 4 labels but train_images has 5"):
        open_dataset("medmnist", _npz(tmp_path / "m1.npz", **bad))
    multi = dict(a, train_labels=np.zeros((5, 14), np.uint8))
    with pytest.raises(DatasetError, match="multi-label.*only single-label"):
        open_dataset("medmnist", _npz(tmp_path / "chestmnist.npz", **multi))
    no_lab = {k: v for k, v in a.items() if k != "val_labels"}
    with pytest.raises(DatasetError, match="has val_images but no val_labels"):
        open_dataset("medmnist", _npz(tmp_path / "m2.npz", **no_lab))
    with pytest.raises(DatasetError, match="label 4 found but breastmnist has 2 classes"):
        open_dataset("medmnist", _npz(tmp_path / "x" / "breastmnist.npz",
                                      **dict(a, test_labels=np.full((3, 1), 4))))
    nan_labels = dict(a, val_labels=np.array([[0.0], [np.nan]]))
    with pytest.raises(DatasetError, match="NaN/inf or fractional labels"):
        open_dataset("medmnist", _npz(tmp_path / "m3.npz", **nan_labels))
    with pytest.raises(DatasetError, match=r"4 \.npz files"):
        open_dataset("medmnist", tmp_path)
    with pytest.raises(DatasetError, match="not a readable .npz"):
        (tmp_path / "fake.npz").write_text("hello")
        open_dataset("medmnist", tmp_path / "fake.npz")


def test_medmnist_nan_pixels_bad_image_at_load(tmp_path: Path) -> None:
    a = _mnist()
    images = a["train_images"].astype(np.float32)
    images[3, 5, 5] = np.nan
    npz = _npz(tmp_path / "f.npz", **dict(a, train_images=images))
    ds = open_dataset("medmnist", npz)
    assert ds.load_image(2).dtype == np.float32
    with pytest.raises(BadImageError, match=r"f\.npz:train_images\[3\]: 1 NaN/inf"):
        ds.load_image(3)


# ---------------------------------------------------------------- acdc-h5


def _h5(path: Path, image: np.ndarray, label: np.ndarray, spacing: tuple | None = None) -> None:
    with h5py.File(path, "w") as f:
        f["image"] = image
        f["label"] = label
        if spacing is not None:
            f.attrs["spacing"] = spacing


def _acdc(root: Path, slices: bool = True) -> dict[str, np.ndarray]:
    data = root / "data"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    vols = {}
    for name, n in (("patient001_frame01", 3), ("patient001_frame12", 2), ("patient002_frame01", 4),
                    ("patient003_frame01", 2), ("patient004_frame01", 3)):
        vols[name] = (rng.random((n, 12, 10), dtype=np.float32), rng.integers(0, 4, (n, 12, 10), dtype=np.uint8))
    train, val, test = ["patient001_frame01", "patient001_frame12"], ["patient002_frame01", "patient003_frame01"], \
        ["patient004_frame01"]
    for v in train:
        for k in range(len(vols[v][0])):
            _h5(data / f"{v}_slice_{k + 1}.h5", vols[v][0][k], vols[v][1][k])
    for v in val + test:
        _h5(data / f"{v}.h5", *vols[v], spacing=(10.0, 1.5, 1.5) if v == "patient002_frame01" else None)
    listed = [f"{train[0]}_slice_3", f"{train[0]}_slice_1", f"{train[1]}_slice_2"]
    if slices:
        (root / "train_slices.list").write_text("\n".join(listed) + "\n")
    (root / "train.list").write_text("\n".join(train) + "\n")
    (root / "val.list").write_text("\n".join(val) + "\n\n")
    (root / "test.list").write_text("\n".join(test) + "\n")
    return vols


def test_acdc_h5_layout(tmp_path: Path) -> None:
    vols = _acdc(tmp_path)
    ds = open_dataset("acdc-h5", tmp_path)
    assert split_counts(ds.samples) == {"train": 3, "val": 6, "test": 3}
    assert ds.ids[:3] == ["patient001_frame01/slice_00", "patient001_frame01/slice_02", "patient001_frame12/slice_01"]
    assert ds.ids[3] == "patient002_frame01/slice_00"
    s = ds.samples[1]
    assert (s.group, s.index_in_group, s.label) == ("patient001_frame01", 2, -1)
    assert ds.classes == [] and ds.mask_classes == ["background", "RV", "Myo", "LV"]
    assert ds.spacing == {"patient002_frame01": (10.0, 1.5, 1.5)}
    img, lab = vols["patient001_frame01"]
    np.testing.assert_array_equal(ds.load_image(1), img[2])
    np.testing.assert_array_equal(ds.load_mask(1), lab[2])
    i = ds.ids.index("patient002_frame01/slice_03")
    np.testing.assert_array_equal(ds.load_image(i), vols["patient002_frame01"][0][3])
    assert ds.load_mask(i).dtype == np.uint8
    clone = pickle.loads(pickle.dumps(ds))  # open h5 handle is not pickled
    np.testing.assert_array_equal(clone.load_mask(i), vols["patient002_frame01"][1][3])
    ds.close()


def test_acdc_without_train_slices_list(tmp_path: Path) -> None:
    _acdc(tmp_path, slices=False)
    ds = open_dataset("acdc-h5", tmp_path)
    assert split_counts(ds.samples)["train"] == 5  # all slice files of the train volumes


def test_acdc_errors(tmp_path: Path) -> None:
    _acdc(tmp_path)
    (tmp_path / "data" / "patient003_frame01.h5").unlink()
    with pytest.raises(DatasetError, match=r"1 listed file\(s\) missing.*patient003_frame01.h5 \(val.list line 2\)"):
        open_dataset("acdc-h5", tmp_path)
    (tmp_path / "val.list").write_text("patient002_frame01\npatient004_frame01\n")
    with pytest.raises(DatasetError, match=r"patient004_frame01 is listed in several splits \['test', 'val'\]"):
        open_dataset("acdc-h5", tmp_path)
    with pytest.raises(DatasetError, match="no data/ folder"):
        open_dataset("acdc-h5", tmp_path / "data")
    (tmp_path / "val.list").write_text("patient002_frame01\n")
    with h5py.File(tmp_path / "data" / "patient002_frame01.h5", "a") as f:
        f["label"][0, 0, 0] = 9
    with pytest.raises(BadImageError, match=r"patient002_frame01.h5\[label\]\[0\]: label values 0..9"):
        open_dataset("acdc-h5", tmp_path).load_mask(3)


# ---------------------------------------------------------------- synthetic


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synthetic_is_deterministic(tmp_path: Path) -> None:
    a = _files(make_synthetic(tmp_path / "a", 3, size=48, seed=7))
    b = _files(make_synthetic(tmp_path / "b", 3, size=48, seed=7))
    c = _files(make_synthetic(tmp_path / "c", 3, size=48, seed=8))
    assert a == b
    assert all(a[k] != c[k] for k in a if k.startswith("images/"))
    make_synthetic(tmp_path / "a", 2, size=48, seed=7)  # rewrite in place drops stale files
    assert len(list((tmp_path / "a" / "images").glob("*.png"))) == 6
    with pytest.raises(DatasetError, match="not a synthetic dataset"):
        png(tmp_path / "other" / "x.png", gray(1))
        make_synthetic(tmp_path / "other", 1)


def _features(image: np.ndarray, mask: np.ndarray) -> list[float]:
    """Lesion/ring contrast, height/width, posterior/lateral ratio, perimeter^2/area."""
    im, m = image.astype(float), mask.astype(bool)
    ys, xs = np.nonzero(m)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    h, w = y1 - y0, x1 - x0
    ring = np.zeros_like(m)
    ring[max(0, y0 - 4):y1 + 4, max(0, x0 - 4):x1 + 4] = True
    ring &= ~m
    below = im[y1:y1 + h, x0:x1].mean()
    side = np.concatenate([im[y1:y1 + h, max(0, x0 - w):x0].ravel(), im[y1:y1 + h, x1:x1 + w].ravel()]).mean()
    perimeter = (m ^ np.roll(m, 1, 0)).sum() + (m ^ np.roll(m, 1, 1)).sum()
    return [im[m].mean() / im[ring].mean(), h / w, below / side, perimeter**2 / m.sum()]


def test_synthetic_reader_masks_and_separable_classes(tmp_path: Path) -> None:
    root = make_synthetic(tmp_path / "s", 12, size=64, seed=1)
    ds = open_dataset("synthetic", root)
    assert ds.kind == "synthetic" and ds.classes == ["benign", "cyst", "malignant"]
    assert ds.mask_classes == ["background", "lesion"]
    assert split_counts(ds.samples) == {"train": 21, "val": 6, "test": 9}  # 7, 2, 3 per class
    for c in range(3):
        assert sum(s.label == c and s.split == "train" for s in ds.samples) == 7
    feats, labels, darker = [], [], 0
    for i, s in enumerate(ds.samples):
        image, mask = ds.load_image(i), ds.load_mask(i)
        assert image.shape == (64, 64) and image.dtype == np.uint8
        assert set(np.unique(mask)) == {0, 1} and 30 < mask.sum() < 0.3 * mask.size
        f = _features(image, mask)
        darker += f[0] < 1  # every lesion class is hypo/anechoic: the mask sits on the lesion
        feats.append(f)
        labels.append(s.label)
    assert darker >= 0.9 * len(ds)
    x, y = np.array(feats), np.array(labels)
    z = (x - x.mean(0)) / x.std(0)
    hits = 0
    for i in range(len(y)):  # leave-one-out nearest centroid
        keep = np.arange(len(y)) != i
        cents = np.stack([z[keep & (y == c)].mean(0) for c in range(3)])
        hits += int(np.argmin(((cents - z[i]) ** 2).sum(1)) == y[i])
    assert hits / len(y) > 0.7  # chance is 1/3
    with pytest.raises(DatasetError, match="no synthetic.json"):
        open_dataset("synthetic", tmp_path)


def test_synthetic_fan_and_speed(tmp_path: Path) -> None:
    import time

    t = time.process_time()
    root = make_synthetic(tmp_path / "f", 10, size=256, seed=0, fan=True)
    assert time.process_time() - t < 20  # ~0.4 s of CPU here; generous for slow CI
    ds = open_dataset("synthetic", root)
    image = ds.load_image(0)
    assert image[0, 0] == 0 and image[0, -1] == 0 and image[128, 128] > 0  # outside the sector is black
