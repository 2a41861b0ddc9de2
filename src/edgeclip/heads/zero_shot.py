"""Zero-shot heads: class text embeddings from prompt ensembles (CLIP's recipe), as a `Head`.

Labels, templates and class embeddings are checked and computed in `runtime.labels` (the runtime
uses them too); they are re-exported here for the heads' callers.
"""
from __future__ import annotations

from ..runtime.labels import (DEFAULT_TEMPLATES, MAX_LABEL_CHARS, MAX_LABELS, MAX_LABELS_FILE_BYTES,  # noqa: F401
                              MAX_TEMPLATE_CHARS, MAX_TEMPLATES, check_templates, class_embeddings, parse_labels,
                              read_labels_file, resolve_templates, split_labels)


def zero_shot_head(encode_text, classes, templates, scale: float, bias: float = 0.0, sigmoid: bool = False,
                   name: str = "zero_shot", info: dict | None = None):
    """A `zero_shot` Head: class embeddings from prompt ensembles, CLIP's logit scale (and SigLIP's bias).

    `templates=None` means DEFAULT_TEMPLATES; an empty list is an error.
    """
    from .base import Head, check_name, check_number

    check_name(name)   # before the text tower runs: a bad name fails at once
    classes, templates = parse_labels(classes, "class"), resolve_templates(templates)
    params = {"scale": check_number("scale", scale, name), "bias": check_number("bias", bias, name),
              "sigmoid": float(bool(sigmoid))}
    return Head("zero_shot", name, classes, {"text_weights": class_embeddings(encode_text, classes, templates)},
                params, {"templates": templates, **(info or {})})
