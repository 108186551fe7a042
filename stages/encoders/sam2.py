"""SAM 2 / SAM 2.1 Hiera image encoders (``sam2_hiera_t``, ``_s``, ``_b+``, ``_l``).

The model is built by the ``sam2`` package itself: ``sam2.build_sam.build_sam2`` composes
the package's own hydra config (``configs/sam2.1/sam2.1_hiera_t.yaml`` etc.) and
instantiates the whole ``SAM2Base``; the checkpoint is then loaded strictly, as sam2's
``_load_checkpoint`` does, but through our weights-only reader so a bad file gets a one-line
error naming it. Only the image encoder and ``no_mem_embed`` are kept: the stored
embedding is ``SAM2ImagePredictor``'s ``image_embed``, i.e. the last FPN level
``backbone_fpn[-1]`` (256x64x64 at 1024 input) plus ``no_mem_embed``
(``directly_add_no_mem_embed``). The high-resolution FPN levels SAM 2's decoder also uses
are not stored (the store's contract is 256x64x64).

Which config: SAM 2.1 checkpoints have ``no_obj_embed_spatial``, SAM 2.0 ones do not, so
the same names load both generations (``configs/sam2.1/...`` or ``configs/sam2/...``).
A checkpoint with an official size other than the name's is refused; one with a
non-official trunk size (a test model, a resized variant) is built from the name's config
with ``embed_dim``, ``stages``, the background position-embedding size and the neck's
channel list read off its tensors and passed as hydra overrides. Heads, window sizes and
global-attention blocks leave no trace in the weights, so they stay the config's. The
overrides (empty for official sizes) are recorded in the store's signature.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from stages.encoders.base import EMBED_SHAPE, Encoder, EncoderError
from stages.encoders.checkpoints import OFFICIAL, file_sha256, load_state_dict
from stages.encoders.preprocess import check_resize
from stages.encoders.preprocess_sam2 import SAM2_PREPROCESSING, prepare_sam2
from stages.encoders.registry import register_encoder

DEFAULT_CHECKPOINT_DIR = Path("checkpoints")
_TRUNK = "image_encoder.trunk."

#: name -> (config suffix, trunk embed_dim, blocks per stage), as in sam2's configs
SAM2_SIZES: dict[str, tuple[str, int, tuple[int, ...]]] = {
    "sam2_hiera_t": ("t", 96, (1, 2, 7, 2)),
    "sam2_hiera_s": ("s", 96, (1, 2, 11, 2)),
    "sam2_hiera_b+": ("b+", 112, (2, 3, 16, 3)),
    "sam2_hiera_l": ("l", 144, (2, 6, 36, 4)),
}


class Sam2ImageEmbed(nn.Module):
    """(B,3,1024,1024) -> SAM2ImagePredictor's ``image_embed`` (B,256,64,64)."""

    def __init__(self, image_encoder: nn.Module, no_mem_embed: torch.Tensor | None) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.no_mem_embed = None if no_mem_embed is None else nn.Parameter(no_mem_embed.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.image_encoder(x)["backbone_fpn"][-1]
        if self.no_mem_embed is None:
            return feat
        # predictor: (HW,B,C) + (1,1,C); the same elementwise sums in (B,C,H,W) layout
        return feat + self.no_mem_embed.reshape(1, -1, 1, 1)


class Sam2Encoder(Encoder):
    """A frozen SAM 2 image encoder; input (B,3,1024,1024) preprocessed by ``prepare``."""

    def prepare(self, image: np.ndarray) -> torch.Tensor:
        """(H,W[,C]) any dtype -> (3,1024,1024) float32, as ``SAM2ImagePredictor.set_image``
        (stretched to a square, no padding; non-uint8 pixels min-max scaled to uint8 first)."""
        return prepare_sam2(image, self.img_size)

    def preprocessor(self) -> Callable[[np.ndarray], torch.Tensor]:
        return partial(prepare_sam2, size=self.img_size)


def trunk_size(state: dict[str, torch.Tensor], path: str | Path) -> tuple[int, tuple[int, ...], list[int], list[int]]:
    """(embed_dim, blocks per stage, background pos-embed size, neck channel list) of a
    whole-SAM2Base state dict; a stage starts at each block with a ``proj`` (dim change)."""
    try:
        embed = int(state[_TRUNK + "patch_embed.proj.weight"].shape[0])
        depth = 1 + max(int(k.split(".")[3]) for k in state if k.startswith(_TRUNK + "blocks."))
        bkg = [int(s) for s in state[_TRUNK + "pos_embed"].shape[2:]]
        n_convs = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("image_encoder.neck.convs."))
        channels = [int(state[f"image_encoder.neck.convs.{i}.conv.weight"].shape[1]) for i in range(n_convs)]
    except (KeyError, ValueError, IndexError) as e:
        raise EncoderError(f"checkpoint {path} is an incomplete SAM 2 image encoder (missing or odd {e})") from None
    bounds = [0, *[i for i in range(1, depth) if f"{_TRUNK}blocks.{i}.proj.weight" in state], depth]
    return embed, tuple(b - a for a, b in zip(bounds, bounds[1:])), bkg, channels


def _missing(name: str, path: Path | None) -> EncoderError:
    url, sha, fname = OFFICIAL[name]
    where = path if path is not None else DEFAULT_CHECKPOINT_DIR / fname
    return EncoderError(f"encoder {name!r}: checkpoint {where} not found; download {url} "
                        f"(sha256 {sha}; the SAM 2.0 file of the same size works too) and pass its path with --checkpoint")


def _read(name: str, checkpoint: str | Path | None) -> tuple[Path, dict[str, torch.Tensor]]:
    if checkpoint is None:
        checkpoint = DEFAULT_CHECKPOINT_DIR / OFFICIAL[name][2]
        if not checkpoint.is_file():
            raise _missing(name, None)
    path = Path(checkpoint)
    if not path.is_file():
        raise _missing(name, path)
    state = load_state_dict(path)
    if _TRUNK + "patch_embed.proj.weight" not in state:
        hint = (" (it looks like a SAM ViT checkpoint: use --encoder vit_b, vit_l, vit_h or sam)"
                if any(k.startswith(("image_encoder.blocks.", "blocks.")) for k in state) else "")
        raise EncoderError(f"checkpoint {path} is not a whole SAM 2 model (no image_encoder.trunk.* Hiera "
                           f"weights){hint}; pass an official sam2.1_hiera_*.pt file")
    return path, state


def _config_and_overrides(name: str, path: Path, state: dict[str, torch.Tensor]) -> tuple[str, list[str]]:
    version = "sam2.1" if "no_obj_embed_spatial" in state else "sam2"
    suffix, embed, stages = SAM2_SIZES[name]
    config = f"configs/{version}/{version}_hiera_{suffix}.yaml"
    got_embed, got_stages, bkg, channels = trunk_size(state, path)
    if (got_embed, got_stages) == (embed, stages):
        return config, []
    other = next((n for n, (_, e, s) in SAM2_SIZES.items() if (e, s) == (got_embed, got_stages)), None)
    if other is not None:
        raise EncoderError(f"checkpoint {path} is {other} (Hiera embed_dim {got_embed}, stages {list(got_stages)}), "
                           f"not {name}; use --encoder {other}")
    t = "++model.image_encoder.trunk."
    return config, [f"{t}embed_dim={got_embed}", f"{t}stages=[{','.join(map(str, got_stages))}]",
                    f"{t}window_pos_embed_bkg_spatial_size=[{','.join(map(str, bkg))}]",
                    f"++model.image_encoder.neck.backbone_channel_list=[{','.join(map(str, channels))}]"]


def _build_model(config: str, overrides: list[str], path: Path) -> nn.Module:
    try:
        from sam2.build_sam import build_sam2
    except ImportError as e:
        raise EncoderError(f"the SAM 2 encoders need the sam2 package ({e}); install it with "
                           "pip install -e '.[sam2]' (or pip install rf-sam-2)") from None
    try:
        # ckpt_path=None: weights are loaded below through the weights-only reader
        return build_sam2(config, ckpt_path=None, device="cpu", mode="eval", hydra_overrides_extra=overrides)
    except Exception as e:  # hydra/omegaconf/Hiera assertions on a shape it cannot build
        raise EncoderError(f"checkpoint {path}: sam2 cannot build {config} with {overrides or 'no overrides'} "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None


def build_sam2_encoder(name: str, checkpoint: str | Path | None = None, device: str | torch.device = "cpu",
                       fast: bool = False, resize: str = "exact") -> Sam2Encoder:
    """``name`` in ``SAM2_SIZES``. ``fast`` changes nothing: Hiera already runs PyTorch's
    fused SDPA attention. ``resize`` must be exact: SAM 2's reference resize already is
    torch's antialiased bilinear (on float32), there is no PIL resize to replace. The
    sha256 recorded is always the file's own."""
    if name not in SAM2_SIZES:
        raise EncoderError(f"unknown SAM 2 encoder {name!r}; choose one of: {', '.join(SAM2_SIZES)}")
    if check_resize(resize) != "exact":
        raise EncoderError(f"encoder {name!r}: --resize fast applies to the SAM ViT encoders (vit_b, vit_l, vit_h, "
                           "sam) only; SAM 2's reference resize already is torch's bilinear, drop --resize fast")
    path, state = _read(name, checkpoint)
    config, overrides = _config_and_overrides(name, path, state)
    model = _build_model(config, overrides, path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise EncoderError(f"checkpoint {path} does not fit sam2's {config}: {str(e).splitlines()[0][:200]}; "
                           "pass an official SAM 2 / 2.1 checkpoint of this size") from None
    if model.image_size != 1024 or model.image_encoder.neck.d_model != EMBED_SHAPE[0]:
        raise EncoderError(f"checkpoint {path}: {config} gives {model.image_encoder.neck.d_model}-channel embeddings "
                           f"at {model.image_size} input, the feature store needs {EMBED_SHAPE} at 1024")
    trunk = model.image_encoder.trunk
    net = Sam2ImageEmbed(model.image_encoder, model.no_mem_embed if model.directly_add_no_mem_embed else None)
    net.eval().requires_grad_(False)
    del model  # memory attention, memory encoder, decoders: not needed for embeddings
    arch = {
        "config": config, "hydra_overrides": overrides, "embed_dim": int(trunk.patch_embed.proj.out_channels),
        "stages": [b - a for a, b in zip([0, *[e + 1 for e in trunk.stage_ends[:-1]]], [e + 1 for e in trunk.stage_ends])],
        "num_heads": int(trunk.blocks[0].attn.num_heads), "global_att_blocks": list(trunk.global_att_blocks),
        "window_spec": list(trunk.window_spec), "no_mem_embed_added": net.no_mem_embed is not None,
    }
    enc = Sam2Encoder(name=name, net=net, img_size=1024, checkpoint_sha256=file_sha256(path),
                      checkpoint_path=str(path.resolve()), preprocessing=dict(SAM2_PREPROCESSING), arch=arch,
                      fast=False)
    return enc.to(device)


def sam2_builders() -> dict[str, Callable[..., Encoder]]:
    """Registry entries ``name -> builder(checkpoint=None, device="cpu", fast=False, resize="exact")``."""
    return {name: partial(build_sam2_encoder, name) for name in SAM2_SIZES}


for _name, _builder in sam2_builders().items():  # registered in SAM2_SIZES order (tiny to large)
    register_encoder(_name)(_builder)
