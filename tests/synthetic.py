"""Synthetic calibration and held-out data for tests and benchmarks: photo-like images and captions."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def write_images(folder: Path, n: int, size: int, seed: int) -> list[Path]:
    """Smooth random colour images (blobs plus grain), like photos at low resolution."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    r = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        coarse = r.uniform(0, 255, size=(4, 4, 3)).astype(np.uint8)
        img = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR), np.float32)
        img = np.clip(img + r.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        paths.append(folder / f"{seed}_{i:03d}.png")
        Image.fromarray(img).save(paths[-1])
    return paths


WORDS = ("red", "small", "old", "bright", "wooden", "striped", "cat", "dog", "car", "house", "tree",
         "boat", "street", "beach", "table", "mountain", "bird", "flower", "on", "near", "under")


def captions(n: int, seed: int) -> list[str]:
    r = np.random.default_rng(seed)
    return ["a photo of a " + " ".join(r.choice(WORDS, size=int(r.integers(2, 9)))) for _ in range(n)]
