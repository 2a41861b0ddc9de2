"""The runtime paths we promise to keep fast, one pytest-benchmark each (medians, IQR, ops/s):

- image tower and text tower through `Pipeline` (`encode_image` on preprocessed pixels, `encode_text`
  on token ids), batch 1, per precision: FP32 and INT8 ONNX artifacts of `builtin:tiny` and of a
  random-weight ViT-B-32 (INT8 calibrated on 48 synthetic photo-like images and 96 captions);
- the CLIP tokenizer (32 captions), and preprocessing (one 640x480 photo to 224 px, and a batch of 8).

    python -m pytest benchmarks/test_runtime_paths.py -q -p no:cacheprovider --benchmark-only

(`make bench` runs every benchmark file; ~3 minutes for this one on 2 cores, most of it exporting
ViT-B-32 twice.) Artifacts run with the backend's default threads (the machine's cores); compare
figures across commits on the same machine with `--benchmark-autosave` / `--benchmark-compare`.
For ratios between variants, use `edgeclip bench` (interleaved) or the side-by-side files here.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _timing import export_once, machine  # noqa: E402
from synthetic import calibration_data, captions, write_images  # noqa: E402

from edgeclip.runtime import Pipeline, tokenize  # noqa: E402
from edgeclip.runtime.preprocess import Preprocessor  # noqa: E402

MODELS = {"tiny": "builtin:tiny", "vitb32": "random:ViT-B-32"}
CASES = [(m, p) for m in MODELS for p in ("fp32", "int8")]
PROMPT = "a photo of a small dog"


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    folder, _, caps = calibration_data(tmp_path_factory.mktemp("runtime-paths-calib"), 224, images=48, held=8,
                                       caps=96)
    return {"calib": str(folder), "calib_captions": str(caps)}


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory, calib):
    cache: dict = {}

    def get(model: str, precision: str) -> Pipeline:
        if (model, precision) not in cache:
            opts = dict(calib) if precision == "int8" and model != "tiny" else {}  # tiny ships its own set
            path = export_once(tmp_path_factory, MODELS[model], precision=precision, **opts)
            cache[model, precision] = Pipeline.load(path)
        return cache[model, precision]

    return get


def _info(benchmark, pipe: Pipeline, graph: str) -> None:
    benchmark.extra_info.update(model=pipe.manifest["model"]["name"], precision=pipe.manifest["precision"],
                                backend=pipe.backend_name, cpus=os.cpu_count(), machine=machine(),
                                ran_as=pipe.info().get(graph, {}).get("inference_precision"))


@pytest.mark.parametrize("model,precision", CASES, ids=[f"{m}-{p}" for m, p in CASES])
def test_image_tower(benchmark, pipelines, model, precision):
    pipe = pipelines(model, precision)
    s = pipe.preprocessor.output_size
    pixels = np.random.default_rng(0).normal(size=(1, 3, *s)).astype(np.float32)
    benchmark.group = f"image tower, batch 1 ({model})"
    out = benchmark(pipe.encode_image, pixels)
    assert out.shape == (1, pipe.embed_dim)
    _info(benchmark, pipe, "image")


@pytest.mark.parametrize("model,precision", CASES, ids=[f"{m}-{p}" for m, p in CASES])
def test_text_tower(benchmark, pipelines, model, precision):
    pipe = pipelines(model, precision)
    ids = pipe.tokenize([PROMPT])
    benchmark.group = f"text tower, batch 1 ({model})"
    out = benchmark(pipe.encode_text, ids)
    assert out.shape == (1, pipe.embed_dim)
    _info(benchmark, pipe, "text")


def test_tokenizer(benchmark):
    texts = captions(32, seed=3)
    tokenize(texts)  # loads the BPE vocabulary once, outside the timing
    benchmark.group = "tokenizer"
    ids = benchmark(tokenize, texts)
    assert ids.shape == (32, 77)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from PIL import Image

    small = write_images(tmp_path_factory.mktemp("photos"), 8, 160, seed=5)
    return [Image.open(p).convert("RGB").resize((640, 480), Image.BILINEAR) for p in small]


@pytest.mark.parametrize("batch", [1, 8])
def test_preprocessing(benchmark, photos, batch):
    prep = Preprocessor(224)  # CLIP's: shortest edge to 224 (bicubic), centre crop, normalize
    benchmark.group = "preprocessing (640x480 -> 224)"
    out = benchmark(prep, photos[:batch])
    assert out.shape == (batch, 3, 224, 224) and out.dtype == np.float32
