"""`pooled_only_last`: ViT-B-32 exported with the last block computing only the pooled token vs all
tokens, image tower (batch 1 and 8) and text tower (77 ids), interleaved side by side.

Run (from the repository root; not part of the default `pytest` run, takes ~3 minutes):

    python -m pytest benchmarks/test_pooled_last.py -q -p no:cacheprovider --benchmark-only

Medians and gains are printed in the terminal summary and written to .benchmarks/pooled_last.json.
The rewrite removes ~(1 - 1/tokens) of one block out of twelve, so expect a gain near 1.08x; the test
asserts identical outputs and reports the gain it measured.
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from _timing import export_once, report, summary  # noqa: E402
from edgeclip.bench.timing import Interleaved  # noqa: E402
from edgeclip.runtime.pipeline import Pipeline  # noqa: E402

ROUNDS = {"image-b1": 60, "image-b8": 15, "text-77": 60}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    on = Pipeline.load(export_once(tmp_path_factory, "random:ViT-B-32", precision="fp32"))
    off = Pipeline.load(export_once(tmp_path_factory, "random:ViT-B-32", precision="fp32", pooled_only_last=False))
    assert on.manifest["options"]["pooled_only_last"] is True
    assert off.manifest["options"]["pooled_only_last"] is False
    return on, off


def inputs(case: str, pipe: Pipeline) -> tuple[str, dict]:
    rng = np.random.default_rng(0)
    if case.startswith("image"):
        n = int(case.split("-b")[1])
        photos = [rng.integers(0, 256, size=(240, 320, 3), dtype=np.uint8) for _ in range(n)]
        return "image", {"pixel_values": pipe.preprocess(photos)}
    ids = pipe.tokenize(["a photo of a small dog", "a diagram of a very long sentence " * 5], truncate=True)
    return "text", {"input_ids": ids}


@pytest.mark.parametrize("case", list(ROUNDS))
def test_pooled_last_side_by_side(benchmark, pair, case, request):
    on, off = pair
    graph, feeds = inputs(case, on)
    g_on, g_off = on._graph(graph), off._graph(graph)
    out = "image_embeds" if graph == "image" else "text_embeds"
    diff = float(np.abs(g_on.run(feeds)[out] - g_off.run(feeds)[out]).max())
    assert diff <= 1e-4, f"pooled-only-last changes the {graph} features by {diff}"

    timer = Interleaved({"all-tokens": lambda: g_off.run(feeds), "pooled-only-last": lambda: g_on.run(feeds)},
                        block=1, warm=0).warmup(3)
    benchmark.group = f"pooled-last {case} (interleaved pair)"
    benchmark.pedantic(timer.round, rounds=ROUNDS[case], iterations=1)
    stats = summary(timer)
    gain = stats["all-tokens"]["median_ms"] / stats["pooled-only-last"]["median_ms"]
    paired = timer.paired_ratio("all-tokens", "pooled-only-last")
    benchmark.extra_info.update(gain=gain, paired_gain=paired, medians_ms={k: v["median_ms"] for k, v in stats.items()})
    report(request.config, "pooled_last", {
        "model": "random:ViT-B-32", "graph": f"{graph} (fp32 ONNX, ORT CPU)", "case": case,
        "input_shape": list(next(iter(feeds.values())).shape), "timings": stats, "gain": gain, "paired_gain": paired,
        "max_abs_diff": diff,
    }, [
        f"pooled-only-last, {case} ({ROUNDS[case]} interleaved rounds): all tokens "
        f"{stats['all-tokens']['median_ms']:.2f} ms | pooled only {stats['pooled-only-last']['median_ms']:.2f} ms"
        f" | gain {gain:.3f}x (per-round {paired:.3f}x) | max abs diff {diff:.2g}",
    ], key=case)


@pytest.mark.parametrize("variant", ["all-tokens", "pooled-only-last"])
def test_pooled_last_image_each(benchmark, pair, variant):
    """Image batch 1, as plain pytest-benchmark entries (run one after the other)."""
    on, off = pair
    pipe = on if variant == "pooled-only-last" else off
    _, feeds = inputs("image-b1", on)
    graph = pipe._graph("image")
    benchmark.group = "pooled-last image-b1"
    out = benchmark(graph.run, feeds)
    assert out["image_embeds"].shape == (1, 512)
