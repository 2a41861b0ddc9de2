"""Inference backends: one class per runtime library, each imported lazily.

A backend wraps one compiled graph: `Backend(path, threads=None)`, `.run(feeds) -> dict`,
`.input_names`, `.output_names`, and `.info` (what actually ran: provider, precision, threads).
"""
from __future__ import annotations

import importlib

from ...errors import EdgeClipError

# backend name -> module; target -> the backend that runs its artifacts
_BACKENDS = {"ort": "ort", "openvino": "openvino", "coreml": "coreml"}
TARGET_BACKEND = {"onnx": "ort", "ort-mobile": "ort", "openvino": "openvino", "coreml": "coreml",
                  "tensorrt": "tensorrt"}


def backends() -> list[str]:
    return sorted(_BACKENDS)


def backend_for_target(target: str) -> str:
    try:
        return TARGET_BACKEND[target]
    except KeyError:
        raise EdgeClipError(f"no runtime backend for target '{target}'") from None


def get_backend(name: str):
    if name not in _BACKENDS:
        raise EdgeClipError(f"unknown backend '{name}'; available: {', '.join(backends())}")
    module = importlib.import_module(f"{__name__}.{_BACKENDS[name]}")
    return module.Backend
