"""The artifact the hostile suites attack: builtin:tiny in ONNX with the digit words baked in, the
same export the runtime, INT8 and OpenVINO suites read (exported once per session, tests/conftest.py).
Suites clone it before changing anything."""
from __future__ import annotations

from pathlib import Path

import pytest

from edgeclip.builtin import digit_labels

TINY_ONNX = {"model": "builtin:tiny", "target": "onnx", "precision": "fp32", "labels": digit_labels()}


@pytest.fixture(scope="module")
def art(shared_exports) -> Path:
    pytest.importorskip("onnxruntime")
    return shared_exports.path(TINY_ONNX)
