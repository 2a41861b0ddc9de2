"""The head kinds: zero-shot, linear probe, residual adapter (CLIP-Adapter), Tip-Adapter(-F), GDA.

Each kind is the same maths twice: a numpy reference (float64, straight from the stored arrays) and
a torch module for export (folded where that is exact: GDA and the zero-shot part of Tip-Adapter
become one matrix product; a one-hot Tip-Adapter cache becomes a per-class sum, not a product).
"""
from __future__ import annotations

import numpy as np

from .base import Head, HeadKind, normalize, register_kind


def _torch():
    from .._lazy import require

    torch = require("torch", "exporting heads")
    return torch, torch.nn, torch.nn.functional


def _f32(a) -> "object":
    torch, _, _ = _torch()
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def _input(head: Head, feats: np.ndarray) -> np.ndarray:
    return normalize(feats) if head.params.get("normalize", 1.0) else feats


@register_kind
class ZeroShot(HeadKind):
    kind = "zero_shot"
    summary = "class names x prompt templates, averaged and normalized: scale * cos(image, class) + bias"
    arrays = {"text_weights": ("C", "E")}
    params = {"scale": 100.0, "bias": 0.0, "sigmoid": 0.0}

    @classmethod
    def activation_for(cls, head):
        return "sigmoid" if head.params["sigmoid"] else "softmax"

    @staticmethod
    def logits(head, feats):
        p = head.params
        return p["scale"] * normalize(feats) @ head.arrays["text_weights"].T.astype(np.float64) + p["bias"]

    @staticmethod
    def module(head):
        return _Linear(head.params["scale"] * head.arrays["text_weights"].astype(np.float64),
                       np.full(head.num_classes, head.params["bias"]), normalize=True)


@register_kind
class Linear(HeadKind):
    kind = "linear"
    summary = "linear probe: W x + b (x L2-normalized unless normalize=0)"
    arrays = {"weight": ("C", "E"), "bias": ("C",)}
    optional = {"text_weights": ("C", "E")}   # for the MCM score only
    params = {"normalize": 1.0}

    @staticmethod
    def logits(head, feats):
        return _input(head, feats) @ head.arrays["weight"].T.astype(np.float64) + head.arrays["bias"]

    @staticmethod
    def module(head):
        return _Linear(head.arrays["weight"], head.arrays["bias"], normalize=bool(head.params["normalize"]))


@register_kind
class ResidualAdapter(HeadKind):
    kind = "residual_adapter"
    summary = ("CLIP-Adapter: x' = ratio * relu(W2 relu(W1 x + b1) + b2) + (1 - ratio) * x, "
               "then scale * cos(x', class)")
    arrays = {"w1": ("H", "E"), "w2": ("E", "H"), "text_weights": ("C", "E")}
    optional = {"b1": ("H",), "b2": ("E",)}
    params = {"ratio": 0.2, "scale": 100.0, "normalize": 0.0}

    @staticmethod
    def logits(head, feats):
        a, p = head.arrays, head.params
        x = _input(head, feats)
        h = np.maximum(x @ a["w1"].T.astype(np.float64) + a.get("b1", 0.0), 0.0)
        h = np.maximum(h @ a["w2"].T.astype(np.float64) + a.get("b2", 0.0), 0.0)
        x = p["ratio"] * h + (1.0 - p["ratio"]) * x
        return p["scale"] * normalize(x) @ a["text_weights"].T.astype(np.float64)

    @staticmethod
    def module(head):
        return _ResidualAdapter(head)


@register_kind
class TipAdapter(HeadKind):
    kind = "tip_adapter"
    summary = ("Tip-Adapter: scale * cos(x, class) + alpha * exp(-beta (1 - x . keys)) @ values; "
               "fine-tuned keys (Tip-Adapter-F) work the same")
    arrays = {"keys": ("K", "E"), "values": ("K", "C"), "text_weights": ("C", "E")}
    params = {"alpha": 1.0, "beta": 5.5, "scale": 100.0}

    @staticmethod
    def logits(head, feats):
        a, p = head.arrays, head.params
        x = normalize(feats)
        affinity = x @ a["keys"].T.astype(np.float64)
        cache = np.exp(-p["beta"] * (1.0 - affinity)) @ a["values"].astype(np.float64)
        return p["scale"] * x @ a["text_weights"].T.astype(np.float64) + p["alpha"] * cache

    @staticmethod
    def module(head):
        return _TipAdapter(head)


@register_kind
class Gda(HeadKind):
    kind = "gda"
    summary = ("Gaussian discriminant analysis (shared covariance) blended with zero-shot: "
               "scale * cos(x, class) + alpha * (mu P x - mu P mu / 2 + log prior)")
    arrays = {"means": ("C", "E"), "precision": ("E", "E"), "priors": ("C",), "text_weights": ("C", "E")}
    params = {"alpha": 1.0, "scale": 100.0}

    @staticmethod
    def folded(head) -> tuple[np.ndarray, np.ndarray]:
        """(W, b) with logits = W normalize(x) + b, in float64: GDA and zero-shot are both linear."""
        a, p = head.arrays, head.params
        mu, prec = a["means"].astype(np.float64), a["precision"].astype(np.float64)
        mp = mu @ prec
        b = np.log(np.maximum(a["priors"].astype(np.float64), 1e-12)) - 0.5 * np.einsum("ce,ce->c", mp, mu)
        return p["scale"] * a["text_weights"].astype(np.float64) + p["alpha"] * mp, p["alpha"] * b

    @staticmethod
    def logits(head, feats):
        a, p = head.arrays, head.params
        x = normalize(feats)
        mu, prec = a["means"].astype(np.float64), a["precision"].astype(np.float64)
        d = x[:, None, :] - mu[None]                          # (N, C, E)
        maha = np.einsum("nce,ef,ncf->nc", d, prec, d)
        xpx = np.einsum("ne,ef,nf->n", x, prec, x)[:, None]    # class-independent: cancels in softmax,
        gda = -0.5 * (maha - xpx) + np.log(np.maximum(a["priors"], 1e-12))  # removed to match the linear form
        return p["scale"] * x @ a["text_weights"].T.astype(np.float64) + p["alpha"] * gda

    @staticmethod
    def module(head):
        w, b = Gda.folded(head)
        return _Linear(w, b, normalize=True)


# ------------------------------------------------------------------------------------ torch modules
# Built lazily: torch is needed only to export.

def _Linear(weight: np.ndarray, bias: np.ndarray, normalize: bool):
    torch, nn, F = _torch()

    class LinearHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.normalize = normalize
            self.register_buffer("weight", _f32(np.asarray(weight).T))   # (E, C): x @ W
            self.register_buffer("bias", _f32(bias))

        def forward(self, x):
            if self.normalize:
                x = F.normalize(x, dim=-1)
            return x @ self.weight + self.bias

    return LinearHead()


def _ResidualAdapter(head: Head):
    torch, nn, F = _torch()
    a, p = head.arrays, head.params

    class ResidualAdapterHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.normalize, self.ratio = bool(p["normalize"]), float(p["ratio"])
            self.register_buffer("w1", _f32(a["w1"].T))
            self.register_buffer("b1", _f32(a.get("b1", np.zeros(a["w1"].shape[0]))))
            self.register_buffer("w2", _f32(a["w2"].T))
            self.register_buffer("b2", _f32(a.get("b2", np.zeros(a["w2"].shape[0]))))
            self.register_buffer("classes", _f32(p["scale"] * a["text_weights"].astype(np.float64).T))

        def forward(self, x):
            if self.normalize:
                x = F.normalize(x, dim=-1)
            h = torch.relu(torch.relu(x @ self.w1 + self.b1) @ self.w2 + self.b2)
            x = self.ratio * h + (1.0 - self.ratio) * x
            return F.normalize(x, dim=-1) @ self.classes

    return ResidualAdapterHead()


def one_hot_groups(values: np.ndarray) -> np.ndarray | None:
    """Key order that groups a one-hot cache by class with the same count per class, else None."""
    v = np.asarray(values)
    if not np.isin(v, (0.0, 1.0)).all() or not (v.sum(axis=1) == 1).all():
        return None
    labels = v.argmax(axis=1)
    counts = np.bincount(labels, minlength=v.shape[1])
    if counts.min() != counts.max() or counts[0] == 0:
        return None
    return np.argsort(labels, kind="stable")


def _TipAdapter(head: Head):
    torch, nn, F = _torch()
    a, p = head.arrays, head.params
    keys, values = a["keys"].astype(np.float64), a["values"].astype(np.float64)
    order = one_hot_groups(values)
    n_keys, n_classes = keys.shape[0], values.shape[1]
    if order is not None:
        keys = keys[order]
    # One product for the cache affinities and the zero-shot logits: [keys; scale * text] x.
    stacked = np.concatenate([keys, p["scale"] * a["text_weights"].astype(np.float64)], axis=0)

    unit_text = bool(np.allclose(np.linalg.norm(a["text_weights"].astype(np.float64), axis=-1), 1.0, atol=1e-5))

    class TipAdapterHead(nn.Module):
        # the zero-shot part is scale * cosines when the class text is unit-norm: the MCM score reuses it
        shares_cosines = unit_text and p["scale"] > 0

        def __init__(self):
            super().__init__()
            self.alpha, self.beta, self.scale = float(p["alpha"]), float(p["beta"]), float(p["scale"])
            # set by the image graph when its MCM score reuses the cosines: forward returns both (called
            # through the module, so the exporter records this head's name scope for its layers)
            self.return_cosines = False
            self.grouped = order is not None
            self.per_class = n_keys // n_classes
            self.register_buffer("keys_and_classes", _f32(stacked.T))          # (E, K + C)
            if not self.grouped:
                self.register_buffer("values", _f32(values))

        def forward(self, x):
            s = F.normalize(x, dim=-1) @ self.keys_and_classes
            affinity, zero_shot = s[:, :n_keys], s[:, n_keys:]
            cache = torch.exp(self.beta * (affinity - 1.0))
            if self.grouped:  # one-hot values, equal shots per class: a per-class sum
                cache = cache.reshape(cache.shape[0], n_classes, self.per_class).sum(-1)
            else:
                cache = cache @ self.values
            logits = zero_shot + self.alpha * cache
            return (logits, zero_shot / self.scale) if self.return_cosines else logits

    return TipAdapterHead()
