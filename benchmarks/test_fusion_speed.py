"""Fused vs unfused attention on ONNX Runtime (CPU), FP32 and INT8, at the sequence lengths our
models use: 50 (ViT-B/32 image), 197 (ViT-B/16 image), 248 (Long-CLIP text), 577 (ViT-L/14-336
image). Side by side in one run, interleaved.

    python -m pytest benchmarks/test_fusion_speed.py -q -p no:cacheprovider --benchmark-only

(~7 minutes on 2 cores.) Each case is the real spec's tower cut to a few blocks (width, heads, token
count and MLP unchanged), random weights, batch 1, 2 threads; "unfused" is the same export with
`fuse=False`. The ratio is unfused / fused latency (median over rounds of the per-round ratio):
>= 1.0 means fusing did not slow the artifact down. Results in .benchmarks/fusion_speed.json.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _timing import report, summary  # noqa: E402
from synthetic import captions, write_images  # noqa: E402

import edgeclip  # noqa: E402
from edgeclip.bench.timing import Interleaved  # noqa: E402
from edgeclip.models.clip import ClipModel  # noqa: E402
from edgeclip.specs import get_spec  # noqa: E402

ROUNDS = 12
THREADS = 2
GOAL = 1.0
CASES = {  # sequence length -> (spec, tower, blocks kept)
    50: ("ViT-B-32", "image", 4),
    197: ("ViT-B-16", "image", 4),
    248: ("Long-CLIP-B", "text", 4),
    577: ("ViT-L-14-336", "image", 2),
}
_RESULTS: dict = {}


def _model(name, blocks):
    spec = get_spec(name)
    spec = dataclasses.replace(spec, vision=dataclasses.replace(spec.vision, layers=blocks),
                               text=dataclasses.replace(spec.text, layers=blocks))
    return ClipModel(spec).init_random(0).float().eval()


def _session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fusion-data")
    (root / "caps.txt").write_text("\n".join(captions(64, 0)))
    return root


@pytest.mark.parametrize("length", sorted(CASES))
def test_fused_vs_unfused(benchmark, data, tmp_path, request, length):
    name, tower, blocks = CASES[length]
    model = _model(name, blocks)
    size = model.spec.vision.image_size
    calib = data / f"calib{size}"
    if not calib.exists():
        write_images(calib, 24, size, seed=0)
    paths = {}
    for precision in ("fp32", "int8"):
        for fused in (True, False):
            kw = dict(calib=calib, calib_captions=data / "caps.txt") if precision == "int8" else {}
            art = edgeclip.export(model, precision=precision, fuse=fused, out=tmp_path / f"{precision}-{fused}", **kw)
            paths[(precision, fused)] = art.path / f"{tower}.onnx"
    if tower == "image":
        feeds = {"pixel_values": np.random.default_rng(0).normal(size=(1, 3, size, size)).astype(np.float32)}
    else:
        ids = np.random.default_rng(0).integers(1, 49000, size=(1, length))
        ids[0, 0], ids[0, -1] = 49406, 49407
        feeds = {"input_ids": ids.astype(np.int64)}
    sessions = {f"{p}-{'fused' if f else 'unfused'}": _session(path) for (p, f), path in paths.items()}
    outs = {k: s.run(None, feeds)[0] for k, s in sessions.items()}
    for p in ("fp32", "int8"):  # the fused graph computes the same function
        a, b = outs[f"{p}-fused"], outs[f"{p}-unfused"]
        tol = 1e-4 if p == "fp32" else 0.05
        assert np.abs(a - b).max() <= tol * max(1.0, np.abs(b).max()), (p, np.abs(a - b).max())
    timer = Interleaved({k: (lambda s=s: s.run(None, feeds)) for k, s in sessions.items()}, block=5, warm=3).warmup(1)
    benchmark.group = f"fusion, {length} tokens"
    benchmark.pedantic(timer.round, rounds=ROUNDS, iterations=1)
    stats = summary(timer)
    speedup = {p: timer.paired_ratio(f"{p}-unfused", f"{p}-fused") for p in ("fp32", "int8")}
    _RESULTS[length] = {"model": f"{name} ({tower}, {blocks} blocks)", "speedup": speedup,
                        "median_ms": {k: v["median_ms"] for k, v in stats.items()}}
    lines = [f"  {length:>4} tokens, {name} {tower} x{blocks}: " + "; ".join(
        f"{p} unfused {stats[f'{p}-unfused']['median_ms']:.2f} ms / fused {stats[f'{p}-fused']['median_ms']:.2f} ms"
        f" = {speedup[p]:.3f}x" for p in ("fp32", "int8"))]
    report(request.config, "fusion_speed", {"threads": THREADS, "rounds": ROUNDS, "goal": GOAL, **_RESULTS[length]},
           lines, key=str(length))
    for p, r in speedup.items():
        assert r >= GOAL - 0.03, f"{p} at {length} tokens: fused is {r:.3f}x of unfused"
