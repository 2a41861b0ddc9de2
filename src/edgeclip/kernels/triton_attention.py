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
    triton = require("triton", "the Triton attention kernel")
    import triton.language as tl

    @triton.jit
    def _flash_fwd(Q, K, V, Mask, Out,
                   sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                   smb, smh, smm, smn, sob, soh, som, sod,
                   H, LQ, LK, D, scale_log2,
                   HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < LQ
        d_ok = offs_d < D
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        shift = LK - LQ  # causal: query i sees keys j <= i + shift
        hi = LK
        if CAUSAL:
            hi = tl.minimum(LK, (pid_m + 1) * BLOCK_M + shift)
        for start in range(0, hi, BLOCK_N):
            n = start + offs_n
            n_ok = n < LK
            k = tl.load(K + b * skb + h * skh + n[None, :] * skn + offs_d[:, None] * skd,
                        mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
            if IEEE:
                s = tl.dot(q, k, input_precision="ieee")
            else:
                s = tl.dot(q, k)
            s = s * scale_log2  # log2 domain: exp2 below
            if HAS_MASK:
                bias = tl.load(Mask + b * smb + h * smh + offs_m[:, None] * smm + n[None, :] * smn,
                               mask=m_ok[:, None] & n_ok[None, :], other=0.0)
                s += bias.to(tl.float32) * 1.4426950408889634
            keep = n_ok[None, :]
            if CAUSAL:
                keep = keep & (n[None, :] <= offs_m[:, None] + shift)
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # rows that have seen only masked keys so far keep m = -inf: avoid (-inf) - (-inf)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + b * svb + h * svh + n[:, None] * svn + offs_d[None, :] * svd,
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:
                v = v.to(tl.float32)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(Out + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
                 out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])

    return triton, _flash_fwd


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
