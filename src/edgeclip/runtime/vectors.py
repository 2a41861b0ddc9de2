"""Row-wise vector helpers shared by the runtime, heads, calibration and bench. numpy only.

One definition of "L2-normalized" and of "cosine", so that the features the runtime returns, the
heads fitted on them and the fidelity figures bench reports all agree to the last bit.
"""
from __future__ import annotations

import numpy as np

from ..errors import InputError

EPS = 1e-12  # the norm floor: a zero vector normalizes to zeros instead of NaN


def l2_normalize(x, axis: int = -1, eps: float = EPS, dtype=None) -> np.ndarray:
    """`x / max(||x||, eps)` along `axis`, computed in `dtype` (default: `x`'s own).

    `eps=0.0` divides by the norm itself, for callers that have checked every norm is positive and
    must not let a floor change a tiny vector's direction weight."""
    x = np.asarray(x, dtype=dtype)
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), eps)


def cosine(a, b, axis: int = -1, eps: float = EPS) -> np.ndarray:
    """Row-wise cosine similarity of `a` and `b` (same shape): `a.b / (||a|| ||b|| + eps)`.

    The epsilon is added, not a floor: a zero row scores 0 against anything, never NaN. Computed in
    the inputs' dtype; pass float64 for figures that are reported."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:  # broadcasting would pair rows silently wrong
        raise InputError(f"cosine needs two arrays of one shape, got {a.shape} and {b.shape}")
    return (a * b).sum(axis) / (np.linalg.norm(a, axis=axis) * np.linalg.norm(b, axis=axis) + eps)
