"""Tiny random-weight SAM 2.1 checkpoints for tests, saved exactly like the official files
(``torch.save({"model": sam2_base.state_dict()})`` of a whole ``SAM2Base``).

The model is the package's own ``configs/sam2.1/sam2.1_hiera_t.yaml`` built by
``sam2.build_sam.build_sam2`` with hydra overrides that shrink only the Hiera trunk (the
FPN neck keeps d_model 256, the input stays 1024), so the stored 256x64x64 contract holds.
"""
from __future__ import annotations

from pathlib import Path

import torch

TINY_CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"


def tiny_overrides(embed_dim: int = 8, stages: tuple[int, ...] = (1, 1, 1, 1)) -> list[str]:
    """Hydra overrides of the official tiny config: a Hiera of ``embed_dim`` and ``stages``
    (4 stages, dims doubling) with the neck's channel list to match."""
    channels = [embed_dim * 2 ** i for i in range(len(stages))][::-1]
    t = "++model.image_encoder.trunk."
    return [f"{t}embed_dim={embed_dim}", f"{t}stages=[{','.join(map(str, stages))}]",
            f"++model.image_encoder.neck.backbone_channel_list=[{','.join(map(str, channels))}]"]


def make_tiny_sam2(embed_dim: int = 8, stages: tuple[int, ...] = (1, 1, 1, 1), seed: int = 0,
                   config: str = TINY_CONFIG) -> torch.nn.Module:
    """A whole eval-mode ``SAM2Base``; the image encoder's weights (including the
    zero-initialised position embeddings) get noise so that every one of them matters."""
    from sam2.build_sam import build_sam2

    torch.manual_seed(seed)
    model = build_sam2(config, ckpt_path=None, device="cpu", mode="eval",
                       hydra_overrides_extra=tiny_overrides(embed_dim, stages))
    with torch.no_grad():
        for name, p in model.image_encoder.named_parameters():
            p.add_(torch.randn_like(p) * (0.5 if "pos_embed" in name else 0.05))
        model.no_mem_embed.add_(torch.randn_like(model.no_mem_embed))
    return model.eval()


def make_tiny_sam2_checkpoint(path: str | Path, embed_dim: int = 8, stages: tuple[int, ...] = (1, 1, 1, 1),
                              seed: int = 0, config: str = TINY_CONFIG) -> Path:
    """Write a tiny whole-SAM2Base checkpoint in the official format to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": make_tiny_sam2(embed_dim, stages, seed, config).state_dict()}, path)
    return path
