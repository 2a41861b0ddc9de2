"""What a model is fed: its tokenizer (from the spec) and the fixed synthetic inputs that exports
validate on and that INT8 falls back to when a recipe needs no calibration data."""
from __future__ import annotations

import numpy as np

from ..errors import TokenizerError
from ..runtime.tokenizer import load_tokenizer


def model_tokenizer(spec):
    """The tokenizer a spec names (CLIP's BPE, or the folder's tokenizer.json for HF models)."""
    cfg = spec.tokenizer_config()
    if cfg["kind"] == "hf" and not cfg.get("path"):
        raise TokenizerError(f"model '{spec.name}' has no tokenizer.json (a random or spec-only SigLIP model); "
                             "load it from a folder with tokenizer.json to embed text")
    return load_tokenizer(cfg["kind"], cfg["context_length"], cfg.get("path"))


def _in_preprocessed_range(z: np.ndarray, spec) -> np.ndarray:
    """Map N(0, 1)-like images into what the model's preprocessing produces: colours in [0, 1]
    (a logistic squash, so the images stay smooth), then normalized with the spec's mean and std.
    A model normalized with mean 0 / std 1 (MobileCLIP) sees [0, 1], a CLIP model about [-1.8, 2.1]:
    the ranges its INT8 calibration covers."""
    pre = spec.preprocess_config()
    mean = np.asarray(pre.get("mean", (0.48145466, 0.4578275, 0.40821073)), np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(pre.get("std", (0.26862954, 0.26130258, 0.27577711)), np.float32).reshape(1, 3, 1, 1)
    colours = 1.0 / (1.0 + np.exp(-1.5 * z))
    return ((colours - mean) / std).astype(np.float32)


def reference_inputs(spec, n: int = 3, seed: int = 1234) -> dict:
    """Fixed inputs: smooth random images (like preprocessed photos) and tokenizer-shaped ids."""
    import torch
    import torch.nn.functional as F

    g = np.random.default_rng(seed)
    s = spec.vision.image_size
    coarse = g.normal(size=(n, 3, max(2, s // 8), max(2, s // 8))).astype(np.float32)
    pixels = F.interpolate(torch.from_numpy(coarse), size=(s, s), mode="bilinear", align_corners=False)
    pixels = (pixels + 0.1 * torch.from_numpy(g.normal(size=(n, 3, s, s)).astype(np.float32))).numpy()
    pixels = _in_preprocessed_range(pixels, spec)
    t = spec.text
    ids = np.zeros((n, t.context_length), dtype=np.int64)
    lengths = [3, min(12, t.context_length - 2), t.context_length - 2][:n]
    for i, length in enumerate(lengths):
        ids[i, : length + 2] = g.integers(1, min(t.vocab_size - 3, 49405), size=length + 2)
        if t.pool == "eot":
            ids[i, 0] = 49406 if t.vocab_size > 49406 else ids[i, 0]
            ids[i, length + 1] = t.eot_token_id if t.eot_token_id is not None else t.vocab_size - 1
    if t.pool == "last":  # SigLIP: padded to full length with its pad id, end token before the padding
        ids[ids == 0] = 1
    return {"pixel_values": pixels.astype(np.float32), "input_ids": ids}
