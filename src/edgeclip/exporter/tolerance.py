"""Fidelity of an export: per-output error and cosine against the float32 reference, and the
typed error when an output is outside its target's tolerance. numpy only."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ValidationError
from ..runtime.vectors import cosine


@dataclass(frozen=True)
class Tolerance:
    max_abs: float      # relative to max(1, |reference|max): features of real checkpoints can be large
    min_cosine: float


def compare(got: dict, ref: dict, tol: Tolerance) -> dict:
    """Per output: max abs error, min cosine, pass/fail."""
    report = {}
    for name, r in ref.items():
        g = got[name].astype(np.float64)
        r = r.astype(np.float64)
        err = float(np.abs(g - r).max())
        cos = float(np.min(cosine(g, r)))
        bound = tol.max_abs * max(1.0, float(np.abs(r).max()))
        report[name] = {"max_abs": err, "min_cosine": cos, "max_abs_bound": bound, "min_cosine_bound": tol.min_cosine,
                        "ok": bool(err <= bound and cos >= tol.min_cosine)}
    return report


def raise_if_failed(report: dict, where: str) -> None:
    failures = [(name, r) for name, r in report.items() if not r["ok"]]
    if failures:
        lines = [f"  {name}: max abs {r['max_abs']:.3g} (bound {r['max_abs_bound']:.3g}), "
                 f"min cosine {r['min_cosine']:.6f} (bound {r['min_cosine_bound']})" for name, r in failures]
        raise ValidationError(
            f"{where} is outside its fidelity tolerance vs the torch reference:\n" + "\n".join(lines) +
            "\nTry a higher precision, or export with validate=False (CLI: --no-validate) to keep it anyway",
            failures=[{"output": n, **r} for n, r in failures],
        )
