#!/usr/bin/env python
"""Artifact sizes next to fidelity, ONNX target, for the README's size table.

    python scripts/size_table.py builtin:tiny random:ViT-B-32 random:MobileCLIP-S1 [--out DIR]

Per model: our FP32, FP16, INT8 (default recipe), w4a16 and w4a8 artifacts (the 4-bit ones with the
guard at cosine drop 0.01), and the peers: a plain `torch.onnx.export` of each tower (FP32) and that
export through ONNX Runtime's `quantize_dynamic` defaults. Bytes are the two graph files (the
tokenizer vocabulary, 1.4 MB, is left out everywhere). Cosine: the minimum over held-out images
and captions against our FP32 torch model (builtin:tiny: 40 of its held-out digits and its own
calibration captions; random models: 12 synthetic photo-like images and 16 captions, with 48 images
and 96 captions to calibrate). Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for p in (REPO / "src", REPO / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

FOUR_BIT_DROP = 0.01


def _cos(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(((a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)).min())


def rows_for(uri: str, root: Path) -> list[dict]:
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import quantize_dynamic

    import edgeclip
    from edgeclip import builtin
    from edgeclip.bench.baselines import plain_export
    from edgeclip.runtime.pipeline import Pipeline
    from edgeclip.runtime.preprocess import Preprocessor
    from synthetic import calibration_data, captions

    model = edgeclip.load_model(uri, seed=0)
    pre = Preprocessor.from_config(model.spec.preprocess_config())
    if uri == "builtin:tiny":
        held = [str(f) for f in sorted(builtin.heldout_dir().glob("*/*.png"))[::9]]
        texts, q = list(builtin.calib_captions())[:16], {}
    else:
        calib, held_paths, caps = calibration_data(root / "data", model.spec.vision.image_size, 48, 12, 96)
        held, texts, q = [str(p) for p in held_paths], captions(16, 1), {"calib": calib, "calib_captions": caps}
    pixels = pre(held)
    runs = [("fp32", "fp32", {}), ("fp16", "fp16", {}), ("int8", "int8", q),
            ("w4a16", "int8", {**q, "recipe": "w4a16", "max_cosine_drop": FOUR_BIT_DROP}),
            ("w4a8", "int8", {**q, "recipe": "w4a8", "max_cosine_drop": FOUR_BIT_DROP})]
    out, ids = [], None
    for name, precision, kw in runs:
        art = edgeclip.export(model, precision=precision, out=root / name, overwrite=True, **kw)
        pipe = Pipeline.load(art.path)
        ids = pipe.tokenizer(texts, truncate=True) if ids is None else ids
        with torch.no_grad():
            ref = {"image": model.encode_image(torch.from_numpy(pixels)).numpy(),
                   "text": model.encode_text(torch.from_numpy(ids)).numpy()}
        got = {"image": pipe.encode_image(held), "text": pipe.encode_text(texts)}
        sizes = art.manifest["sizes"]
        out.append({"variant": f"edgeclip {name}", "image": sizes["image"]["bytes"], "text": sizes["text"]["bytes"],
                    "cos_image": _cos(got["image"], ref["image"]), "cos_text": _cos(got["text"], ref["text"])})
    for graph in ("image", "text"):
        plain_export(model, graph, root / f"plain-{graph}.onnx")
        quantize_dynamic(str(root / f"plain-{graph}.onnx"), str(root / f"dynamic-{graph}.onnx"))
    feeds = {"image": {"pixel_values": pixels}, "text": {"input_ids": ids}}
    for name, stem in (("plain export fp32", "plain"), ("plain export + quantize_dynamic", "dynamic")):
        row = {"variant": name}
        for graph in ("image", "text"):
            path = root / f"{stem}-{graph}.onnx"
            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            row[graph] = path.stat().st_size
            row[f"cos_{graph}"] = _cos(sess.run(None, feeds[graph])[0], ref[graph])
        out.append(row)
    fp32 = out[0]["image"] + out[0]["text"]
    for r in out:
        r["ratio"] = (r["image"] + r["text"]) / fp32
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--out", help="folder for the artifacts (default: a temporary one)")
    args = ap.parse_args(argv)
    print("| model | variant | image MB | text MB | × FP32 | cosine image / text |")
    print("|---|---|---:|---:|---:|---|")
    for uri in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(args.out) / uri.replace(":", "_") if args.out else Path(tmp)
            for r in rows_for(uri, root):
                print(f"| {uri} | {r['variant']} | {r['image'] / 1e6:.2f} | {r['text'] / 1e6:.2f} | {r['ratio']:.3f} | "
                      f"{r['cos_image']:.4f} / {r['cos_text']:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
