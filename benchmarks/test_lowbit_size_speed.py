"""Size, fidelity and speed of the small recipes: random ViT-B/32 (seed 0), both towers, ONNX.

    python -m pytest benchmarks/test_lowbit_size_speed.py -q -p no:cacheprovider --benchmark-only

(~15 minutes on 2 cores, mostly the guarded 4-bit exports.)

Variants, exported side by side in one run:
- `fp32`: our FP32 artifact.
- `int8`: our default recipe (static INT8, tables and end projections int8 too), 48 synthetic
  calibration images and 96 captions, accuracy guard at its default bound (cosine drop 0.005).
- `w4a16`, `w4a8`: the 4-bit recipes, default block (32), guard bound 0.01 (cosine >= 0.99).
- `plain-dynamic`: a plain `torch.onnx.export` of each tower through ONNX Runtime's
  `quantize_dynamic` with its defaults (the standard recipe for a small ONNX model).

Sizes are the graph files' bytes (the tokenizer vocabulary, 1.4 MB, is left out of every variant).
Cosines: min over 12 held-out images and 16 captions against our FP32 torch model. Latency: batch 1,
2 threads, image and text graphs, every variant interleaved (2 untimed + 5 timed calls per turn, the
turn's median; 20 rounds; medians over rounds). Asserted: the issue's size and cosine goals. Speed is
reported, not asserted: whether 4-bit is faster or slower than int8 on this CPU.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _timing import report, summary  # noqa: E402
from synthetic import calibration_data, captions  # noqa: E402

import edgeclip  # noqa: E402
from edgeclip.bench.baselines import plain_export  # noqa: E402
from edgeclip.bench.timing import Interleaved  # noqa: E402
from edgeclip.runtime.pipeline import Pipeline  # noqa: E402
from edgeclip.runtime.preprocess import Preprocessor  # noqa: E402

ROUNDS = 20
THREADS = 2
FOUR_BIT_DROP = 0.01
GOALS = {"int8": 0.27, "w4a16": 0.16}  # bytes vs the FP32 artifact's


def _min_cos(y, ref) -> float:
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    return float(np.min((y * ref).sum(1) / np.linalg.norm(y, axis=1) / np.linalg.norm(ref, axis=1)))


def _session(path, config=None):
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = THREADS, 1
    for k, v in (config or {}).items():
        so.add_session_config_entry(k, v)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    from onnxruntime.quantization import quantize_dynamic

    root = tmp_path_factory.mktemp("lowbit")
    model = edgeclip.load_model("random:ViT-B-32", seed=0)
    calib, held, caps = calibration_data(root, 224, images=48, held=12, caps=96)
    arts = {"fp32": edgeclip.export(model, precision="fp32", out=root / "fp32")}
    q = {"calib": calib, "calib_captions": caps}
    arts["int8"] = edgeclip.export(model, precision="int8", out=root / "int8", **q)
    for recipe in ("w4a16", "w4a8"):
        arts[recipe] = edgeclip.export(model, precision="int8", recipe=recipe, max_cosine_drop=FOUR_BIT_DROP,
                                       out=root / recipe, **q)
    files = {name: {g: (a.path / a.manifest["graphs"][g]["file"], a.manifest["graphs"][g].get("session_config"))
                    for g in ("image", "text")} for name, a in arts.items()}
    files["plain-dynamic"] = {}
    for g in ("image", "text"):
        plain_export(model, g, root / f"plain-{g}.onnx")
        quantize_dynamic(str(root / f"plain-{g}.onnx"), str(root / f"dynamic-{g}.onnx"))
        files["plain-dynamic"][g] = (root / f"dynamic-{g}.onnx", None)
    pre = Preprocessor.from_config(model.spec.preprocess_config())
    pixels = pre([str(p) for p in held])
    tok = Pipeline.load(arts["fp32"].path).tokenizer
    caption_ids = tok(captions(16, 1), truncate=True)
    with torch.no_grad():
        ref = {"image": model.encode_image(torch.from_numpy(pixels)).numpy(),
               "text": model.encode_text(torch.from_numpy(caption_ids)).numpy()}
    return arts, files, {"image": {"pixel_values": pixels}, "text": {"input_ids": caption_ids}}, ref


def test_lowbit_sizes_cosines_and_speed(benchmark, variants, request):
    arts, files, feeds, ref = variants
    sessions = {name: {g: _session(p, cfg) for g, (p, cfg) in gs.items()} for name, gs in files.items()}
    size = {name: {g: p.stat().st_size for g, (p, _) in gs.items()} for name, gs in files.items()}
    total = {name: sum(s.values()) for name, s in size.items()}
    cos = {name: {g: _min_cos(s.run(None, feeds[g])[0], ref[g]) for g, s in gs.items()}
           for name, gs in sessions.items()}
    one = {g: {k: v[:1] for k, v in f.items()} for g, f in feeds.items()}  # full-length token rows: every
    # variant takes them (the plain export has a fixed length)
    fns = {f"{name}/{g}": (lambda s=s, g=g: s.run(None, one[g])) for name, gs in sessions.items() for g, s in gs.items()}
    timer = Interleaved(fns, block=5, warm=2).warmup(2)
    benchmark.group = "low-bit ViT-B/32 (interleaved)"
    benchmark.pedantic(timer.round, rounds=ROUNDS, iterations=1)
    stats = summary(timer)

    ratio = {name: total[name] / total["fp32"] for name in total}
    lines = []
    for name in files:
        q = (arts[name].manifest.get("quantization") or {}).get("graphs", {}) if name in arts else {}
        widths = {g: _widths(r.get("bits", {})) for g, r in q.items()}
        lines.append(f"  {name:<13} {total[name] / 1e6:7.1f} MB ({ratio[name]:.3f}x fp32)  cos image {cos[name]['image']:.5f} "
                     f"text {cos[name]['text']:.5f}  image {stats[name + '/image']['median_ms']:6.2f} ms  "
                     f"text {stats[name + '/text']['median_ms']:6.2f} ms  {widths or ''}")
    speed = {}
    for name in ("w4a16", "w4a8"):
        for g in ("image", "text"):
            for base in ("int8", "fp32"):
                speed[f"{name}/{g} vs {base}"] = timer.paired_ratio(f"{name}/{g}", f"{base}/{g}")
    lines += [f"  {k}: {v:.3f} ({'faster' if v < 1 else 'slower'})" for k, v in speed.items()]
    lines.append(f"  int8 bytes / plain-dynamic bytes: {total['int8'] / total['plain-dynamic']:.3f}")
    report(request.config, "lowbit_size_speed", {
        "model": "random:ViT-B-32 (seed 0), both towers, batch 1", "threads": THREADS, "rounds": ROUNDS,
        "bytes": size, "ratio_vs_fp32": ratio, "min_cosine": cos,
        "timings": stats, "speed_ratios": speed, "goals": GOALS, "four_bit_max_cosine_drop": FOUR_BIT_DROP,
    }, ["low-bit recipes, ViT-B-32, both towers, batch 1, 2 threads:"] + lines)

    assert ratio["int8"] <= GOALS["int8"] and total["int8"] <= total["plain-dynamic"], (ratio, total)
    assert min(cos["int8"].values()) >= 0.995, cos["int8"]
    assert ratio["w4a16"] <= GOALS["w4a16"], ratio
    assert min(cos["w4a16"].values()) >= 0.99 and min(cos["w4a8"].values()) >= 0.99, cos


def _widths(bits: dict) -> str:
    count: dict = {}
    for b in bits.values():
        count[b] = count.get(b, 0) + 1
    return "/".join(f"{n}x{'f' if b >= 32 else b}" for b, n in sorted(count.items()))
