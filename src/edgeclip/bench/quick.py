"""A quick latency look at an artifact: p50/p90/p99 per graph after warm-up, within a time budget."""
from __future__ import annotations

import time

import numpy as np

from ..runtime import Pipeline
from .sizes import artifact_sizes

PROMPT = "a photo of a dog"


def time_calls(fn, seconds: float, min_iters: int = 10, warmup: int = 3) -> np.ndarray:
    """Milliseconds per call; iterations set by the time budget."""
    check_seconds(seconds)
    for _ in range(warmup):
        fn()
    times, deadline = [], time.perf_counter() + seconds
    while len(times) < min_iters or time.perf_counter() < deadline:
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return np.asarray(times)


def _row(name: str, batch: int, ms: np.ndarray) -> dict:
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"graph": name, "p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99),
            "iterations": int(ms.size), "items_per_s": float(batch * 1e3 / p50)}


def quick_bench(artifact, batch: int = 1, threads: int | None = None, seconds: float = 2.0,
                inference_precision: str | None = None) -> dict:
    t = time.perf_counter()
    p = Pipeline.load(artifact, threads=threads, inference_precision=inference_precision)
    load_s = time.perf_counter() - t
    s = p.preprocessor.output_size or (224, 224)
    pixels = np.random.default_rng(0).normal(size=(batch, 3, *s)).astype(np.float32)
    image = p._graph("image")
    rows = [_row("image", batch, time_calls(lambda: image.run({"pixel_values": pixels}), seconds))]
    try:
        ids = p.tokenize([PROMPT] * batch)
    except Exception:  # artifacts without a tokenizer: time the image graph only
        ids = None
    if ids is not None:
        rows.append(_row("text", batch, time_calls(lambda: p.encode_text(ids), seconds)))
    info = p.info()  # what actually ran (OpenVINO may run "FP32" as bf16)
    for row in rows:
        row["inference_precision"] = info.get(row["graph"], {}).get("inference_precision")
    return {"artifact": str(artifact), "batch": batch, "threads": threads, "load_s": load_s,
            "backend": p.backend_name, "backend_info": info,
            "size_bytes": sum(v["size"] for v in p.manifest["files"].values()),
            "sizes": artifact_sizes(p.manifest), "graphs": rows,
            "target": p.manifest["target"], "precision": p.manifest["precision"]}


MAX_SECONDS = 3600.0


def check_seconds(seconds) -> float:
    """A time budget must be a finite number of seconds in (0, MAX_SECONDS]: `inf` would never end."""
    import math

    from ..errors import InputError

    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not math.isfinite(seconds) \
            or not 0 < seconds <= MAX_SECONDS:
        raise InputError(f"seconds must be a finite number in (0, {MAX_SECONDS:g}], got {seconds!r}")
    return float(seconds)
