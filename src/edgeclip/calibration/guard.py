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
          drop_fn=None):
    """Run `quantize_fn(exclude=set of layers kept float)` under the accuracy bound.

    `drop_fn(quantized) -> cosine drop` measures a candidate (default: ONNX Runtime on `held_out`
    against `reference`, the float model's output). Returns (quantized model, GuardReport); raises
    ValidationError when the bound holds only with every layer back in float (nothing INT8 would be
    left), with the per-layer sensitivities."""
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
    excluded: list[str] = []
    for layer in sorted(layers, key=lambda name: -report.sensitivity[name]):
        excluded.append(layer)
        quant = quantize_fn(set(excluded))
        report.drop = drop_fn(quant)
        if report.ok:
            break
    report.float_layers = excluded
    if not report.ok or len(excluded) == len(layers):  # an "INT8" model with no INT8 layer left is a failure
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
