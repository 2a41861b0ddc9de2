"""The accuracy guard: quantize, measure on held-out inputs, and if the cosine drop is too large,
return the most sensitive layers to float, greedily, until it passes or nothing is left."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .._lazy import require
from ..errors import ValidationError
from ..runtime.vectors import cosine
from . import qdq


@dataclass
class GuardReport:
    bound: float                       # max allowed cosine drop (1 - min cosine)
    drop_all_int8: float               # drop with every target quantized
    drop: float                        # drop of the returned model
    float_layers: list = field(default_factory=list)  # layers returned to float, in order
    sensitivity: dict = field(default_factory=dict)   # layer -> drop with only that layer quantized

    @property
    def ok(self) -> bool:
        return self.drop <= self.bound


def _session(model):
    ort = require("onnxruntime", "the accuracy guard")
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def float_reference(model, feeds: dict, output: str) -> np.ndarray:
    return _session(model).run([output], feeds)[0]


def cosine_drop(model, reference: np.ndarray, feeds: dict, output: str) -> float:
    """1 - the minimum cosine between `model`'s output and the float reference over held-out rows."""
    return min_cosine_drop(_session(model).run([output], feeds)[0], reference)


def min_cosine_drop(y: np.ndarray, reference: np.ndarray) -> float:
    """1 - the minimum row-wise cosine between `y` and `reference`."""
    y, r = y.astype(np.float64), reference.astype(np.float64)
    return float(1.0 - cosine(y, r).min())


def head_agreement(got: dict, ref: dict, heads) -> dict:
    """Top-1 agreement with the float model of each class-score output in `heads`."""
    return {h: float((got[h].argmax(-1) == ref[h].argmax(-1)).mean()) for h in heads}


def guard_measure(got: dict, ref: dict, output: str, heads=(), max_drop: float = 0.005,
                  min_agreement: float = 0.99) -> float:
    """The guard's one number: 1 - min cosine of `output`; a head whose top-1 agreement with the float
    model falls below `min_agreement` counts as a drop past `max_drop`, in proportion to the shortfall
    (agreement == min_agreement maps to exactly `max_drop`), so layers go back to float for it too."""
    drop = min_cosine_drop(got[output], ref[output])
    for a in head_agreement(got, ref, heads).values():
        drop = max(drop, (1.0 - a) * max_drop / max(1.0 - min_agreement, 1e-9))
    return drop


def run_outputs(model, feeds: dict, outputs) -> dict:
    """{output: array} of an ONNX model under ONNX Runtime."""
    return dict(zip(outputs, _session(model).run(list(outputs), feeds)))


def guarded_quantize(model, targets, ranges, held_out: dict, output: str, max_drop: float = 0.005,
                     act_type: str = "uint8"):
    """(QDQ-quantized model, GuardReport). Raises ValidationError when even all-float-but-one fails."""
    return guard(model, lambda exclude: qdq.quantize(model, targets, ranges, act_type, exclude=exclude),
                 [t.layer for t in targets], held_out, output, max_drop)


def guard(model, quantize_fn, layers, held_out: dict, output: str, max_drop: float = 0.005, reference=None,
          drop_fn=None, allow_all: bool = False, cost: dict | None = None, search: str = "linear"):
    """Run `quantize_fn(exclude=set of layers kept float)` under the accuracy bound.

    `drop_fn(quantized) -> cosine drop` measures a candidate (default: ONNX Runtime on `held_out`
    against `reference`, the float model's output). Returns (quantized model, GuardReport); raises
    ValidationError when the bound holds only with every layer back in float (nothing INT8 would be
    left), with the per-layer sensitivities. `allow_all`: excluding every layer is a result, not a
    failure (the excluded layers fall back to another quantized form, not to float: `guard_chain`).

    Layers go back in order of sensitivity, or of sensitivity per weight when `cost` ({layer: weights})
    is given (the most accuracy for the fewest bytes). `search`: "linear" adds them one at a time
    until the bound holds; "bisect" finds the same shortest prefix of that order with a doubling then
    halving search (O(log n) candidates; exact when the drop falls as layers go back)."""
    if drop_fn is None:
        if reference is None:  # the float model's `output` on `held_out`
            reference = float_reference(model, held_out, output)

        def drop_fn(candidate):
            return cosine_drop(candidate, reference, held_out, output)
    quant = quantize_fn(set())
    drop_all = drop_fn(quant)
    report = GuardReport(max_drop, drop_all, drop_all)
    if report.ok:
        return quant, report
    layers = list(dict.fromkeys(layers))
    # Sensitivity of a layer: the drop when it alone is quantized (cheap, one session per layer).
    for layer in layers:
        report.sensitivity[layer] = drop_fn(quantize_fn(set(layers) - {layer}))
    weight = (lambda name: max(cost.get(name, 1), 1)) if cost else (lambda name: 1)
    order = sorted(layers, key=lambda name: -report.sensitivity[name] / weight(name))
    if search == "bisect":
        quant, excluded = _bisect(quantize_fn, drop_fn, order, report)
    else:
        excluded = []
        for layer in order:
            excluded.append(layer)
            quant = quantize_fn(set(excluded))
            report.drop = drop_fn(quant)
            if report.ok:
                break
    report.float_layers = excluded
    if not report.ok or (len(excluded) == len(layers) and not allow_all):  # an "INT8" model with no INT8 layer left is a failure
        worst = sorted(report.sensitivity.items(), key=lambda kv: -kv[1])[:5]
        raise ValidationError(
            f"INT8 misses the accuracy bound: only with every layer returned to float is the cosine drop "
            f"{report.drop:.2g} ≤ {max_drop} on {output} (with every layer INT8: {drop_all:.4f}; most sensitive: "
            + ", ".join(f"{k} {v:.4f}" for k, v in worst)
            + "); try another recipe (int8-smoothquant, w8a16) or fp16",
            failures=[{"output": output, "cosine_drop": report.drop, "bound": max_drop,
                       "drop_all_int8": drop_all, "sensitivity": report.sensitivity}],
        )
    return quant, report


def _bisect(quantize_fn, drop_fn, order: list, report: GuardReport):
    """(model, excluded): the shortest prefix of `order` whose exclusion meets the bound, searched by
    doubling then halving; `report.drop` gets its drop (the whole order when none does)."""
    drops: dict = {0: report.drop_all_int8}

    def drop_at(k: int) -> float:
        if k not in drops:
            drops[k] = drop_fn(quantize_fn(set(order[:k])))
        return drops[k]

    hi = 1
    while hi < len(order) and drop_at(hi) > report.bound:
        hi = min(hi * 2, len(order))
    lo = hi // 2 if drop_at(hi) <= report.bound else hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if drop_at(mid) <= report.bound:
            hi = mid
        else:
            lo = mid
    report.drop = drop_at(hi)
    return quantize_fn(set(order[:hi])), list(order[:hi])

@dataclass
class ChainReport:
    """What `guard_chain` chose: the bits of every layer (32: float), and each width's guard report
    (None where even every layer at the next width missed the bound)."""

    bits: dict
    levels: list = field(default_factory=list)   # [(bits, GuardReport | None)] in the order tried
    drop: float = 0.0

    @property
    def float_layers(self) -> list:
        return [k for k, b in self.bits.items() if b >= 32]

    @property
    def _first(self):
        return next((g for _, g in self.levels if g is not None), None)

    @property
    def drop_all_int8(self) -> float:
        """The drop with every layer at the narrowest width that was measured (the first guard's)."""
        return self._first.drop_all_int8 if self._first is not None else self.drop

    @property
    def sensitivity(self) -> dict:
        return self._first.sensitivity if self._first is not None else {}


def guard_chain(model, quantize_fn, layers, held_out: dict, output: str, chain=(4, 8), max_drop: float = 0.005,
                drop_fn=None, cost: dict | None = None):
    """The accuracy guard over a chain of weight widths: every layer starts at `chain[0]` bits and the
    most sensitive ones fall back to the next width (`guard`, its excluded layers one width wider);
    where even every layer at the next width misses the bound, the next width is tried the same way,
    and after the last one layers go back to float. When that last step sent some layers to float,
    the chain runs once more with those layers kept float, so that one layer needing float does not
    keep every other one from the narrow widths.

    `quantize_fn(bits: {layer: bits}) -> model` (32 = float). Returns (model, ChainReport); raises
    ValidationError as `guard` does when the last width holds only with every layer in float. Layers
    fall back in order of sensitivity per weight (`cost`: {layer: weights}; the smallest model that
    holds the bound), found by bisection (`guard`'s search="bisect")."""
    layers = list(dict.fromkeys(layers))
    quant, report, skipped = _chain_pass(model, quantize_fn, layers, {}, held_out, output, chain, max_drop,
                                         drop_fn, cost)
    pinned = {layer: 32 for layer in report.float_layers}
    if skipped and pinned and len(pinned) < len(layers):
        try:
            again = _chain_pass(model, quantize_fn, [x for x in layers if x not in pinned], pinned, held_out, output,
                                chain, max_drop, drop_fn, cost)
        except ValidationError:
            again = None
        if again is not None and _narrower(again[1].bits, report.bits):
            quant, report = again[0], again[1]
            report.bits.update(pinned)
    return quant, report


def _narrower(a: dict, b: dict) -> bool:
    return sum(min(v, 16) for v in a.values()) < sum(min(v, 16) for k, v in b.items() if k in a)


def _chain_pass(model, quantize_fn, layers, pinned: dict, held_out, output, chain, max_drop, drop_fn, cost):
    """One pass of `guard_chain` over `layers` (the `pinned` ones kept at their widths): (model,
    ChainReport, whether a width was skipped because it missed the bound with every layer moved on)."""
    report = ChainReport({})
    skipped = False
    for i, bits in enumerate(chain):
        fallback = chain[i + 1] if i + 1 < len(chain) else 32

        def at(exclude, bits=bits, fallback=fallback):
            return quantize_fn({**pinned, **{layer: fallback if layer in exclude else bits for layer in layers}})

        last = fallback == 32
        try:
            quant, g = guard(model, at, layers, held_out, output, max_drop, drop_fn=drop_fn, allow_all=not last,
                             cost=cost, search="bisect")
        except ValidationError:
            if last:
                raise
            report.levels.append((bits, None))
            skipped = True
            continue
        report.levels.append((bits, g))
        if last or len(g.float_layers) < len(layers):
            moved = set(g.float_layers)
            report.bits = {layer: fallback if layer in moved else bits for layer in layers}
            report.drop = g.drop
            return quant, report, skipped
    raise AssertionError("unreachable: the last width returns or raises")
