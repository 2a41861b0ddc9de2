"""Zero-shot heads: class text embeddings from prompt ensembles (CLIP's recipe)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError

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


def parse_labels(labels) -> list[str]:
    """A list, a comma-separated string, or a path to a text file with one label per line."""
    if labels is None or (not isinstance(labels, (str, Path)) and len(labels) == 0):
        return []
    if isinstance(labels, Path) or (isinstance(labels, str) and "," not in labels and Path(labels).is_file()):
        p = Path(labels)
        if not p.is_file():
            raise InputError(f"labels file not found: {p}")
        items = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    elif isinstance(labels, str):
        items = [s.strip() for s in labels.split(",")]
    else:
        items = [str(s).strip() for s in labels]
    items = [s for s in items if s]
    if not items:
        raise InputError("no labels given; pass e.g. --labels cat,dog or a file with one label per line")
    if len(set(items)) != len(items):
        dup = sorted({s for s in items if items.count(s) > 1})
        raise InputError(f"duplicate labels: {', '.join(dup)}")
    return items


def check_templates(templates) -> list[str]:
    templates = list(templates)
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise InputError(f"prompt templates must each contain '{{}}' where the label goes; bad: {bad or '(none given)'}")
    return templates


def class_embeddings(encode_text, labels: list[str], templates: list[str]) -> np.ndarray:
    """(C, E) float32: per class, the mean of L2-normalized prompt embeddings, renormalized.

    `encode_text(list_of_str) -> (N, E)` array of unnormalized features.
    """
    prompts = [t.format(label) for label in labels for t in templates]
    feats = np.asarray(encode_text(prompts), dtype=np.float32)
    feats /= np.linalg.norm(feats, axis=-1, keepdims=True)
    feats = feats.reshape(len(labels), len(templates), -1).mean(axis=1)
    return (feats / np.linalg.norm(feats, axis=-1, keepdims=True)).astype(np.float32)


def zero_shot_head(encode_text, classes, templates, scale: float, bias: float = 0.0, sigmoid: bool = False,
                   name: str = "zero_shot", info: dict | None = None):
    """A `zero_shot` Head: class embeddings from prompt ensembles, CLIP's logit scale (and SigLIP's bias)."""
    from .base import Head

    classes, templates = list(classes), check_templates(templates)
    return Head("zero_shot", name, classes, {"text_weights": class_embeddings(encode_text, classes, templates)},
                {"scale": float(scale), "bias": float(bias), "sigmoid": float(sigmoid)},
                {"templates": templates, **(info or {})})
