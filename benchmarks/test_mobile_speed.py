"""The phone graphs (`--target ort-mobile`) against the ORT-format graphs the target wrote before
them, on this CPU with ONNX Runtime's CPU EP: random ViT-B/32 and MobileCLIP-S1 (seed 0), FP32,
batch 1, 2 threads, then 1 thread.

    python -m pytest benchmarks/test_mobile_speed.py -q -p no:cacheprovider --benchmark-only

(~9 minutes on 2 cores.)

Variants, exported side by side in one run:
- `ort-today`: the server `onnx` target's graphs (fused attention, dynamic shapes) saved in ORT format
  exactly as the ort-mobile target saved them before (`to_ort_format`, basic optimizations).
- `mobile`: the ort-mobile target's default graphs (fixed batch 1 and text length 77, plain ops for
  NNAPI + Core ML + XNNPACK).
- `mobile-coreml` (MobileCLIP-S1): `--mobile-ep coreml`, which keeps Erf (Core ML takes it; NNAPI
  does not, so the default rewrites GELU into six elementwise ops).
- `mobile-16` (ViT-B/32): `--mobile-shapes 1x16`, the fixed length for short texts.
- `mobile-cpu`: `--mobile-ep cpu`, the graphs for the CPU EP alone (its fused kernels, fixed shapes).

Text is timed on one caption (its tokens up to the end token: the dynamic graph runs just those,
the fixed graphs their whole length) and on a full 77-token row (the same work for every graph).
Every variant interleaved (warm calls, then a block, the block's median per round; medians over
rounds). Asserted, loosely, on the same work (image; text at its full length): the CPU EP's
fixed-shape graphs (`mobile-cpu`: today's kernels) are not slower than today's, within the noise of
one run (two sessions of one graph measure up to 5 % apart here: MARGIN), and the accelerators' graphs
(`mobile`) at most 15 % slower, at either thread count (their extra small nodes cost ONNX Runtime's
thread pool more at 2 threads).
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

import edgeclip  # noqa: E402
from edgeclip.bench.timing import Interleaved  # noqa: E402
from edgeclip.exporter.formats.ort_mobile import to_ort_format  # noqa: E402
from edgeclip.runtime.pipeline import Pipeline  # noqa: E402
from edgeclip.runtime.shapes import fit_feed  # noqa: E402
from edgeclip.runtime.tokenizer import trim  # noqa: E402

ROUNDS = 15
THREADS = 2
MARGIN = 1.06  # two sessions of one graph, in one run
PLAIN = 1.15  # the accelerators' plain-op graphs on the CPU EP (a regression bound: 0.97-1.14 across runs)
CAPTION = "a photo of a dog playing in the snow."
CPU = {"mobile-cpu": {"mobile_eps": "cpu"}}
MODELS = {"ViT-B-32": {"mobile-16": {"mobile_shapes": "1x16"}, **CPU},
          "MobileCLIP-S1": {"mobile-coreml": {"mobile_eps": "coreml"}, **CPU}}


def _session(path, threads: int = THREADS):
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module", params=list(MODELS))
def variants(request, tmp_path_factory):
    name = request.param
    root = tmp_path_factory.mktemp(name)
    model = edgeclip.load_model(f"random:{name}", seed=0)
    server = edgeclip.export(model, target="onnx", out=root / "onnx")
    today = {}
    for g in ("image", "text"):
        today[g] = root / f"today-{g}.ort"
        to_ort_format(server.path / f"{g}.onnx", today[g], plain=False)
    arts = {"mobile": edgeclip.export(model, target="ort-mobile", out=root / "mobile")}
    for v, kw in MODELS[name].items():
        arts[v] = edgeclip.export(model, target="ort-mobile", out=root / v, **kw)
    files = {"ort-today": {g: (today[g], server.manifest["graphs"][g]) for g in today}}
    files.update({v: {g: (a.path / f"{g}.ort", a.manifest["graphs"][g]) for g in ("image", "text")}
                  for v, a in arts.items()})
    tok = Pipeline.load(server.path).tokenizer
    ids = tok([CAPTION])
    spec = model.spec
    feeds = {"image": {"pixel_values": np.random.RandomState(0).rand(1, 3, spec.vision.image_size,
                                                                      spec.vision.image_size).astype(np.float32)},
             "caption": {"input_ids": ids}, "full": {"input_ids": _full_row(spec)}}
    return name, files, feeds, spec.text.eot_token_id


def _full_row(spec) -> np.ndarray:
    n = spec.text.context_length
    row = np.zeros((1, n), np.int64)
    row[0, :n - 1] = np.arange(1, n) % 40000 + 300
    row[0, n - 1] = spec.text.eot_token_id or spec.text.vocab_size - 1
    return row


def _feed(info: dict, graph: str, feed: dict, eot, trims: bool) -> dict:
    """What the runtime feeds the graph: the dynamic graph trimmed after the end token (when its text
    manifest trims), the fixed graphs their type and length."""
    if graph == "image":
        return feed
    ids = feed["input_ids"]
    return {"input_ids": trim(ids, eot) if trims else fit_feed(info["inputs"]["input_ids"], ids)}


def _timed(benchmark, fns: dict, group: str):
    """Every "variant/case" of `fns` interleaved, ROUNDS rounds: (timings, each variant's paired ratio
    to ort-today on the same case, report lines)."""
    timer = Interleaved(fns, warm=2).warmup(2)
    benchmark.group = group
    benchmark.pedantic(timer.round, rounds=ROUNDS, iterations=1)
    stats = summary(timer)
    ratios = {f"{k} vs ort-today": timer.paired_ratio(k, f"ort-today/{k.split('/')[1]}")
              for k in fns if not k.startswith("ort-today/")}
    lines = [f"  {k:<22} {s['median_ms']:7.2f} ms" for k, s in stats.items()]
    lines += [f"  {k}: {r:.3f} ({'faster' if r < 1 else 'slower'})" for k, r in ratios.items()]
    return stats, ratios, lines


def test_mobile_graphs_vs_todays_ort_format(benchmark, variants, request):
    name, files, feeds, eot = variants
    trims = {v: files[v]["text"][1]["inputs"]["input_ids"]["shape"][1] == "length" for v in files}
    caption_tokens = int(_feed(files["ort-today"]["text"][1], "text", feeds["caption"], eot, trims["ort-today"])
                         ["input_ids"].shape[1])
    fns = {}
    for v, gs in files.items():
        for g, (path, info) in gs.items():
            s = _session(path)
            cases = {"image": [("image", feeds["image"])]}.get(g) or [("caption", feeds["caption"]),
                                                                      ("full", feeds["full"])]
            for case, feed in cases:
                if v == "mobile-16" and case == "full":
                    continue  # 77 tokens do not fit its 16
                f = _feed(info, g, feed, eot, trims[v])
                fns[f"{v}/{case}"] = (lambda s=s, f=f: s.run(None, f))
    stats, ratios, lines = _timed(benchmark, fns, f"mobile graphs {name} (interleaved)")
    lines.append(f"  (the caption is {caption_tokens} tokens: today's graph runs those, the fixed graphs their length)")
    report(request.config, f"mobile_speed_{name}", {
        "model": f"random:{name} (seed 0), FP32, batch 1", "threads": THREADS, "rounds": ROUNDS,
        "caption_tokens": caption_tokens, "timings": stats, "ratios": ratios,
    }, [f"ort-mobile graphs vs today's ORT format, {name}, CPU EP, batch 1, {THREADS} threads:"] + lines)
    for case in ("image", "full"):
        assert ratios[f"mobile-cpu/{case} vs ort-today"] <= MARGIN, ratios
        assert ratios[f"mobile/{case} vs ort-today"] <= PLAIN, ratios


def test_one_thread(benchmark, variants, request):
    """Today's graphs, the accelerators' and the CPU EP's, on one thread: the same work (image, text at
    its full length), where no thread pool splits the small ops."""
    name, files, feeds, eot = variants
    fns = {}
    for v in ("ort-today", "mobile", "mobile-cpu"):
        for g, (path, info) in files[v].items():
            s = _session(path, threads=1)
            trims = g == "text" and info["inputs"]["input_ids"]["shape"][1] == "length"
            f = _feed(info, g, feeds["image" if g == "image" else "full"], eot, trims)
            fns[f"{v}/{'image' if g == 'image' else 'full'}"] = (lambda s=s, f=f: s.run(None, f))
    stats, ratios, lines = _timed(benchmark, fns, f"mobile graphs {name}, 1 thread (interleaved)")
    report(request.config, f"mobile_speed_{name}_1thread", {
        "model": f"random:{name} (seed 0), FP32, batch 1", "threads": 1, "rounds": ROUNDS,
        "timings": stats, "ratios": ratios,
    }, [f"ort-mobile graphs vs today's ORT format, {name}, CPU EP, batch 1, 1 thread:"] + lines)
    for case in ("image", "full"):
        assert ratios[f"mobile-cpu/{case} vs ort-today"] <= MARGIN, ratios
        assert ratios[f"mobile/{case} vs ort-today"] <= PLAIN, ratios
