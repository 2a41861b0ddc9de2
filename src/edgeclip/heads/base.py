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
import math
import numbers
import operator
import os
import re
import struct
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from .._files import open_regular
from ..runtime.labels import select  # noqa: F401  (heads and the runtime pick a head alike)
from ..runtime.vectors import l2_normalize
from ..errors import HeadError, HeadShapeError, LabelError

FORMAT = "edgeclip-head"
FORMAT_VERSION = 1
# A head name becomes an artifact output (`logits_<name>`, `mcm_<name>`) and part of file names:
# an identifier, nothing a path or a graph could misread. fullmatch: '$' would accept a trailing '\n'.
NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
META_KEYS = {"format", "format_version", "kind", "name", "classes", "params", "info"}

# Head files are untrusted. Bounds far above real heads (a 1000-class, 16-shot Tip-Adapter cache at
# E=1024 is 64 MiB) and far below what would exhaust memory.
MAX_HEAD_FILE_BYTES = 1 << 30          # on disk, and uncompressed in all for an .npz
MAX_NPZ_MEMBERS = 256
MEMBER_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}")   # no folders, no '..', no odd characters

KINDS: dict[str, type["HeadKind"]] = {}


def register_kind(cls: type["HeadKind"]) -> type["HeadKind"]:
    KINDS[cls.kind] = cls
    return cls


def get_kind(kind: str) -> type["HeadKind"]:
    from . import kinds  # noqa: F401  (registers the built-in kinds)

    if not isinstance(kind, str):
        raise HeadError(f"head kind must be a string, got {type(kind).__name__} {kind!r:.60}; "
                        f"known kinds: {', '.join(sorted(KINDS))}")
    try:
        return KINDS[kind]
    except KeyError:
        raise HeadError(f"unknown head kind {kind!r:.80}; known kinds: {', '.join(sorted(KINDS))}") from None


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
        self.classes = _check_classes(self.name, self.classes)
        self.arrays = _check_arrays(self.name, k, self.arrays)
        self.params = {**k.params, **_check_params(self.name, k, self.params)}
        if not isinstance(self.info, dict):
            raise HeadError(f"head '{self.name}': field 'info' must be a dict (JSON object), "
                            f"got {type(self.info).__name__}")
        self.embed_dim = self._check_shapes()

    # ------------------------------------------------------------------------------- shapes

    def _check_shapes(self, embed_dim: int | None = None, model: str = "") -> int:
        """Resolve the shape symbols; raise HeadShapeError naming the first tensor that disagrees."""
        k = get_kind(self.kind)
        sizes = {"C": len(self.classes)}
        if embed_dim is not None:
            sizes["E"] = int(embed_dim)
        where = {"C": f"{len(self.classes)} classes"}
        if embed_dim is not None:
            where["E"] = f"embedding width {embed_dim} of {model or 'the model'}"
        for name, shape in {**k.arrays, **k.optional}.items():
            if name not in self.arrays:
                continue
            a = self.arrays[name]
            if a.ndim != len(shape):
                raise HeadShapeError(f"head '{self.name}': tensor '{name}' has shape {a.shape}, expected "
                                     f"{len(shape)}-D ({', '.join(shape)})")
            if a.size == 0:
                raise HeadShapeError(f"head '{self.name}': tensor '{name}' has shape {a.shape}, an empty "
                                     f"dimension; expected ({', '.join(shape)}) with every size at least 1")
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
        try:
            embed_dim = operator.index(embed_dim)
        except TypeError:
            raise HeadError(f"embedding width must be an integer, got {type(embed_dim).__name__}") from None
        self._check_shapes(embed_dim, model)
        if isinstance(classes, str):
            raise HeadError(f"classes must be a list of strings, got a single string {classes!r:.60}")
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
        feats = self._features(feats)
        return np.asarray(get_kind(self.kind).logits(self, feats), dtype=np.float32)

    def mcm(self, feats: np.ndarray) -> np.ndarray | None:
        """Maximum concept matching: max softmax of the zero-shot cosines / T (None without text weights)."""
        if not self.has_text:
            return None
        feats = self._features(feats)
        return mcm_score(normalize(feats) @ normalize(self.arrays["text_weights"].astype(np.float64)).T)

    def _features(self, feats) -> np.ndarray:
        try:
            feats = np.asarray(feats, dtype=np.float64)
        except (TypeError, ValueError):
            raise HeadShapeError(f"head '{self.name}' takes a numeric (N, {self.embed_dim}) array of features, "
                                 f"got {type(feats).__name__}") from None
        if feats.ndim != 2 or feats.shape[1] != self.embed_dim:
            raise HeadShapeError(f"head '{self.name}' takes (N, {self.embed_dim}) features, got {feats.shape}")
        return feats

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
        path = _saved_name(Path(path))
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": self.kind, "name": self.name,
                "classes": self.classes, "params": self.params, "info": self.info}
        from ..runtime.manifest import _json_default  # numpy scalars in fitting figures

        try:
            text = json.dumps(meta, default=_json_default)
        except (TypeError, ValueError) as e:
            raise HeadError(f"head '{self.name}': field 'info' cannot be written as JSON ({e})") from None
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez(tmp, __meta__=np.array(text), **self.arrays)
        tmp.replace(path)
        return path


# ------------------------------------------------------------------------------ field checks

def _check_classes(name: str, classes) -> list[str]:
    from .zero_shot import parse_labels

    if isinstance(classes, str):  # list("abc") would make three classes of one word
        raise HeadError(f"head '{name}': field 'classes' must be a list of strings, got a single string "
                        f"{classes!r:.60}")
    try:
        return parse_labels(classes, "class")
    except LabelError as e:
        raise HeadError(f"head '{name}': field 'classes': {e}") from None


def _check_arrays(name: str, k: type[HeadKind], arrays) -> dict:
    if not isinstance(arrays, dict) or not all(isinstance(n, str) for n in arrays):
        raise HeadError(f"head '{name}': arrays must be a dict of name -> array, got {type(arrays).__name__}")
    unknown = set(arrays) - set(k.arrays) - set(k.optional)
    if unknown:
        raise HeadError(f"a '{k.kind}' head has no array(s) {', '.join(sorted(unknown))}; "
                        f"it holds {', '.join(list(k.arrays) + list(k.optional))}")
    missing = [a for a in k.arrays if a not in arrays]
    if missing:
        raise HeadError(f"a '{k.kind}' head needs array(s) {', '.join(missing)}")
    out = {}
    for n, a in arrays.items():
        try:
            a = np.asarray(a)
        except (TypeError, ValueError) as e:
            raise HeadError(f"head '{name}': tensor '{n}' is not an array ({e})") from None
        if a.dtype.kind not in "fiu":
            raise HeadError(f"head '{name}': tensor '{n}' has dtype {a.dtype}; a head's arrays hold real numbers "
                            "(float32, float64, float16)")
        with np.errstate(over="ignore"):  # values beyond float32's range become inf: refused below
            # not ascontiguousarray: it turns a 0-D array into shape (1,), which a 1-class head would accept
            out[n] = np.asarray(a, dtype=np.float32, order="C")
    bad = [n for n, a in out.items() if not np.isfinite(a).all()]
    if bad:
        raise HeadError(f"head '{name}': tensor(s) {', '.join(bad)} hold NaN or infinite values "
                        "(or values beyond float32's range)")
    return out


def check_number(field_name: str, value, head: str = "") -> float:
    """A finite real number (bool counts as 0/1) as a float, else HeadError naming the field."""
    where = f"head '{head}': " if head else ""
    if not isinstance(value, (numbers.Real, np.bool_)):
        raise HeadError(f"{where}parameter '{field_name}' must be a number, got {type(value).__name__} "
                        f"{value!r:.60}")
    v = float(value)
    if not math.isfinite(v):
        raise HeadError(f"{where}parameter '{field_name}' must be a finite number, got {v}")
    return v


def _check_params(name: str, k: type[HeadKind], params) -> dict:
    if not isinstance(params, dict):
        raise HeadError(f"head '{name}': field 'params' must be a dict (JSON object) of name -> number, "
                        f"got {type(params).__name__}")
    unknown = [str(p) for p in params if p not in k.params]
    if unknown:
        raise HeadError(f"a '{k.kind}' head has no parameter(s) {', '.join(sorted(unknown))}; "
                        f"known: {', '.join(k.params) or '(none)'}")
    return {n: check_number(n, v, name) for n, v in params.items()}


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise HeadError(f"head name {name!r:.80} must start with a letter and hold only letters, digits and '_' "
                        "(at most 64): it names the artifact's output")
    return name


# ---------------------------------------------------------------------------------- reading files

def regular_file(path, what: str = "head file") -> Path:
    """`path` as a Path if it is a regular file of at most MAX_HEAD_FILE_BYTES, else HeadError."""
    if not isinstance(path, (str, os.PathLike)):
        raise HeadError(f"{what} must be a path, got {type(path).__name__}")
    os.close(open_regular(path, HeadError, what, max_bytes=MAX_HEAD_FILE_BYTES))
    return Path(path)


class Npz:
    """An .npz read without numpy's loader: member names, sizes and dtypes are checked before any
    array is allocated (np.load trusts the .npy header's shape and would allocate what it says)."""

    def __init__(self, path: Path, zf: zipfile.ZipFile):
        self.path, self._zf = path, zf
        self.members: dict[str, zipfile.ZipInfo] = {}
        infos = zf.infolist()
        if len(infos) > MAX_NPZ_MEMBERS:
            raise HeadError(f"{path} holds {len(infos)} arrays; at most {MAX_NPZ_MEMBERS} are read")
        for info in infos:
            stem = info.filename[:-4] if info.filename.endswith(".npy") else None
            if stem is None or info.is_dir() or not MEMBER_RE.fullmatch(stem):
                raise HeadError(f"{path}: member {info.filename!r:.80} is not an array name of an .npz "
                                "(NAME.npy, letters, digits, '_', '.', '-')")
            if stem in self.members:
                raise HeadError(f"{path}: array '{stem}' is stored twice")
            if info.flag_bits & 0x1:
                raise HeadError(f"{path}: array '{stem}' is encrypted")
            self.members[stem] = info
        total = sum(i.file_size for i in infos)
        if total > MAX_HEAD_FILE_BYTES:
            raise HeadError(f"{path} declares {total / 2**20:.0f} MiB of arrays uncompressed; heads of more "
                            f"than {MAX_HEAD_FILE_BYTES >> 20} MiB are refused")

    @property
    def names(self) -> list[str]:
        return list(self.members)

    def read(self, name: str, kinds: str = "f") -> np.ndarray:
        """Array `name`, whose dtype kind must be one of `kinds` (numpy's codes: f float, U text, ...)."""
        try:
            return self._read(self.members[name], name, kinds)
        except HeadError:
            raise
        except Exception as e:  # zip/zlib/npy-header errors of every flavour
            raise HeadError(f"{self.path}: array '{name}' is unreadable ({type(e).__name__}: {e})") from e

    def _read(self, info: zipfile.ZipInfo, name: str, kinds: str) -> np.ndarray:
        with self._zf.open(info) as f:
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                raise HeadError(f"{self.path}: array '{name}' is .npy format {version}; expected 1.0 or 2.0")
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = reader(f)
            if any(d < 0 for d in shape):
                raise HeadError(f"{self.path}: array '{name}' declares a negative size in its shape {shape}")
            _check_dtype(self.path, name, dtype, kinds)
            count = math.prod(shape)
            nbytes = count * dtype.itemsize
            if nbytes != info.file_size - f.tell():
                raise HeadError(f"{self.path}: array '{name}' declares shape {shape} of {dtype} ({nbytes} bytes) "
                                f"but holds {info.file_size - f.tell()} bytes")
            buf = bytearray(nbytes)
            view, got = memoryview(buf), 0
            while got < nbytes:
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
            if got != nbytes or f.read(1):  # the extra read also makes zipfile check the CRC
                raise HeadError(f"{self.path}: array '{name}' holds a different amount of data than it declares")
        return np.frombuffer(buf, dtype=dtype, count=count).reshape(shape, order="F" if fortran else "C")


_DTYPE_WORDS = {"f": "floating point", "U": "text", "S": "bytes", "i": "integer", "u": "unsigned integer",
                "b": "boolean"}


def _check_dtype(path, name: str, dtype: np.dtype, kinds: str) -> None:
    if dtype.hasobject:
        raise HeadError(f"{path}: array '{name}' is an object array (pickled Python objects); refused: "
                        "save plain numeric arrays (and class names as strings)")
    if dtype.names is not None or dtype.subdtype is not None or dtype.kind not in kinds:
        want = " or ".join(_DTYPE_WORDS.get(k, k) for k in kinds)
        raise HeadError(f"{path}: array '{name}' has dtype {dtype}; expected {want}"
                        + (" (float16, float32 or float64)" if kinds == "f" else ""))


def _check_entry_count(path: Path) -> None:
    # zipfile parses the whole central directory when it opens a file: a 1 GiB zip of empty entries
    # holds millions. The end record says how many there are; refuse before listing them.
    with open(path, "rb") as f:
        end = zipfile._EndRecData(f)   # stdlib's own reader of the end record (zip64 aware)
    if end is None:
        raise zipfile.BadZipFile("no end of central directory record")
    if end[zipfile._ECD_ENTRIES_TOTAL] > MAX_NPZ_MEMBERS:
        raise HeadError(f"{path} holds {end[zipfile._ECD_ENTRIES_TOTAL]} arrays; at most {MAX_NPZ_MEMBERS} are read")


@contextmanager
def open_npz(path, what: str = "head file"):
    """An `Npz` of a regular, bounded file; HeadError if it is not a readable zip."""
    path = regular_file(path, what)
    try:
        _check_entry_count(path)
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, struct.error) as e:
        raise HeadError(f"{path} is not a readable .npz {what} ({type(e).__name__}: {e})") from None
    with zf:
        yield Npz(path, zf)


def load_head(path, name: str | None = None) -> Head:
    """Read a head written by `Head.save` (or `edgeclip heads fit/import`)."""
    with open_npz(path) as z:
        path = z.path
        if "__meta__" not in z.members:
            raise HeadError(f"{path} is an .npz without edgeclip head metadata (arrays: "
                            f"{', '.join(z.names) or 'none'}); convert it with `edgeclip heads import` "
                            "(e.g. --kind linear for coef_/intercept_)")
        meta = _read_meta(z)
        try:
            k = get_kind(meta["kind"])
        except HeadError as e:
            raise HeadError(f"{path}: {e}") from None
        allowed = set(k.arrays) | set(k.optional)
        unknown = sorted(set(z.names) - allowed - {"__meta__"})
        if unknown:  # refused before reading: nothing unexpected is allocated
            raise HeadError(f"{path}: a '{k.kind}' head has no array(s) {', '.join(unknown)}; "
                            f"it holds {', '.join(list(k.arrays) + list(k.optional))}")
        data = {n: z.read(n, "f") for n in z.names if n != "__meta__"}
    try:
        return Head(meta["kind"], meta["name"] if name is None else name, meta["classes"], data,
                    meta.get("params", {}), meta.get("info", {}))
    except HeadError as e:
        raise type(e)(f"{path}: {e}") from None


def _read_meta(z: Npz) -> dict:
    path = z.path
    raw = z.read("__meta__", "U")
    if raw.ndim != 0:
        raise HeadError(f"{path}: head metadata must be one JSON string, got an array of shape {raw.shape}")
    try:
        meta = json.loads(str(raw))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, too many digits, nesting too deep
        raise HeadError(f"{path}: head metadata is not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(meta, dict):
        raise HeadError(f"{path}: head metadata must be a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise HeadError(f"{path} is not an edgeclip head file (format {meta.get('format')!r:.80})")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise HeadError(f"{path}: field 'format_version' must be a positive integer, got {version!r:.40}")
    if version > FORMAT_VERSION:
        raise HeadError(f"{path} is head format {version}; this edgeclip reads up to {FORMAT_VERSION}: "
                        "upgrade edgeclip")
    unknown = sorted(set(meta) - META_KEYS)
    if unknown:
        raise HeadError(f"{path}: unknown metadata field(s) {', '.join(map(repr, unknown))}; "
                        f"a head file holds {', '.join(sorted(META_KEYS))}")
    want = {"kind": str, "name": str, "classes": list, "params": dict, "info": dict}
    for key, typ in want.items():
        if key not in meta and key in ("params", "info"):
            continue
        if key not in meta:
            raise HeadError(f"{path}: head metadata lacks the field '{key}'")
        if not isinstance(meta[key], typ):
            word = {str: "a string", list: "a list", dict: "an object"}[typ]
            raise HeadError(f"{path}: field '{key}' must be {word}, got {type(meta[key]).__name__} "
                            f"{meta[key]!r:.60}")
    return meta


# ---------------------------------------------------------------------------------- numpy helpers

normalize = l2_normalize  # the heads' historical name (kinds, fit, importers and tests import it)


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
SUFFIX = ".npz"


def _saved_name(path: Path) -> Path:
    """The file `Head.save(path)` writes: `path` with ".npz" appended unless it ends so already."""
    return path if path.suffix == SUFFIX else path.with_name(path.name + SUFFIX)


def head_file(path):
    """`path`, or the file `Head.save(path)` wrote (path + ".npz") where `path` itself does not exist:
    `heads fit --out tip` writes tip.npz, and `--head tip` must find it. Only that one name is tried,
    never another folder; a missing file is reported as the caller named it (by `load_head`)."""
    text = os.fspath(path) if isinstance(path, os.PathLike) else path
    # "" or "dir/" name no file of their own: "dir/" + ".npz" would be a hidden file inside dir
    if not isinstance(text, str) or not text or text.endswith(("/", os.sep)) or os.path.lexists(text):
        return path
    saved = _saved_name(Path(text))
    return saved if saved != Path(text) and os.path.lexists(saved) else path


def resolve(items, embed_dim: int, model: str = "") -> list[Head]:
    """Heads for export: Head objects, head files, or "NAME=FILE" (renames). Checked against the model's
    embedding width; names unique."""
    out: list[Head] = []
    for item in items or ():
        if isinstance(item, Head):
            head = item
        elif not isinstance(item, (str, os.PathLike)):
            raise HeadError(f"a head is a Head, a head file or NAME=FILE, got {type(item).__name__}")
        else:
            text = os.fspath(item)
            name, sep, file = text.partition("=")
            whole = head_file(text)  # a file of that whole name (even with '=' in it) wins over NAME=FILE
            if sep and NAME_RE.fullmatch(name) and not Path(whole).exists():
                head = load_head(head_file(file), name=name)
            else:
                head = load_head(whole)
        head.check(embed_dim, model)
        if any(h.name == head.name for h in out):
            raise HeadError(f"two heads are named '{head.name}'; rename one with --head NEWNAME=FILE")
        out.append(head)
    return out
