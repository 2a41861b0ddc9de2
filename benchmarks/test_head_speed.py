"""Classify-with-head vs image encoding alone: what an adapter head inside the graph costs.

    python -m pytest benchmarks/test_head_speed.py -q -p no:cacheprovider --benchmark-only

(~8 minutes on 2 cores: two ViT-B-32 INT8 exports, then the timed rounds.)

The model is random:ViT-B-32 exported INT8 (default recipe, calibrated on 48 synthetic photo-like
images) twice: without a head, and with a 16-shot Tip-Adapter head over 1000 classes (a cache of
16 000 keys: the largest of the head kinds). Variants, through `Pipeline` as an app calls it, batch 1,
2 threads, preprocessed pixels in (decoding is the same for both and is not what is measured):

- `encode`: the head-less artifact, `encode_image` (pixels -> embedding);
- `classify-tip`: the head artifact, `classify(head="tip")` (pixels -> 1000-class labels, scores,
  max-softmax and MCM out-of-distribution scores, in one graph call).

Rounds interleave the variants (alternating order); per turn 2 untimed and 5 timed calls, the
turn's median is the variant's round time; the ratio is the median of per-round ratios.
Goal (issue 10): the head adds <= 5 %: classify-tip / encode <= 1.05.

The cache's keys are random unit vectors except that every calibration image's own feature is the
key of one class, so the INT8 guard's held-out images have a clear top class (as real shots give):
the head's top-1 agreement is then a real check, not a coin toss among 1000 near-ties.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _timing import report, summary  # noqa: E402
from synthetic import calibration_data  # noqa: E402

import edgeclip  # noqa: E402
from edgeclip.bench.timing import Interleaved  # noqa: E402
from edgeclip.heads import Head  # noqa: E402
from edgeclip.runtime import Pipeline  # noqa: E402
from edgeclip.runtime.preprocess import Preprocessor  # noqa: E402

ROUNDS = 30
THREADS = 2
CLASSES, SHOTS = 1000, 16
GOAL = 1.05


def tip_head(feats: np.ndarray, embed_dim: int, seed: int = 0) -> Head:
    rng = np.random.default_rng(seed)
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
    keys = unit(rng.normal(size=(CLASSES * SHOTS, embed_dim)))
    keys[: len(feats) * SHOTS: SHOTS] = unit(feats)       # image i is shot 0 of class i
    values = np.eye(CLASSES)[np.repeat(np.arange(CLASSES), SHOTS)]
    text = unit(rng.normal(size=(CLASSES, embed_dim)))
    return Head("tip_adapter", "tip", [f"class {i}" for i in range(CLASSES)],
                {"keys": keys, "values": values, "text_weights": text}, {"alpha": 1.0, "beta": 5.5, "scale": 100.0})


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("head-speed")
    model = edgeclip.load_model("random:ViT-B-32", seed=0)
    calib, held, caps = calibration_data(root, 224, images=48, held=8, caps=96)
    pre = Preprocessor.from_config(model.spec.preprocess_config())
    with torch.no_grad():
        feats = model.encode_image(torch.from_numpy(pre(sorted(str(p) for p in calib.glob("*.png"))))).numpy()
    head = tip_head(feats, model.spec.embed_dim)
    common = dict(precision="int8", calib=calib, calib_captions=caps)
    plain = edgeclip.export(model, out=root / "plain", **common)
    with_head = edgeclip.export(model, out=root / "tip", heads=[head], **common)
    return plain.path, with_head.path, pre([str(p) for p in held])


def test_tip_head_adds_at_most_five_percent(benchmark, artifacts, request):
    plain_dir, head_dir, pixels = artifacts
    plain = Pipeline.load(plain_dir, threads=THREADS)
    tip = Pipeline.load(head_dir, threads=THREADS)
    one = np.ascontiguousarray(pixels[:1])
    pred = tip.classify(one, head="tip")[0]  # an (N, 3, H, W) array is a batch: a list of Predictions
    assert len(pred.scores) == CLASSES and set(pred.ood) == {"max_softmax", "mcm"}
    fns = {"encode": lambda: plain.encode_image(one), "classify-tip": lambda: tip.classify(one, head="tip")}
    timer = Interleaved(fns, block=5, warm=2).warmup(2)
    benchmark.group = "adapter head cost (interleaved)"
    benchmark.pedantic(timer.round, rounds=ROUNDS, iterations=1)

    ratio = timer.paired_ratio("classify-tip", "encode")
    stats = summary(timer)
    m = tip.manifest
    q = m["quantization"]["graphs"]["image"]
    agreement = q["head_agreement"]["logits_tip"]
    import onnx

    head_int8 = any(i.name.startswith("heads.tip.") and i.data_type == onnx.TensorProto.INT8
                    for i in onnx.load(str(head_dir / "image.onnx")).graph.initializer)
    plain_float = plain.manifest["quantization"]["graphs"]["image"]["float_layers"]
    # the towers must be quantized alike, or the ratio would measure the guard's choices, not the head
    assert [x for x in q["float_layers"] if not x.startswith("heads.")] == plain_float
    sizes = {name: sum(f["size"] for f in p.manifest["files"].values())
             for name, p in (("encode", plain), ("classify-tip", tip))}
    lines = [f"  {name:<13} {stats[name]['median_ms']:7.2f} ms  (p10 {stats[name]['p10_ms']:.2f}, "
             f"p90 {stats[name]['p90_ms']:.2f})  artifact {sizes[name] / 2**20:6.1f} MiB" for name in fns]
    lines += [f"  classify-tip / encode = {ratio:.3f}  (goal <= {GOAL}); head keys int8: {head_int8}; "
              f"INT8 guard top-1 agreement of the head on held-out calibration images: {agreement:.3f}"]
    benchmark.extra_info.update(ratio=ratio, medians_ms={k: v["median_ms"] for k, v in stats.items()})
    report(request.config, "head_speed", {
        "model": "random:ViT-B-32 INT8 image graph, batch 1", "head": f"tip_adapter, {CLASSES} classes x "
        f"{SHOTS} shots", "threads": THREADS, "rounds": ROUNDS,
        "method": "interleaved rounds; per turn 2 untimed + 5 timed calls (median); ratio = median of "
                  "per-round ratios", "timings": stats, "ratio": ratio, "goal": GOAL, "bytes": sizes,
        "head_int8": head_int8, "head_agreement": agreement, "float_layers": q["float_layers"],
    }, [f"adapter head cost, ViT-B-32 INT8, Tip-Adapter {CLASSES} classes x {SHOTS} shots, batch 1, "
        f"{THREADS} threads:"] + lines)
    assert agreement >= 0.99
    assert head_int8, "the head's product is not int8: the INT8 recipe should treat it as a layer"
    assert ratio <= GOAL, f"classify with the tip head / encode = {ratio:.3f} (goal {GOAL})"
