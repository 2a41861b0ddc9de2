"""Side-by-side timing on a noisy machine, shared by the benchmark files.

`Interleaved` runs its variants alternately (A B, then B A, ...) so that drifting load (another
process training, thermal throttling, a browser) hits every variant alike; medians and their ratio
are then comparable. `report()` prints the result in pytest's terminal summary and writes it to
`.benchmarks/<name>.json`. `export_once()` exports a model once per pytest session.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

_PLUGIN = "edgeclip-side-by-side"
_ARTIFACTS: dict[tuple, Path] = {}
_COLLECTED: dict[str, dict] = {}


class Interleaved:
    """Time named callables alternately; `round()` runs each once (usable as a pedantic target).

    With `block`/`warm`, each variant's turn in a round is `warm` untimed calls, then `block` timed
    calls whose median is the round's time: runtimes with spinning thread pools (ONNX Runtime) keep
    a core busy for a moment after a call, which would otherwise bill the next variant."""

    def __init__(self, fns: dict[str, Callable[[], object]], block: int = 1, warm: int = 0):
        self.fns = dict(fns)
        self.block, self.warm = max(1, block), max(0, warm)
        self.times: dict[str, list[float]] = {name: [] for name in self.fns}
        self._rounds = 0

    def round(self) -> None:
        names = list(self.fns)
        if self._rounds % 2:
            names.reverse()
        self._rounds += 1
        for name in names:
            fn = self.fns[name]
            for _ in range(self.warm):
                fn()
            calls = []
            for _ in range(self.block):
                t = time.perf_counter()
                fn()
                calls.append(time.perf_counter() - t)
            self.times[name].append(statistics.median(calls))

    def warmup(self, rounds: int = 5) -> "Interleaved":
        for _ in range(rounds):
            self.round()
        self.times = {name: [] for name in self.fns}
        return self

    def run(self, rounds: int) -> "Interleaved":
        for _ in range(rounds):
            self.round()
        return self

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def ratio(self, slow: str, fast: str) -> float:
        """median(slow) / median(fast): how many times faster `fast` is."""
        return self.median(slow) / self.median(fast)

    def paired_ratio(self, slow: str, fast: str) -> float:
        """Median over rounds of slow/fast within the same round: robust to load that drifts."""
        return statistics.median(a / b for a, b in zip(self.times[slow], self.times[fast]))

    def summary(self) -> dict:
        out = {}
        for name, ts in self.times.items():
            q = statistics.quantiles(ts, n=10) if len(ts) >= 2 else [ts[0]] * 9
            out[name] = {"median_ms": 1e3 * statistics.median(ts), "p10_ms": 1e3 * q[0], "p90_ms": 1e3 * q[-1],
                         "min_ms": 1e3 * min(ts), "rounds": len(ts)}
        return out


def machine() -> dict:
    """What the numbers were measured on, including how busy the machine was."""
    info = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}
    try:
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


class _Summary:
    """A pytest plugin registered at run time: prints the collected lines in the terminal summary."""

    def __init__(self):
        self.lines: list[str] = []

    def pytest_terminal_summary(self, terminalreporter):
        if self.lines:
            terminalreporter.write_sep("=", "edgeclip side-by-side timings (interleaved, medians)")
            for line in self.lines:
                terminalreporter.write_line(line)


def report(config, name: str, payload: dict, lines: list[str], key: str | None = None) -> Path:
    """Show `lines` in the terminal summary; write `payload` (+ machine info) to .benchmarks/<name>.json.

    With `key`, payloads of one session are gathered in that file as {key: payload, ...}."""
    plugin = config.pluginmanager.get_plugin(_PLUGIN)
    if plugin is None:
        plugin = _Summary()
        config.pluginmanager.register(plugin, _PLUGIN)
    plugin.lines.extend(lines)
    path = Path(config.rootpath) / ".benchmarks" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**payload, "machine": machine(), "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if key is not None:
        _COLLECTED.setdefault(name, {})[key] = payload
        payload = _COLLECTED[name]
    path.write_text(json.dumps(payload, indent=2) + "\n")
    plugin.lines.append(f"  -> {path}")
    return path


def export_once(tmp_path_factory, uri: str, **options) -> Path:
    """Export `uri` with `options` once per session (benchmark files share the artifacts)."""
    import edgeclip

    key = (uri, tuple(sorted(options.items())))
    if key not in _ARTIFACTS:
        out = tmp_path_factory.mktemp("bench-artifact") / "artifact"
        edgeclip.export(edgeclip.load_model(uri, seed=0), out=out, **options)
        _ARTIFACTS[key] = out
    return _ARTIFACTS[key]
