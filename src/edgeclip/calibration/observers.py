"""Range estimation for INT8: min-max, percentile, entropy (KL) and MSE observers.

An observer sees activation batches (`observe(x)`) and then gives a range (`range() -> (lo, hi)`).
Histogram-based observers keep a fixed-size histogram of |x| whose upper edge grows by whole
rebinning when a larger value arrives, so memory stays constant over any number of batches.
Symmetric ranges are returned as (-t, t); asymmetric ones (min-max) as the observed (min, max).
"""
from __future__ import annotations

import numpy as np

from ..errors import EdgeClipError

QMAX = 127  # symmetric signed 8-bit: [-127, 127]


class Observer:
    name = "base"
    symmetric = True

    def observe(self, x: np.ndarray) -> None:
        raise NotImplementedError

    def range(self) -> tuple[float, float]:
        raise NotImplementedError


class MinMaxObserver(Observer):
    """The observed extremes: exact, but one outlier stretches the whole grid."""

    name = "minmax"
    symmetric = False

    def __init__(self):
        self.lo, self.hi = np.inf, -np.inf

    def observe(self, x):
        x = np.asarray(x)
        if x.size:
            self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))

    def range(self):
        if not np.isfinite(self.lo):
            raise EdgeClipError("observer saw no data; calibration produced no activations")
        return min(self.lo, 0.0), max(self.hi, 0.0)  # 0 must be representable exactly


class HistogramObserver(Observer):
    """|x| histogram with `bins` bins over [0, edge]; subclasses choose the clipping threshold."""

    def __init__(self, bins: int = 2048):
        self.bins = bins
        self.hist = np.zeros(bins, dtype=np.float64)
        self.edge = 0.0   # histogram upper edge (>= amax after growth)
        self.amax = 0.0   # largest |x| seen

    def observe(self, x):
        a = np.abs(np.asarray(x, dtype=np.float32)).ravel()
        if not a.size:
            return
        amax = float(a.max())
        self.amax = max(self.amax, amax)
        if amax > self.edge:
            self._grow(amax)
        if self.edge == 0.0:
            self.hist[0] += a.size
            return
        idx = np.minimum((a * (self.bins / self.edge)).astype(np.int64), self.bins - 1)
        self.hist += np.bincount(idx, minlength=self.bins)

    def _grow(self, amax: float) -> None:
        if self.edge == 0.0 or not self.hist.any():
            self.edge = amax
            return
        # Grow by an integer factor so old bins merge exactly into new ones.
        factor = int(np.ceil(amax / self.edge))
        merged = np.zeros(self.bins, dtype=np.float64)
        np.add.at(merged, np.arange(self.bins) // factor, self.hist)
        self.hist, self.edge = merged, self.edge * factor

    @property
    def centers(self) -> np.ndarray:
        w = self.edge / self.bins
        return (np.arange(self.bins) + 0.5) * w

    def threshold(self) -> float:
        raise NotImplementedError

    def range(self):
        if not self.hist.any():
            raise EdgeClipError("observer saw no data; calibration produced no activations")
        t = max(min(self.threshold(), self.amax), 1e-8)  # never beyond what was seen
        return -t, t


class PercentileObserver(HistogramObserver):
    """Clip at the p-th percentile of |x| (default 99.99)."""

    name = "percentile"

    def __init__(self, percentile: float = 99.99, bins: int = 2048):
        super().__init__(bins)
        self.percentile = percentile

    def threshold(self):
        cdf = np.cumsum(self.hist) / self.hist.sum()
        i = int(np.searchsorted(cdf, self.percentile / 100.0))
        return (min(i, self.bins - 1) + 1) * self.edge / self.bins


class EntropyObserver(HistogramObserver):
    """The threshold whose 8-bit quantized distribution is closest in KL divergence to the observed
    one (the TensorRT calibration method), searched over the histogram's bin edges."""

    name = "entropy"

    def __init__(self, bins: int = 2048, levels: int = QMAX + 1):
        super().__init__(bins)
        self.levels = levels

    def threshold(self):
        hist, n = self.hist, self.levels
        best_i, best_kl = self.bins, np.inf
        for i in range(n, self.bins + 1, max(1, self.bins // 256)):
            p = hist[:i].copy()
            p[-1] += hist[i:].sum()  # clipped mass lands in the last bin
            nonzero = p > 0
            # quantize the first i bins into n levels, spread each level back over its non-empty bins
            groups = np.arange(i) * n // i
            q_level = np.bincount(groups, weights=hist[:i], minlength=n)
            count = np.bincount(groups, weights=nonzero.astype(np.float64), minlength=n)
            q = np.where(nonzero, q_level[groups] / np.maximum(count[groups], 1), 0.0)
            kl = _kl(p, q)
            if kl < best_kl:
                best_i, best_kl = i, kl
        return best_i * self.edge / self.bins


def _smooth(d: np.ndarray, eps: float = 1e-4) -> np.ndarray | None:
    """Move a little mass onto empty bins so KL stays finite (as MXNet's/TensorRT's calibrators do)."""
    zeros = d == 0
    n_zero, n_nonzero = int(zeros.sum()), int((~zeros).sum())
    if n_nonzero == 0:
        return None
    eps1 = eps * n_zero / n_nonzero
    if eps1 >= 1.0:
        return None
    return d + eps * zeros - eps1 * (~zeros)


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    if p.sum() == 0 or q.sum() == 0:
        return np.inf
    p, q = _smooth(p / p.sum()), _smooth(q / q.sum())
    if p is None or q is None:
        return np.inf
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))


class MSEObserver(HistogramObserver):
    """The threshold that minimises the expected squared error of symmetric 8-bit quantization:
    rounding error (step²/12) inside the range plus clipping error outside it."""

    name = "mse"

    def threshold(self):
        c, h = self.centers, self.hist
        candidates = np.linspace(self.edge / 64, self.edge, 256)
        errors = []
        for t in candidates:
            step = t / QMAX
            inside = c <= t
            err = np.sum(h[inside]) * step * step / 12.0 + np.sum(h[~inside] * (c[~inside] - t) ** 2)
            errors.append(err)
        return float(candidates[int(np.argmin(errors))])


OBSERVERS = {cls.name: cls for cls in (MinMaxObserver, PercentileObserver, EntropyObserver, MSEObserver)}


def make_observer(name: str, **kw) -> Observer:
    try:
        return OBSERVERS[name](**kw)
    except KeyError:
        raise EdgeClipError(f"unknown observer '{name}'; available: {', '.join(sorted(OBSERVERS))}") from None


def quantize_weight_per_channel(w: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel INT8: (q int8 same shape, scale float32 per channel along `axis`)."""
    w = np.asarray(w, dtype=np.float32)
    reduce = tuple(i for i in range(w.ndim) if i != axis % w.ndim)
    amax = np.abs(w).max(axis=reduce, keepdims=True)
    scale = np.where(amax > 0, amax / QMAX, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -QMAX, QMAX).astype(np.int8)
    return q, scale.reshape(-1)


def scale_zero_point(lo: float, hi: float, dtype: str = "int8") -> tuple[float, int]:
    """Affine parameters for a range: symmetric int8 (zero point 0) or asymmetric uint8."""
    if dtype == "int8":
        t = max(abs(lo), abs(hi), 1e-8)
        return t / QMAX, 0
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max(hi - lo, 1e-8) / 255.0
    return scale, int(np.clip(np.rint(-lo / scale), 0, 255))
