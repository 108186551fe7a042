"""SAM 2 / SAM 2.1 Hiera encoders: stored embeddings equal SAM2ImagePredictor's
``image_embed``, built through the real sam2 config/builder and checkpoint loading, on tiny
random-weight models saved in the official checkpoint format."""
from __future__ import annotations

import inspect
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cache import FeatureStore
from pipeline.cli import app
from stages.datasets import open_dataset
from stages.encoders import ENCODERS, EncoderError, build_encoder
from stages.encoders.checkpoints import OFFICIAL
from stages.encoders.preprocess import to_rgb, to_uint8_minmax
from stages.encoders.sam2 import SAM2_SIZES

# sam2 is in the dev extra: these tests run wherever the test suite does (no skip)
from sam2.sam2_image_predictor import SAM2ImagePredictor  # noqa: E402
from sam2.utils.transforms import SAM2Transforms  # noqa: E402
from tiny_sam2 import make_tiny_sam2, make_tiny_sam2_checkpoint  # noqa: E402

runner = CliRunner()
# sam2's SAM2Transforms (the reference) scripts its transforms with torch.jit
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
NAMES = ["sam2_hiera_t", "sam2_hiera_s", "sam2_hiera_b+", "sam2_hiera_l"]


def fp16_close(a: np.ndarray, b: np.ndarray) -> None:
    """Equal within float16 rounding of values of this scale."""
    scale = float(np.abs(b).max())
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3 * scale)


@pytest.fixture(scope="module")
def tiny2_ckpt(tmp_path_factory) -> Path:
    return make_tiny_sam2_checkpoint(tmp_path_factory.mktemp("sam2") / "tiny_sam2.1.pt")


@pytest.fixture(scope="module")
def tiny2_encoder(tiny2_ckpt):
    return build_encoder("sam2_hiera_t", tiny2_ckpt)


@pytest.fixture(scope="module")
def tiny2_predictor() -> SAM2ImagePredictor:
    return SAM2ImagePredictor(make_tiny_sam2())


def reference(predictor: SAM2ImagePredictor, rgb: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        predictor.set_image(rgb)
        return predictor.get_image_embedding()[0].float().numpy()


def test_registry_and_official_files():
    assert [n for n in ENCODERS if n.startswith("sam2")] == NAMES
    for name in NAMES:
        url, sha, fname = OFFICIAL[name]
        assert url == "https://dl.fbaipublicfiles.com/segment_anything_2/092824/" + fname
        assert fname.startswith("sam2.1_hiera_") and re.fullmatch(r"[0-9a-f]{64}", sha)


@pytest.mark.parametrize("version", ["sam2", "sam2.1"])
def test_size_table_matches_the_package_configs(version):
    """embed_dim and blocks per stage of each name, as sam2's own configs (or Hiera's
    defaults, which the b+ configs rely on) define them."""
    from hydra import compose
    from sam2.modeling.backbones.hieradet import Hiera

    defaults = inspect.signature(Hiera).parameters
    for name, (suffix, embed, stages) in SAM2_SIZES.items():
        trunk = compose(config_name=f"configs/{version}/{version}_hiera_{suffix}.yaml").model.image_encoder.trunk
        assert trunk.get("embed_dim", defaults["embed_dim"].default) == embed, name
        assert tuple(trunk.get("stages", defaults["stages"].default)) == stages, name


@pytest.mark.parametrize("shape", [(1, 1), (300, 200, 3), (64, 96), (37, 512, 4), (1100, 700, 3), (9, 9, 2)])
def test_prepare_equals_sam2_transforms(shape):
    rng = np.random.default_rng(sum(shape))
    img = rng.integers(0, 256, shape, dtype=np.uint8) if shape != (1, 1) else np.full((8, 13), 7, np.uint8)
    from stages.encoders.preprocess_sam2 import prepare_sam2

    ours = prepare_sam2(img)
    ref = SAM2Transforms(resolution=1024, mask_threshold=0.0)(to_rgb(img))
    assert ours.shape == (3, 1024, 1024) and ours.dtype == torch.float32
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("shape", [(300, 200, 3), (64, 96), (37, 512, 3)])
def test_embedding_equals_predictor(shape, tiny2_predictor, tiny2_encoder):
    """RGB and grayscale (repeated to RGB, as the predictor needs), portrait, landscape and
    an extreme aspect ratio: SAM 2 stretches each to 1024x1024."""
    img = np.random.default_rng(shape[0]).integers(0, 256, shape, dtype=np.uint8)
    ours = tiny2_encoder.forward(tiny2_encoder.prepare(img)[None])[0].numpy()
    assert ours.shape == (256, 64, 64)
    fp16_close(ours, reference(tiny2_predictor, to_rgb(img)))


def test_16_bit_images_are_scaled_to_uint8_first(tiny2_encoder):
    img = np.random.default_rng(5).integers(0, 65536, (40, 30), dtype=np.uint16)
    assert torch.equal(tiny2_encoder.prepare(img), tiny2_encoder.prepare(to_uint8_minmax(img)))


def test_signature_and_preprocessor(tiny2_encoder, tiny2_ckpt):
    sig = tiny2_encoder.signature()
    assert sig["encoder"] == "sam2_hiera_t" and sig["img_size"] == 1024
    assert sig["preprocessing"]["resize"] == "square_bilinear_antialias_no_aspect"
    assert sig["preprocessing"]["pad"] == "none"
    arch = sig["arch"]
    assert arch["config"] == "configs/sam2.1/sam2.1_hiera_t.yaml" and arch["embed_dim"] == 8
    assert arch["stages"] == [1, 1, 1, 1] and arch["num_heads"] == 1 and arch["no_mem_embed_added"]
    assert "++model.image_encoder.trunk.embed_dim=8" in arch["hydra_overrides"]
    fn = pickle.loads(pickle.dumps(tiny2_encoder.preprocessor()))
    img = np.zeros((20, 30, 3), np.uint8)
    assert torch.equal(fn(img), tiny2_encoder.prepare(img))


def test_sam2_0_checkpoint_uses_the_sam2_0_config(tmp_path):
    """SAM 2.0 files (no ``no_obj_embed_spatial``) load with configs/sam2/..., same names."""
    cfg = "configs/sam2/sam2_hiera_t.yaml"
    ckpt = make_tiny_sam2_checkpoint(tmp_path / "tiny_sam2.0.pt", seed=1, config=cfg)
    enc = build_encoder("sam2_hiera_t", ckpt)
    assert enc.arch["config"] == cfg
    img = np.random.default_rng(9).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    ref = reference(SAM2ImagePredictor(make_tiny_sam2(seed=1, config=cfg)), img)
    fp16_close(enc.forward(enc.prepare(img)[None])[0].numpy(), ref)


def _fake_state(embed: int, stages: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Just the shape-bearing tensors the size check reads (no model is built)."""
    t = "image_encoder.trunk."
    state = {t + "patch_embed.proj.weight": torch.zeros(embed, 3, 7, 7), t + "pos_embed": torch.zeros(1, embed, 7, 7)}
    starts, dim = np.cumsum((0, *stages[:-1])), embed
    for i in range(sum(stages)):
        state[f"{t}blocks.{i}.norm1.weight"] = torch.zeros(1)
        if i in starts[1:]:
            state[f"{t}blocks.{i}.proj.weight"] = torch.zeros(1)
    for i in range(len(stages)):
        state[f"image_encoder.neck.convs.{i}.conv.weight"] = torch.zeros(256, dim * 2 ** (len(stages) - 1 - i), 1, 1)
    return state


def test_checkpoint_of_another_official_size_is_refused(tmp_path):
    path = tmp_path / "small.pt"
    torch.save({"model": _fake_state(96, (1, 2, 11, 2))}, path)
    with pytest.raises(EncoderError, match=r"small.pt is sam2_hiera_s .*not sam2_hiera_t; use --encoder sam2_hiera_s"):
        build_encoder("sam2_hiera_t", path)


def test_bad_checkpoints(tmp_path, tiny_sam_checkpoint, tiny2_ckpt, monkeypatch):
    with pytest.raises(EncoderError, match="not a whole SAM 2 model.*SAM ViT checkpoint: use --encoder vit_b"):
        build_encoder("sam2_hiera_l", tiny_sam_checkpoint)
    state = torch.load(tiny2_ckpt, weights_only=True)["model"]
    del state["no_mem_embed"]
    torch.save({"model": state}, tmp_path / "cut.pt")
    with pytest.raises(EncoderError, match=r"cut.pt does not fit sam2's configs/sam2.1/sam2.1_hiera_t.yaml"):
        build_encoder("sam2_hiera_t", tmp_path / "cut.pt")
    monkeypatch.chdir(tmp_path)
    url, sha, fname = OFFICIAL["sam2_hiera_b+"]
    root = _folder(tmp_path / "imgs")
    res = runner.invoke(app, ["extract", "-d", "imagefolder", "-r", str(root), "-o", str(tmp_path / "x.zarr"),
                              "--encoder", "sam2_hiera_b+", "-q"])
    assert res.exit_code == 2 and url in res.output and sha in res.output and str(Path("checkpoints") / fname) in res.output
    assert "Traceback" not in res.output and not (tmp_path / "x.zarr").exists()


def test_without_the_sam2_package_the_error_says_how_to_install_it(tiny2_ckpt, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sam2.build_sam", None)  # what an absent package raises: ImportError
    with pytest.raises(EncoderError, match=r"need the sam2 package.*pip install -e '\.\[sam2\]'"):
        build_encoder("sam2_hiera_t", tiny2_ckpt)


def _folder(root: Path) -> Path:
    rng = np.random.default_rng(3)
    for k, (h, w) in enumerate([(100, 60), (60, 100), (33, 90)]):
        cls = "a" if k % 2 else "b"
        (root / cls).mkdir(parents=True, exist_ok=True)
        shape = (h, w, 3) if k % 2 else (h, w)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / cls / f"img{k}.png")
    return root


@pytest.mark.slow
def test_extract_store_info_resume_and_refusals(tmp_path, tiny2_ckpt, tiny2_predictor):
    root = _folder(tmp_path / "imgs")
    out = tmp_path / "sam2.zarr"
    args = ["extract", "-d", "imagefolder", "-r", str(root), "-o", str(out), "--checkpoint", str(tiny2_ckpt),
            "--shard-size", "2", "--batch-size", "2", "--workers", "0", "-q"]
    res = runner.invoke(app, [*args, "--encoder", "sam2_hiera_t"])
    assert res.exit_code == 0, res.output
    store = FeatureStore(out)
    assert store.embeddings.shape == (3, 256, 64, 64) and store.dtype == "float16"
    assert store.attrs["encoder"] == "sam2_hiera_t" and store.attrs["preprocessing"]["pad"] == "none"
    data = open_dataset("imagefolder", root)
    for i in range(len(data)):
        img = np.array(Image.open(root / data.samples[i].id).convert("RGB"))
        fp16_close(store.read([i])[0].astype(np.float32), reference(tiny2_predictor, img))
    info = runner.invoke(app, ["info", str(out)])
    assert info.exit_code == 0 and "sam2_hiera_t" in info.output and "complete" in info.output
    again = runner.invoke(app, [*args, "--encoder", "sam2_hiera_t"])
    assert again.exit_code == 0 and "nothing to do" in again.output
    other = runner.invoke(app, [*args, "--encoder", "sam2_hiera_s"])
    assert other.exit_code == 2 and "encoder: store has 'sam2_hiera_t', asked for 'sam2_hiera_s'" in other.output
    # resume of a partial store: the changed image's shard alone is re-encoded
    first = (out / "embeddings" / "c" / "0").rglob("*")
    before = {p: p.read_bytes() for p in first if p.is_file()}
    changed = root / data.samples[2].id
    new = np.random.default_rng(11).integers(0, 256, (70, 20, 3), dtype=np.uint8)
    Image.fromarray(new).save(changed)
    res = runner.invoke(app, [*args, "--encoder", "sam2_hiera_t", "--refresh-changed"])
    assert res.exit_code == 0, res.output
    assert "re-encoding 1 shard(s)" in res.output
    assert {p: p.read_bytes() for p in before} == before
    fp16_close(FeatureStore(out).read([2])[0].astype(np.float32), reference(tiny2_predictor, new))
