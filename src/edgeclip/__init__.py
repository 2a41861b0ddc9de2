"""edgeclip: deploy CLIP-family models to the edge."""
from __future__ import annotations

from .errors import EdgeClipError  # noqa: F401

__version__ = "0.1.0"
