"""Import heads trained elsewhere: an `nn.Linear` (module or state dict), CLIP-Adapter's two-layer
adapter, a Tip-Adapter(-F) cache, a scikit-learn linear model's `coef_`/`intercept_` saved with numpy.

    head = import_head("probe.pt", classes=labels, model_dim=512)                     # nn.Linear
    head = import_head("adapter.pt", classes=labels, text_weights=zs, scale=100.0)   # CLIP-Adapter

Files: .pt/.pth/.bin (torch.load, weights only), .npz, .safetensors. The layout is recognised from
the tensor names (any prefix, e.g. `adapter.fc.0.weight`, `model.head.weight`), or named with `kind`.
Every tensor is checked against the model's embedding width and the class list, and an error says
which source tensor disagrees and what was expected.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import HeadError, HeadShapeError
from .base import Head, load_head, normalize

LAYOUTS = {
    "linear": "nn.Linear / linear probe: weight (C, E) and bias (C,), any prefix (e.g. fc.weight); or an "
              "nn.Linear module saved whole; or scikit-learn coef_ (C, E) / intercept_ (C,) in an .npz",
    "residual_adapter": "CLIP-Adapter: fc.0.weight (E/r, E) and fc.2.weight (E, E/r) (biases optional)",
    "tip_adapter": "Tip-Adapter cache: cache_keys (E, K) or (K, E) and cache_values (K, C); Tip-Adapter-F: "
                   "plus the fine-tuned keys adapter.weight (K, E)",
}


def read_tensors(path) -> dict:
    """{name: float array} from a torch file, .npz or .safetensors; nested dicts are flattened."""
    path = Path(path)
    if not path.is_file():
        raise HeadError(f"head file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except Exception as e:
            raise HeadError(f"{path} is not a readable .npz ({type(e).__name__}: {e})") from e
    if suffix == ".safetensors":
        from safetensors.numpy import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as e:
            raise HeadError(f"{path} is not a readable .safetensors file ({type(e).__name__}: {e})") from e
    return _flatten(_torch_load(path))


def _torch_load(path: Path):
    from .._lazy import require

    torch = require("torch", "importing heads saved with torch.save")
    try:
        # weights only: no arbitrary code from the file; an nn.Linear saved whole is allowed by name
        with torch.serialization.safe_globals([torch.nn.Linear, torch.nn.Sequential, torch.nn.ReLU]):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise HeadError(f"{path} could not be read as a weights-only torch file ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]}); save the state dict: torch.save(module.state_dict(), ...)") \
            from e


def _flatten(obj, prefix: str = "") -> dict:
    from .._lazy import require

    torch = require("torch", "importing heads saved with torch.save")
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, torch.Tensor):
        return {prefix.rstrip(".") or "tensor": obj.detach().float().cpu().numpy()}
    if isinstance(obj, np.ndarray):
        return {prefix.rstrip(".") or "tensor": obj}
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {}  # numbers, strings, optimizer states' scalars: not tensors of a head


def _find(tensors: dict, *suffixes, ndim: int | None = None) -> str | None:
    """The one tensor name ending in one of `suffixes` (with a '.' or nothing before it)."""
    for suf in suffixes:
        hits = [n for n in tensors if (n == suf or n.endswith("." + suf))
                and (ndim is None or np.asarray(tensors[n]).ndim == ndim)]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise HeadError(f"several tensors match '{suf}': {', '.join(hits)}; keep one head per file")
    return None


def detect(tensors: dict) -> str | None:
    if _find(tensors, "fc.0.weight") and _find(tensors, "fc.2.weight"):
        return "residual_adapter"
    if _find(tensors, "cache_keys", "keys") and _find(tensors, "cache_values", "values"):
        return "tip_adapter"
    if _find(tensors, "coef_"):
        return "linear"
    matrices = [n for n, a in tensors.items() if np.asarray(a).ndim == 2]
    if len(matrices) == 1 and (matrices[0] == "weight" or matrices[0].endswith(".weight") or len(tensors) == 1):
        return "linear"  # nn.Linear (bias optional), or a bare (C, E) matrix
    return None


def import_head(src, kind: str | None = None, classes=None, *, embed_dim: int | None = None,
                text_weights: np.ndarray | None = None, scale: float | None = None, name: str | None = None,
                params: dict | None = None, model: str = "") -> Head:
    """A Head from a trained file. `text_weights` (C, E) and `scale` (zero-shot class embeddings and
    logit scale, e.g. from `zero_shot_head`) are needed by residual adapters and Tip-Adapter caches."""
    path = Path(src)
    if path.suffix == ".npz" and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                native = "__meta__" in z.files
        except Exception as e:
            raise HeadError(f"{path} is not a readable .npz ({type(e).__name__}: {e})") from e
        if native:
            head = load_head(path, name=name)
            if embed_dim is not None:
                head.check(embed_dim, model, classes)
            return head
    tensors = read_tensors(path)
    if not tensors:
        raise HeadError(f"{path} holds no tensors; expected one of these layouts:\n" + _layouts())
    found = detect(tensors)
    kind = {"tip": "tip_adapter", "adapter": "residual_adapter", "clip_adapter": "residual_adapter"}.get(kind, kind)
    if kind is None:
        kind = found
    if kind is None:
        raise HeadError(f"{path}: unknown head layout (tensors: {_names(tensors)}); expected one of:\n"
                        + _layouts() + "\nor name the layout with --kind")
    if kind not in LAYOUTS:
        raise HeadError(f"cannot import a '{kind}' head; importable layouts:\n" + _layouts())
    arrays, sources, extra = _LAYOUT_READERS[kind](path, tensors)
    classes = list(classes) if classes is not None else list(extra.pop("classes", []) or [])
    if not classes:
        raise HeadError(f"{path}: give the class names (--classes / classes=[...]) in the head's output order")
    needs_text = kind != "linear"
    if text_weights is not None:
        arrays["text_weights"] = np.asarray(text_weights, np.float32)
        sources["text_weights"] = "zero-shot class embeddings (computed from the model)"
    elif needs_text:
        raise HeadError(f"a {kind} head scores classes with zero-shot text embeddings: pass --model MODEL "
                        "(and --templates) so they can be computed")
    p = dict(params or {})
    if scale is not None and kind != "linear":
        p.setdefault("scale", float(scale))
    try:
        head = Head(kind, name or {"tip_adapter": "tip", "residual_adapter": "adapter"}.get(kind, kind), classes,
                    arrays, p, {"source": str(path), "layout": kind, "tensors": sources})
        if embed_dim is not None:
            head.check(embed_dim, model)
    except HeadShapeError as e:
        raise HeadShapeError(_with_sources(str(e), sources)) from None
    return head


def _with_sources(msg: str, sources: dict) -> str:
    for ours, theirs in sources.items():
        msg = msg.replace(f"tensor '{ours}'", f"tensor '{theirs}'")
    return msg


def _names(tensors: dict) -> str:
    items = [f"{k} {tuple(np.asarray(v).shape)}" for k, v in list(tensors.items())[:8]]
    return ", ".join(items) + (f", … ({len(tensors)} in all)" if len(tensors) > 8 else "")


def _layouts() -> str:
    return "\n".join(f"  {k}: {v}" for k, v in LAYOUTS.items())


def _linear(path, tensors):
    coef = _find(tensors, "coef_")
    if coef:
        w = np.asarray(tensors[coef], np.float64)
        b_name = _find(tensors, "intercept_")
        b = np.asarray(tensors[b_name], np.float64).reshape(-1) if b_name else np.zeros(w.shape[0])
        extra = {}
        cls = _find(tensors, "classes_")
        if cls is not None and tensors[cls].dtype.kind in "USO":
            extra["classes"] = [str(c) for c in tensors[cls]]
        if w.ndim == 2 and w.shape[0] == 1:  # binary: sigmoid(w x + b) == softmax([0, w x + b])[1]
            w, b = np.concatenate([np.zeros_like(w), w]), np.concatenate([[0.0], b[:1]])
        return {"weight": w, "bias": b}, {"weight": coef, "bias": b_name or "(none: zeros)"}, extra
    w_name = _find(tensors, "weight", ndim=2) or next(iter(tensors))
    w = np.asarray(tensors[w_name], np.float64)
    if w.ndim != 2:
        raise HeadShapeError(f"{path}: tensor '{w_name}' has shape {w.shape}; a linear head's weight is (C, E)")
    b_name = _find(tensors, "bias", ndim=1)
    b = np.asarray(tensors[b_name], np.float64) if b_name else np.zeros(w.shape[0])
    return {"weight": w, "bias": b}, {"weight": w_name, "bias": b_name or "(none: zeros)"}, {}


def _residual_adapter(path, tensors):
    names = {"w1": _find(tensors, "fc.0.weight"), "w2": _find(tensors, "fc.2.weight"),
             "b1": _find(tensors, "fc.0.bias"), "b2": _find(tensors, "fc.2.bias")}
    arrays = {k: np.asarray(tensors[v], np.float64) for k, v in names.items() if v}
    return arrays, {k: v for k, v in names.items() if v}, {}


def _tip_adapter(path, tensors):
    k_name, v_name = _find(tensors, "cache_keys", "keys"), _find(tensors, "cache_values", "values")
    keys, values = np.asarray(tensors[k_name], np.float64), np.asarray(tensors[v_name], np.float64)
    if values.ndim != 2:
        raise HeadShapeError(f"{path}: tensor '{v_name}' has shape {values.shape}; cache values are (K, C) one-hot")
    if keys.ndim == 2 and keys.shape[0] != values.shape[0] and keys.shape[1] == values.shape[0]:
        keys = keys.T  # Tip-Adapter stores the keys transposed, (E, K)
    sources = {"keys": k_name, "values": v_name}
    tuned = _find(tensors, "adapter.weight")
    if tuned is None and _find(tensors, "weight", ndim=2) not in (None, k_name, v_name):
        tuned = _find(tensors, "weight", ndim=2)
    if tuned is not None:  # Tip-Adapter-F: the fine-tuned keys replace the cache's (same shape)
        w = np.asarray(tensors[tuned], np.float64)
        if w.shape != keys.shape:
            raise HeadShapeError(f"{path}: fine-tuned keys '{tuned}' have shape {w.shape}, the cache keys "
                                 f"'{k_name}' {keys.shape}")
        keys, sources["keys"] = w, tuned
    return {"keys": keys, "values": values}, sources, {}


_LAYOUT_READERS = {"linear": _linear, "residual_adapter": _residual_adapter, "tip_adapter": _tip_adapter}


def zero_shot_weights(encoder, classes, templates=None) -> np.ndarray:
    """(C, E) class embeddings with the encoder's text tower (for adapters and caches)."""
    from .zero_shot import class_embeddings, check_templates

    templates = check_templates(templates or encoder.templates)
    return normalize(class_embeddings(encoder.text, list(classes), templates))
