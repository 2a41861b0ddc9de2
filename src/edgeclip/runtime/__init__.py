"""numpy-only runtime: tokenizer, preprocessing, backends and Pipeline. Never imports torch.

Names are imported on first use, so that reading a manifest (what `edgeclip.export` does) loads
neither Pillow nor a backend: `from edgeclip.runtime import Pipeline, tokenize` works as always."""
from __future__ import annotations

import importlib

_EXPORTS = {"read_manifest": "manifest", "Pipeline": "pipeline", "Prediction": "pipeline",
            "Preprocessor": "preprocess", "load_image": "preprocess", "tokenize": "tokenizer"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
