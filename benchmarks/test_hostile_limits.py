"""How long hostile inputs cost the runtime before they are answered (tokenized or refused, typed).

Run (from the repository root; not part of the default `pytest` run, ~20 s):

    python -m pytest benchmarks/test_hostile_limits.py -q -p no:cacheprovider --benchmark-only

(`make bench` runs every benchmark file the same way.) Medians are printed in the terminal summary
and written to .benchmarks/hostile_limits.json. Goals asserted: a 1,000,000 x 1 PNG is refused in
< 2 s (measured here in-process; tests/hostile/test_inputs.py repeats it under a 3 GiB address-space
cap), and a 100 kB single-word text is answered in < 0.5 s with truncate=True and False. Also timed:
a ~400 kB caption truncated to the context, and the centre-crop window against the full resize of a
50:1 strip (same pixels).
"""
from __future__ import annotations

import io
import statistics
import time

import numpy as np
import pytest
from PIL import Image

from _timing import report
from edgeclip.errors import ImageSizeError, TextTooLongError
from edgeclip.runtime.preprocess import Preprocessor
from edgeclip.runtime.tokenizer import ClipTokenizer

ROUNDS = 7
GOALS_S = {"png-1000000x1": 2.0, "word-100kB-truncate": 0.5, "word-100kB": 0.5}
_RESULTS: dict[str, dict] = {}


def _timed(fn, rounds: int = ROUNDS) -> dict:
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return {"median_ms": 1e3 * statistics.median(ts), "max_ms": 1e3 * max(ts), "rounds": rounds}


def _expect(error, fn):
    def call():
        with pytest.raises(error):
            fn()
    return call


@pytest.fixture(scope="module")
def cases():
    buf = io.BytesIO()
    Image.new("L", (1_000_000, 1)).save(buf, "PNG")
    png = buf.getvalue()
    prep = Preprocessor(image_size=224)
    tok = ClipTokenizer()
    caption = " ".join("a photo of a big red cat on the mat".split() * 12_000)
    strip = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 2000, 3), dtype=np.uint8))
    return {
        "png-1000000x1": _expect(ImageSizeError, lambda: prep([png])),
        "word-100kB-truncate": _expect(TextTooLongError, lambda: tok(["x" * 100_000], truncate=True)),
        "word-100kB": _expect(TextTooLongError, lambda: tok(["x" * 100_000])),
        "caption-400kB-truncate": lambda: tok([caption], truncate=True),
        "strip-50to1-window": lambda: prep.resize_and_crop(strip),
        "strip-50to1-full-resize": lambda: strip.resize((11200, 224), Image.BICUBIC),
    }


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", ["png-1000000x1", "word-100kB-truncate", "word-100kB", "caption-400kB-truncate",
                                  "strip-50to1-window", "strip-50to1-full-resize"])
def test_hostile_input_cost(benchmark, cases, request, name):
    benchmark.group = "hostile-limits"
    benchmark.pedantic(cases[name], rounds=ROUNDS, iterations=1, warmup_rounds=1)
    stats = _timed(cases[name])
    goal = GOALS_S.get(name)
    _RESULTS[name] = {**stats, "goal_s": goal}
    line = f"  {name:26s} median {stats['median_ms']:8.2f} ms  max {stats['max_ms']:8.2f} ms"
    if goal is not None:
        line += f"  (goal < {goal:g} s: {'met' if stats['max_ms'] < 1e3 * goal else 'NOT met'})"
    report(request.config, "hostile_limits", {"cases": dict(_RESULTS)}, [line])
    if goal is not None:
        assert stats["max_ms"] < 1e3 * goal, f"{name} took {stats['max_ms']:.0f} ms, goal < {goal} s"
