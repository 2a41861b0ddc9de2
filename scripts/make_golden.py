"""Write tests/data/golden_tiny.npz: fixed inputs and what today's exports of builtin:tiny compute on them.

tests/test_golden.py exports the same artifacts again and compares: refactors of the export path must
leave artifacts numerically identical. Rerun only when a change is meant to alter the numbers, and
say so in the commit. Usage: python scripts/make_golden.py [OUT.npz]
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

import edgeclip
from edgeclip.builtin import digit_labels
from edgeclip.runtime import Pipeline

VARIANTS = {"onnx_fp32": {"target": "onnx", "precision": "fp32"},
            "openvino_fp32": {"target": "openvino", "precision": "fp32"}}


def inputs(seed: int = 7) -> dict:
    g = np.random.default_rng(seed)
    coarse = g.normal(size=(4, 3, 4, 4)).astype(np.float32)
    pixels = np.kron(coarse, np.ones((1, 1, 8, 8), np.float32)) + 0.1 * g.normal(size=(4, 3, 32, 32)).astype(np.float32)
    texts = ["a photo of the number seven.", "a handwritten digit two.", "an image of a zero.", "nine"]
    return {"pixel_values": pixels.astype(np.float32), "texts": np.array(texts)}


def outputs(artifact: Path, x: dict) -> dict:
    p = Pipeline.load(artifact, inference_precision="f32" if (artifact / "image.xml").exists() else None)
    image = p._graph("image").run({"pixel_values": x["pixel_values"]})
    return {"image_embeds": image["image_embeds"], "logits": image["logits"],
            "text_embeds": p.encode_text(list(x["texts"]))}


def main(out: str = "tests/data/golden_tiny.npz") -> None:
    x = inputs()
    saved = dict(x)
    model = edgeclip.load_model("builtin:tiny")
    with tempfile.TemporaryDirectory() as tmp:
        for name, kw in VARIANTS.items():
            art = edgeclip.export(model, labels=digit_labels(), out=Path(tmp) / name, **kw)
            saved.update({f"{name}/{k}": v for k, v in outputs(art.path, x).items()})
    np.savez_compressed(out, **saved)
    print(f"wrote {out}: {', '.join(sorted(saved))}")


if __name__ == "__main__":
    main(*sys.argv[1:])
