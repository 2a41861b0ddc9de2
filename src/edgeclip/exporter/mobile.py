"""What the `ort-mobile` target decides and checks for phones: the fixed shapes of its graphs
(`--mobile-shapes`), the execution providers they are made for (`--mobile-ep`), and ONNX Runtime's
own mobile usability analysis of each graph, recorded per EP in the manifest.

    shapes = parse_shapes("1x77", spec)              # {"batch": 1, "length": 77}
    eps = parse_eps("nnapi,coreml")                  # ("nnapi", "coreml")
    report = usability(onnx_path, eps)               # {"nnapi": {"nodes": ..., "share": ..., "partitions": 1}, ...}
"""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

from ..errors import InputError

MOBILE_EPS = ("nnapi", "coreml", "xnnpack")
# the CPU EP alone: it takes every op, so the graphs keep ONNX Runtime's fused CPU kernels
CPU_EP = "cpu"
EP_NAMES = {"nnapi": "NNAPI (Android)", "coreml": "Core ML ML Program (iOS)", "xnnpack": "XNNPACK (CPU)",
            CPU_EP: "ONNX Runtime's CPU EP"}
MAX_BATCH = 64
# a graph whose share the analysis puts under this, or in more than one partition, is reported as not fit
FIT_SHARE = 0.95
XNNPACK_OPS = Path(__file__).resolve().parent / "data" / "xnnpack_supported_ops.md"


def parse_eps(value) -> tuple:
    """`--mobile-ep`: a comma-separated subset of nnapi, coreml, xnnpack (None: all three), or cpu
    alone (the CPU EP only: fused CPU kernels, no accelerator constraints)."""
    if value is None:
        return MOBILE_EPS
    items = value.split(",") if isinstance(value, str) else list(value)
    eps = tuple(dict.fromkeys(str(e).strip().lower() for e in items if str(e).strip()))
    bad = [e for e in eps if e not in MOBILE_EPS + (CPU_EP,)]
    if bad or not eps or (CPU_EP in eps and len(eps) > 1):
        raise InputError(f"mobile_eps must name execution providers among {', '.join(MOBILE_EPS)} "
                         f"(comma-separated), or {CPU_EP} alone, got {value!r}")
    return eps


def accelerated(eps) -> bool:
    """Whether the graphs are made for an accelerator EP (plain ops), not the CPU EP alone."""
    return any(e in MOBILE_EPS for e in eps)


def parse_shapes(value, spec) -> dict:
    """`--mobile-shapes BATCH[xLENGTH]`: the graphs' fixed batch and text length (default 1 and the
    text tower's context length). A shorter length is exact only for a causal tower pooled at its
    end token (what follows that token cannot change it); the runtime then refuses longer texts."""
    context = spec.text.context_length
    if value is None:
        return {"batch": 1, "length": context}
    m = re.fullmatch(r"\s*(\d{1,4})\s*(?:[xX]\s*(\d{1,5}))?\s*", str(value))
    if not m:
        raise InputError(f"mobile_shapes must be BATCH or BATCHxLENGTH (e.g. 1 or 1x77), got {value!r}")
    batch, length = int(m.group(1)), int(m.group(2) or context)
    if not 1 <= batch <= MAX_BATCH:
        raise InputError(f"mobile_shapes batch must be from 1 to {MAX_BATCH}, got {batch}")
    if not 2 <= length <= context:
        raise InputError(f"mobile_shapes length must be from 2 to the text tower's context length {context}, "
                         f"got {length}")
    from .graphs import trim_supported

    if length != context and not trim_supported(spec):
        raise InputError(f"mobile_shapes length {length}: the '{spec.name}' text tower is not causal or not "
                         f"pooled at its end token, so fewer tokens would change its features; use its "
                         f"context length {context}")
    return {"batch": batch, "length": length}


def usability(onnx_path: Path, eps: tuple) -> dict:
    """ONNX Runtime's mobile usability analysis (`onnxruntime.tools.mobile_helpers.usability_checker`)
    of the graph at `onnx_path` as it will be saved (already optimized: the checker's own partition
    estimate with fixed input sizes required). Per EP: nodes, supported nodes, share, partitions,
    unsupported ops, and ORT's verdict (YES / MAYBE / NO)."""
    from onnxruntime.tools.mobile_helpers import usability_checker as uc
    from onnxruntime.tools.onnx_model_utils import ModelProtoWithShapeInfo

    with contextlib.redirect_stdout(io.StringIO()):
        model = ModelProtoWithShapeInfo(Path(onnx_path)).model_with_shape_info
    checks = {"nnapi": lambda: uc.check_nnapi_partitions(model, True),
              "coreml": lambda: uc.check_coreml_partitions(model, True, "coreml_supported_mlprogram_ops.md"),
              "xnnpack": lambda: uc._check_ep_partitioning(model, XNNPACK_OPS, True)}
    out = {}
    for ep in (e for e in eps if e in checks):
        info = checks[ep]()
        share = info.num_supported_nodes / max(info.num_nodes, 1)
        out[ep] = {"nodes": info.num_nodes, "supported": info.num_supported_nodes,
                   "share": round(share, 4), "partitions": info.num_partitions,
                   "partition_sizes": sorted((len(p) for p in info.supported_groups), reverse=True)[:8],
                   "unsupported_ops": sorted(info.unsupported_ops),
                   "dynamic_nodes": info.nodes_unsupported_due_to_dynamic_input,
                   "rank_nodes": info.num_unsupported_nodes_due_to_rank,
                   "verdict": info.suitability().name}
    return out


def supported_ops(eps: tuple) -> set:
    """The "domain:Op" names every accelerator EP in `eps` takes, from the lists ONNX Runtime's usability
    checker reads (XNNPACK runs beside the CPU EP, so it constrains nothing)."""
    from onnxruntime.tools.mobile_helpers import usability_checker as uc

    lists = {"nnapi": "nnapi_supported_ops.md", "coreml": "coreml_supported_mlprogram_ops.md"}
    sets = [set(uc._SupportedOpsChecker(Path(uc.__file__).parent / lists[ep])._ops) for ep in eps if ep in lists]
    return set.intersection(*sets) if sets else set()


def fits(entry: dict) -> bool:
    """One partition covering at least FIT_SHARE of the nodes."""
    return entry["partitions"] == 1 and entry["share"] >= FIT_SHARE


def summary(report: dict) -> str:
    """'nnapi 100.0% in 1 partition, coreml 98.7% in 1' for one graph's analysis."""
    return ", ".join(f"{ep} {e['share'] * 100:.1f}% in {e['partitions']} partition{'s' * (e['partitions'] != 1)}"
                     for ep, e in report.items())
