"""Flash attention forward in Triton: one pass over the keys with an online softmax, no (Lq, Lk)
score matrix in memory. fp32 / fp16 / bf16 inputs (fp32 accumulation), head dims 16-256 (any size:
padded to a power of two inside the kernel and masked), any sequence lengths, optional causal mask
(queries are the *last* Lq positions, as everywhere in `kernels`) and optional additive mask.

    out = flash_attention(q, k, v, causal=False, scale=None, attn_mask=None)   # (B, H, L, D) tensors

Runs on NVIDIA GPUs; on CPU only under Triton's interpreter (`TRITON_INTERPRET=1`, set before
triton is imported), which is how CI checks it. Registered as the `triton` attention implementation.
"""
from __future__ import annotations

from .._lazy import require
from ..errors import EdgeClipError, InputError

_KERNEL = None


def _build():
    """(triton, the jitted kernel); the kernel module imports triton itself, so it is imported here only."""
    triton = require("triton", "the Triton attention kernel")
    from .triton_flash import flash_fwd

    return triton, flash_fwd


def _kernel():
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = _build()
    return _KERNEL


def _interpreting() -> bool:
    """Triton's CPU interpreter computes bf16 dot products wrongly (numpy has no bf16): there the
    kernel upcasts bf16 tiles after loading; on GPUs the dots run in bf16 on tensor cores."""
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def flash_attention(q, k, v, *, causal: bool = False, scale: float | None = None, attn_mask=None,
                    block_m: int | None = None, block_n: int | None = None):
    """softmax(q kᵀ · scale [+ attn_mask] [causal]) v for (B, H, Lq, D), (B, H, Lk, D) tensors."""
    import torch

    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise InputError(f"flash_attention wants (B, H, L, D) tensors, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    b, h, lq, d = q.shape
    if k.shape[:2] != (b, h) or v.shape[:2] != (b, h) or k.shape[3] != d or v.shape != k.shape:
        raise InputError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not agree")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise InputError(f"flash_attention supports float32/float16/bfloat16 (all alike), got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    if not 1 <= d <= 256:
        raise InputError(f"head dim {d} outside 1..256")
    lk = k.shape[2]
    triton, kernel = _kernel()
    block_d = max(16, _next_pow2(d))
    bm = block_m or (64 if lq >= 64 else max(16, _next_pow2(lq)))
    bn = block_n or (64 if block_d <= 64 else 32)
    out = torch.empty_like(q)
    scale = d ** -0.5 if scale is None else float(scale)
    if attn_mask is not None:
        mask = attn_mask.to(q.device).expand(b, h, lq, lk)
        ms = mask.stride()
    else:
        mask, ms = q, (0, 0, 0, 0)  # unused
    grid = (triton.cdiv(lq, bm), b * h)
    kernel[grid](q, k, v, mask, out, *q.stride(), *k.stride(), *v.stride(), *ms, *out.stride(),
                 h, lq, lk, d, scale * 1.4426950408889634,
                 HAS_MASK=attn_mask is not None, CAUSAL=bool(causal), IEEE=q.dtype == torch.float32,
                 UPCAST=_interpreting() and q.dtype == torch.bfloat16,
                 BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d)
    return out


def available() -> bool:
    """True where the kernel can run: an NVIDIA GPU with triton, or Triton's CPU interpreter."""
    import os

    try:
        import torch
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def triton_attention(q, k, v, *, causal=False, scale=None, attn_mask=None):
    """The `triton` entry of the attention registry."""
    if not available():
        raise EdgeClipError("the triton attention implementation needs an NVIDIA GPU (or TRITON_INTERPRET=1 "
                            "for Triton's CPU interpreter); use 'sdpa' or 'reference' here")
    if q.device.type != "cuda":
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            raise EdgeClipError("the triton attention implementation runs on CUDA tensors")
    return flash_attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=causal, scale=scale,
                           attn_mask=attn_mask)


__all__ = ["flash_attention", "triton_attention", "available"]
