"""Graphs with fixed shapes (the `ort-mobile` target's): any batch is run in chunks of the graph's
batch, the last one padded by repeating its last row; token ids are fed in the graph's integer type
and cut or padded with zeros to its length (exact for the causal, end-token-pooled towers such graphs
are written with a shorter length for; the cut columns must be padding).

    graph = fit_shapes(backend, manifest["graphs"]["text"])   # the backend itself when nothing is fixed
"""
from __future__ import annotations

import numpy as np

from ..errors import InputError

_INTS = {"int32": np.int32, "int64": np.int64}


def fixed(info: dict) -> bool:
    """Whether a manifest graph entry declares a fixed batch or int32 ids."""
    return any(isinstance(t["shape"][0], int) or t["dtype"] == "int32" for t in info["inputs"].values())


def fit_shapes(backend, info: dict):
    return FixedShapes(backend, info) if fixed(info) else backend


def fit_feed(t: dict | None, x: np.ndarray) -> np.ndarray:
    """Token ids `x` in the integer type and length the declared input `t` takes (anything else as is)."""
    if t is None or t["dtype"] not in _INTS or x.dtype.kind not in "iu":
        return x
    length = t["shape"][1] if len(t["shape"]) > 1 else None
    if isinstance(length, int) and x.ndim == 2 and x.shape[1] != length:
        if x.shape[1] > length:
            if np.any(x[:, length:]):
                longest = int(np.max(np.nonzero(np.any(x != 0, axis=0))[0])) + 1
                raise InputError(f"these token ids run to position {longest}; this artifact's text graph takes "
                                 f"{length} tokens (export with --mobile-shapes BATCHx{longest} or longer)")
            x = x[:, :length]
        else:
            x = np.pad(x, ((0, 0), (0, length - x.shape[1])))
    return np.ascontiguousarray(x, dtype=_INTS[t["dtype"]])


class FixedShapes:
    """A backend wrapper that feeds a fixed-shape graph whatever batch and length the caller has."""

    def __init__(self, backend, info: dict):
        self.backend, self.decl = backend, info["inputs"]
        self.batch = next((t["shape"][0] for t in self.decl.values() if isinstance(t["shape"][0], int)), None)
        for attr in ("input_names", "output_names", "signature", "info"):
            if hasattr(backend, attr):
                setattr(self, attr, getattr(backend, attr))

    def run(self, feeds: dict) -> dict:
        feeds = {k: fit_feed(self.decl.get(k), np.asarray(v)) for k, v in feeds.items()}
        n = len(next(iter(feeds.values())))
        if self.batch is None or n == self.batch:
            return self.backend.run(feeds)
        if n == 0:
            raise InputError("an empty batch: pass at least one input")
        parts = []
        for start in range(0, n, self.batch):
            chunk = {k: v[start:start + self.batch] for k, v in feeds.items()}
            short = self.batch - len(next(iter(chunk.values())))
            if short:
                chunk = {k: np.concatenate([v, np.repeat(v[-1:], short, axis=0)]) for k, v in chunk.items()}
            parts.append(self.backend.run(chunk))
        return {k: np.concatenate([p[k] for p in parts])[:n] for k in parts[0]}
