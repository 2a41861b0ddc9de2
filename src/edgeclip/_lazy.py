"""Lazy imports of optional dependencies, with an error naming the extra to install."""
from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingExtraError

# module -> extra that provides it
_EXTRA = {
    "torch": "export",
    "onnx": "export",
    "onnxscript": "export",
    "safetensors": "export",
    "onnxruntime": "ort",
    "openvino": "openvino",
    "nncf": "openvino",
    "coremltools": "coreml",
    "tensorrt": "tensorrt",
    "tokenizers": "tokenizers",
    "rich": "bench",
    "triton": "triton",
}


def require(module: str, purpose: str = "") -> ModuleType:
    """Import `module` or raise MissingExtraError naming the pip extra."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        raise MissingExtraError(top, _EXTRA.get(top, top), purpose) from e
