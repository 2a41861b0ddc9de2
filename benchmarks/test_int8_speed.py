"""INT8 speed: the ViT-B-32 image tower (random weights, batch 1), four ways, side by side in one run.

    python -m pytest benchmarks/test_int8_speed.py -q -p no:cacheprovider --benchmark-only

(~4 minutes on 2 cores; `make bench` runs every benchmark file the same way.)

- `edgeclip-fp32`: our FP32 artifact (`edgeclip.export(..., precision="fp32")`).
- `edgeclip-int8`: our INT8 artifact, default recipe (`int8`: static, per-channel, calibrated on 48
  synthetic photos-like images, accuracy guard on), as `edgeclip export --precision int8` writes it.
- `plain-fp32`: what a user gets from a plain `torch.onnx.export` of the same tower.
- `ort-dynamic`: that plain export quantized with ONNX Runtime's `quantize_dynamic` defaults.

All run through ONNX Runtime with 2 intra-op threads (this machine's cores). Rounds interleave the
variants (alternating order); in each turn a variant runs 2 untimed calls then 5 timed calls, and
the turn's median is its time for that round. Ratios are medians over rounds of the per-round ratio.
Goals (issue 4): INT8 <= 0.5x our FP32, and at least as fast as `ort-dynamic` (ratio <= 1.0).
Cosines to the torch FP32 reference on 8 held-out images are reported next to the times.
"""
from __future__ import annotations

import contextlib
import io
import logging
import statistics
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _timing import Interleaved, report  # noqa: E402
from synthetic import captions, write_images  # noqa: E402

import edgeclip  # noqa: E402
from edgeclip.export.graphs import ImageGraph  # noqa: E402
from edgeclip.runtime.preprocess import Preprocessor  # noqa: E402

ROUNDS = 30
THREADS = 2
GOAL_VS_FP32 = 0.5
GOAL_VS_DYNAMIC = 1.0


def _session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _plain_export(model, path):
    """The standard recipe: torch.onnx.export of the unmodified tower, nothing else."""
    import copy

    quiet = logging.getLogger("torch.onnx")
    quiet.setLevel(logging.ERROR)
    graph = ImageGraph(copy.deepcopy(model).eval())
    x = torch.randn(1, 3, 224, 224)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, (x,), str(path), input_names=["pixel_values"], output_names=["image_embeds"],
                          dynamo=True, external_data=False, optimize=True,
                          dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch", min=1, max=64)}})


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    from onnxruntime.quantization import quantize_dynamic

    root = tmp_path_factory.mktemp("int8-speed")
    model = edgeclip.load_model("random:ViT-B-32", seed=0)
    write_images(root / "calib", 48, 224, seed=0)
    held = write_images(root / "held", 8, 224, seed=1)
    (root / "caps.txt").write_text("\n".join(captions(96, 0)))
    fp32 = edgeclip.export(model, precision="fp32", out=root / "fp32")
    int8 = edgeclip.export(model, precision="int8", calib=root / "calib", calib_captions=root / "caps.txt",
                           out=root / "int8")
    _plain_export(model, root / "plain.onnx")
    quantize_dynamic(str(root / "plain.onnx"), str(root / "dynamic.onnx"))
    paths = {"edgeclip-fp32": fp32.path / "image.onnx", "edgeclip-int8": int8.path / "image.onnx",
             "plain-fp32": root / "plain.onnx", "ort-dynamic": root / "dynamic.onnx"}
    pixels = Preprocessor.from_config(model.spec.preprocess_config())([str(p) for p in held])
    with torch.no_grad():
        ref = model.encode_image(torch.from_numpy(pixels)).numpy()
    return {name: _session(p) for name, p in paths.items()}, paths, pixels, ref, int8.manifest


def _min_cos(y, ref) -> float:
    y, ref = y.astype(np.float64), ref.astype(np.float64)
    return float(np.min((y * ref).sum(1) / np.linalg.norm(y, axis=1) / np.linalg.norm(ref, axis=1)))


def test_int8_image_tower_side_by_side(benchmark, variants, request):
    sessions, paths, pixels, ref, manifest = variants
    cosines = {name: _min_cos(s.run(["image_embeds"], {"pixel_values": pixels})[0], ref)
               for name, s in sessions.items()}
    one = {"pixel_values": pixels[:1]}
    timer = Interleaved({name: (lambda s=s: s.run(["image_embeds"], one)) for name, s in sessions.items()},
                        block=5, warm=2).warmup(2)
    benchmark.group = "int8 image tower (interleaved)"
    benchmark.pedantic(timer.round, rounds=ROUNDS, iterations=1)

    vs_fp32 = timer.paired_ratio("edgeclip-int8", "edgeclip-fp32")
    vs_dynamic = timer.paired_ratio("edgeclip-int8", "ort-dynamic")
    stats = timer.summary()
    sizes = {name: Path(p).stat().st_size for name, p in paths.items()}
    lines = [f"  {name:<14} {stats[name]['median_ms']:7.2f} ms  (p10 {stats[name]['p10_ms']:.2f}, "
             f"p90 {stats[name]['p90_ms']:.2f})  min cosine {cosines[name]:.5f}  {sizes[name] / 2**20:6.1f} MiB"
             for name in sessions]
    lines += [f"  edgeclip-int8 / edgeclip-fp32 = {vs_fp32:.3f}  (goal <= {GOAL_VS_FP32})",
              f"  edgeclip-int8 / ort-dynamic   = {vs_dynamic:.3f}  (goal <= {GOAL_VS_DYNAMIC})",
              f"  edgeclip-fp32 / plain-fp32    = {timer.paired_ratio('edgeclip-fp32', 'plain-fp32'):.3f}"]
    benchmark.extra_info.update(int8_vs_fp32=vs_fp32, int8_vs_dynamic=vs_dynamic,
                                medians_ms={k: v["median_ms"] for k, v in stats.items()}, min_cosine=cosines)
    report(request.config, "int8_speed", {
        "model": "random:ViT-B-32 image tower, batch 1", "threads": THREADS, "rounds": ROUNDS,
        "method": "interleaved rounds; per turn 2 untimed + 5 timed calls (median); ratios = median of "
                  "per-round ratios",
        "timings": stats, "min_cosine": cosines, "bytes": sizes,
        "int8_vs_fp32": vs_fp32, "int8_vs_dynamic": vs_dynamic,
        "goals": {"int8_vs_fp32": GOAL_VS_FP32, "int8_vs_dynamic": GOAL_VS_DYNAMIC},
        "recipe": manifest["quantization"]["recipe"],
        "float_layers": manifest["quantization"]["graphs"]["image"]["float_layers"],
    }, ["int8 image tower, ViT-B-32, batch 1, 2 threads:"] + lines)

    assert cosines["edgeclip-int8"] >= 0.995
    assert vs_fp32 <= GOAL_VS_FP32, f"INT8/FP32 = {vs_fp32:.3f} (goal {GOAL_VS_FP32})"
    assert vs_dynamic <= GOAL_VS_DYNAMIC, f"INT8/ORT dynamic = {vs_dynamic:.3f}"
    assert statistics.median(timer.times["edgeclip-int8"]) > 0
