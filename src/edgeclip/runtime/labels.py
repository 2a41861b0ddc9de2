"""Labels, prompt templates and zero-shot class embeddings (CLIP's recipe), numpy only.

The runtime classifies with them and the export bakes them into heads, so they live here, below
both. Labels and templates come from users (and from head files): they are checked here once, for
every caller. Labels are a list of strings, never a path: a string that happens to name a file must
not turn that file into labels (`labels="/proc/self/environ"`). Files are read only on request
(`read_labels_file`), and the CLI's comma-separated form is split by `split_labels`.
"""
from __future__ import annotations

import os
import string
import unicodedata

import numpy as np

from .._files import read_regular
from ..errors import HeadError, LabelError, TemplateError, UnknownHeadError
from .vectors import l2_normalize

# A short ensemble in the spirit of CLIP's ImageNet prompts; users pass their own for their domain.
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a photo of the {}.",
    "an image of a {}.",
    "a good photo of a {}.",
)

# Bounds: far above any real class list (ImageNet-21k has ~21k classes) or prompt, far below what
# would exhaust memory or the text tower's time (every label is encoded once per template).
MAX_LABELS = 100_000
MAX_LABEL_CHARS = 1_000
MAX_LABELS_FILE_BYTES = 16 * 1024 * 1024
MAX_TEMPLATES = 1_000
MAX_TEMPLATE_CHARS = 1_000

_HOW = "pass labels as a list of strings, e.g. ['cat', 'dog']"


def _short(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else text[:n] + "…")


def _bad_char(text: str) -> str | None:
    """The first control character (NUL, newline, tab, ESC, ...) or lone surrogate in `text`."""
    for ch in text:
        if unicodedata.category(ch) in ("Cc", "Cs"):
            return ch
    return None


def _collision_key(label: str) -> str:
    # labels differing only by case or spacing read the same to a user, and nearly the same to the
    # text tower: two such classes are a mistake, not two classes
    return " ".join(label.split()).casefold()


def parse_labels(labels, what: str = "label") -> list[str]:
    """Check a list (or tuple) of label strings; returns them stripped of surrounding whitespace.

    Refused with LabelError: a bare string or path (use `read_labels_file` / `split_labels`), items
    that are not strings, blank items, control characters, labels over MAX_LABEL_CHARS, more than
    MAX_LABELS labels, and two labels that differ only by case or whitespace ('Cat' and 'cat ').
    """
    whats = what + ("es" if what.endswith("s") else "s")
    if isinstance(labels, (str, bytes, os.PathLike)):
        raise LabelError(f"{whats} must be a list of strings, got a single {type(labels).__name__} "
                         f"{_short(str(labels))}: {_HOW}; to read a file with one {what} per line use "
                         "labels_file= (read_labels_file) or the CLI's --labels-file; to split 'a,b,c' use "
                         "split_labels")
    if not isinstance(labels, (list, tuple)):
        raise LabelError(f"{whats} must be a list of strings, got {type(labels).__name__}: {_HOW}")
    if len(labels) > MAX_LABELS:
        raise LabelError(f"{len(labels)} {whats} given; at most {MAX_LABELS} are supported")
    out = [_check_label(item, i, what) for i, item in enumerate(labels)]
    if not out:
        raise LabelError(f"no {whats} given (an empty list): {_HOW}")
    seen: dict[str, int] = {}
    for i, label in enumerate(out):
        j = seen.setdefault(_collision_key(label), i)
        if j != i:
            same = "are the same" if out[j] == label else "differ only by case or whitespace"
            raise LabelError(f"{whats} {labels[j]!r} (item {j}) and {labels[i]!r} (item {i}) {same}: "
                             f"each {what} must be distinct; remove or rename one")
    return out


def _check_label(item, i: int, what: str) -> str:
    whats = what + ("es" if what.endswith("s") else "s")
    if not isinstance(item, str):
        raise LabelError(f"{what} {i} is {type(item).__name__} {_short(repr(item))}, not a string: {_HOW}")
    label = str(item).strip()   # str(): plain str, not a subclass such as numpy.str_
    if not label:
        raise LabelError(f"{what} {i} is blank ({item!r}); remove it or give it a name")
    if len(label) > MAX_LABEL_CHARS:
        raise LabelError(f"{what} {i} is {len(label)} characters long; at most {MAX_LABEL_CHARS} are allowed")
    bad = _bad_char(label)
    if bad is not None:
        raise LabelError(f"{what} {i} {_short(label)} holds the control character {bad!r} "
                         f"(U+{ord(bad):04X}); {whats} are plain text on one line")
    return label


def split_labels(text: str) -> list[str]:
    """The CLI's comma-separated form: 'cat,dog, red car' -> ['cat', 'dog', 'red car'] (checked).

    Empty pieces (a trailing comma) are skipped; a label cannot hold a comma in this form (use a file).
    """
    if not isinstance(text, str):
        raise LabelError(f"comma-separated labels must be a string, got {type(text).__name__}")
    return parse_labels([s for s in (piece.strip() for piece in text.split(",")) if s])


def read_labels_file(path) -> list[str]:
    """Labels from a UTF-8 text file, one per line; blank lines and lines starting with '#' skipped.

    Only a regular file of at most MAX_LABELS_FILE_BYTES is read (a FIFO would block, a device or
    /proc file has no size to trust); the labels are then checked like `parse_labels`.
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise LabelError(f"labels file must be a path (str or pathlib.Path), got {type(path).__name__}")
    data = read_regular(os.fspath(path), LabelError, "labels file", MAX_LABELS_FILE_BYTES)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise LabelError(f"labels file {path} is not UTF-8 text (byte {e.start}: {data[e.start:e.start + 4]!r}); "
                         "save it as UTF-8, one label per line") from None
    lines = [line.strip() for line in text.splitlines()]
    items = [s for s in lines if s and not s.startswith("#")]
    if not items:
        raise LabelError(f"labels file {path} holds no labels (only blank lines or '#' comments); "
                         "write one label per line")
    try:
        return parse_labels(items)
    except LabelError as e:
        raise LabelError(f"labels file {path}: {e}") from None


# ---------------------------------------------------------------------------------- templates

def check_templates(templates) -> list[str]:
    """A list (or tuple) of prompt templates, each with exactly one '{}' and no other format field.

    None or an empty list is refused (TemplateError): use `resolve_templates` where None means the
    defaults. '{0}', '{name}', '{:>10}', '{!r}', '{.attr}' and unbalanced braces are refused because
    `str.format` would read them as something else than "the label goes here" (or fail later).
    """
    if templates is None or isinstance(templates, (str, bytes)):
        got = "None" if templates is None else f"a single string {_short(str(templates))}"
        raise TemplateError(f"prompt templates must be a list of strings, got {got}; "
                            "e.g. ['a photo of a {}.'] (or leave them out for the defaults)")
    if not isinstance(templates, (list, tuple)):
        raise TemplateError(f"prompt templates must be a list of strings, got {type(templates).__name__}")
    if not templates:
        raise TemplateError("no prompt templates given (an empty list); pass e.g. ['a photo of a {}.'], "
                            "or leave them out (None) for the defaults")
    if len(templates) > MAX_TEMPLATES:
        raise TemplateError(f"{len(templates)} prompt templates given; at most {MAX_TEMPLATES} are supported")
    out = [_check_template(t, i) for i, t in enumerate(templates)]
    dup = sorted({t for t in out if out.count(t) > 1})
    if dup:  # a repeated template silently weighs double in the ensemble
        raise TemplateError(f"prompt template {dup[0]!r} is given twice; list each template once")
    return out


def _check_template(t, i: int) -> str:
    if not isinstance(t, str):
        raise TemplateError(f"prompt template {i} is {type(t).__name__} {_short(repr(t))}, not a string")
    if len(t) > MAX_TEMPLATE_CHARS:
        raise TemplateError(f"prompt template {i} is {len(t)} characters long; at most {MAX_TEMPLATE_CHARS}")
    bad = _bad_char(t)
    if bad is not None:
        raise TemplateError(f"prompt template {i} {_short(t)} holds the control character {bad!r}")
    hint = f"prompt template {i} {_short(t)} must hold exactly one '{{}}' where the label goes"
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(t) if name is not None]
    except ValueError as e:  # a lone '{' or '}'
        raise TemplateError(f"{hint}: {e}; write a literal brace as '{{{{' or '}}}}'") from None
    if len(fields) != 1:
        raise TemplateError(f"{hint}, it has {len(fields)} format field(s)")
    name, spec, conv = fields[0]
    if name or spec or conv:
        raise TemplateError(f"{hint}, not '{{{name}{'!' + conv if conv else ''}{':' + spec if spec else ''}}}': "
                            "no index, name, conversion or format spec")
    return t


def spec_templates(spec) -> list[str]:
    """A model's zero-shot prompt templates: its spec's own (spec data), else DEFAULT_TEMPLATES.
    `spec`: a ModelSpec or a manifest's spec dict."""
    own = spec.get("templates") if isinstance(spec, dict) else getattr(spec, "templates", ())
    return list(own or DEFAULT_TEMPLATES)


def resolve_templates(templates, default=DEFAULT_TEMPLATES) -> list[str]:
    """`templates` checked, or `default` when it is None. An empty list is an error, not the defaults."""
    return check_templates(default if templates is None else templates)


# ---------------------------------------------------------------------------------- embeddings

def class_embeddings(encode_text, labels: list[str], templates: list[str]) -> np.ndarray:
    """(C, E) float32: per class, the mean of L2-normalized prompt embeddings, renormalized.

    `encode_text(list_of_str) -> (N, E)` array of unnormalized features.
    """
    labels, templates = parse_labels(list(labels)), check_templates(list(templates))
    prompts = [t.format(label) for label in labels for t in templates]
    feats = np.asarray(encode_text(prompts), dtype=np.float32)
    if feats.ndim != 2 or feats.shape[0] != len(prompts):
        raise HeadError(f"the text encoder returned shape {feats.shape} for {len(prompts)} prompts, "
                        f"expected ({len(prompts)}, E)")
    norms = np.linalg.norm(feats, axis=-1, keepdims=True)
    if not (np.isfinite(norms).all() and (norms > 0).all()):
        raise HeadError("the text encoder returned zero, NaN or infinite features for some prompts; "
                        "check the model's text tower")
    # eps=0 (no floor): the norms are checked positive above, so even a tiny prompt counts as a unit
    # vector in the class mean; the mean is renormalized the same way
    feats = l2_normalize(feats, eps=0.0).reshape(len(labels), len(templates), -1).mean(axis=1)
    return l2_normalize(feats, eps=0.0).astype(np.float32)


def select(heads: dict, name: str | None):
    """The entry `name` of a {name: ...} mapping, with an error that lists the names there are."""
    if not isinstance(name, str) or name not in heads:
        raise UnknownHeadError(f"no head named {name!r:.80} in this artifact; it has: "
                               f"{', '.join(heads) or 'no heads (export with --head FILE or --labels)'}")
    return heads[name]
