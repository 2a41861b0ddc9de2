"""Reporting shared by the benchmark files; the timing itself is `edgeclip.bench.timing.Interleaved`.

`Interleaved` runs its variants alternately (A B, then B A, ...) so that drifting load (another
process training, thermal throttling, a browser) hits every variant alike; its `round()` serves as a
pytest-benchmark pedantic target. `summary()` turns its per-round times into the figures these files
print; `report()` prints them in pytest's terminal summary and writes them to
`.benchmarks/<name>.json`. `export_once()` exports a model once per pytest session.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

from edgeclip.bench.timing import Interleaved

_PLUGIN = "edgeclip-side-by-side"
_ARTIFACTS: dict[tuple, Path] = {}
_COLLECTED: dict[str, dict] = {}


def summary(timer: Interleaved) -> dict:
    """{variant: {median_ms, p10_ms, p90_ms, min_ms, rounds}} over the variant's per-round times (a
    round's time: the median of its turn's timed calls)."""
    out = {}
    for name, ts in timer.turns.items():
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
