"""Calibration data: image folders and caption files, preprocessed exactly as the runtime does."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import CalibrationError, EdgeClipError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass
class CalibrationImages:
    pixels: np.ndarray                      # (N, 3, H, W) float32, what the image graph receives
    files: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # (path, reason) of unreadable files

    def split(self, holdout: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(calibration, held-out) pixel arrays; held-out samples measure the accuracy guard."""
        return _split(self.pixels, holdout, seed)


def list_images(folder, limit: int | None = None, seed: int = 0) -> list[Path]:
    """Image files under `folder` (recursive), a seeded sample of at most `limit`, in stable order."""
    root = Path(folder)
    if not root.is_dir():
        raise CalibrationError(f"calibration folder not found: {root}; pass --calib DIR with a few hundred "
                               "representative images (jpg/png/webp/bmp)")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise CalibrationError(f"no images ({', '.join(IMAGE_EXTS)}) found under {root}")
    if limit is not None and len(files) > limit:
        files = sorted(random.Random(seed).sample(files, limit))
    return files


def load_images(folder, preprocessor, limit: int | None = 512, seed: int = 0) -> CalibrationImages:
    """Decode and preprocess; unreadable files are skipped and counted, fatal only if none is left."""
    from ..runtime.preprocess import load_image

    arrays, kept, skipped = [], [], []
    for f in list_images(folder, limit, seed):
        try:
            arrays.append(preprocessor(load_image(f)))
            kept.append(f)
        except EdgeClipError as e:
            skipped.append((str(f), str(e)))
    if not arrays:
        raise CalibrationError(f"none of the {len(skipped)} images under {folder} could be read "
                               f"(first problem: {skipped[0][1]})")
    return CalibrationImages(np.concatenate(arrays), kept, skipped)


def read_captions(path, limit: int | None = None, seed: int = 0) -> list[str]:
    """Captions from a .txt (one per line) or .jsonl file (a "caption" or "text" field per line)."""
    p = Path(path)
    if not p.is_file():
        raise CalibrationError(f"caption file not found: {p}; pass --calib-captions FILE (.txt or .jsonl)")
    lines = [ln.strip() for ln in p.read_text(encoding="utf-8", errors="replace").splitlines()]
    lines = [ln for ln in lines if ln]
    if p.suffix.lower() == ".jsonl":
        caps = []
        for i, ln in enumerate(lines, 1):
            try:
                obj = json.loads(ln)
            except json.JSONDecodeError as e:
                raise CalibrationError(f"{p}:{i} is not valid JSON ({e})") from e
            cap = obj.get("caption", obj.get("text")) if isinstance(obj, dict) else obj
            if isinstance(cap, str) and cap.strip():
                caps.append(cap.strip())
        lines = caps
    if not lines:
        raise CalibrationError(f"{p} holds no captions")
    if limit is not None and len(lines) > limit:
        lines = random.Random(seed).sample(lines, limit)
    return lines


def _split(x: np.ndarray, holdout: float, seed: int):
    n = len(x)
    if n < 2:
        return x, x
    idx = np.random.default_rng(seed).permutation(n)
    k = min(n - 1, max(1, int(round(n * holdout))))
    return x[np.sort(idx[k:])], x[np.sort(idx[:k])]
