"""Attention implementations, chosen by name.

Every implementation has one signature::

    fn(q, k, v, *, causal: bool, scale: float, attn_mask: Tensor | None) -> Tensor

q: (B, H, Lq, D); k, v: (B, H, Lk, D); attn_mask: additive, broadcastable to (B, H, Lq, Lk).
`causal` masks key j for query i when j > i + (Lk - Lq), i.e. queries are the *last* Lq positions;
callers computing a single pooled query at another position pass `attn_mask` instead.
"""
from __future__ import annotations

from typing import Callable

from ..errors import EdgeClipError

_REGISTRY: dict[str, Callable] = {}


def register_attention(name: str):
    def deco(fn: Callable) -> Callable:
        _REGISTRY[name] = fn
        return fn

    return deco


_MODULES = {"ane": "ane"}  # implementations registered by their own module, imported on first use


def attention_impls() -> list[str]:
    return sorted(set(_REGISTRY) | set(_MODULES))


def get_attention(name: str) -> Callable:
    if name not in _REGISTRY and name in _MODULES:
        import importlib

        importlib.import_module(f"{__package__}.{_MODULES[name]}")
    try:
        return _REGISTRY[name]
    except KeyError:
        raise EdgeClipError(
            f"unknown attention implementation '{name}'; available: {', '.join(attention_impls())}"
        ) from None


def _causal_mask(lq: int, lk: int, like):
    import torch

    # True where attention is forbidden.
    q_pos = torch.arange(lq, device=like.device).unsqueeze(1) + (lk - lq)
    k_pos = torch.arange(lk, device=like.device).unsqueeze(0)
    return k_pos > q_pos


@register_attention("reference")
def reference_attention(q, k, v, *, causal=False, scale=None, attn_mask=None):
    """Plain softmax(QK^T * scale + mask) V. The exported graph is easy to pattern-match."""
    import torch

    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q * scale, k.transpose(-1, -2))
    if causal:
        scores = scores.masked_fill(_causal_mask(q.shape[-2], k.shape[-2], q), float("-inf"))
    if attn_mask is not None:
        scores = scores + attn_mask
    return torch.matmul(torch.softmax(scores, dim=-1), v)


@register_attention("sdpa")
def sdpa_attention(q, k, v, *, causal=False, scale=None, attn_mask=None):
    """torch.nn.functional.scaled_dot_product_attention (fused kernels in eager torch).

    The default scale (1/sqrt(head dim)) is left implicit: converters fuse the op only without an
    explicit scale (Core ML's iOS 18 `scaled_dot_product_attention` has none)."""
    import torch

    if scale is not None and abs(scale - q.shape[-1] ** -0.5) <= 1e-12 * scale:
        scale = None

    if causal and attn_mask is None and q.shape[-2] == k.shape[-2]:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    mask = attn_mask
    if causal:
        causal_add = torch.zeros(q.shape[-2], k.shape[-2], dtype=q.dtype, device=q.device)
        causal_add = causal_add.masked_fill(_causal_mask(q.shape[-2], k.shape[-2], q), float("-inf"))
        mask = causal_add if mask is None else mask + causal_add
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


@register_attention("triton")
def triton_attention(q, k, v, *, causal=False, scale=None, attn_mask=None):
    """The Triton flash-attention kernel (`kernels.triton_attention`): NVIDIA GPUs, or Triton's CPU
    interpreter under TRITON_INTERPRET=1."""
    from .triton_attention import triton_attention as run

    return run(q, k, v, causal=causal, scale=scale, attn_mask=attn_mask)
