"""Synthetic data and models for tests and benchmarks: photo-like images, captions, and a tiny
model with CLIP-like outlier channels."""
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


def calibration_data(root: Path, size: int, images: int, held: int, caps: int) -> tuple[Path, list[Path], Path]:
    """(calibration folder, held-out image paths, captions file) written under `root`."""
    write_images(root / "calib", images, size, seed=0)
    held_paths = write_images(root / "held", held, size, seed=1)
    (root / "caps.txt").write_text("\n".join(captions(caps, 0)))
    return root / "calib", held_paths, root / "caps.txt"


def outlier_tiny():
    """random:tiny with CLIP-like outliers: 3 LayerNorm output channels x80 in every vision block,
    the following linear compensated so the float function keeps its shape."""
    import torch

    import edgeclip

    m = edgeclip.load_model("random:tiny", seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for blk in m.visual.blocks:
            for ln, lin in ((blk.ln_1, blk.attn.qkv), (blk.ln_2, blk.mlp.fc1)):
                ch = torch.randperm(ln.weight.numel(), generator=g)[:3]
                ln.weight[ch] *= 80
                ln.bias[ch] *= 80
                lin.weight[:, ch] /= 80
    return m
