"""Which backend runs which target's artifacts, and the library extra each backend needs. stdlib only.

The runtime must open an artifact with no export code installed, so the built-in targets are data
here; a target registered later (`edgeclip.exporter.register_target(name, backend=..., suffixes=...)`)
adds its row. A new backend is one module in `runtime/backends/` plus one `register_backend` call.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import EdgeClipError


@dataclass
class BackendEntry:
    name: str
    module: str                      # edgeclip.runtime.backends.<module>
    extra: str                       # pip install 'edgeclip[<extra>]'
    targets: dict = field(default_factory=dict)   # target -> graph file suffixes it runs


_BACKENDS: dict[str, BackendEntry] = {}


def register_backend(name: str, module: str, extra: str, targets: dict | None = None) -> BackendEntry:
    entry = _BACKENDS.setdefault(name, BackendEntry(name, module, extra))
    entry.targets.update(targets or {})
    return entry


def register_target(target: str, backend: str, suffixes: tuple) -> None:
    """Run `target`'s artifacts (graph files ending in `suffixes`) on `backend`."""
    if backend not in _BACKENDS:
        raise EdgeClipError(f"target '{target}' names backend '{backend}', which is not registered; known: "
                            f"{', '.join(sorted(_BACKENDS))}")
    for other in _BACKENDS.values():
        if target in other.targets and other.name != backend:
            raise EdgeClipError(f"target '{target}' already runs on backend '{other.name}'")
    _BACKENDS[backend].targets[target] = tuple(suffixes)


def backends() -> list[str]:
    return sorted(_BACKENDS)


def backend_entry(name: str) -> BackendEntry:
    if name not in _BACKENDS:
        raise EdgeClipError(f"unknown backend '{name}'; available: {', '.join(backends())}")
    return _BACKENDS[name]


def target_backends() -> dict[str, str]:
    """{target: backend} of every target the runtime can open."""
    return {t: b.name for b in _BACKENDS.values() for t in b.targets}


def backend_for_target(target: str) -> str:
    found = target_backends().get(target)
    if found is None:
        raise EdgeClipError(f"no runtime backend for target '{target}'; known targets: "
                            f"{', '.join(sorted(target_backends()))}")
    return found


# backends that can also open a target's artifacts besides its own: TensorRT-ready ONNX runs on ONNX
# Runtime too (CPU, or onnxruntime-gpu's CUDA / TensorRT execution providers on Jetson)
_ALSO_RUNS = {"tensorrt": ("ort",)}


def backends_for_target(target: str) -> tuple:
    """(the target's own backend, other backends that can run its graphs)."""
    return (backend_for_target(target), *_ALSO_RUNS.get(target, ()))


def graph_suffixes(target: str) -> tuple:
    return _BACKENDS[backend_for_target(target)].targets[target]


register_backend("ort", "ort", "ort", {"onnx": (".onnx",), "ort-mobile": (".ort",)})
register_backend("openvino", "openvino", "openvino", {"openvino": (".xml",)})
register_backend("coreml", "coreml", "coreml", {"coreml": (".mlpackage",)})
# engines are built on the device from the artifact's TensorRT-ready ONNX (runtime/backends/tensorrt.py)
register_backend("tensorrt", "tensorrt", "tensorrt", {"tensorrt": (".onnx",)})
