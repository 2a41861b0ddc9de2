"""Inference backends: one class per runtime library, each imported lazily.

A backend wraps one compiled graph: `Backend(path, threads=None)`, `.run(feeds) -> dict`,
`.input_names`, `.output_names`, and `.info` (what actually ran: provider, precision, threads).
`Backend.open_verified(root, info, manifest, **kw)` opens one graph of an artifact from bytes checked
against the manifest. Which backend runs which target lives in `runtime/registry.py`.
"""
from __future__ import annotations

import importlib

from ...errors import ArtifactError
from ..registry import backend_entry, backend_for_target, backends  # noqa: F401  (re-exported)


def get_backend(name: str):
    entry = backend_entry(name)
    module = importlib.import_module(f"{__name__}.{entry.module}")
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
