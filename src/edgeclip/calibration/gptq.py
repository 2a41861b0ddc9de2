"""Error-compensating block-wise rounding of linear weights (GPTQ, Frantar et al. 2022) for the 4-bit
recipes, from the calibration batches' activations.

    hessians = input_hessians(model, targets, batches)           # {activation tensor: (K, K)}
    codes, scales = gptq_quantize(w, hessians[t.activation], bits=4, block=32)

Rounding each weight to its nearest code (`qdq.block_quantize`) ignores that a layer's inputs are
correlated; GPTQ quantizes the input rows of W (K, N) one at a time and moves each row's rounding
error onto the rows not yet quantized, weighted by the inverse of H = X^T X over the calibration
inputs, so that X @ W changes least. Scales are chosen per block when the block's first row is
reached, from the weights as updated so far (the same symmetric, full-range, searched scale as
`qdq.block_quantize`), so the result is the same format: MatMulNBits codes and scales.

numpy only (H accumulated in float32, the compensation in float64); the activations come from an ONNX Runtime session over the
float graph (`qdq.probe_session`).
"""
from __future__ import annotations

import numpy as np

from .qdq import block_quantize, probe_session

DAMP = 0.01      # added to H's diagonal, times its mean: keeps the inverse well conditioned
LAZY = 128       # rows updated together (the error of a block of rows goes to the rest in one GEMM)


MAX_HESSIAN_BYTES = 2 << 30  # all of a graph's H together (float32); beyond it, nearest rounding


def input_hessians(model, targets, batches) -> dict:
    """{activation tensor: X^T X / rows (float32, K x K)} of every MatMul target's input over the
    calibration `batches`, from one ONNX Runtime probe session over the float `model`; {} when they
    would take more than MAX_HESSIAN_BYTES (ViT-B/32 image: ~0.5 GB; ViT-L/14 image: ~1.9 GB)."""
    names, widths = [], {}
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    for t in targets:
        if t.kind == "matmul" and t.activation not in widths:
            names.append(t.activation)
            widths[t.activation] = inits[t.weight][0]
    if not names or not batches or sum(4 * k * k for k in widths.values()) > MAX_HESSIAN_BYTES:
        return {}
    names.sort()
    sess = probe_session(model, names)
    sums: dict = {}
    rows = dict.fromkeys(names, 0)
    for feeds in batches:
        for name, x in zip(names, sess.run(names, feeds)):
            x = np.asarray(x, np.float32).reshape(-1, x.shape[-1])
            sums[name] = x.T @ x + sums[name] if name in sums else x.T @ x
            rows[name] += x.shape[0]
    return {n: sums[n] / np.float32(max(rows[n], 1)) for n in names}


def gptq_quantize(w: np.ndarray, hessian: np.ndarray, bits: int, block: int):
    """(codes uint8 (N, K), scales float32 (N, K // block)) of the (K, N) MatMul weight `w`, in
    `qdq.block_quantize`'s format, with GPTQ's error compensation under the input Hessian `hessian`."""
    k, n = w.shape
    lazy = min(LAZY, k)
    if k % block or k % lazy or lazy % block:
        return block_quantize(w.T, bits, block)
    wt = w.T.astype(np.float64).copy()                 # (N, K): a row per output, quantized along K
    h = hessian.astype(np.float64).copy()
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    wt[:, dead] = 0.0
    h[np.diag_indices(k)] += DAMP * float(np.mean(np.diag(h)))
    try:
        hinv = np.linalg.cholesky(np.linalg.inv(h)).T   # upper U with U^T U = H^-1
    except np.linalg.LinAlgError:
        return block_quantize(w.T, bits, block)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    codes = np.zeros((n, k), np.int16)
    scales = np.zeros((n, k // block), np.float32)
    for i1 in range(0, k, lazy):
        i2 = i1 + lazy
        w1, err1, u = wt[:, i1:i2].copy(), np.zeros((n, lazy)), hinv[i1:i2, i1:i2]
        for i in range(lazy):
            col = i1 + i
            if col % block == 0:  # this block's scale, from the weights as compensated so far
                _, s = block_quantize(w1[:, i:i + block].astype(np.float32), bits, block)
                scales[:, col // block] = s[:, 0]
            s = scales[:, col // block].astype(np.float64)
            q = np.clip(np.rint(w1[:, i] / s), lo, hi)
            codes[:, col] = q
            e = (w1[:, i] - q * s) / u[i, i]
            w1[:, i:] -= np.outer(e, u[i, i:])
            err1[:, i] = e
        wt[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return (codes - lo).astype(np.uint8), scales
