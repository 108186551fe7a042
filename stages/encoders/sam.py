"""Segment Anything ViT image encoders (vit_b / vit_l / vit_h, and any SAM-shaped ViT such
as MedSAM's fine-tuned medsam_vit_b.pth).

The architecture is read off the checkpoint's tensors, so fine-tuned and test checkpoints
need no configuration:

- embed_dim, patch size: ``patch_embed.proj.weight`` (dim, 3, p, p)
- depth: the number of ``blocks.{i}``
- heads: ``dim // head_dim`` with head_dim = ``blocks.0.attn.rel_pos_h.shape[1]``
  (vit_b: 768/64 = 12, vit_l: 1024/64 = 16, vit_h: 1280/80 = 16)
- global-attention blocks: ``rel_pos_h`` has 2*64-1 rows there, 2*window-1 elsewhere
- img_size: patch size * ``pos_embed.shape[1]``; mlp ratio from ``mlp.lin1.weight``
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from segment_anything.modeling import ImageEncoderViT

from stages.encoders.base import EMBED_SHAPE, Encoder, EncoderError
from stages.encoders.checkpoints import (
    OFFICIAL,
    file_sha256,
    load_state_dict,
    sub_state,
)
from stages.encoders.preprocess import (
    check_resize,
    finish_sam,
    prepare_sam,
    prepare_sam_u8,
    resize_choice,
    sam_preprocessing,
)
from stages.encoders.registry import register_encoder

DEFAULT_CHECKPOINT_DIR = Path("checkpoints")

#: name -> (embed_dim, depth, num_heads, global_attn_indexes) as in segment_anything.build_sam
OFFICIAL_ARCH: dict[str, tuple[int, int, int, tuple[int, ...]]] = {
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
}


@dataclass(frozen=True)
class SamArch:
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    patch_size: int = 16
    img_size: int = 1024
    window_size: int = 14
    mlp_ratio: float = 4.0
    out_chans: int = 256

    def official_name(self) -> str | None:
        for name, (dim, depth, heads, glob) in OFFICIAL_ARCH.items():
            if (self.embed_dim, self.depth, self.num_heads, self.global_attn_indexes) == (dim, depth, heads, glob):
                return name
        return None

    def describe(self) -> str:
        return (f"a SAM ViT with embed_dim {self.embed_dim}, depth {self.depth}, {self.num_heads} heads, "
                f"global attention in blocks {list(self.global_attn_indexes)}")


def infer_arch(state: dict[str, torch.Tensor], path: str | Path) -> SamArch:
    """Architecture of an ImageEncoderViT state dict (keys without ``image_encoder.``)."""
    if "patch_embed.proj.weight" not in state or "blocks.0.attn.rel_pos_h" not in state:
        hint = (" (it looks like a LiteMedSAM checkpoint: use --encoder litemedsam)"
                if "patch_embed.seq.0.c.weight" in state else "")
        raise EncoderError(f"checkpoint {path} is not a SAM ViT image encoder with relative positions{hint}")
    try:
        dim, _, patch, _ = state["patch_embed.proj.weight"].shape
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        head_dim = state["blocks.0.attn.rel_pos_h"].shape[1]
        grid = state["pos_embed"].shape[1]
        rows = [state[f"blocks.{i}.attn.rel_pos_h"].shape[0] for i in range(depth)]
        mlp = state["blocks.0.mlp.lin1.weight"].shape[0]
        out = state["neck.0.weight"].shape[0]
    except (KeyError, ValueError, IndexError) as e:
        raise EncoderError(f"checkpoint {path} is an incomplete SAM ViT image encoder (missing or odd {e})") from None
    glob = tuple(i for i, r in enumerate(rows) if r == 2 * grid - 1)
    windows = {(r + 1) // 2 for r in rows if r != 2 * grid - 1}
    if len(windows) > 1 or dim % head_dim:
        raise EncoderError(f"checkpoint {path} has an unsupported SAM ViT layout (window sizes {sorted(windows)})")
    arch = SamArch(dim, depth, dim // head_dim, glob, patch, patch * grid,
                   windows.pop() if windows else 14, mlp / dim, out)
    if (arch.out_chans, arch.img_size // arch.patch_size) != (EMBED_SHAPE[0], EMBED_SHAPE[1]):
        raise EncoderError(f"checkpoint {path} yields {arch.out_chans}x{grid}x{grid} embeddings, "
                           f"the feature store needs {EMBED_SHAPE}")
    return arch


def build_vit(arch: SamArch) -> ImageEncoderViT:
    """An ImageEncoderViT as segment_anything.build_sam builds it, for ``arch``."""
    return ImageEncoderViT(
        depth=arch.depth,
        embed_dim=arch.embed_dim,
        img_size=arch.img_size,
        mlp_ratio=arch.mlp_ratio,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=arch.num_heads,
        patch_size=arch.patch_size,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=arch.global_attn_indexes,
        window_size=arch.window_size,
        out_chans=arch.out_chans,
    )


class SamEncoder(Encoder):
    """A frozen SAM ViT image encoder; input (B,3,1024,1024) preprocessed by ``prepare``."""

    @property
    def resize(self) -> str:
        """``--resize`` exact (PIL, the reference) or fast (torch's uint8 kernel), read off
        the recorded preprocessing, so that what runs is always what the store records."""
        return resize_choice(self.preprocessing)

    def prepare(self, image: np.ndarray) -> torch.Tensor:
        """(H,W[,C]) any dtype -> (3,1024,1024) float32, as ``SamPredictor.set_image``.
        Non-uint8 pixels (16-bit, float, ...) are first min-max scaled to 0..255 over the
        image and rounded to uint8, since SAM is defined on uint8 RGB."""
        return prepare_sam(image, self.img_size, self.resize)

    def preprocessor(self) -> Callable[[np.ndarray], torch.Tensor]:
        return partial(prepare_sam, size=self.img_size, resize=self.resize)

    def prepare_host(self) -> Callable[[np.ndarray], torch.Tensor] | None:
        return partial(prepare_sam_u8, size=self.img_size, resize=self.resize)

    def finish(self, batch: torch.Tensor, heights, widths) -> torch.Tensor:
        return finish_sam(batch, heights, widths, self.img_size) if batch.dtype == torch.uint8 else batch


def _missing(name: str, path: Path | None) -> EncoderError:
    if name in OFFICIAL:
        url, sha, fname = OFFICIAL[name]
        where = path if path is not None else DEFAULT_CHECKPOINT_DIR / fname
        return EncoderError(f"encoder {name!r}: checkpoint {where} not found; download {url} "
                            f"(sha256 {sha}) and pass its path with --checkpoint")
    return EncoderError(f"encoder {name!r}: checkpoint {path} not found; pass a SAM ViT checkpoint "
                        "(e.g. sam_vit_b_01ec64.pth or MedSAM's medsam_vit_b.pth) with --checkpoint")


def build_sam_encoder(name: str, checkpoint: str | Path | None = None, device: str | torch.device = "cpu",
                      fast: bool = False, resize: str = "exact") -> SamEncoder:
    """``name`` in vit_b/vit_l/vit_h (the checkpoint must have that architecture) or ``sam``
    (any SAM ViT). A checkpoint that is not the official file is accepted as fine-tuned;
    the sha256 recorded is always the file's own. ``resize``: exact (PIL, the reference)
    or fast (torch's uint8 kernel; recorded in the preprocessing)."""
    check_resize(resize)
    if checkpoint is None:
        if name not in OFFICIAL or not (DEFAULT_CHECKPOINT_DIR / OFFICIAL[name][2]).is_file():
            raise _missing(name, None)
        checkpoint = DEFAULT_CHECKPOINT_DIR / OFFICIAL[name][2]
    path = Path(checkpoint)
    if not path.is_file():
        raise _missing(name, path)
    full = load_state_dict(path)
    state = sub_state(full, "image_encoder.") or full
    arch = infer_arch(state, path)
    if name in OFFICIAL and arch.official_name() != name:
        what = arch.official_name() or "no official SAM size"
        raise EncoderError(f"checkpoint {path} is {arch.describe()} ({what}), not {name}; "
                           f"use --encoder {arch.official_name() or 'sam'}")
    net = build_vit(arch)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise EncoderError(f"checkpoint {path} does not fit {arch.describe()}: {str(e).splitlines()[0]}") from None
    net.eval().requires_grad_(False)
    if fast:
        from stages.encoders.fast import speed_up
        speed_up(net)
    info = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(arch).items()}
    enc = SamEncoder(name=name, net=net, img_size=arch.img_size, checkpoint_sha256=file_sha256(path),
                     checkpoint_path=str(path.resolve()), preprocessing=sam_preprocessing(arch.img_size, resize),
                     arch=info, fast=fast)
    return enc.to(device)


@register_encoder("vit_b")
def build_vit_b(checkpoint: str | Path | None = None, device: str | torch.device = "cpu",
                fast: bool = False, resize: str = "exact") -> SamEncoder:
    return build_sam_encoder("vit_b", checkpoint, device, fast, resize)


@register_encoder("vit_l")
def build_vit_l(checkpoint: str | Path | None = None, device: str | torch.device = "cpu",
                fast: bool = False, resize: str = "exact") -> SamEncoder:
    return build_sam_encoder("vit_l", checkpoint, device, fast, resize)


@register_encoder("vit_h")
def build_vit_h(checkpoint: str | Path | None = None, device: str | torch.device = "cpu",
                fast: bool = False, resize: str = "exact") -> SamEncoder:
    return build_sam_encoder("vit_h", checkpoint, device, fast, resize)


@register_encoder("sam")
def build_sam(checkpoint: str | Path | None = None, device: str | torch.device = "cpu",
              fast: bool = False, resize: str = "exact") -> SamEncoder:
    return build_sam_encoder("sam", checkpoint, device, fast, resize)
