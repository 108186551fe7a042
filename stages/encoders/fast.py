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

from stages.encoders.tinyvit import TinyViT, tiny_vit_sam


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


class CompiledNet(nn.Module):
    """``torch.compile`` of a frozen net for one static batch size (``pipeline extract
    --compile``). Shorter batches (a shard's tail) are zero-padded to that size, so one
    graph serves the whole run; on CPU the graph is frozen (weights folded in as
    constants, Conv/Linear fused with their pointwise neighbours through oneDNN), without
    which compiling gains nothing on CPU. LiteMedSAM, one thread, batch 1: 1.4-1.6x the
    eager speed, for 20-60 s of compiling once per run; on 2 cores no faster than two
    eager ``--fast`` streams (README, Benchmarks). If compiling fails (no C++ compiler,
    an unsupported op) the first call warns on stderr and the eager net runs instead.

    x (B<=batch,3,S,S) -> the eager net's output for x."""

    def __init__(self, net: nn.Module, batch: int, device_type: str):
        super().__init__()
        self.eager, self.batch = net, batch
        self.freeze = device_type == "cpu"
        self.compiled = torch.compile(net, dynamic=False)
        self.state = "new"  # -> "ok" | "failed" after the first call
        self.compile_seconds = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        if self.state == "failed" or b > self.batch:
            return self.eager(x)
        if b < self.batch:
            full = x.new_zeros((self.batch, *x.shape[1:]))
            if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
                full = full.contiguous(memory_format=torch.channels_last)
            full[:b] = x
            x = full
        if self.state == "ok":
            return self.compiled(x)[:b]
        import sys
        import time

        t0 = time.perf_counter()
        try:
            # freezing is read when the graph compiles, i.e. now (torch.compile's
            # options={"freezing": True} does not reach it). Imported under another name:
            # ``import torch._inductor.config`` would make ``torch`` local to this function
            # and its uses above, reached by a short channels_last batch, UnboundLocalError.
            import torch._inductor.config as inductor_config

            with inductor_config.patch(freezing=self.freeze):
                y = self.compiled(x)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - any compiler failure: run eager, say why
            self.state = "failed"
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"--compile: torch.compile failed ({type(e).__name__}: {msg[:200]}); running the eager encoder",
                  file=sys.stderr)
            return self.eager(x[:b])
        self.state = "ok"
        self.compile_seconds = time.perf_counter() - t0
        return y[:b]
