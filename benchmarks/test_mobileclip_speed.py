"""MobileCLIP-S1 / -S2 image towers (random weights, batch 1, 2 threads): edgeclip's artifacts against
what users do today, every variant interleaved in one run per model.

    python -m pytest benchmarks/test_mobileclip_speed.py -q -p no:cacheprovider --benchmark-only

(~15 minutes on 2 cores, most of it building the variants; `-k S1` runs one model.) The weights are
our random init (`random:MobileCLIP-S1`, seed 0; BatchNorms at their init statistics): latency does
not depend on them, the cosines of quantized variants do (a real checkpoint's activations differ).

- `edgeclip-fp32`, `edgeclip-int8`: `edgeclip.export(model, target="onnx", precision=...)` on ONNX
  Runtime; `edgeclip-openvino-int8`: `edgeclip.export(model, target="openvino", precision="int8")`,
  run by our OpenVINO backend as `Pipeline.load` runs it (the precision its manifest asks for). INT8 is
  the default recipe calibrated on 64 smooth random images (+ 96 captions), accuracy guard on,
  exported with `validate=False` so that whatever our INT8 is gets measured: whether each export's
  own validation passed is reported beside it. "Our INT8" for the goal is the faster of the two
  INT8 artifacts that holds the cosine bound (on an x86 CPU a user deploys the OpenVINO one).
- `plain-fp32`: `torch.onnx.export(..., dynamo=True)` of the tower as loaded (train-time branches),
  ONNX Runtime. `plain-reparam-fp32`: the same after upstream's reparameterization (Apple's README:
  `reparameterize_model`, i.e. every block's `reparameterize()` on a deep copy; it folds the
  multi-branch blocks and leaves the ConvMlp BatchNorms and layer scales, as timm does).
- `dynamic-int8`, `reparam-dynamic-int8`: those two through `onnxruntime.quantization.quantize_dynamic`
  with its defaults.
- `nncf-default`: the reparameterized export read by OpenVINO, `nncf.quantize(model, dataset)` with
  default settings on the same 64 images, compiled for CPU (latency hint, 2 threads) at OpenVINO's
  default inference precision (bf16 on CPUs with bf16); `nncf-f32`: the same model forced to f32.
- `openvino-reparam` (context, not one of the issue's peers): the reparameterized FP32 export on
  OpenVINO at its default precision.

Rounds interleave the variants (alternating order); in each turn a variant runs 1 untimed then 3
timed calls, the turn's median is its time for that round; ratios are medians of per-round ratios.
Cosines: the image embedding vs our FP32 torch reference, minimum over 16 held-out images.
Goal (issue 18): our INT8 <= 0.75x the fastest peer, at image cosine >= 0.995.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
ov = pytest.importorskip("openvino")
nncf = pytest.importorskip("nncf")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _timing import report, summary  # noqa: E402
from synthetic import calibration_data  # noqa: E402

import edgeclip  # noqa: E402
from edgeclip.bench.baselines import plain_export, upstream_reparameterized  # noqa: E402
from edgeclip.bench.timing import Interleaved  # noqa: E402
from edgeclip.runtime.backends.openvino import Backend as OvBackend, precision_name  # noqa: E402
from edgeclip.runtime.backends.ort import Backend as OrtBackend  # noqa: E402
from edgeclip.runtime.preprocess import Preprocessor  # noqa: E402

MODELS = ("random:MobileCLIP-S1", "random:MobileCLIP-S2")
ROUNDS = 15  # x 3 timed calls per turn; the quantize_dynamic graphs (~1 s a call: ConvInteger) set the pace
THREADS = 2
CALIB, HELD, CAPTIONS = 64, 16, 96
GOAL = 0.75        # our INT8 / fastest peer
OURS_INT8 = ("edgeclip-int8", "edgeclip-openvino-int8")
MIN_COSINE = 0.995
PEERS = ("plain-fp32", "plain-reparam-fp32", "dynamic-int8", "reparam-dynamic-int8", "nncf-default", "nncf-f32")
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def _cpu_flags() -> list[str]:
    try:
        have = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return [f for f in CPU_FLAGS if f in have]


def _ort(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _ov(model, precision: str | None = None):
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": str(THREADS)}
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    return ov.Core().compile_model(model, "CPU", config)


class _OvRunner:
    """One compiled OpenVINO model behind the `run(pixels)` the timing and the cosines call."""

    def __init__(self, compiled):
        self.compiled, self.request = compiled, compiled.create_infer_request()
        self.precision = precision_name(compiled.get_property("INFERENCE_PRECISION_HINT"))

    def __call__(self, pixels):
        return np.asarray(self.request.infer([pixels])[self.compiled.output(0)])


def _ours(art):
    """Our artifact's image graph through our ORT backend (with the session settings it asks for)."""
    info = art.manifest["graphs"]["image"]
    b = OrtBackend(art.path / info["file"], threads=THREADS, config=info.get("session_config"))
    return lambda pixels: b.session.run(["image_embeds"], {"pixel_values": pixels})[0]


def _plain(root: Path, model) -> dict:
    """The ONNX files users make today: {name: path}."""
    from onnxruntime.quantization import quantize_dynamic

    folded, changed = upstream_reparameterized(model)
    assert changed == ["image"], "an MCi tower has train-time branches to fold"
    files = {"plain-fp32": root / "plain.onnx", "plain-reparam-fp32": root / "plain-reparam.onnx",
             "dynamic-int8": root / "dynamic.onnx", "reparam-dynamic-int8": root / "reparam-dynamic.onnx"}
    plain_export(model, "image", files["plain-fp32"])
    plain_export(folded, "image", files["plain-reparam-fp32"])
    quantize_dynamic(str(files["plain-fp32"]), str(files["dynamic-int8"]))
    quantize_dynamic(str(files["plain-reparam-fp32"]), str(files["reparam-dynamic-int8"]))
    return files


def _nncf(root: Path, reparam_onnx: Path, calib_pixels: list) -> tuple:
    """NNCF with default settings on the reparameterized export; (quantized model, its .xml, FP32 model)."""
    fp32 = ov.Core().read_model(str(reparam_onnx))
    nncf.set_log_level(logging.ERROR)
    q = nncf.quantize(ov.Core().read_model(str(reparam_onnx)), nncf.Dataset(calib_pixels), subset_size=len(calib_pixels))
    ov.save_model(q, str(root / "nncf.xml"), compress_to_fp16=False)  # its size on disk, as a user ships it
    return q, root / "nncf.xml", fp32


def _size(path: Path) -> int:
    path = Path(path)
    return path.stat().st_size + (path.with_suffix(".bin").stat().st_size if path.suffix == ".xml" else 0)


@pytest.fixture(scope="module", params=MODELS, ids=lambda uri: uri.split("-")[-1])
def variants(request, tmp_path_factory):
    uri = request.param
    root = tmp_path_factory.mktemp("mobileclip-speed")
    model = edgeclip.load_model(uri, seed=0)
    size = model.spec.vision.image_size
    calib, held, caps = calibration_data(root, size, images=CALIB, held=HELD, caps=CAPTIONS)
    prep = Preprocessor.from_config(model.spec.preprocess_config())
    fp32 = edgeclip.export(model, precision="fp32", out=root / "fp32")
    int8 = edgeclip.export(model, precision="int8", calib=calib, calib_captions=caps, validate=False,
                           out=root / "int8")
    ov_int8 = edgeclip.export(model, target="openvino", precision="int8", calib=calib, calib_captions=caps,
                              validate=False, out=root / "ov-int8")
    files = _plain(root, model)
    calib_pixels = [prep([str(f)]) for f in sorted(Path(calib).rglob("*.png"))]
    q, q_xml, reparam_ov = _nncf(root, files["plain-reparam-fp32"], calib_pixels)
    ov_info = ov_int8.manifest["graphs"]["image"]
    runners = {"edgeclip-fp32": _ours(fp32), "edgeclip-int8": _ours(int8),
               "edgeclip-openvino-int8": _OvRunner(OvBackend(ov_int8.path / "image.xml", threads=THREADS,
                                                             config=ov_info.get("ov_config")).compiled)}
    runners.update({name: (lambda x, s=_ort(p): s.run(["image_embeds"], {"pixel_values": x})[0])
                    for name, p in files.items()})
    runners.update({"nncf-default": _OvRunner(_ov(q)), "nncf-f32": _OvRunner(_ov(q, "f32")),
                    "openvino-reparam": _OvRunner(_ov(reparam_ov))})
    sizes = {"edgeclip-fp32": _size(fp32.path / "image.onnx"), "edgeclip-int8": _size(int8.path / "image.onnx"),
             "edgeclip-openvino-int8": _size(ov_int8.path / "image.xml"),
             **{name: _size(p) for name, p in files.items()}, "nncf-default": _size(q_xml), "nncf-f32": _size(q_xml)}
    pixels = prep([str(p) for p in held])
    with torch.no_grad():
        ref = model.encode_image(torch.from_numpy(pixels)).numpy()
    return uri, runners, sizes, pixels, ref, {"edgeclip-int8": int8.manifest, "edgeclip-openvino-int8": ov_int8.manifest}


def _min_cos(y, ref) -> float:
    y, ref = np.asarray(y, np.float64), ref.astype(np.float64)
    return float(np.min((y * ref).sum(1) / np.linalg.norm(y, axis=1) / np.linalg.norm(ref, axis=1)))


def _lines(stats, cosines, sizes, ratios, precisions) -> list[str]:
    out = []
    for name, s in stats.items():
        ran = f"  ran as {precisions[name]}" if name in precisions else ""
        size = f"{sizes[name] / 2**20:6.1f} MiB" if name in sizes else "   (n/a)  "
        out.append(f"  {name:<21} {s['median_ms']:7.2f} ms ({1e3 / s['median_ms']:6.1f} img/s; p10 {s['p10_ms']:.2f}, "
                   f"p90 {s['p90_ms']:.2f})  {size}  min cosine {cosines[name]:.5f}  "
                   f"ours/this {ratios[name]:.3f}{ran}")
    return out


def _int8_line(name: str, manifest: dict) -> str:
    q, valid = manifest["quantization"]["graphs"]["image"], manifest["fidelity"]["image_embeds"]
    speed = q.get("float_for_speed", {}).get("layers", 0)
    return (f"  {name}: {q.get('int8_conv_layers', 0)} conv + {q.get('int8_matmul_layers', '?')} matmul layers int8, "
            f"{len(q.get('float_layers', []))} returned to float by the guard"
            + (f", {speed} grouped convs float for speed" if speed else "")
            + f"; export validation {'passed' if valid['ok'] else 'FAILED'} (min cosine {valid['min_cosine']:.5f}, "
            f"bound {valid['min_cosine_bound']})")


def test_mobileclip_image_tower_side_by_side(benchmark, variants, request):
    uri, runners, sizes, pixels, ref, manifests = variants
    cosines = {name: _min_cos(r(pixels), ref) for name, r in runners.items()}
    precisions = {name: r.precision for name, r in runners.items() if isinstance(r, _OvRunner)}
    one = np.ascontiguousarray(pixels[:1])
    timer = Interleaved({name: (lambda r=r: r(one)) for name, r in runners.items()}, block=3, warm=1).warmup(1)
    benchmark.group = f"{uri} image tower (interleaved)"
    benchmark.pedantic(timer.round, rounds=ROUNDS, iterations=1)

    stats = summary(timer)
    fastest = min(PEERS, key=lambda n: stats[n]["median_ms"])
    accurate = [n for n in PEERS if cosines[n] >= MIN_COSINE]
    fastest_accurate = min(accurate, key=lambda n: stats[n]["median_ms"]) if accurate else None
    ours_ok = [n for n in OURS_INT8 if cosines[n] >= MIN_COSINE] or list(OURS_INT8)
    ours = min(ours_ok, key=lambda n: timer.paired_ratio(n, fastest))
    ratios = {name: timer.paired_ratio(ours, name) for name in runners}  # < 1: ours is faster
    vs_fastest = ratios[fastest]
    met = vs_fastest <= GOAL and cosines[ours] >= MIN_COSINE
    lines = [f"{uri} image tower, batch 1, {THREADS} threads, CPU flags {' '.join(_cpu_flags()) or '?'}:"]
    lines += _lines(stats, cosines, sizes, ratios, precisions)
    lines += [f"  our INT8 = {ours}; {ours} / fastest peer ({fastest}) = {vs_fastest:.3f}  (goal <= {GOAL} at "
              f"cosine >= {MIN_COSINE}: {'met' if met else 'NOT met'})",
              f"  {ours} / fastest peer with cosine >= {MIN_COSINE} ({fastest_accurate}) = "
              f"{ratios[fastest_accurate]:.3f}" if fastest_accurate else "  no peer reaches the cosine bound",
              *(f"  {n} / fastest peer ({fastest}) = {timer.paired_ratio(n, fastest):.3f}" for n in OURS_INT8),
              f"  edgeclip-fp32 / plain-reparam-fp32 = {timer.paired_ratio('edgeclip-fp32', 'plain-reparam-fp32'):.3f}; "
              f"edgeclip-int8 / edgeclip-fp32 = {timer.paired_ratio('edgeclip-int8', 'edgeclip-fp32'):.3f}",
              *(_int8_line(n, manifests[n]) for n in OURS_INT8)]
    benchmark.extra_info.update(int8_vs_fastest_peer=vs_fastest, fastest_peer=fastest, ours=ours,
                                medians_ms={k: v["median_ms"] for k, v in stats.items()}, min_cosine=cosines)
    report(request.config, "mobileclip_speed", {
        "model": f"{uri} (random init, seed 0) image tower, batch 1", "threads": THREADS, "rounds": ROUNDS,
        "method": "interleaved rounds; per turn 1 untimed + 3 timed calls (median); ratios = median of "
                  "per-round ratios", "cpu_flags": _cpu_flags(),
        "timings": stats, "min_cosine": cosines, "bytes": sizes, "openvino_precision": precisions,
        "ours": ours, "ours_over": ratios, "fastest_peer": fastest, "fastest_peer_at_cosine": fastest_accurate,
        "ours_vs_fastest_peer": vs_fastest,
        "vs_fastest_peer": {n: timer.paired_ratio(n, fastest) for n in OURS_INT8},
        "goal": GOAL, "min_cosine_goal": MIN_COSINE, "meets_goal": met,
        "int8_export_validation": {n: manifests[n]["fidelity"]["image_embeds"] for n in OURS_INT8},
        "int8_layers": {n: {k: manifests[n]["quantization"]["graphs"]["image"].get(k) for k in
                            ("int8_conv_layers", "int8_matmul_layers", "float_layers", "float_for_speed",
                             "inference_precision")} for n in OURS_INT8},
    }, lines, key=uri)

    assert cosines["edgeclip-fp32"] >= 0.99999 and cosines["plain-reparam-fp32"] >= 0.99999, cosines
    assert cosines[ours] >= MIN_COSINE, f"{ours} min cosine {cosines[ours]:.5f}"
    assert vs_fastest <= GOAL, f"{ours} / {fastest} = {vs_fastest:.3f} (goal <= {GOAL})"
