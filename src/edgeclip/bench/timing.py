"""Interleaved timing with a time budget: the only way ratios hold on a shared, noisy machine.

Variants take turns within a round, in alternating order (A B C, then C B A, ...), so load that drifts
(another process, throttling) hits each alike. In a turn a variant runs `warm` untimed calls (runtimes
with spinning thread pools would otherwise bill the previous variant's tail to this one) and then
`block` timed calls. Percentiles come from every timed call; ratios from the per-round medians: the
median over rounds of (variant's turn / base's turn in the same round).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import numpy as np

TURN_TARGET_S = 0.02  # aim for this much timed work per turn, so tiny graphs get several calls


class Interleaved:
    def __init__(self, fns: dict[str, Callable[[], object]], warm: int = 2, block: int | None = None):
        self.fns = dict(fns)
        self.warm, self.block = warm, block
        self.calls: dict[str, list[float]] = {n: [] for n in self.fns}   # seconds, every timed call
        self.turns: dict[str, list[float]] = {n: [] for n in self.fns}   # seconds, median per round
        self.rounds = 0

    def _calibrate(self) -> None:
        """Block size from the slowest variant's call time (3..50 calls)."""
        slowest = 0.0
        for fn in self.fns.values():
            fn()
            t = time.perf_counter()
            fn()
            slowest = max(slowest, time.perf_counter() - t)
        self.block = int(min(50, max(3, TURN_TARGET_S / max(slowest, 1e-6))))
        if slowest > 0.2:  # slow graphs: one warm call is enough to settle the thread pools
            self.warm = min(self.warm, 1)

    def round(self, record: bool = True) -> None:
        if self.block is None:
            self._calibrate()
        names = list(self.fns)
        if self.rounds % 2:
            names.reverse()
        for name in names:
            fn = self.fns[name]
            for _ in range(self.warm):
                fn()
            calls = []
            for _ in range(self.block):
                t = time.perf_counter()
                fn()
                calls.append(time.perf_counter() - t)
            if record:
                self.calls[name].extend(calls)
                self.turns[name].append(statistics.median(calls))
        if record:
            self.rounds += 1

    def warmup(self, rounds: int = 2) -> "Interleaved":
        """`rounds` rounds whose times are discarded."""
        for _ in range(rounds):
            self.round(record=False)
        return self

    def run(self, seconds: float, min_rounds: int = 5, max_rounds: int = 10_000, warmup_rounds: int = 2,
            tick: Callable[[float], None] | None = None) -> "Interleaved":
        """Warm-up rounds (discarded), then rounds until `seconds` have passed and `min_rounds` are done
        (`seconds=0`: exactly `min_rounds` rounds).

        `tick(fraction_done)` is called after each round (progress bars)."""
        self.warmup(warmup_rounds)
        start = time.perf_counter()
        while self.rounds < max_rounds:
            self.round()
            done = (time.perf_counter() - start) / seconds if seconds > 0 else 1.0
            if tick is not None:
                tick(min(1.0, done))
            if self.rounds >= min_rounds and done >= 1.0:
                break
        return self

    def stats(self, name: str, batch: int) -> dict:
        ms = np.asarray(self.calls[name]) * 1e3
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99), "mean_ms": float(ms.mean()),
                "min_ms": float(ms.min()), "iterations": int(ms.size), "rounds": self.rounds,
                "items_per_s": float(batch * 1e3 / p50)}

    def paired_ratio(self, name: str, base: str) -> float:
        """Median over rounds of (name's turn / base's turn): < 1 means `name` is faster."""
        return float(statistics.median(a / b for a, b in zip(self.turns[name], self.turns[base])))
