"""The Triton flash-attention forward kernel that `triton_attention.flash_attention` launches.

This module imports triton at its top, so nothing imports it but `triton_attention._build`, after
`require("triton")` (the error naming the extra) and after TRITON_INTERPRET is set for the CPU
interpreter. The helpers are separate @triton.jit functions at module level because Triton inlines
them into the kernel (same IR as writing them out) and its interpreter looks callees up in the
module's globals, not in a closure.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _load(ptrs, mask, UPCAST: tl.constexpr):
    # masked tile load, zeros outside; upcast where the interpreter cannot compute in the input dtype
    x = tl.load(ptrs, mask=mask, other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # fp32 inputs: full-precision products (no TF32), to hold the fp32 tolerance
    if IEEE:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def flash_fwd(Q, K, V, Mask, Out,
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
    q = _load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
              mask=m_ok[:, None] & d_ok[None, :], UPCAST=UPCAST)
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
        k = _load(K + b * skb + h * skh + n[None, :] * skn + offs_d[:, None] * skd,
                  mask=n_ok[None, :] & d_ok[:, None], UPCAST=UPCAST)
        s = _dot(q, k, IEEE)
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
        v = _load(V + b * svb + h * svh + n[:, None] * svn + offs_d[None, :] * svd,
                  mask=n_ok[:, None] & d_ok[None, :], UPCAST=UPCAST)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(Out + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
             out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
