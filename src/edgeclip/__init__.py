"""edgeclip: deploy CLIP-family models to the edge.

`import edgeclip` stays light (numpy only); torch is imported when a model is loaded or exported.
"""
from __future__ import annotations

from .errors import EdgeClipError  # noqa: F401

__version__ = "0.1.0"


def load_model(uri: str, **kwargs):
    """Load a ClipModel: hf:DIR, openai:FILE, open_clip:ARCH (checkpoint=), random:SPEC (seed=), builtin:tiny."""
    from ._lazy import require

    require("torch", "loading models")
    from .models.loaders import load_model as _load

    return _load(uri, **kwargs)


def export(model, target: str = "onnx", precision: str | None = None, out=None, **options):
    """Export `model` (a ClipModel or a model URI) to a verified artifact folder `out` for `target`
    (see `edgeclip.exporter.targets()`); returns the Artifact. Options: `edgeclip.exporter.ExportOptions`."""
    from .exporter import export as _export

    return _export(model, target=target, precision=precision, out=out, **options)
