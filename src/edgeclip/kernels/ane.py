"""Transformer blocks in the layout Apple's Neural Engine runs fast (for Core ML targets before iOS 18).

The Neural Engine wants channels-first 4-D tensors, (B, C, 1, S), with the sequence on the last
axis; linear layers as 1x1 convolutions; LayerNorm over the channel axis; and attention split per
head into small einsums instead of one batched matmul over a reshaped head axis. This follows the
recipe Apple published for ANE transformers, written for our blocks:

    rewrite_for_ane(model)     # in place, on an export copy: every tower's blocks run as AneBlocks

`ane` in the attention registry is the same split-einsum attention for (B, H, L, D) inputs, so any
model can use it through `set_attention("ane")`.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import EdgeClipError
from .attention import register_attention

NEG = -3.0e4  # masked scores: exp() underflows to 0 in fp16 and fp32 without inf arithmetic


def split_einsum_attention(q, k, v, heads: int, scale: float, mask=None):
    """q (B, C, 1, Sq), k and v (B, C, 1, Sk) -> (B, C, 1, Sq); `mask` additive, (B|1, Sk, 1, Sq)."""
    d = q.shape[1] // heads
    qs = q.split(d, dim=1)                      # heads x (B, d, 1, Sq)
    ks = k.transpose(1, 3).split(d, dim=3)      # heads x (B, Sk, 1, d)
    vs = v.split(d, dim=1)                      # heads x (B, d, 1, Sk)
    outs = []
    for qi, ki, vi in zip(qs, ks, vs):
        w = torch.einsum("bchq,bkhc->bkhq", qi, ki) * scale   # (B, Sk, 1, Sq)
        if mask is not None:
            w = w + mask
        w = w.softmax(dim=1)
        outs.append(torch.einsum("bkhq,bchk->bchq", w, vi))  # (B, d, 1, Sq)
    return torch.cat(outs, dim=1)


def causal_mask(n: int, dtype, device=None):
    """(1, Sk, 1, Sq): key k is visible to query q when k <= q."""
    keys = torch.arange(n, device=device).reshape(1, n, 1, 1)
    queries = torch.arange(n, device=device).reshape(1, 1, 1, n)
    return (keys > queries).to(dtype) * NEG


@register_attention("ane")
def ane_attention(q, k, v, *, causal=False, scale=None, attn_mask=None):
    """Split-einsum attention in the (B, C, 1, S) layout, for (B, H, L, D) inputs."""
    b, h, lq, d = q.shape
    lk = k.shape[-2]
    scale = d ** -0.5 if scale is None else scale

    def bc1s(x):  # (B, H, L, D) -> (B, H*D, 1, L)
        return x.permute(0, 1, 3, 2).reshape(b, h * d, 1, x.shape[-2])

    mask = None
    if causal:  # queries are the last lq positions of the lk keys
        keys = torch.arange(lk, device=q.device).reshape(1, lk, 1, 1)
        queries = torch.arange(lk - lq, lk, device=q.device).reshape(1, 1, 1, lq)
        mask = (keys > queries).to(q.dtype) * NEG
    if attn_mask is not None:
        if attn_mask.dim() == 4 and attn_mask.shape[1] != 1:
            # per-head masks: run heads one by one
            outs = [ane_attention(q[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1], causal=causal, scale=scale,
                                  attn_mask=attn_mask[:, i:i + 1]) for i in range(h)]
            return torch.cat(outs, dim=1)
        m = attn_mask.reshape(-1, lq, lk) if attn_mask.dim() >= 3 else attn_mask.reshape(1, lq, lk)
        m = m.transpose(1, 2).unsqueeze(2).to(q.dtype).clamp(min=NEG)  # (B|1, Sk, 1, Sq)
        mask = m if mask is None else mask + m
    o = split_einsum_attention(bc1s(q), bc1s(k), bc1s(v), h, scale, mask)  # (B, H*D, 1, Lq)
    return o.reshape(b, h, d, lq).permute(0, 1, 3, 2)


def _conv(linear: nn.Linear) -> nn.Conv2d:
    conv = nn.Conv2d(linear.in_features, linear.out_features, 1, bias=linear.bias is not None)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.detach()[:, :, None, None])
        if linear.bias is not None:
            conv.bias.copy_(linear.bias.detach())
    return conv


class LayerNormANE(nn.Module):
    """LayerNorm over the channel axis of (B, C, 1, S)."""

    def __init__(self, ln: nn.LayerNorm):
        super().__init__()
        self.eps = ln.eps
        self.weight = nn.Parameter(ln.weight.detach().clone().reshape(1, -1, 1, 1))
        self.bias = nn.Parameter(ln.bias.detach().clone().reshape(1, -1, 1, 1))

    def forward(self, x):
        zc = x - x.mean(dim=1, keepdim=True)
        return zc * torch.rsqrt((zc * zc).mean(dim=1, keepdim=True) + self.eps) * self.weight + self.bias


class AneBlock(nn.Module):
    """One pre-norm transformer block (models.clip.Block) on (B, C, 1, S) tensors: 1x1 convolutions
    for every projection, channel-axis LayerNorm, split-einsum attention."""

    def __init__(self, block):
        super().__init__()
        self.heads = block.attn.heads
        self.scale = block.attn.head_dim ** -0.5
        self.ln_1, self.ln_2 = LayerNormANE(block.ln_1), LayerNormANE(block.ln_2)
        self.qkv, self.out = _conv(block.attn.qkv), _conv(block.attn.out)
        self.fc1, self.act, self.fc2 = _conv(block.mlp.fc1), block.mlp.act, _conv(block.mlp.fc2)

    def forward(self, x, mask=None):
        c = x.shape[1]
        q, k, v = self.qkv(self.ln_1(x)).split(c, dim=1)
        x = x + self.out(split_einsum_attention(q, k, v, self.heads, self.scale, mask))
        return x + self.fc2(self.act(self.fc1(self.ln_2(x))))


class AneBlocks(nn.Module):
    """A tower's block stack in the ANE layout; takes and returns (B, L, W) so the tower's embedding
    and pooling code stay as they are."""

    def __init__(self, blocks, causal: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(AneBlock(b) for b in blocks)
        self.causal = causal

    def forward(self, x):
        x = x.transpose(1, 2).unsqueeze(2)  # (B, W, 1, L)
        mask = causal_mask(x.shape[-1], x.dtype, x.device) if self.causal else None
        for blk in self.blocks:
            x = blk(x, mask)
        return x.squeeze(2).transpose(1, 2)


def conv1x1(linear: nn.Linear) -> nn.Conv2d:
    """A linear layer as the 1x1 convolution that computes it on (B, C, 1, S) (or any NCHW map)."""
    return _conv(linear)


class AneAttention(nn.Module):
    """A packed-QKV self-attention (models.clip.Attention or a subclass: `qkv`, `out`, `heads`,
    `head_dim`) on channels-first maps: (B, C, 1, S) -> (B, C, 1, S), with 1x1 convolutions for the
    projections and per-head split einsum. Towers that are channels-first already (convolutional
    stages, RepMixer text layers) use it directly, without the (B, L, C) transposes.

    The projections take the names the tower gives them (`qkv_name`, `out_name`), so the rewritten
    module's parameters are named like the original's (compressed weights map back by name)."""

    def __init__(self, attn, qkv_name: str = "qkv", out_name: str = "out"):
        super().__init__()
        if getattr(attn, "q_proj", None) is not None:
            raise EdgeClipError("AneAttention takes the packed qkv projection: apply the ANE rewrite "
                                "before split_qkv()")
        self.heads = attn.heads
        self.scale = attn.head_dim ** -0.5
        self.names = (qkv_name, out_name)
        setattr(self, qkv_name, _conv(attn.qkv))
        setattr(self, out_name, _conv(attn.out))

    def forward(self, x, mask=None):
        qkv, out = (getattr(self, n) for n in self.names)
        q, k, v = qkv(x).split(x.shape[1], dim=1)
        return out(split_einsum_attention(q, k, v, self.heads, self.scale, mask))


def rewrite_for_ane(model):
    """Run both towers in the ANE layout (in place; use on an export copy): each tower applies its own
    rewrite (`Tower.rewrite_for_ane`; the transformer towers swap their blocks for AneBlocks)."""
    for tower in model.towers().values():
        tower.rewrite_for_ane()
    return model
