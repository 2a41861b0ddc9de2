"""Text-encoder trimming: one 8-token prompt through the ViT-B-32 text graph, padded to 77 vs trimmed.

Run (from the repository root; not part of the default `pytest` run, takes ~2 minutes):

    python -m pytest benchmarks/test_text_trim.py -q -p no:cacheprovider --benchmark-only

(`make bench` runs every benchmark file the same way.) The interleaved medians and their ratio are
printed in the terminal summary and written to .benchmarks/text_trim.json. The goal is >= 2.5x; the
test asserts identical outputs and that trimming is faster, and reports the ratio it measured.
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from _timing import export_once, report, summary  # noqa: E402
from edgeclip.bench.timing import Interleaved  # noqa: E402
from edgeclip.runtime.pipeline import Pipeline, trim  # noqa: E402

PROMPT = "a photo of a small dog"  # start + 6 words + end = 8 tokens
TOKENS = 8
GOAL = 2.5
ROUNDS = 60


@pytest.fixture(scope="module")
def text_case(tmp_path_factory):
    pipe = Pipeline.load(export_once(tmp_path_factory, "random:ViT-B-32", precision="fp32"))
    assert pipe.manifest["text"]["trim"] is True
    padded = pipe.tokenize([PROMPT])
    trimmed = trim(padded, pipe.manifest["text"]["eot_token_id"])
    assert padded.shape == (1, 77) and trimmed.shape == (1, TOKENS)
    graph = pipe._graph("text")  # one ONNX Runtime session serves both inputs

    def run(ids):
        return graph.run({"input_ids": ids})["text_embeds"]

    return run, padded, trimmed


def test_trim_side_by_side(benchmark, text_case, request):
    run, padded, trimmed = text_case
    full, cut = run(padded), run(trimmed)
    diff = float(np.abs(full - cut).max())
    assert diff <= 1e-6, f"trimmed features differ from padded ones by {diff}"

    timer = Interleaved({"padded-77": lambda: run(padded), f"trimmed-{TOKENS}": lambda: run(trimmed)},
                        block=1, warm=0).warmup(5)
    benchmark.group = "text-trim (interleaved pair)"
    benchmark.pedantic(timer.round, rounds=ROUNDS, iterations=1)
    stats = summary(timer)
    ratio = stats["padded-77"]["median_ms"] / stats[f"trimmed-{TOKENS}"]["median_ms"]
    paired = timer.paired_ratio("padded-77", f"trimmed-{TOKENS}")
    benchmark.extra_info.update(ratio=ratio, paired_ratio=paired, goal=GOAL,
                                medians_ms={k: v["median_ms"] for k, v in stats.items()})
    report(request.config, "text_trim", {
        "model": "random:ViT-B-32", "graph": "text (fp32 ONNX, ORT CPU)", "prompt": PROMPT, "tokens": TOKENS,
        "timings": stats, "speedup": ratio, "paired_speedup": paired, "goal": GOAL, "meets_goal": ratio >= GOAL,
        "max_abs_diff": diff,
    }, [
        f"text trim (ViT-B-32 text graph, '{PROMPT}', {ROUNDS} interleaved rounds):",
        f"  padded-77 median {stats['padded-77']['median_ms']:.2f} ms | trimmed-{TOKENS} median "
        f"{stats[f'trimmed-{TOKENS}']['median_ms']:.2f} ms | speed-up {ratio:.2f}x (per-round {paired:.2f}x) "
        f"(goal >= {GOAL}x: {'met' if ratio >= GOAL else 'NOT met'}) | max abs diff {diff:.2g}",
    ])
    assert ratio > 1.0, f"trimmed ids are not faster than padded ones ({ratio:.2f}x)"


@pytest.mark.parametrize("variant", ["padded-77", f"trimmed-{TOKENS}"])
def test_trim_each(benchmark, text_case, variant):
    """The same two inputs as plain pytest-benchmark entries (run one after the other)."""
    run, padded, trimmed = text_case
    ids = padded if variant == "padded-77" else trimmed
    benchmark.group = "text-trim"
    out = benchmark(run, ids)
    assert out.shape == (1, 512)
