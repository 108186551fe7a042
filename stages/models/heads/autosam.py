"""AutoSAM head: SAM's mask decoder without prompts (Hu, Xu, Shi, arXiv 2306.13731).

The two-way transformer (depth 2, dim 256, MLP 2048, 8 heads) attends between the image
embedding and one learned mask token per class; each class token goes through its own
hypernetwork MLP and is multiplied with the x4-upscaled embedding, so one pass yields
all classes. Prompt tokens (points, boxes, mask prompts) and the IoU head are gone.
Unlike the reference code, which runs the transformer once per class, all class tokens
share one pass (they attend to each other, like SAM's multimask tokens).

Parameter names follow SAM's ``mask_decoder.*`` (and ``prompt_encoder.pe_layer`` /
``no_mask_embed``) so a SAM-family checkpoint initialises the head directly
(``init_from_sam``).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.mask_decoder import MLP
from segment_anything.modeling.prompt_encoder import PositionEmbeddingRandom
from segment_anything.modeling.transformer import TwoWayTransformer
from torch import nn

from stages.models.heads.registry import register_head


class AutoSamHead(nn.Module):
    """(B,dim,64,64) embeddings -> (B,num_classes,256,256) logits."""

    input_kind = "features"

    def __init__(self, num_classes: int, embed_dim: int = 256, depth: int = 2, mlp_dim: int = 2048,
                 num_heads: int = 8) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.transformer = TwoWayTransformer(depth=depth, embedding_dim=embed_dim, mlp_dim=mlp_dim,
                                             num_heads=num_heads)
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        # SAM adds this learned "no mask prompt" embedding to the image embedding; kept as a bias
        self.no_mask_embed = nn.Embedding(1, embed_dim)
        nn.init.zeros_(self.no_mask_embed.weight)
        self.mask_tokens = nn.Embedding(num_classes, embed_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(embed_dim, embed_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(embed_dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(embed_dim // 4, embed_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            [MLP(embed_dim, embed_dim, embed_dim // 8, 3) for _ in range(num_classes)]
        )

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B,dim,h,w) -> (class tokens (B,C,dim), upscaled embedding (B,dim/8,4h,4w))."""
        b, c, h, w = x.shape
        src = x + self.no_mask_embed.weight.view(1, -1, 1, 1)
        pos = self.pe_layer((h, w)).unsqueeze(0).expand(b, -1, -1, -1)
        tokens = self.mask_tokens.weight.unsqueeze(0).expand(b, -1, -1)
        hs, src = self.transformer(src, pos, tokens)
        up = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        return hs, up

    def forward_head(self, hs: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        hyper = torch.stack([mlp(hs[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        b, c, h, w = up.shape
        return (hyper @ up.view(b, c, h * w)).view(b, -1, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B,dim,64,64) -> logits (B,num_classes,256,256)."""
        return self.forward_head(*self.forward_features(x))

    @torch.no_grad()
    def init_from_sam(self, state: dict[str, torch.Tensor]) -> dict[str, list[str]]:
        """Copy the weights of a whole SAM-family state dict (keys ``mask_decoder.*``,
        ``prompt_encoder.*``) that still fit: the two-way transformer, the upscaling, the
        positional encoding, the no-mask embedding and, for class ``i`` < 4, SAM's
        hypernetwork MLP ``i``. Like the AutoSAM reference code, SAM's mask tokens are not
        copied: they make all classes start as SAM's "object" mask with large logits (std
        ~9 on ACDC), and in our measurement the head then stalled (soft Dice loss 0.98
        after 50 steps on one ACDC volume, against 0.14 with random class tokens). Classes
        beyond SAM's four start random. Returns {"loaded": [...], "skipped": [...]}."""
        own = self.state_dict()
        loaded: list[str] = []
        skipped: list[str] = []
        for key, value in state.items():
            if key.startswith("mask_decoder."):
                name = key[len("mask_decoder."):]
            elif key in ("prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
                         "prompt_encoder.no_mask_embed.weight"):
                name = key[len("prompt_encoder."):]
            elif key.startswith("prompt_encoder."):
                skipped.append(key)  # point/box/mask prompt embeddings: prompts are removed
                continue
            else:
                continue  # image encoder weights: not ours
            if name == "mask_tokens.weight":
                skipped.append(key)  # SAM's output tokens stall training; the class tokens start random
                continue
            if name in own and own[name].shape == value.shape:
                own[name].copy_(value)
                loaded.append(key)
            else:
                skipped.append(key)  # iou token/head, hypernetworks of SAM tokens beyond our classes
        self.load_state_dict(own)
        return {"loaded": loaded, "skipped": skipped}


def load_sam_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A SAM-family checkpoint's tensors (weights-only load), via the encoders' reader."""
    from stages.encoders.checkpoints import load_state_dict

    state = load_state_dict(path)
    if not any(k.startswith("mask_decoder.") for k in state):
        from stages.encoders.base import EncoderError

        raise EncoderError(f"checkpoint {path} has no mask_decoder.* weights; pass a whole SAM-family "
                           "checkpoint (sam_vit_b_01ec64.pth, medsam_vit_b.pth, lite_medsam.pth)")
    return state


@register_head
def autosam(num_classes: int, checkpoint: str | Path | None = None, verbose: bool = True, **kwargs) -> AutoSamHead:
    """AutoSAM head; ``checkpoint``: a SAM-family checkpoint whose decoder initialises it."""
    head = AutoSamHead(num_classes, **kwargs)
    if checkpoint is not None:
        report = head.init_from_sam(load_sam_state(checkpoint))
        if verbose:
            extra = f"; classes {4}..{num_classes - 1} start random" if num_classes > 4 else ""
            print(f"autosam: initialised {len(report['loaded'])} tensors from the decoder of {checkpoint}; "
                  f"skipped {len(report['skipped'])} (IoU token and head, SAM's mask tokens, "
                  f"prompt embeddings, unused mask-token MLPs){extra}", file=sys.stderr)
    return head
