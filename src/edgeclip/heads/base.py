"""A head is data: a kind, a name, class names, named arrays and scalar parameters.

    head = Head("tip_adapter", "tip", classes, {"keys": ..., "values": ..., "text_weights": ...},
                {"alpha": 1.0, "beta": 5.5, "scale": 100.0})
    head.save("tip.npz"); head = load_head("tip.npz")
    logits = head.logits(features)        # numpy reference, (N, E) image features -> (N, C)
    module = head.module()                # torch module for export, same maths

Kinds are small registered classes (`heads/kinds.py`); each declares its arrays' shapes in terms of
C (classes), E (the model's embedding width) and free sizes, so a head can be checked against a
model before anything is exported. Heads take the image tower's (unnormalized) features; whether
they normalize them first is each kind's own convention (a parameter where layouts differ).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from ..errors import HeadError, HeadShapeError, UnknownHeadError

FORMAT = "edgeclip-head"
FORMAT_VERSION = 1
NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")

KINDS: dict[str, type["HeadKind"]] = {}


def register_kind(cls: type["HeadKind"]) -> type["HeadKind"]:
    KINDS[cls.kind] = cls
    return cls


def get_kind(kind: str) -> type["HeadKind"]:
    from . import kinds  # noqa: F401  (registers the built-in kinds)

    try:
        return KINDS[kind]
    except KeyError:
        raise HeadError(f"unknown head kind '{kind}'; known kinds: {', '.join(sorted(KINDS))}") from None


class HeadKind:
    """One kind of head: its arrays (name -> shape symbols), parameters with defaults, and maths."""

    kind: ClassVar[str]
    arrays: ClassVar[dict]             # required array name -> shape, e.g. ("C", "E")
    optional: ClassVar[dict] = {}      # optional array name -> shape
    params: ClassVar[dict] = {}        # parameter name -> default
    activation: ClassVar[str] = "softmax"
    summary: ClassVar[str] = ""

    @classmethod
    def activation_for(cls, head: "Head") -> str:
        return cls.activation

    @staticmethod
    def logits(head: "Head", feats: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @staticmethod
    def module(head: "Head"):
        raise NotImplementedError


@dataclass
class Head:
    kind: str
    name: str
    classes: list
    arrays: dict
    params: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)   # how it was made: fitting figures, source file, ...

    def __post_init__(self):
        k = get_kind(self.kind)
        check_name(self.name)
        self.classes = [str(c) for c in self.classes]
        if not self.classes:
            raise HeadError(f"head '{self.name}' has no classes")
        if len(set(self.classes)) != len(self.classes):
            dup = sorted({c for c in self.classes if self.classes.count(c) > 1})
            raise HeadError(f"head '{self.name}' lists a class twice: {', '.join(dup)}")
        unknown = set(self.arrays) - set(k.arrays) - set(k.optional)
        if unknown:
            raise HeadError(f"a '{self.kind}' head has no array(s) {', '.join(sorted(unknown))}; "
                            f"it holds {', '.join(list(k.arrays) + list(k.optional))}")
        missing = [a for a in k.arrays if a not in self.arrays]
        if missing:
            raise HeadError(f"a '{self.kind}' head needs array(s) {', '.join(missing)}")
        self.arrays = {n: np.ascontiguousarray(a, dtype=np.float32) for n, a in self.arrays.items()}
        bad = [n for n, a in self.arrays.items() if not np.isfinite(a).all()]
        if bad:
            raise HeadError(f"head '{self.name}': array(s) {', '.join(bad)} hold NaN or infinite values")
        unknown = set(self.params) - set(k.params)
        if unknown:
            raise HeadError(f"a '{self.kind}' head has no parameter(s) {', '.join(sorted(unknown))}; "
                            f"known: {', '.join(k.params) or '(none)'}")
        self.params = {**k.params, **{n: float(v) for n, v in self.params.items()}}
        self.embed_dim = self._check_shapes()

    # ------------------------------------------------------------------------------- shapes

    def _check_shapes(self, embed_dim: int | None = None, model: str = "") -> int:
        """Resolve the shape symbols; raise HeadShapeError naming the first tensor that disagrees."""
        k = get_kind(self.kind)
        sizes = {"C": len(self.classes)}
        if embed_dim is not None:
            sizes["E"] = int(embed_dim)
        where = {"C": f"{len(self.classes)} classes", "E": f"embedding width {embed_dim} of {model or 'the model'}"}
        for name, shape in {**k.arrays, **k.optional}.items():
            if name not in self.arrays:
                continue
            a = self.arrays[name]
            if a.ndim != len(shape):
                raise HeadShapeError(f"head '{self.name}': tensor '{name}' has shape {a.shape}, expected "
                                     f"{len(shape)}-D ({', '.join(shape)})")
            for sym, got in zip(shape, a.shape):
                want = sizes.setdefault(sym, got)
                if want != got:
                    why = where.get(sym, f"{sym}={want} set by an earlier tensor")
                    raise HeadShapeError(
                        f"head '{self.name}': tensor '{name}' has shape {a.shape}, expected "
                        f"({', '.join(str(sizes.get(s, s)) for s in shape)}): {sym}={got} disagrees with {why}")
        return int(sizes["E"])

    def check(self, embed_dim: int, model: str = "", classes=None) -> "Head":
        """Check against a model's embedding width (and a class list); returns self."""
        self._check_shapes(embed_dim, model)
        if classes is not None and list(classes) != self.classes:
            raise HeadShapeError(f"head '{self.name}' has classes {_short(self.classes)}, expected "
                                 f"{_short(list(classes))}")
        return self

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def activation(self) -> str:
        return get_kind(self.kind).activation_for(self)

    @property
    def has_text(self) -> bool:
        """Whether the head holds zero-shot class embeddings (then an MCM score is available)."""
        return "text_weights" in self.arrays

    # -------------------------------------------------------------------------------- maths

    def logits(self, feats: np.ndarray) -> np.ndarray:
        """numpy reference: (N, E) image features (as the image tower returns them) -> (N, C) float32."""
        feats = np.asarray(feats, dtype=np.float64)
        if feats.ndim != 2 or feats.shape[1] != self.embed_dim:
            raise HeadShapeError(f"head '{self.name}' takes (N, {self.embed_dim}) features, got {feats.shape}")
        return np.asarray(get_kind(self.kind).logits(self, feats), dtype=np.float32)

    def mcm(self, feats: np.ndarray) -> np.ndarray | None:
        """Maximum concept matching: max softmax of the zero-shot cosines / T (None without text weights)."""
        if not self.has_text:
            return None
        return mcm_score(normalize(np.asarray(feats, np.float64)) @ normalize(self.arrays["text_weights"]).T)

    def module(self):
        """A torch module: (N, E) features -> (N, C) logits, the same maths as `logits`."""
        return get_kind(self.kind).module(self)

    # --------------------------------------------------------------------------------- files

    def manifest(self) -> dict:
        return {"name": self.name, "kind": self.kind, "classes": list(self.classes), "params": dict(self.params),
                "activation": self.activation, "info": self.info, "mcm": self.has_text,
                "shapes": {n: list(a.shape) for n, a in self.arrays.items()}}

    def save(self, path) -> Path:
        """Write a self-describing .npz (arrays + JSON metadata); numpy only."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": self.kind, "name": self.name,
                "classes": self.classes, "params": self.params, "info": self.info}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.npz")
        from ..export.artifact import _json_default  # numpy scalars in fitting figures

        np.savez(tmp, __meta__=np.array(json.dumps(meta, default=_json_default)), **self.arrays)
        tmp.replace(path)
        return path


def load_head(path, name: str | None = None) -> Head:
    """Read a head written by `Head.save` (or `edgeclip heads fit/import`)."""
    path = Path(path)
    if not path.is_file():
        raise HeadError(f"head file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as e:  # zip/npy errors of every flavour
        raise HeadError(f"{path} is not a readable .npz head file ({type(e).__name__}: {e})") from e
    if "__meta__" not in data:
        raise HeadError(f"{path} is an .npz without edgeclip head metadata (arrays: {', '.join(data) or 'none'}); "
                        "convert it with `edgeclip heads import` (e.g. --kind linear for coef_/intercept_)")
    try:
        meta = json.loads(str(data.pop("__meta__")))
    except json.JSONDecodeError as e:
        raise HeadError(f"{path}: head metadata is not valid JSON ({e})") from e
    if meta.get("format") != FORMAT:
        raise HeadError(f"{path} is not an edgeclip head file (format {meta.get('format')!r})")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise HeadError(f"{path} is head format {meta['format_version']}; this edgeclip reads up to "
                        f"{FORMAT_VERSION}: upgrade edgeclip")
    return Head(meta["kind"], name or meta["name"], meta["classes"], data, meta.get("params", {}),
                meta.get("info", {}))


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise HeadError(f"head name {name!r} must start with a letter and hold only letters, digits and '_' "
                        "(at most 64): it names the artifact's output")
    return name


def select(heads: dict, name: str | None):
    """The entry `name` of a {name: ...} mapping, with an error that lists the names there are."""
    if name not in heads:
        raise UnknownHeadError(f"no head named {name!r} in this artifact; it has: "
                               f"{', '.join(heads) or 'no heads (export with --head FILE or --labels)'}")
    return heads[name]


# ---------------------------------------------------------------------------------- numpy helpers

def normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


MCM_TEMPERATURE = 1.0  # MCM (Ming et al., 2022): softmax of cosines / T, T = 1


def mcm_score(cosines: np.ndarray, temperature: float = MCM_TEMPERATURE) -> np.ndarray:
    return softmax(cosines / temperature).max(axis=-1).astype(np.float32)


def _short(items: list, n: int = 6) -> str:
    return "[" + ", ".join(map(str, items[:n])) + (f", … ({len(items)} in all)" if len(items) > n else "") + "]"


RESERVED = {"image_embeds", "logits"}


def resolve(items, embed_dim: int, model: str = "") -> list[Head]:
    """Heads for export: Head objects, head files, or "NAME=FILE" (renames). Checked against the model's
    embedding width; names unique."""
    out: list[Head] = []
    for item in items or ():
        if isinstance(item, Head):
            head = item
        else:
            text = str(item)
            name, sep, file = text.partition("=")
            if sep and NAME_RE.match(name) and not Path(text).exists():
                head = load_head(file, name=name)
            else:
                head = load_head(text)
        head.check(embed_dim, model)
        if any(h.name == head.name for h in out):
            raise HeadError(f"two heads are named '{head.name}'; rename one with --head NEWNAME=FILE")
        out.append(head)
    return out
