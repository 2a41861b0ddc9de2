"""OpenVINO INT8: edgeclip's artifact vs OpenVINO + NNCF defaults, side by side in one run.

    python -m pytest benchmarks/test_openvino_speed.py -q -p no:cacheprovider --benchmark-only

(~4 minutes on 2 cores.) Same random-weight ViT-B-32 image tower, batch 1, 2 threads, every
variant compiled for CPU with the latency hint and OpenVINO's default inference precision:

- `edgeclip-int8`: `edgeclip export --target openvino --precision int8` (default recipe, calibrated on
  48 synthetic photo-like images, accuracy guard on), run through our `openvino` backend.
- `nncf-default`: what a user gets from the standard recipe: a plain `torch.onnx.export` of the same
  tower, read by OpenVINO, `nncf.quantize(model, dataset, model_type=TRANSFORMER)` on the same
  calibration images.
- `edgeclip-fp32` and `plain-fp32` (the plain export, compiled as is), for context.

Rounds interleave the variants (alternating order); in each turn a variant runs 2 untimed then 5
timed calls, the turn's median is its time for that round; ratios are medians of per-round ratios.
Goal (issue 6): edgeclip-int8 at least as fast as nncf-default (nncf/edgeclip >= 1.0) at equal or
better min cosine to the torch FP32 reference on 8 held-out images.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ov = pytest.importorskip("openvino")
nncf = pytest.importorskip("nncf")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _timing import report, summary  # noqa: E402
from synthetic import calibration_data  # noqa: E402

import edgeclip  # noqa: E402
from edgeclip.bench.baselines import plain_export  # noqa: E402
from edgeclip.bench.timing import Interleaved  # noqa: E402
from edgeclip.runtime.backends.openvino import Backend, precision_name  # noqa: E402
from edgeclip.runtime.preprocess import Preprocessor  # noqa: E402

ROUNDS = 30
THREADS = 2
GOAL = 1.0  # nncf-default time / edgeclip-int8 time


def _compile(model):
    core = ov.Core()
    return core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": str(THREADS)})


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    root = tmp_path_factory.mktemp("openvino-speed")
    model = edgeclip.load_model("random:ViT-B-32", seed=0)
    calib, held, caps = calibration_data(root, 224, images=48, held=8, caps=96)
    prep = Preprocessor.from_config(model.spec.preprocess_config())
    int8 = edgeclip.export(model, target="openvino", precision="int8", calib=calib, calib_captions=caps,
                           out=root / "int8")
    fp32 = edgeclip.export(model, target="openvino", precision="fp32", out=root / "fp32")
    plain_export(model, "image", root / "plain.onnx")
    plain = ov.Core().read_model(str(root / "plain.onnx"))
    files = sorted(p for p in Path(calib).rglob("*.png"))
    items = [prep([str(f)]) for f in files]  # the same images, preprocessed the same way
    nncf.set_log_level(logging.ERROR)
    default = nncf.quantize(plain, nncf.Dataset(items), model_type=nncf.ModelType.TRANSFORMER,
                            subset_size=len(items))
    compiled = {
        "edgeclip-int8": Backend(int8.path / "image.xml", threads=THREADS).compiled,
        "nncf-default": _compile(default),
        "edgeclip-fp32": Backend(fp32.path / "image.xml", threads=THREADS).compiled,
        "plain-fp32": _compile(ov.Core().read_model(str(root / "plain.onnx"))),
    }
    pixels = prep([str(p) for p in held])
    with torch.no_grad():
        ref = model.encode_image(torch.from_numpy(pixels)).numpy()
    return compiled, pixels, ref, int8.manifest


def _min_cos(y, ref) -> float:
    y, ref = y.astype(np.float64), ref.astype(np.float64)
    return float(np.min((y * ref).sum(1) / np.linalg.norm(y, axis=1) / np.linalg.norm(ref, axis=1)))


def test_openvino_int8_vs_nncf_defaults(benchmark, variants, request):
    compiled, pixels, ref, manifest = variants
    cosines = {name: _min_cos(np.asarray(c.create_infer_request().infer([pixels])[c.output(0)]), ref)
               for name, c in compiled.items()}
    precisions = {name: precision_name(c.get_property("INFERENCE_PRECISION_HINT")) for name, c in compiled.items()}
    requests = {name: c.create_infer_request() for name, c in compiled.items()}
    one = pixels[:1]
    fns = {name: (lambda r=r: r.infer([one])) for name, r in requests.items()}
    timer = Interleaved(fns, block=5, warm=2).warmup(2)
    benchmark.group = "openvino int8 image tower (interleaved)"
    benchmark.pedantic(timer.round, rounds=ROUNDS, iterations=1)

    speedup = timer.paired_ratio("nncf-default", "edgeclip-int8")
    stats = summary(timer)
    lines = [f"  {name:<14} {stats[name]['median_ms']:7.2f} ms  (p10 {stats[name]['p10_ms']:.2f}, "
             f"p90 {stats[name]['p90_ms']:.2f})  min cosine {cosines[name]:.5f}  ran as {precisions[name]}"
             for name in compiled]
    lines += [f"  nncf-default / edgeclip-int8 = {speedup:.3f}  (goal >= {GOAL})",
              f"  edgeclip-int8 / edgeclip-fp32 = {timer.paired_ratio('edgeclip-int8', 'edgeclip-fp32'):.3f}",
              f"  edgeclip-fp32 / plain-fp32    = {timer.paired_ratio('edgeclip-fp32', 'plain-fp32'):.3f}"]
    image = manifest["quantization"]["graphs"]["image"]
    report(request.config, "openvino_speed", {
        "model": "random:ViT-B-32 image tower, batch 1", "threads": THREADS, "rounds": ROUNDS,
        "method": "interleaved rounds; per turn 2 untimed + 5 timed calls (median); ratios = median of "
                  "per-round ratios",
        "timings": stats, "min_cosine": cosines, "inference_precision": precisions,
        "nncf_default_over_edgeclip_int8": speedup, "goal": GOAL,
        "float_layers": image["float_layers"], "int8_layers": image["int8_layers"],
    }, ["OpenVINO INT8 image tower, ViT-B-32, batch 1, 2 threads:"] + lines)

    assert cosines["edgeclip-int8"] >= cosines["nncf-default"], cosines
    assert speedup >= GOAL, f"nncf-default / edgeclip-int8 = {speedup:.3f} (goal >= {GOAL})"
