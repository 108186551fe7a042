"""Bad input, systematically (hypothesis): every dataset reader is fed random truncations,
random bytes with image extensions, odd PIL modes and sizes, and manifests with random
paths. The only outcomes allowed are images that decode to a sane array or a one-line
user error naming the input; never another exception (a traceback in the CLI), and never
a store marked complete holding a sample that could not be read.

Runs derandomized (the same inputs every CI run) with bounded examples; the number of
inputs tried is printed at the end of the module (``fuzz: N inputs``)."""
from __future__ import annotations

import csv
import io
import tempfile
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cache import StoreError  # noqa: E402
from stages.datasets import DatasetError, open_dataset  # noqa: E402

TRIED: Counter = Counter()
FUZZ = dict(deadline=None, derandomize=True, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                   HealthCheck.function_scoped_fixture])
USER_ERRORS = (DatasetError, StoreError, ValueError, FileNotFoundError)
MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F")
EXTS = ("png", "tif", "bmp", "jpg", "jpeg", "tiff", "npy")  # what the readers accept (IMAGE_EXTS)


@pytest.fixture(scope="module", autouse=True)
def _report(request):
    yield
    line = f"fuzz: {sum(TRIED.values())} inputs ({', '.join(f'{k} {v}' for k, v in sorted(TRIED.items()))})"
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if capture is not None:
        with capture.global_and_fixture_disabled():
            print("\n" + line)


def image_bytes(mode: str, h: int, w: int, ext: str, seed: int) -> bytes | None:
    """A valid file of that mode/size/format, or None if PIL cannot write the combination."""
    rng = np.random.default_rng(seed)
    if ext == "npy":
        buf = io.BytesIO()
        np.save(buf, rng.standard_normal((h, w)).astype(np.float32))
        return buf.getvalue()
    im = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).convert(mode) if mode != "I;16" else \
        Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    buf = io.BytesIO()
    try:
        im.save(buf, format={"jpg": "JPEG", "jpeg": "JPEG", "tif": "TIFF", "tiff": "TIFF"}.get(ext, ext.upper()))
    except (OSError, ValueError, KeyError):
        return None
    return buf.getvalue()


@st.composite
def damaged(draw, valid: bytes, intact: bool = True) -> tuple[str, bytes]:
    """(what was done, bytes): the file as is, truncated, bit-flipped, or random bytes."""
    how = draw(st.sampled_from(["intact", "truncated", "flipped", "random"][0 if intact else 1:]))
    if how == "truncated":
        return how, valid[:draw(st.integers(0, max(len(valid) - 1, 0)))]
    if how == "flipped" and valid:
        b = bytearray(valid)
        for _ in range(draw(st.integers(1, 8))):
            b[draw(st.integers(0, len(b) - 1))] ^= 1 << draw(st.integers(0, 7))
        return how, bytes(b)
    if how == "random":
        return how, draw(st.binary(max_size=256))
    return "intact", valid


def read_all(kind: str, root: Path, names: list[str], **options) -> tuple[str, set[int]]:
    """Open the dataset and read every image and mask: ("ok", unreadable rows) or
    ("error", {}) after a one-line user error naming one of ``names``; anything else fails."""
    try:
        ds = open_dataset(kind, root, **options)
    except USER_ERRORS as e:
        check_message(e, names)
        return "error", set()
    bad = set()
    for i in range(len(ds)):
        try:
            img = ds.load_image(i)
            ds.load_mask(i)
        except USER_ERRORS as e:
            check_message(e, names)
            bad.add(i)
            continue
        assert isinstance(img, np.ndarray) and img.ndim in (2, 3) and min(img.shape[:2]) >= 8
        assert np.isfinite(img).all()
    return "ok", bad


def check_message(e: BaseException, names: list[str]) -> None:
    msg = str(e)
    assert msg and "\n" not in msg.strip(), msg
    assert any(n in msg for n in names), (msg, names)


# --- image files through imagefolder ----------------------------------------------------------
@settings(max_examples=200, **FUZZ)
@given(mode=st.sampled_from(MODES), h=st.integers(1, 40), w=st.integers(1, 40), ext=st.sampled_from(EXTS),
       seed=st.integers(0, 2**16), data=st.data())
def test_imagefolder_reader_on_odd_and_damaged_images(mode, h, w, ext, seed, data):
    valid = image_bytes(mode, h, w, ext, seed)
    hypothesis.assume(valid is not None)
    how, blob = data.draw(damaged(valid))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "a").mkdir(), (root / "b").mkdir()
        target = root / "a" / f"x.{ext}"
        target.write_bytes(blob)
        Image.fromarray(np.full((16, 16), 99, np.uint8)).save(root / "b" / "ok.png")
        outcome, bad = read_all("imagefolder", root, [str(target), str(root)])
    TRIED[f"image/{how}"] += 1
    if how == "intact" and min(h, w) >= 8:  # a well-formed image of any mode and size >= 8 is read
        assert outcome == "ok" and not bad, (mode, h, w, ext)


# --- manifests with random paths ----------------------------------------------------------------
PATHS = st.one_of(
    st.sampled_from(["ok.png", "../ok.png", "/etc/hostname", "sub/../ok.png", "./ok.png", "a,b.png", '"q".png',
                     "", " ", ".", "..", "sub", "sub/", "ok.png/", "missing.png", "ok.PNG", "~/ok.png",
                     "link.png", "nul\x00.png", "ok.png\r", "s\u00e9.png", "\u202eok.png", "//ok.png"]),
    st.text(max_size=24),
)


@settings(max_examples=150, **FUZZ)
@given(rows=st.lists(st.tuples(PATHS, st.sampled_from(["a", "b", "", "a,b", "\u00e9"]),
                               st.sampled_from(["", "train", "val", "test", "bogus"])), min_size=1, max_size=5),
       header=st.sampled_from(["path,label,split", "path,label", "label,path,split", "path", "paths,label"]))
def test_csv_reader_on_manifests_with_random_paths(rows, header):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "d"
        (root / "sub").mkdir(parents=True)
        Image.fromarray(np.full((16, 16), 99, np.uint8)).save(root / "ok.png")
        Image.fromarray(np.full((16, 16), 9, np.uint8)).save(root / "s\u00e9.png")
        (root / "link.png").symlink_to("/etc/hostname")
        cols = header.split(",")
        buf = io.StringIO()
        wr = csv.writer(buf)
        wr.writerow(cols)
        for path, label, split in rows:
            value = {"path": path, "paths": path, "label": label, "split": split}
            wr.writerow([value[c] for c in cols])
        manifest = root / "m.csv"
        try:
            manifest.write_text(buf.getvalue(), encoding="utf-8")
        except UnicodeEncodeError:  # a lone surrogate: not a file a user can have
            hypothesis.assume(False)
        outcome, bad = read_all("csv", manifest, [str(manifest), str(root)])
    TRIED["manifest"] += 1
    assert not bad or outcome == "ok"


# --- MedMNIST .npz, ACDC .h5, synthetic phantoms ----------------------------------------------------
def _npz_bytes(shape: tuple[int, ...]) -> bytes:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, m in (("train", 3), ("val", 2), ("test", 2)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (m, *shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (m, 1)).astype(np.uint8)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


NPZ = {s: _npz_bytes(s) for s in ((28, 28), (8, 8), (28, 28, 3), (4, 4))}


@settings(max_examples=80, **FUZZ)
@given(shape=st.sampled_from(sorted(NPZ)), data=st.data())
def test_medmnist_reader_on_damaged_npz(shape, data):
    how, blob = data.draw(damaged(NPZ[shape]))
    with tempfile.TemporaryDirectory() as tmp:
        npz = Path(tmp) / "pneumoniamnist.npz"
        npz.write_bytes(blob)
        read_all("medmnist", npz, [str(npz)])
    TRIED[f"npz/{how}"] += 1


def _h5_bytes(image: np.ndarray, label: np.ndarray) -> bytes:
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        f["image"], f["label"] = image, label
    return buf.getvalue()


@settings(max_examples=80, **FUZZ)
@given(n=st.integers(1, 3), h=st.integers(1, 20), w=st.integers(1, 20), volume=st.booleans(),
       dtype=st.sampled_from(["float32", "uint8", "int64", "float16"]), data=st.data())
def test_acdc_reader_on_damaged_h5(n, h, w, volume, dtype, data):
    rng = np.random.default_rng(n * h * w)
    shape = (n, h, w) if volume else (h, w)
    valid = _h5_bytes(rng.random(shape).astype(dtype), rng.integers(0, 4, shape).astype("uint8"))
    how, blob = data.draw(damaged(valid))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "data").mkdir()
        name = "patient001_frame01" if volume else "patient001_frame01_slice_1"
        (root / "data" / f"{name}.h5").write_bytes(blob)
        (root / "train.list").write_text("patient001_frame01\n")
        (root / "val.list").write_text("")
        if not volume:
            (root / "train_slices.list").write_text(name + "\n")
        read_all("acdc-h5", root, [str(root / "data" / f"{name}.h5"), str(root)])
    TRIED[f"h5/{how}"] += 1


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    from stages.datasets import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("fz") / "syn", n_per_class=1, size=32, seed=0)


@settings(max_examples=30, **FUZZ)
@given(which=st.sampled_from(["images", "masks"]), data=st.data())
def test_synthetic_reader_on_damaged_phantoms(phantoms, which, data):
    import shutil

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "syn"
        shutil.copytree(phantoms, root)
        target = root / which / "cyst_0000.png"
        how, blob = data.draw(damaged(target.read_bytes()))
        target.write_bytes(blob)
        outcome, bad = read_all("synthetic", root, [str(target), str(root)])
    TRIED[f"synthetic/{how}"] += 1
    if how == "intact":
        assert outcome == "ok" and not bad


# --- end to end: never a complete store with a sample it could not read ---------------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from tiny_sam import make_tiny_sam_checkpoint

    return make_tiny_sam_checkpoint(tmp_path_factory.mktemp("fzc") / "sam16.pth", embed_dim=16, depth=1,
                                    global_attn=(0,), num_heads=1)


@settings(max_examples=6, **FUZZ)
@given(mode=st.sampled_from(MODES), ext=st.sampled_from(["png", "tif", "bmp", "jpg"]), skip_bad=st.booleans(),
       data=st.data())
def test_extract_store_is_complete_only_with_every_sample_read_or_failed(ckpt, mode, ext, skip_bad, data):
    from cache import FeatureStore
    from stages.extract import ExtractConfig, extract

    valid = image_bytes(mode, 12, 10, ext, 0)
    hypothesis.assume(valid is not None)
    how, blob = data.draw(damaged(valid, intact=False))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        (root / "a").mkdir(parents=True), (root / "b").mkdir()
        target = root / "a" / f"x.{ext}"
        target.write_bytes(blob)
        Image.fromarray(np.full((16, 16), 99, np.uint8)).save(root / "b" / "ok.png")
        outcome, bad = read_all("imagefolder", root, [str(target), str(root)])
        out = Path(tmp) / "s.zarr"
        cfg = ExtractConfig(dataset="imagefolder", data_root=str(root), out=str(out), encoder="sam",
                            checkpoint=str(ckpt), shard_size=2, batch_size=2, workers=0, skip_bad=skip_bad)
        try:
            extract(cfg, progress=False)
        except USER_ERRORS as e:
            check_message(e, [str(target), str(root), str(out)])
            assert outcome == "error" or (bad and not skip_bad), (how, str(e))
            if out.exists():
                with pytest.raises(StoreError, match="not complete"):
                    FeatureStore(str(out))
            TRIED["extract/error"] += 1
            return
        s = FeatureStore(str(out))  # complete
        assert outcome == "ok" and s.done.all()
        failed = {i for i in range(s.n) if s.failed[i]}
        assert failed == bad  # every unreadable sample is marked failed, every readable one is not
        assert all(s.hashes[i] for i in range(s.n) if i not in failed)
    TRIED["extract/store"] += 1
