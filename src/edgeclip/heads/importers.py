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
from .base import Head, load_head, normalize, open_npz, regular_file

LAYOUTS = {
    "linear": "nn.Linear / linear probe: weight (C, E) and bias (C,), any prefix (e.g. fc.weight); or an "
              "nn.Linear module saved whole; or scikit-learn coef_ (C, E) / intercept_ (C,) in an .npz",
    "residual_adapter": "CLIP-Adapter: fc.0.weight (E/r, E) and fc.2.weight (E, E/r) (biases optional)",
    "tip_adapter": "Tip-Adapter cache: cache_keys (E, K) or (K, E) and cache_values (K, C); Tip-Adapter-F: "
                   "plus the fine-tuned keys adapter.weight (K, E)",
}
# A field with one of these names is read as a tensor by some layout: a non-tensor there is an error,
# not a field to skip (elsewhere numbers and strings, e.g. an epoch count, are skipped).
TENSOR_NAMES = {"weight", "bias", "coef_", "intercept_", "cache_keys", "cache_values", "keys", "values"}
MAX_DEPTH = 32           # state dicts nest a few levels (model.adapter.fc.0.weight)
MAX_TENSORS = 100_000
MAX_VISITS = 1_000_000
MAX_PICKLE_BYTES = 16 << 20


def read_tensors(path) -> dict:
    """{name: array} from a torch file, .npz or .safetensors; nested dicts are flattened.

    Arrays keep their dtype (float, integer, boolean; text for scikit-learn's classes_): a layout
    checks the ones it uses (`_float`). Files are bounded in size; torch files load weights only.
    """
    path = regular_file(path)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        with open_npz(path) as z:
            return {n: z.read(n, "fiubUS") for n in z.names}
    if suffix == ".safetensors":
        from .._lazy import require

        require("safetensors", "importing .safetensors heads")
        from safetensors.numpy import load_file

        try:
            tensors = dict(load_file(str(path)))
        except Exception as e:  # header, dtype (bf16 has no numpy type) and offset errors
            raise HeadError(f"{path} is not a readable .safetensors file ({type(e).__name__}: {e})") from e
        for n, a in tensors.items():
            if a.dtype.kind not in "fiub":
                raise HeadError(f"{path}: tensor '{n}' has dtype {a.dtype}; a head's tensors are floating point")
        return tensors
    return _flatten(path, _torch_load(path))


def _torch_load(path: Path):
    from .._lazy import require

    torch = require("torch", "importing heads saved with torch.save")
    from ..errors import CheckpointError
    from ..models.safe_pickle import checked_torch_source  # imports torch: only once a torch file is read

    _check_pickle_size(path)
    try:  # weights_only bounds code, not cost: storages' declared sizes are checked against the file first
        source = checked_torch_source(path)
    except CheckpointError as e:
        raise HeadError(f"{e}; save the head's state dict again: torch.save(module.state_dict(), ...)") from e
    try:
        # weights only: no arbitrary code from the file; an nn.Linear saved whole is allowed by name
        with torch.serialization.safe_globals([torch.nn.Linear, torch.nn.Sequential, torch.nn.ReLU]):
            return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).splitlines() or [""])[0][:200]
        raise HeadError(f"{path} could not be read as a weights-only torch file ({type(e).__name__}: "
                        f"{first}); save the state dict: torch.save(module.state_dict(), ...)") from e


def _check_pickle_size(path: Path) -> None:
    # torch's zip format keeps tensors in their own entries and the object structure in data.pkl;
    # a state dict's structure is kilobytes, while a pickle of millions of tiny objects would cost
    # far more memory than its size on disk: bound it before unpickling
    import zipfile

    if not zipfile.is_zipfile(path):
        return  # the legacy format: bounded by the file size alone
    try:
        with zipfile.ZipFile(path) as zf:
            sizes = [i.file_size for i in zf.infolist() if i.filename.endswith("data.pkl")]
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise HeadError(f"{path} is not a readable torch file ({type(e).__name__}: {e})") from None
    if sum(sizes) > MAX_PICKLE_BYTES:
        raise HeadError(f"{path}: its object structure (data.pkl) is {sum(sizes) >> 20} MiB; a head's state dict "
                        f"needs far less than {MAX_PICKLE_BYTES >> 20} MiB: save a plain state dict")


def _flatten(path: Path, obj) -> dict:
    """{dotted name: numpy array} of every tensor in a (nested) state dict; refuses cycles, deep nesting,
    non-tensor values under tensor names and tensors numpy cannot hold."""
    from .._lazy import require

    walker = _Walker(path, require("torch", "importing heads saved with torch.save"))
    walker.walk(obj, "", 0)
    return walker.out


class _Walker:
    """Flattens a state dict. Pickle memoizes shared objects, so a small file can describe a list
    holding itself, or a list holding the same list twice at each of 30 levels (2**30 paths): cycles
    are refused and the number of values visited is bounded, not only the depth."""

    def __init__(self, path: Path, torch):
        self.path, self.torch, self.out = path, torch, {}
        self.stack: set[int] = set()
        self.visits = 0

    def walk(self, obj, prefix: str, depth: int) -> None:
        path, torch, where = self.path, self.torch, prefix.rstrip(".") or "(the file itself)"
        self.visits += 1
        if self.visits > MAX_VISITS:
            raise HeadError(f"{path} holds more than {MAX_VISITS} values (or shares containers many times over); "
                            "a head file holds a few tensors")
        if isinstance(obj, torch.nn.Module):
            obj = obj.state_dict()
        if isinstance(obj, (torch.Tensor, np.ndarray)):
            if len(self.out) >= MAX_TENSORS:
                raise HeadError(f"{path} holds more than {MAX_TENSORS} tensors; a head file holds a few")
            self.out[prefix.rstrip(".") or "tensor"] = _numpy(path, torch, obj, where)
            return
        if prefix.rstrip(".").rsplit(".", 1)[-1] in TENSOR_NAMES and not isinstance(obj, dict):
            raise HeadError(f"{path}: field '{where}' is a {type(obj).__name__}, not a tensor; save tensors "
                            "(torch.save(module.state_dict(), ...))")
        if not isinstance(obj, (dict, list, tuple)):
            return  # anything else (epoch counts, strings, dtypes, sizes) is not part of a head: skipped
        if id(obj) in self.stack:
            raise HeadError(f"{path}: field '{where}' contains itself (a cyclic structure); save a plain state dict")
        if depth >= MAX_DEPTH:
            raise HeadError(f"{path}: field '{where}' is nested more than {MAX_DEPTH} levels deep; "
                            "save a plain state dict")
        self.stack.add(id(obj))
        for k, v in (obj.items() if isinstance(obj, dict) else enumerate(obj)):
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise HeadError(f"{path}: field '{where}' has a key of type {type(k).__name__}; "
                                "state dict keys are strings")
            self.walk(v, f"{prefix}{k}.", depth + 1)
        self.stack.discard(id(obj))


def _numpy(path, torch, t, where: str) -> np.ndarray:
    if isinstance(t, np.ndarray):
        if t.dtype.hasobject:
            raise HeadError(f"{path}: field '{where}' is an object array; save numeric tensors")
        return t
    if t.layout != torch.strided or t.is_quantized:
        raise HeadError(f"{path}: tensor '{where}' is {'quantized' if t.is_quantized else 'sparse'}; "
                        "save a dense float tensor (t.dequantize() / t.to_dense())")
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
        t = t.float()
    try:
        return t.numpy()
    except (TypeError, RuntimeError) as e:
        raise HeadError(f"{path}: tensor '{where}' of dtype {t.dtype} cannot be read ({e})") from None


def _float(path, tensors: dict, name: str) -> np.ndarray:
    """Tensor `name` as float64, refusing integer, boolean, complex and non-finite tensors by name."""
    a = np.asarray(tensors[name])
    if a.dtype.kind != "f":
        raise HeadError(f"{path}: tensor '{name}' has dtype {a.dtype}; a head's weights are floating point "
                        "(convert with .float() or .astype(np.float32) before saving)")
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise HeadError(f"{path}: tensor '{name}' holds NaN or infinite values")
    return a


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


KIND_ALIASES = {"tip": "tip_adapter", "adapter": "residual_adapter", "clip_adapter": "residual_adapter"}


def import_head(src, kind: str | None = None, classes=None, *, embed_dim: int | None = None,
                text_weights: np.ndarray | None = None, scale: float | None = None, name: str | None = None,
                params: dict | None = None, model: str = "") -> Head:
    """A Head from a trained file. `text_weights` (C, E) and `scale` (zero-shot class embeddings and
    logit scale, e.g. from `zero_shot_head`) are needed by residual adapters and Tip-Adapter caches."""
    path = regular_file(src)
    if path.suffix.lower() == ".npz":
        with open_npz(path) as z:
            native = "__meta__" in z.members
        if native:
            head = load_head(path, name=name)
            if embed_dim is not None:
                head.check(embed_dim, model)
            if classes is not None:
                head.check(head.embed_dim, model, classes)
            return head
    tensors = read_tensors(path)
    if not tensors:
        raise HeadError(f"{path} holds no tensors; expected one of these layouts:\n" + _layouts())
    kind = _layout_kind(path, kind, tensors)
    arrays, sources, extra = _LAYOUT_READERS[kind](path, tensors)
    classes = classes if classes is not None else extra.pop("classes", None)
    if classes is None or (isinstance(classes, (list, tuple)) and not classes):
        raise HeadError(f"{path}: give the class names (--classes / classes=[...]) in the head's output order")
    if text_weights is not None:
        arrays["text_weights"] = text_weights
        sources["text_weights"] = "zero-shot class embeddings (computed from the model)"
    elif kind != "linear":
        raise HeadError(f"a {kind} head scores classes with zero-shot text embeddings: pass --model MODEL "
                        "(and --templates) so they can be computed")
    if params is not None and not isinstance(params, dict):
        raise HeadError(f"params must be a dict of name -> number, got {type(params).__name__}")
    p = dict(params or {})
    if scale is not None and kind != "linear":
        p.setdefault("scale", scale)
    try:
        head = Head(kind, {"tip_adapter": "tip", "residual_adapter": "adapter"}.get(kind, kind) if name is None
                    else name, classes, arrays, p, {"source": str(path), "layout": kind, "tensors": sources})
        if embed_dim is not None:
            head.check(embed_dim, model)
    except HeadShapeError as e:
        raise HeadShapeError(_with_sources(str(e), sources)) from None
    return head


def _layout_kind(path, kind, tensors: dict) -> str:
    if kind is not None and not isinstance(kind, str):
        raise HeadError(f"kind must be a layout name (string), got {type(kind).__name__}")
    kind = KIND_ALIASES.get(kind, kind) if kind is not None else detect(tensors)
    if kind is None:
        raise HeadError(f"{path}: unknown head layout (tensors: {_names(tensors)}); expected one of:\n"
                        + _layouts() + "\nor name the layout with --kind")
    if kind not in LAYOUTS:
        raise HeadError(f"cannot import a {kind!r:.60} head; importable layouts:\n" + _layouts())
    return kind


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
        w = _float(path, tensors, coef)
        b_name = _find(tensors, "intercept_")
        b = _float(path, tensors, b_name).reshape(-1) if b_name else np.zeros(w.shape[0])
        extra = {}
        cls = _find(tensors, "classes_")
        if cls is not None and np.asarray(tensors[cls]).dtype.kind in "US":
            extra["classes"] = _class_names(path, cls, tensors[cls])
        if w.ndim == 2 and w.shape[0] == 1:  # binary: sigmoid(w x + b) == softmax([0, w x + b])[1]
            w, b = np.concatenate([np.zeros_like(w), w]), np.concatenate([[0.0], b[:1]])
        return {"weight": w, "bias": b}, {"weight": coef, "bias": b_name or "(none: zeros)"}, extra
    w_name = _find(tensors, "weight", ndim=2) or next(iter(tensors))
    w = _float(path, tensors, w_name)
    if w.ndim != 2:
        raise HeadShapeError(f"{path}: tensor '{w_name}' has shape {w.shape}; a linear head's weight is (C, E)")
    b_name = _find(tensors, "bias", ndim=1)
    b = _float(path, tensors, b_name) if b_name else np.zeros(w.shape[0])
    return {"weight": w, "bias": b}, {"weight": w_name, "bias": b_name or "(none: zeros)"}, {}


def _class_names(path, name: str, arr: np.ndarray) -> list:
    """scikit-learn's classes_ as strings (bytes decoded as UTF-8); checked as classes by Head."""
    arr = np.asarray(arr)
    if arr.ndim != 1:
        raise HeadShapeError(f"{path}: tensor '{name}' has shape {arr.shape}; class names are one list")
    if arr.dtype.kind == "U":
        return [str(c) for c in arr]
    try:
        return [bytes(c).decode("utf-8") for c in arr]
    except UnicodeDecodeError:
        raise HeadError(f"{path}: tensor '{name}' holds class names that are not UTF-8 text") from None


def _residual_adapter(path, tensors):
    names = {"w1": _find(tensors, "fc.0.weight"), "w2": _find(tensors, "fc.2.weight"),
             "b1": _find(tensors, "fc.0.bias"), "b2": _find(tensors, "fc.2.bias")}
    if not (names["w1"] and names["w2"]):
        raise HeadError(f"{path}: a CLIP-Adapter needs fc.0.weight and fc.2.weight (tensors: {_names(tensors)})")
    arrays = {k: _float(path, tensors, v) for k, v in names.items() if v}
    return arrays, {k: v for k, v in names.items() if v}, {}


def _tip_adapter(path, tensors):
    k_name, v_name = _find(tensors, "cache_keys", "keys"), _find(tensors, "cache_values", "values")
    if not (k_name and v_name):
        raise HeadError(f"{path}: a Tip-Adapter cache needs cache_keys and cache_values (tensors: {_names(tensors)})")
    keys, values = _float(path, tensors, k_name), _float(path, tensors, v_name)
    if values.ndim != 2:
        raise HeadShapeError(f"{path}: tensor '{v_name}' has shape {values.shape}; cache values are (K, C) one-hot")
    if keys.ndim == 2 and keys.shape[0] != values.shape[0] and keys.shape[1] == values.shape[0]:
        keys = keys.T  # Tip-Adapter stores the keys transposed, (E, K)
    sources = {"keys": k_name, "values": v_name}
    tuned = _find(tensors, "adapter.weight")
    if tuned is None and _find(tensors, "weight", ndim=2) not in (None, k_name, v_name):
        tuned = _find(tensors, "weight", ndim=2)
    if tuned is not None:  # Tip-Adapter-F: the fine-tuned keys replace the cache's (same shape)
        w = _float(path, tensors, tuned)
        if w.shape != keys.shape:
            raise HeadShapeError(f"{path}: fine-tuned keys '{tuned}' have shape {w.shape}, the cache keys "
                                 f"'{k_name}' {keys.shape}")
        keys, sources["keys"] = w, tuned
    return {"keys": keys, "values": values}, sources, {}


_LAYOUT_READERS = {"linear": _linear, "residual_adapter": _residual_adapter, "tip_adapter": _tip_adapter}


def zero_shot_weights(encoder, classes, templates=None) -> np.ndarray:
    """(C, E) class embeddings with the encoder's text tower (for adapters and caches)."""
    from .zero_shot import DEFAULT_TEMPLATES, class_embeddings, parse_labels, resolve_templates

    templates = resolve_templates(templates, encoder.templates or DEFAULT_TEMPLATES)
    return normalize(class_embeddings(encoder.text, parse_labels(classes, "class"), templates))
