"""Fidelity against the FP32 reference: feature cosines, top-1 agreement, zero-shot accuracy.

Every variant sees the same preprocessed images and the same prompts. The reference is the FP32 torch
model (`TorchReference`) or, when the model cannot be rebuilt, an FP32 artifact of the set.

- cosine: per image (per prompt), cosine between the variant's and the reference's features;
- top-1 agreement: share of images whose zero-shot top-1 class (or, without --eval, best-matching
  caption) is the reference's;
- zero-shot top-1 accuracy (with --eval): share of images whose top-1 class is their folder's.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..calibration.data import IMAGE_EXTS, EvalSet, read_eval  # noqa: F401  (bench reads --eval)
from ..runtime.labels import check_templates
from ..runtime.vectors import cosine, l2_normalize

CHUNK = 64
# Without --eval: captions to compare text features on, and to rank synthetic images against.
CAPTIONS = ("a photo of a cat", "a photo of a dog", "a red car on a street", "a bowl of fruit",
            "a person riding a bike", "a plate of food", "a mountain lake at sunset", "a city at night",
            "a handwritten digit seven", "a photo of the number three", "two birds on a wire",
            "a diagram of a neural network")


def synthetic_images(size: tuple[int, int], n: int = 24, seed: int = 0) -> list[np.ndarray]:
    """Smooth random uint8 images (photo-like statistics, unlike white noise) when no --eval is given."""
    from PIL import Image

    g = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        coarse = g.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((size[1], size[0]), Image.BICUBIC)
        noise = g.normal(0, 8, size=(size[0], size[1], 3))
        out.append(np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8))
    return out


@dataclass
class Probe:
    """The fixed inputs every variant is measured on."""

    pixels: np.ndarray           # (N, 3, H, W) preprocessed
    ids: np.ndarray              # (C*K, L) full-length token ids of the prompts
    n_classes: int               # prompts are class-major: C classes x K templates
    targets: np.ndarray | None   # (N,) class of each image, with --eval
    description: str


def make_probe(preprocess, tokenizer, eval_set: EvalSet | None, templates=None, image_size=(224, 224)) -> Probe:
    if eval_set is not None:
        templates = check_templates(templates)
        pixels = _chunked(preprocess, [str(f) for f in eval_set.files])
        prompts = [t.format(c) for c in eval_set.classes for t in templates]
        return Probe(pixels, tokenizer(prompts, truncate=True), len(eval_set.classes), eval_set.targets,
                     f"{len(eval_set.files)} images in {len(eval_set.classes)} classes from {eval_set.root}; "
                     f"{len(templates)} prompt template(s) per class")
    pixels = preprocess(synthetic_images(image_size))
    return Probe(pixels, tokenizer(list(CAPTIONS), truncate=True), len(CAPTIONS), None,
                 f"{len(pixels)} synthetic smooth-noise images (no --eval given) ranked against "
                 f"{len(CAPTIONS)} fixed captions")


def _chunked(fn, items: list):
    return np.concatenate([fn(items[i:i + CHUNK]) for i in range(0, len(items), CHUNK)])


def features(runner, probe: Probe) -> dict:
    """Normalized image and text features of one variant (or the reference) on the probe."""
    img = np.concatenate([runner.image(probe.pixels[i:i + CHUNK]) for i in range(0, len(probe.pixels), CHUNK)])
    txt = np.concatenate([runner.text(probe.ids[i:i + CHUNK]) for i in range(0, len(probe.ids), CHUNK)])
    return {"image": img.astype(np.float64), "text": txt.astype(np.float64)}


def _predict(feats: dict, n_classes: int) -> np.ndarray:
    """Zero-shot top-1: prompts averaged per class (CLIP's ensemble), then nearest class embedding."""
    t = feats["text"].reshape(n_classes, -1, feats["text"].shape[-1])
    cls = l2_normalize(l2_normalize(t).mean(axis=1))
    return np.argmax(feats["image"] @ cls.T, axis=1)


def _cos(a: np.ndarray, b: np.ndarray) -> dict:
    c = cosine(a, b)
    return {"mean": float(c.mean()), "min": float(c.min())}


def compare(feats: dict, ref: dict | None, probe: Probe) -> dict:
    """Fidelity of one variant's features; `ref` None when no reference applies (another model)."""
    pred = _predict(feats, probe.n_classes)
    out = {"images": int(len(probe.pixels)), "prompts": int(len(probe.ids))}
    if ref is not None:
        out["image_cosine"] = _cos(feats["image"], ref["image"])
        out["text_cosine"] = _cos(feats["text"], ref["text"])
        out["top1_agreement"] = float(np.mean(pred == _predict(ref, probe.n_classes)))
    if probe.targets is not None:
        out["zero_shot_top1"] = float(np.mean(pred == probe.targets))
    return out
