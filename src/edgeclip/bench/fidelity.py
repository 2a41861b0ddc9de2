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
from pathlib import Path

import numpy as np

from ..errors import EvalDataError
from ..heads.zero_shot import DEFAULT_TEMPLATES, check_templates, parse_labels

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CHUNK = 64
# Without --eval: captions to compare text features on, and to rank synthetic images against.
CAPTIONS = ("a photo of a cat", "a photo of a dog", "a red car on a street", "a bowl of fruit",
            "a person riding a bike", "a plate of food", "a mountain lake at sunset", "a city at night",
            "a handwritten digit seven", "a photo of the number three", "two birds on a wire",
            "a diagram of a neural network")


@dataclass
class EvalSet:
    """A labelled folder: `files[i]` belongs to class `targets[i]`; `classes` are the prompt words."""

    root: Path
    files: list
    targets: np.ndarray
    classes: list
    folders: list


def _folder_order(names: list[str]) -> list[str]:
    return sorted(names, key=int) if all(n.isdigit() for n in names) else sorted(names)


def read_eval(root, labels=None, limit: int | None = None, seed: int = 0, what: str = "--eval") -> EvalSet:
    """One sub-folder per class. `labels` (list, comma string or file) name the classes in folder order
    (numeric order when every folder name is a number); by default the folder names are the classes."""
    root = Path(root)
    if not root.is_dir():
        raise EvalDataError(f"{what} folder not found: {root}; pass a folder with one sub-folder of images per class")
    folders = _folder_order([d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")])
    per_class = {f: sorted(p for p in (root / f).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
                 for f in folders}
    folders = [f for f in folders if per_class[f]]
    if len(folders) < 2:
        loose = sum(1 for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
        hint = f" (it holds {loose} images directly: move them into class folders)" if loose else ""
        raise EvalDataError(f"{what} folder {root} has {len(folders)} class sub-folder(s) with images{hint}; "
                            f"it needs at least two, e.g. {root}/cat/*.jpg and {root}/dog/*.jpg")
    classes = parse_labels(labels) if labels is not None else list(folders)
    if len(classes) != len(folders):
        raise EvalDataError(f"{len(classes)} labels given for {len(folders)} class folders in {root} "
                            f"({', '.join(folders)}); give one label per folder, in that order")
    files, targets = [], []
    for i, f in enumerate(folders):
        files += per_class[f]
        targets += [i] * len(per_class[f])
    targets = np.asarray(targets)
    if limit and len(files) > limit:  # a seeded sample keeps long evals affordable
        keep = np.sort(np.random.default_rng(seed).choice(len(files), size=limit, replace=False))
        files, targets = [files[i] for i in keep], targets[keep]
    return EvalSet(root, files, targets, classes, folders)


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


def default_templates(model: str, source: str | None) -> list[str]:
    if model == "tiny" or (source or "").startswith("builtin:"):
        from ..builtin import prompt_templates

        return prompt_templates()
    return list(DEFAULT_TEMPLATES)


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
    t = t / np.linalg.norm(t, axis=-1, keepdims=True)
    cls = t.mean(axis=1)
    cls /= np.linalg.norm(cls, axis=-1, keepdims=True)
    return np.argmax(feats["image"] @ cls.T, axis=1)


def _cos(a: np.ndarray, b: np.ndarray) -> dict:
    c = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)
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
