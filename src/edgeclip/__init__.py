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



# `edgeclip.export(...)` exports; `edgeclip.export` is also the package of targets (a callable module).
from . import export  # noqa: E402,F401
