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

After the rounds it times one bare GEMM of the tower's shape (50 x 768 x 3072), INT8 (ONNX Runtime's
U8S8 kernel) vs FP32: the floor for the whole tower's ratio, since quantization shrinks only the
GEMMs. On AVX2 CPUs without VNNI the INT8 kernel's peak is exactly 2x the FP32 FMA peak, so that
floor is ~0.5 and the 0.5 goal cannot hold for a whole tower there; the test then asserts the tower at
<= 0.56 and reports the goal as not met. With VNNI (or AVX-512 VNNI)
the 0.5 goal is asserted as is.
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _timing import report, summary  # noqa: E402
from synthetic import calibration_data  # noqa: E402

import edgeclip  # noqa: E402
from edgeclip.bench.baselines import plain_export  # noqa: E402
from edgeclip.bench.timing import Interleaved  # noqa: E402
from edgeclip.runtime.preprocess import Preprocessor  # noqa: E402

ROUNDS = 30
THREADS = 2
GOAL_VS_FP32 = 0.5
GOAL_VS_DYNAMIC = 1.0
AVX2_BOUND = 0.56  # without VNNI: INT8 GEMM peak = 2x FP32 FMA peak, so ~0.5 is the floor, not reachable


def _session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    from onnxruntime.quantization import quantize_dynamic

    root = tmp_path_factory.mktemp("int8-speed")
    model = edgeclip.load_model("random:ViT-B-32", seed=0)
    calib, held, caps = calibration_data(root, 224, images=48, held=8, caps=96)
    fp32 = edgeclip.export(model, precision="fp32", out=root / "fp32")
    int8 = edgeclip.export(model, precision="int8", calib=calib, calib_captions=caps, out=root / "int8")
    plain_export(model, "image", root / "plain.onnx")
    quantize_dynamic(str(root / "plain.onnx"), str(root / "dynamic.onnx"))
    paths = {"edgeclip-fp32": fp32.path / "image.onnx", "edgeclip-int8": int8.path / "image.onnx",
             "plain-fp32": root / "plain.onnx", "ort-dynamic": root / "dynamic.onnx"}
    pixels = Preprocessor.from_config(model.spec.preprocess_config())([str(p) for p in held])
    with torch.no_grad():
        ref = model.encode_image(torch.from_numpy(pixels)).numpy()
    return {name: _session(p) for name, p in paths.items()}, paths, pixels, ref, int8.manifest


def _gemm_pair(m=50, k=768, n=3072):
    """ONNX Runtime sessions for one INT8 (QuantizeLinear + MatMulIntegerToFloat) and one FP32 GEMM."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = (rng.normal(size=(k, n)) * 0.02).astype(np.float32)
    scale = (np.abs(w).max(0) / 127).astype(np.float32)
    q = np.round(w / scale).astype(np.int8)
    x_info = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])]
    y_info = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    ops = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    int8 = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
         helper.make_node("MatMulIntegerToFloat", ["xq", "wq", "xs", "ws", "xz", "wz"], ["y"], domain="com.microsoft")],
        "int8", x_info, y_info,
        [numpy_helper.from_array(q, "wq"), numpy_helper.from_array(scale, "ws"),
         numpy_helper.from_array(np.zeros(n, np.int8), "wz"), numpy_helper.from_array(np.array(0.05, np.float32), "xs"),
         numpy_helper.from_array(np.array(128, np.uint8), "xz")])
    fp32 = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "fp32", x_info, y_info,
                             [numpy_helper.from_array(w, "w")])
    feeds = {"x": rng.normal(size=(m, k)).astype(np.float32)}
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    sessions = {name: ort.InferenceSession(helper.make_model(g, opset_imports=ops).SerializeToString(), so,
                                           providers=["CPUExecutionProvider"]) for name, g in (("int8", int8), ("fp32", fp32))}
    return sessions, feeds


def _has_vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def _min_cos(y, ref) -> float:
    y, ref = y.astype(np.float64), ref.astype(np.float64)
    return float(np.min((y * ref).sum(1) / np.linalg.norm(y, axis=1) / np.linalg.norm(ref, axis=1)))


def test_int8_image_tower_side_by_side(benchmark, variants, request):
    sessions, paths, pixels, ref, manifest = variants
    cosines = {name: _min_cos(s.run(["image_embeds"], {"pixel_values": pixels})[0], ref)
               for name, s in sessions.items()}
    one = {"pixel_values": pixels[:1]}
    fns = {name: (lambda s=s: s.run(["image_embeds"], one)) for name, s in sessions.items()}
    timer = Interleaved(fns, block=5, warm=2).warmup(2)
    benchmark.group = "int8 image tower (interleaved)"
    benchmark.pedantic(timer.round, rounds=ROUNDS, iterations=1)

    vs_fp32 = timer.paired_ratio("edgeclip-int8", "edgeclip-fp32")
    vs_dynamic = timer.paired_ratio("edgeclip-int8", "ort-dynamic")
    # The floor, timed after the towers (alone: small GEMMs interleaved with big sessions are distorted
    # by the latter's spinning threads): 10 GEMMs per call, 5 calls per turn.
    gemm, gemm_feeds = _gemm_pair()
    floor = Interleaved({name: (lambda s=s: [s.run(None, gemm_feeds) for _ in range(10)]) for name, s in gemm.items()},
                        block=5, warm=3).run(0, min_rounds=10, warmup_rounds=2)  # 2 warm-up + 10 rounds
    gemm_floor = floor.paired_ratio("int8", "fp32")
    vnni = _has_vnni()
    stats = summary(timer)
    gemm_ms = {name: v["median_ms"] / 10 for name, v in summary(floor).items()}
    sizes = {name: Path(p).stat().st_size for name, p in paths.items()}
    lines = [f"  {name:<14} {stats[name]['median_ms']:7.2f} ms  (p10 {stats[name]['p10_ms']:.2f}, "
             f"p90 {stats[name]['p90_ms']:.2f})  min cosine {cosines[name]:.5f}  {sizes[name] / 2**20:6.1f} MiB"
             for name in sessions]
    lines += [f"  bare GEMM 50x768x3072: int8 {gemm_ms['int8']:.3f} ms, fp32 {gemm_ms['fp32']:.3f} ms, "
              f"ratio {gemm_floor:.3f} (the floor for the tower; CPU has VNNI: {vnni})",
              f"  edgeclip-int8 / edgeclip-fp32 = {vs_fp32:.3f}  (goal <= {GOAL_VS_FP32}: "
              f"{'met' if vs_fp32 <= GOAL_VS_FP32 else 'NOT met'})",
              f"  edgeclip-int8 / ort-dynamic   = {vs_dynamic:.3f}  (goal <= {GOAL_VS_DYNAMIC})",
              f"  edgeclip-fp32 / plain-fp32    = {timer.paired_ratio('edgeclip-fp32', 'plain-fp32'):.3f}"]
    benchmark.extra_info.update(int8_vs_fp32=vs_fp32, int8_vs_dynamic=vs_dynamic,
                                medians_ms={k: v["median_ms"] for k, v in stats.items()}, min_cosine=cosines)
    report(request.config, "int8_speed", {
        "model": "random:ViT-B-32 image tower, batch 1", "threads": THREADS, "rounds": ROUNDS,
        "method": "interleaved rounds; per turn 2 untimed + 5 timed calls (median); ratios = median of "
                  "per-round ratios",
        "timings": stats, "min_cosine": cosines, "bytes": sizes,
        "int8_vs_fp32": vs_fp32, "int8_vs_dynamic": vs_dynamic, "gemm_int8_vs_fp32": gemm_floor,
        "gemm_ms": gemm_ms, "cpu_vnni": vnni, "meets_goal_vs_fp32": vs_fp32 <= GOAL_VS_FP32,
        "goals": {"int8_vs_fp32": GOAL_VS_FP32, "int8_vs_dynamic": GOAL_VS_DYNAMIC},
        "recipe": manifest["quantization"]["recipe"],
        "float_layers": manifest["quantization"]["graphs"]["image"]["float_layers"],
    }, ["int8 image tower, ViT-B-32, batch 1, 2 threads:"] + lines)

    assert cosines["edgeclip-int8"] >= 0.995
    if vnni:
        assert vs_fp32 <= GOAL_VS_FP32, f"INT8/FP32 = {vs_fp32:.3f} (goal {GOAL_VS_FP32})"
    else:  # the INT8 GEMM itself is only ~2x FP32 here (floor ~0.5): hold the tower near that floor
        assert vs_fp32 <= AVX2_BOUND, f"INT8/FP32 = {vs_fp32:.3f} (bare GEMM {gemm_floor:.3f}, bound {AVX2_BOUND})"
    assert vs_dynamic <= GOAL_VS_DYNAMIC, f"INT8/ORT dynamic = {vs_dynamic:.3f}"
    assert statistics.median(timer.turns["edgeclip-int8"]) > 0
