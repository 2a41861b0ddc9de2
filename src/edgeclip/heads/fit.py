"""Fit heads on CPU from a few labelled images: zero-shot, linear probe, Tip-Adapter, GDA.

    data = encode_folder(encoder, "train/", shots=16, seed=0, augment=4)
    head = fit("tip_adapter", data, text_weights, scale=100.0)

Deterministic for a seed: the shots are a seeded sample per class, augmentation is a fixed set of
shifted views, optimisation is full-batch, and hyperparameters are chosen by cross-validation over
the shots themselves (k folds of whole shots with all their views; nothing of the evaluation set).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import product

import numpy as np

from ..errors import HeadError
from .base import Head, check_number, normalize, softmax

FIT_KINDS = ("zero_shot", "linear", "tip_adapter", "gda")
ALIASES = {"tip": "tip_adapter", "zeroshot": "zero_shot", "zero-shot": "zero_shot", "probe": "linear"}


def kind_name(kind: str) -> str:
    k = ALIASES.get(kind, kind) if isinstance(kind, str) else None
    if k not in FIT_KINDS:
        raise HeadError(f"cannot fit a '{kind}' head; fit kinds: linear, tip (tip_adapter), gda, zero_shot "
                        "(residual adapters and fine-tuned Tip-Adapter caches are imported: edgeclip heads import)")
    return k


@dataclass
class FitData:
    """Encoded shots: feats (N, V, E) L2-normalized, view 0 the image itself; labels (N,)."""

    feats: np.ndarray
    labels: np.ndarray
    classes: list
    files: list = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @property
    def shots(self) -> int:
        return int(np.bincount(self.labels, minlength=len(self.classes)).min())


# ---------------------------------------------------------------------------------------- data

def shift_views(image: np.ndarray, n: int) -> list[np.ndarray]:
    """`n` shifted copies of an HWC image (zero padded), by about 1/8 of its side, in a fixed order."""
    h, w = image.shape[:2]
    s = max(1, round(min(h, w) / 8))
    moves = [(s, 0), (-s, 0), (0, s), (0, -s), (s, s), (-s, -s), (s, -s), (-s, s)]
    out = []
    for dy, dx in moves[:n]:
        v = np.zeros_like(image)
        v[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
            image[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
        out.append(v)
    return out


MAX_AUGMENT = 8   # shift_views has eight fixed moves


def check_int(field_name: str, value, low: int, high: int | None = None, flag: str = "") -> int:
    """`value` as an int in [low, high], else HeadError naming the argument (and its CLI flag)."""
    name = f"{field_name} ({flag})" if flag else field_name
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise HeadError(f"{name} must be an integer, got {type(value).__name__} {value!r:.40}")
    if value < low or (high is not None and value > high):
        rng = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise HeadError(f"{name} must be {rng}, got {value}")
    return int(value)


def sample_shots(targets: np.ndarray, classes: list, shots: int | None, seed: int) -> np.ndarray:
    """Indices of `shots` images per class (all when None), a seeded sample, in class order."""
    if shots is not None:
        shots = check_int("shots", shots, 1, flag="--shots")
    rng = np.random.default_rng(check_int("seed", seed, 0, flag="--seed"))
    out = []
    for c, name in enumerate(classes):
        idx = np.flatnonzero(targets == c)
        if shots is not None:
            if len(idx) < shots:
                raise HeadError(f"class '{name}' has {len(idx)} image(s); --shots {shots} needs {shots} per class")
            idx = np.sort(rng.choice(idx, size=shots, replace=False))
        out.extend(idx.tolist())
    return np.asarray(out, dtype=np.int64)


def encode_folder(encode, root, labels=None, shots: int | None = None, seed: int = 0, augment: int = 0,
                  what: str = "--train") -> FitData:
    """Encode a labelled folder (one sub-folder per class) with `encode(list of HWC uint8) -> (N, E)`."""
    from ..calibration.data import read_eval
    from ..runtime.preprocess import load_image

    # arguments first: a bad one fails before a folder is listed or an image decoded
    if shots is not None:
        check_int("shots", shots, 1, flag="--shots")
    check_int("seed", seed, 0, flag="--seed")
    augment = check_int("augment", augment, 0, MAX_AUGMENT, flag="--augment")
    if labels is not None:
        from .zero_shot import parse_labels

        labels = parse_labels(labels, "class")
    ev = read_eval(root, labels, what=what)
    pick = sample_shots(np.asarray(ev.targets), ev.classes, shots, seed)
    files = [ev.files[i] for i in pick]
    images = [np.asarray(load_image(f).convert("RGB")) for f in files]
    views = [images] + [list(v) for v in zip(*(shift_views(im, augment) for im in images))] if augment else [images]
    feats = np.stack([normalize(np.asarray(encode(batch), np.float64)) for batch in views], axis=1)
    return FitData(feats, np.asarray(ev.targets)[pick], list(ev.classes), [str(f) for f in files],
                   {"folder": str(root), "images": len(files), "shots": shots, "seed": seed, "augment": augment})


# ------------------------------------------------------------------------------------- fitting

def fit(kind: str, data: FitData, text_weights: np.ndarray, scale: float, name: str | None = None) -> Head:
    """Fit a head of `kind` (linear | tip_adapter | gda) on `data`; zero-shot weights `text_weights`."""
    kind = kind_name(kind)
    fitter = {"linear": _fit_linear, "tip_adapter": _fit_tip, "gda": _fit_gda}.get(kind)
    if fitter is None:
        raise HeadError("zero-shot heads are built from class names, not images: use zero_shot_head()")
    _check_data(data)
    try:
        text_weights = np.asarray(text_weights, np.float64)
    except (TypeError, ValueError):
        raise HeadError(f"zero-shot weights must be a numeric (C, E) array, got {type(text_weights).__name__}") \
            from None
    if text_weights.shape != (len(data.classes), data.feats.shape[-1]):
        raise HeadError(f"zero-shot weights have shape {text_weights.shape}, expected "
                        f"({len(data.classes)}, {data.feats.shape[-1]})")
    if not np.isfinite(text_weights).all():
        raise HeadError("zero-shot weights hold NaN or infinite values")
    scale = check_number("scale", scale)
    if scale <= 0:
        raise HeadError(f"the logit scale must be positive, got {scale}")
    arrays, params, cv = fitter(data, text_weights, scale)
    info = {**data.info, "fit": cv}
    return Head(kind, name or _default_name(kind), data.classes, arrays, params, info)


def _check_data(data) -> None:
    """FitData that fitting can use: (N, V, E) finite features, labels of every class, one shot at least."""
    if not isinstance(data, FitData):
        raise HeadError(f"fitting takes the FitData of encode_folder(...), got {type(data).__name__}")
    feats, labels = np.asarray(data.feats), np.asarray(data.labels)
    if feats.ndim != 3 or feats.shape[0] == 0 or 0 in feats.shape or feats.dtype.kind != "f":
        raise HeadError(f"fit data features have shape {feats.shape} ({feats.dtype}), expected a float "
                        "(N, views, E) array with at least one image; encode a folder with encode_folder")
    if labels.shape != (feats.shape[0],) or labels.dtype.kind not in "iu":
        raise HeadError(f"fit data labels have shape {labels.shape} ({labels.dtype}), expected ({feats.shape[0]},) "
                        "integers")
    n = len(data.classes)
    if n < 2 or labels.min() < 0 or labels.max() >= n:
        raise HeadError(f"fit data labels must index {n} classes (at least two), got labels "
                        f"{labels.min()}..{labels.max()}")
    empty = [data.classes[c] for c in range(n) if not (labels == c).any()]
    if empty:
        raise HeadError(f"class(es) {', '.join(map(str, empty[:5]))} have no images in the fit data; every class "
                        "needs at least one shot")
    if not np.isfinite(feats).all():
        raise HeadError("fit data features hold NaN or infinite values; check the encoder")


def _default_name(kind: str) -> str:
    return {"tip_adapter": "tip"}.get(kind, kind)


def _folds(data: FitData, k: int = 4) -> list[np.ndarray]:
    """Shot j of every class goes to fold j % k: every fold holds every class."""
    pos = np.zeros(len(data.labels), np.int64)
    for c in range(len(data.classes)):
        idx = np.flatnonzero(data.labels == c)
        pos[idx] = np.arange(len(idx))
    n = min(k, data.shots)
    return [np.flatnonzero(pos % n == f) for f in range(n)]


def _score(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(accuracy, -mean log-likelihood): larger is better, compared in that order."""
    p = softmax(logits)
    nll = -np.log(np.maximum(p[np.arange(len(labels)), labels], 1e-12)).mean()
    return float((logits.argmax(1) == labels).mean()), float(-nll)


def _select(data: FitData, grid: dict, fit_predict, defaults: dict) -> tuple[dict, dict]:
    """Grid search by k-fold cross-validation over shots; `defaults` when there is one shot per class."""
    folds = _folds(data)
    if len(folds) < 2:
        return defaults, {"selected": defaults, "by": "defaults (one shot per class: nothing to validate on)"}
    names = list(grid)
    best, best_score = None, None
    for values in product(*(grid[n] for n in names)):
        hp = dict(zip(names, values))
        logits, labels = [], []
        for held in folds:
            train = np.setdiff1d(np.arange(len(data.labels)), held)
            logits.append(fit_predict(data, train, data.feats[held, 0], hp))
            labels.append(data.labels[held])
        score = _score(np.concatenate(logits), np.concatenate(labels))
        if best_score is None or score > best_score:
            best, best_score = hp, score
    return best, {"selected": best, "by": f"{len(folds)}-fold cross-validation over the shots",
                  "cv_top1": round(best_score[0], 6), "cv_log_likelihood": round(best_score[1], 6)}


def _onehot(labels: np.ndarray, n: int) -> np.ndarray:
    return np.eye(n)[labels]


def _views(data: FitData, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = data.feats[idx]
    return x.reshape(-1, x.shape[-1]), np.repeat(data.labels[idx], x.shape[1])


# Linear probe: softmax regression from the zero-shot weights, pulled towards them (few shots
# cannot support a free 1000 x 512 matrix); Adam, full batch, a fixed number of steps.

def _train_linear(x, y, n_classes, w0, lam, steps=300, lr=0.05):
    w, b = w0.copy(), np.zeros(n_classes)
    target = _onehot(y, n_classes)
    mw, vw, mb, vb = np.zeros_like(w), np.zeros_like(w), np.zeros_like(b), np.zeros_like(b)
    for t in range(1, steps + 1):
        g = (softmax(x @ w.T + b) - target) / len(x)
        gw, gb = g.T @ x + lam * (w - w0), g.sum(0)
        mw, vw = 0.9 * mw + 0.1 * gw, 0.999 * vw + 0.001 * gw * gw
        mb, vb = 0.9 * mb + 0.1 * gb, 0.999 * vb + 0.001 * gb * gb
        c1, c2 = 1 - 0.9 ** t, 1 - 0.999 ** t
        w -= lr * (mw / c1) / (np.sqrt(vw / c2) + 1e-8)
        b -= lr * (mb / c1) / (np.sqrt(vb / c2) + 1e-8)
    return w, b


def _fit_linear(data, text, scale):
    n = len(data.classes)
    w0 = scale * normalize(text)

    def fit_predict(d, train, query, hp):
        x, y = _views(d, train)
        w, b = _train_linear(x, y, n, w0, hp["weight_decay"])
        return query @ w.T + b

    hp, cv = _select(data, {"weight_decay": [0.01, 0.1, 1.0]}, fit_predict, {"weight_decay": 1.0})
    x, y = _views(data, np.arange(len(data.labels)))
    w, b = _train_linear(x, y, n, w0, hp["weight_decay"])
    return {"weight": w, "bias": b, "text_weights": text}, {"normalize": 1.0}, \
        {**cv, "method": "softmax regression from the zero-shot weights, L2 pull towards them; Adam, 300 "
                         "full-batch steps"}


# Tip-Adapter: keys are the shots' features averaged over their views; LOO-free k-fold search of
# (alpha, beta) as in the paper's validation search.

def _tip_keys(data, idx):
    return normalize(data.feats[idx].mean(axis=1))


def _tip_logits(keys, values, text, scale, query, alpha, beta):
    return scale * query @ text.T + alpha * np.exp(-beta * (1.0 - query @ keys.T)) @ values


def _fit_tip(data, text, scale):
    n = len(data.classes)
    text = normalize(text)

    def fit_predict(d, train, query, hp):
        return _tip_logits(_tip_keys(d, train), _onehot(d.labels[train], n), text, scale, query, **hp)

    # alpha is relative to the zero-shot logit scale, so one grid serves models with any scale
    grid = {"alpha": [scale * a for a in (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)], "beta": [1.0, 3.0, 5.5, 10.0, 20.0]}
    hp, cv = _select(data, grid, fit_predict, {"alpha": scale * 0.1, "beta": 5.5})
    keys = _tip_keys(data, np.arange(len(data.labels)))
    return {"keys": keys, "values": _onehot(data.labels, n), "text_weights": text}, \
        {"alpha": hp["alpha"], "beta": hp["beta"], "scale": scale}, \
        {**cv, "method": "cache of the shots (features averaged over their views), one-hot values"}


# GDA: class means and one shared covariance over every view, shrunk towards a scaled identity.

def _gda_stats(x, y, n, shrink):
    means = np.stack([x[y == c].mean(0) for c in range(n)])
    d = x - means[y]
    cov = d.T @ d / len(x)
    e = cov.shape[0]
    target = np.trace(cov) / e if np.trace(cov) > 0 else 1.0
    cov = (1.0 - shrink) * cov + shrink * target * np.eye(e)
    priors = np.bincount(y, minlength=n) / len(y)
    return means, np.linalg.inv(cov), priors


def _gda_logits(means, prec, priors, text, scale, query, alpha):
    mp = means @ prec
    return scale * query @ text.T + alpha * (query @ mp.T - 0.5 * np.einsum("ce,ce->c", mp, means)
                                             + np.log(priors))


def _fit_gda(data, text, scale):
    n = len(data.classes)
    text = normalize(text)

    def fit_predict(d, train, query, hp):
        x, y = _views(d, train)
        means, prec, priors = _gda_stats(x, y, n, hp["shrink"])
        return _gda_logits(means, prec, priors, text, scale, query, hp["alpha"])

    grid = {"alpha": [scale * a for a in (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)], "shrink": [0.1, 0.3, 0.9]}
    hp, cv = _select(data, grid, fit_predict, {"alpha": scale * 0.01, "shrink": 0.9})
    x, y = _views(data, np.arange(len(data.labels)))
    means, prec, priors = _gda_stats(x, y, n, hp["shrink"])
    return {"means": means, "precision": prec, "priors": priors, "text_weights": text}, \
        {"alpha": hp["alpha"], "scale": scale}, \
        {**cv, "method": "class means, shared covariance over every view shrunk towards a scaled identity"}


def top1(head: Head, feats: np.ndarray, labels: np.ndarray) -> float:
    return float((head.logits(feats).argmax(1) == np.asarray(labels)).mean())


# ------------------------------------------------------------------------------------ encoders

@dataclass
class Encoder:
    """What fitting needs from a model or an artifact: image and text features, the logit scale."""

    name: str
    embed_dim: int
    image: object            # list of HWC uint8 arrays -> (N, E)
    text: object             # list of str -> (N, E)
    scale: float
    bias: float = 0.0
    activation: str = "softmax"  # class scores: "softmax" or "sigmoid" (SigLIP), from the spec or the manifest
    templates: list = field(default_factory=list)
    source: str | None = None


def encoder_for(source, batch: int = 64) -> Encoder:
    """A model URI (builtin:tiny, hf:DIR, ...), a loaded ClipModel, or an artifact folder."""
    from pathlib import Path

    from ..runtime.manifest import MANIFEST

    if isinstance(source, (str, Path)) and (Path(source) / MANIFEST).is_file():
        from ..runtime import Pipeline

        p = Pipeline.load(source)
        m = p.manifest
        return Encoder(m["model"]["name"], p.embed_dim, _chunks(p.encode_image, batch),
                       _chunks(lambda t: p.encode_text(t, truncate=True), batch), float(m["logit_scale"]),
                       float(m.get("logit_bias") or 0.0), m["activation"],
                       list((m.get("head") or {}).get("templates") or []), str(source))
    from .._lazy import require

    torch = require("torch", "fitting heads with a torch model (or pass an exported artifact folder)")
    from ..models.loaders import load_model
    from ..models.inputs import model_tokenizer
    from ..runtime.labels import spec_templates
    from ..runtime.preprocess import Preprocessor

    model = load_model(source) if isinstance(source, str) else source
    spec = model.spec
    pre = Preprocessor.from_config(spec.preprocess_config())
    tok = None

    def image(items):
        with torch.no_grad():
            return model.encode_image(torch.from_numpy(pre(items))).float().numpy()

    def text(prompts):
        nonlocal tok
        tok = tok or model_tokenizer(spec)
        with torch.no_grad():
            return model.encode_text(torch.from_numpy(tok(prompts, truncate=True))).float().numpy()

    bias = float(model.logit_bias.detach()) if model.logit_bias is not None else 0.0
    return Encoder(spec.name, spec.embed_dim, _chunks(image, batch), _chunks(text, batch),
                   float(model.logit_scale.detach().exp()), bias, spec.logit_activation, spec_templates(spec),
                   getattr(model, "source", None))


def _chunks(fn, batch: int):
    def run(items):
        items = list(items)
        return np.concatenate([np.asarray(fn(items[i:i + batch]), np.float32) for i in range(0, len(items), batch)])

    return run
