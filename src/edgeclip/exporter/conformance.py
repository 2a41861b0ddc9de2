"""Conformance vectors: a small file in every artifact (`conformance.npz`) with which an app's own
integration (a Kotlin, Swift or C++ tokenizer, resize, normalization and execution provider) checks
itself against ours: a few texts with their token ids, a few source images with their preprocessed
pixels, and the outputs both graphs give them. `edgeclip verify ART --vectors` replays it
(`runtime.conformance`).

Expected outputs are the artifact's own, as this machine's runtime ran them at export, where its
backend runs here; otherwise (Core ML off macOS, TensorRT) the float32 torch reference, with the
target's fidelity tolerance. numpy + Pillow + the model's tokenizer; torch only for that reference.
"""
from __future__ import annotations

import json

import numpy as np

VECTORS = "conformance.npz"
TEXTS = ("a photo of a cat.", "a diagram of the number seven", "Ünïcödé, punctuation & numbers: 3.14 -- ok?")
# an app on another execution provider (float16 accelerators) should meet these against our own outputs
EP_TOLERANCE = {"max_abs": 1e-2, "min_cosine": 0.999}


def source_images(size: int, n: int = 2) -> list:
    """`n` deterministic RGB images, neither square nor of the model's size (the resize and crop run):
    smooth colour ramps with a few rectangles."""
    from PIL import Image

    rng = np.random.RandomState(20261201)
    shapes = [(int(size * 1.25) + 3, size + 5), (size - 3, int(size * 1.5) + 1)]
    out = []
    for h, w in shapes[:n]:
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        img = np.stack([255 * x / w, 255 * y / h, 128 + 100 * np.sin(x / 7.0 + y / 11.0)], -1)
        for _ in range(4):
            y0, x0 = rng.randint(0, h // 2), rng.randint(0, w // 2)
            img[y0:y0 + h // 4, x0:x0 + w // 4] = rng.randint(0, 256, 3)
        out.append(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB"))
    return out


def _token_ids(spec):
    """TEXTS through the model's tokenizer, or None where there is none or its ids exceed the vocabulary."""
    import warnings

    from ..errors import TokenizerError
    from ..models.inputs import model_tokenizer

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a short context truncates the longest text: expected here
            ids = model_tokenizer(spec)(list(TEXTS), truncate=True)
    except TokenizerError:
        return None
    return ids if int(ids.max()) < spec.text.vocab_size else None


def write_vectors(target, job, w, graphs: dict) -> dict:
    """Write `conformance.npz` into the artifact being written; returns its manifest entry."""
    from ..runtime.preprocess import Preprocessor
    from ..runtime.tokenizer import trim

    spec = job.spec
    images = source_images(spec.vision.image_size)
    pixels = Preprocessor.from_config(spec.preprocess_config())(images)
    ids = _token_ids(spec)
    texts = np.array(TEXTS) if ids is not None else np.array([""] * len(TEXTS))
    if ids is None:  # no tokenizer for this model (or a reduced test vocabulary): the fixed synthetic ids
        from ..models.inputs import reference_inputs

        ids = reference_inputs(spec, n=len(TEXTS))["input_ids"]
    length = graphs["text"]["inputs"]["input_ids"]["shape"][1]
    if isinstance(length, int) and length < ids.shape[1]:  # a fixed shorter text graph: the texts that fit
        keep = [i for i, row in enumerate(ids) if not np.any(row[length:])]
        ids, texts = ids[keep], texts[keep]
    feeds = {"pixel_values": pixels, "input_ids": trim(ids, spec.text.eot_token_id) if job.trim else ids}
    expected = target.run_outputs(job, w.staging, graphs, feeds)
    if expected is not None:
        source, tol = f"this artifact on {target.backend} at export", EP_TOLERANCE
    else:
        from .graphs import reference_outputs

        expected = reference_outputs(job.model, {"pixel_values": pixels, "input_ids": ids}, job.head, job.heads)
        t = target.tolerance(job.opts)
        source, tol = "the float32 torch reference", {"max_abs": t.max_abs, "min_cosine": t.min_cosine}
    order = [n for g in ("image", "text") for n in graphs[g]["outputs"] if n in expected]
    meta = {"format": 1, "expected_from": source, "tolerance": tol, "outputs": order,
            "graphs": {g: list(graphs[g]["outputs"]) for g in ("image", "text")}}
    arrays = {"texts": texts, "input_ids": ids.astype(np.int64),
              "pixel_values": pixels.astype(np.float32), "meta": np.array(json.dumps(meta))}
    for i, img in enumerate(images):
        arrays[f"image_{i}"] = np.asarray(img, dtype=np.uint8)
    for name in order:
        arrays[f"expected_{name}"] = np.asarray(expected[name], dtype=np.float32)
    with open(w.path(VECTORS), "wb") as f:
        np.savez(f, **arrays)
    return {"file": VECTORS, "texts": len(ids), "images": len(images), "expected_from": source,
            "tolerance": tol}
