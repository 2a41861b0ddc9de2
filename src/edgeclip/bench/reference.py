"""The FP32 reference for fidelity: the torch model rebuilt from the artifact's source (or --model).

torch is imported here only, and only when a model is rebuilt. When it cannot be (no source in the
manifest, torch not installed, weights gone), bench falls back to an FP32 artifact of the set and says so.
"""
from __future__ import annotations

import numpy as np

from ..errors import EdgeClipError
from ..runtime.vectors import l2_normalize


class TorchReference:
    """The unmodified float32 torch model, behind the Runner interface fidelity uses."""

    def __init__(self, model):
        self.model = model

    def image(self, pixels: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            x = self.model.encode_image(torch.from_numpy(np.ascontiguousarray(pixels))).float().numpy()
        return l2_normalize(x)

    def text(self, ids: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            x = self.model.encode_text(torch.from_numpy(np.ascontiguousarray(ids))).float().numpy()
        return l2_normalize(x)


def rebuild(uri: str | None, explicit: bool) -> tuple[object | None, str | None]:
    """(model, None) or (None, why not). An explicit --model that fails is an error, not a fallback."""
    if not uri:
        return None, "the artifacts' manifests do not record the model they were made from (pass --model URI)"
    try:
        import edgeclip

        kw = {"seed": 0} if uri.startswith("random:") else {}
        return edgeclip.load_model(uri, **kw), None
    except EdgeClipError as e:  # unknown URI, weights gone, torch not installed
        if explicit:
            raise
        return None, f"cannot rebuild '{uri}': {e}"
