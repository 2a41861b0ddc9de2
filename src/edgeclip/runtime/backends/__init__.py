"""Inference backends: one class per runtime library, each imported lazily.

A backend wraps one compiled graph: `Backend(path, threads=None)`, `.run(feeds) -> dict`,
`.input_names`, `.output_names`, and `.info` (what actually ran: provider, precision, threads).
"""
from __future__ import annotations

import importlib

from ...errors import ArtifactError, EdgeClipError
from ..schema import TARGET_BACKEND  # noqa: F401  (target -> the backend that runs its artifacts)

# backend name -> module
_BACKENDS = {"ort": "ort", "openvino": "openvino", "coreml": "coreml"}


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


def filtered_config(config: dict | None, allowed: dict, what: str) -> dict:
    """Only the runtime options exports write, with the values they write: the manifest is untrusted,
    and a library option can write files (ORT's node memory stats, OpenVINO's CACHE_DIR)."""
    out = {}
    for key, value in (config or {}).items():
        if key not in allowed or str(value) not in allowed[key]:
            raise ArtifactError(f"{what} option {key!r}={value!r} is not one edgeclip exports write "
                                f"(allowed: {sorted(allowed) or 'none'}); refusing to pass it on")
        out[str(key)] = str(value)
    return out
