"""Will TensorRT's ONNX parser build this graph? Checked without TensorRT, before an artifact ships.

    report = check_graph(onnx.load("image.onnx"), trt_version="10.3", profiles=profile_for(model))

Four rules, each a `TensorRTCompatError(message, node=, rule=)` naming the node and its op:
- `domain` / `op` / `opset`: standard-domain ops only, each in the allowlist of the targeted TensorRT
  version (`data/tensorrt_ops.json`, read from onnx-tensorrt's operator support table), opset in range;
- `qdq-symmetric` / `qdq-scale` / `qdq-axis` / `qdq-placement`: TensorRT's explicit quantization, i.e.
  int8 zero points of 0, constant positive scales, per-channel only on weights along their output
  channels, Q/DQ on the inputs of MatMul/Conv/Gemm and never on their outputs;
- `profile`: every dynamic input dimension has a min/opt/max range (TensorRT's optimization profile).
The report counts ops and Q/DQ and lists the dynamic dims with their ranges (the manifest and
`edgeclip inspect` show it). Layer: exporter; imports onnx and numpy, never torch.
"""
from __future__ import annotations

import functools
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np

from ..errors import TensorRTCompatError, UsageError

_DATA = Path(__file__).parent / "data" / "tensorrt_ops.json"
_MAX_DIM = 2**31 - 1  # TensorRT dims are int32
_GEMMS = ("MatMul", "Conv", "ConvTranspose", "Gemm")
_QDQ = ("QuantizeLinear", "DequantizeLinear")
_INT8 = 3  # onnx.TensorProto.INT8, spelled out so the module imports without onnx


@functools.lru_cache(maxsize=1)
def _table() -> dict:
    return json.loads(_DATA.read_text())


def _version_key(version: str) -> tuple[int, ...]:
    if not isinstance(version, str) or not re.fullmatch(r"\d{1,3}(\.\d{1,4}){0,3}", version.strip()):
        raise UsageError(f"TensorRT version {version!r} is not a version number like '10.3' or '11.0'")
    return tuple(int(p) for p in version.strip().split("."))


def known_versions() -> list[str]:
    """The TensorRT versions the allowlist has a row for, oldest first."""
    return sorted(_table()["versions"], key=_version_key)


def load_allowlist(version: str) -> dict:
    """The allowlist row for TensorRT `version`: the largest listed version <= it (a version between
    two rows gets the older, smaller list, so the check errs on the side of refusing).
    -> {"version", "requested", "min_opset", "max_opset", "ops": frozenset, "domains": tuple}."""
    want = _version_key(version)
    rows = [v for v in known_versions() if _version_key(v) <= want]
    if not rows:
        raise UsageError(f"TensorRT {version} is older than every version edgeclip checks against; "
                         f"known versions: {', '.join(known_versions())}")
    row = _table()["versions"][rows[-1]]
    return {"version": rows[-1], "requested": version.strip(), "min_opset": int(row["min_opset"]),
            "max_opset": int(row["max_opset"]), "ops": frozenset(row["ops"]),
            "domains": tuple(_table()["domains"])}


def _first_with(op: str) -> str | None:
    """The oldest listed TensorRT version whose parser takes `op` (for the error message)."""
    return next((v for v in known_versions() if op in _table()["versions"][v]["ops"]), None)


def _label(node) -> str:
    """A node's name, or its first output where the exporter left it unnamed."""
    return node.name or (f"<{node.op_type} -> {node.output[0]}>" if node.output else f"<{node.op_type}>")


def _walk(graph):
    """Every node of `graph` and of its subgraphs (If/Loop/Scan bodies), the parser reads them all."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _walk(sub)


class _Graph:
    """What the Q/DQ and profile rules ask of a graph: constants, producers, consumers, types."""

    def __init__(self, model):
        g = model.graph
        self.model, self.nodes = model, list(_walk(g))
        self.consts = {t.name: t for t in g.initializer}
        for n in self.nodes:
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
                for a in n.attribute:
                    if a.name == "value":
                        self.consts[n.output[0]] = a.t
        self.producer = {o: n for n in self.nodes for o in n.output if o}
        self.consumers: dict[str, list] = {}
        for n in self.nodes:
            for i, name in enumerate(n.input):
                self.consumers.setdefault(name, []).append((n, i))
        self.outputs = {o.name for o in g.output}
        self.elem_type = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.value_info, *g.output]}

    def array(self, name: str) -> np.ndarray:
        """A small constant's values (zero points, scales; weights are only ever read for their dims)."""
        from onnx import numpy_helper

        try:
            return numpy_helper.to_array(self.consts[name])
        except Exception as e:  # external data left on disk: onnx.load(path) without load_external_data
            raise UsageError(f"cannot read constant '{name}' ({e}); load the model with its external data "
                             "(onnx.load(path)) before checking it") from e

    def dtype(self, name: str) -> int | None:
        if name in self.consts:
            return self.consts[name].data_type
        return self.elem_type.get(name) or None

    def inputs(self):
        """The graph's real inputs (models of old IR versions also list initializers as inputs)."""
        return [i for i in self.model.graph.input if i.name not in self.consts]


def _default_opset(model) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _check_opset(model, allow: dict) -> int:
    opset = _default_opset(model)
    lo, hi = allow["min_opset"], allow["max_opset"]
    if opset is None or not lo <= opset <= hi:
        hint = (f"export with opset_version={hi}" if opset and opset > hi else "re-export at a newer opset")
        raise TensorRTCompatError(
            f"the graph's default-domain opset is {opset}; TensorRT {allow['requested']}'s ONNX parser "
            f"takes opsets {lo}..{hi} (allowlist row {allow['version']}): {hint}, or aim at a newer "
            "TensorRT with --trt-version", node=None, rule="opset")
    return opset


def _check_op(node, allow: dict) -> None:
    name, op = _label(node), node.op_type
    if node.domain not in allow["domains"]:
        raise TensorRTCompatError(
            f"node '{name}' ({node.domain}.{op}) is a '{node.domain}' op: TensorRT's ONNX parser takes "
            "standard ai.onnx ops only; export the graph for TensorRT without ONNX Runtime fusions "
            "(fuse=False, or --target tensorrt)", node=name, rule="domain")
    if op not in allow["ops"]:
        first = _first_with(op)
        since = (f"its parser takes it from TensorRT {first} (--trt-version {first})" if first else
                 "no TensorRT version edgeclip knows supports it")
        raise TensorRTCompatError(
            f"node '{name}' ({op}) is not supported by TensorRT {allow['requested']}'s ONNX parser "
            f"(allowlist row {allow['version']}, from onnx-tensorrt's operators.md); {since}",
            node=name, rule="op")


def _fail(node, rule: str, why: str):
    raise TensorRTCompatError(f"node '{_label(node)}' ({node.op_type}): {why}", node=_label(node), rule=rule)


def _check_zero_point(node, g: _Graph) -> None:
    """TensorRT builds symmetric int8 only: a zero point must be a constant int8 0. ONNX reads a
    missing one as uint8 (QuantizeLinear without output_dtype), which ORT would then run as uint8."""
    zp = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if zp is None:
        if node.op_type == "QuantizeLinear":
            out = next((a.i for a in node.attribute if a.name == "output_dtype"), 0)
            if out != _INT8:
                _fail(node, "qdq-symmetric", "no zero point and no output_dtype=INT8 quantizes to uint8 in ONNX; "
                      "TensorRT needs int8 with zero point 0 (give it an int8 zero point of 0)")
        elif g.dtype(node.input[0]) not in (None, _INT8):
            _fail(node, "qdq-symmetric", "dequantizes a non-int8 tensor; TensorRT takes int8 Q/DQ only")
        return
    if zp not in g.consts:
        _fail(node, "qdq-symmetric", f"zero point '{zp}' is not a constant; TensorRT needs a constant int8 0")
    if g.consts[zp].data_type != _INT8:
        _fail(node, "qdq-symmetric", f"zero point '{zp}' is not int8 (asymmetric uint8 quantization); "
              "TensorRT needs symmetric int8 with zero point 0: quantize activations and weights as int8")
    values = g.array(zp)
    if np.any(values != 0):
        _fail(node, "qdq-symmetric", f"zero point '{zp}' holds {int(values.flat[np.flatnonzero(values)[0]])}, "
              "not 0; TensorRT builds symmetric quantization only")


def _check_scale(node, g: _Graph) -> np.ndarray:
    scale = node.input[1] if len(node.input) > 1 else ""
    if scale not in g.consts:
        _fail(node, "qdq-scale", f"scale '{scale}' is not a constant; TensorRT needs constant scales")
    values = g.array(scale)
    if values.dtype.kind != "f" or not np.all(np.isfinite(values)) or np.any(values <= 0):
        _fail(node, "qdq-scale", f"scale '{scale}' must be finite and > 0 floats")
    if values.ndim > 1:
        _fail(node, "qdq-axis", f"scale '{scale}' has rank {values.ndim}: blocked quantization is not built here")
    return values


def _weight_axis(consumer, index: int, rank: int) -> int | None:
    """The output-channel axis of the weight `consumer` reads at input `index`, or None where the
    consumer's input is not a weight TensorRT quantizes per channel."""
    op = consumer.op_type
    if op == "Conv" and index == 1:
        return 0
    if op == "ConvTranspose" and index == 1:
        return 1  # [C_in, C_out/group, k...]
    if op == "MatMul" and index == 1 and rank >= 2:
        return rank - 1  # x @ W with W [in, out]
    if op == "Gemm" and index == 1:
        trans = next((a.i for a in consumer.attribute if a.name == "transB"), 0)
        return 0 if trans else 1
    return None


def _check_axis(node, g: _Graph, scale: np.ndarray) -> bool:
    """Per-channel (a scale vector of more than one entry) only on DequantizeLinear of a constant
    weight, along its output channels. True where the node is per-channel."""
    if any(a.name == "block_size" and a.i for a in node.attribute):
        _fail(node, "qdq-axis", "blocked quantization (block_size) is not built here")
    if scale.size <= 1:
        return False
    if node.op_type != "DequantizeLinear" or node.input[0] not in g.consts:
        _fail(node, "qdq-axis", "per-channel scales only on DequantizeLinear of a constant weight; "
              "quantize activations per tensor")
    shape = list(g.consts[node.input[0]].dims)
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    axis = axis + len(shape) if axis < 0 else axis
    if not 0 <= axis < len(shape) or shape[axis] != scale.size:
        _fail(node, "qdq-axis", f"axis {axis} does not match {scale.size} scales on weight shape {shape}")
    for consumer, index in g.consumers.get(node.output[0], []):
        want = _weight_axis(consumer, index, len(shape))
        if want != axis:
            where = (f"input {index} of {consumer.op_type} '{_label(consumer)}'")
            _fail(node, "qdq-axis", f"per-channel axis {axis} feeds {where}, whose output-channel axis is "
                  f"{want if want is not None else 'not a weight axis'} (Conv 0, MatMul [in,out] 1)")
    return True


def _check_placement(node, g: _Graph) -> None:
    """TensorRT fuses Q/DQ into the inputs of MatMul/Conv/Gemm; a pair on their output (or anywhere
    else) would leave int8 tensors TensorRT does not fuse: quantize GEMM inputs only."""
    out = node.output[0]
    users = g.consumers.get(out, [])
    if node.op_type == "QuantizeLinear":
        src = g.producer.get(node.input[0])
        # a GEMM's output may be quantized only as the next GEMM's input (conv -> Q/DQ -> conv, which
        # TensorRT fuses into an int8-output conv); a pair that hands int8 to anything else is an
        # output quantization TensorRT does not fuse
        feeds_gemms = all(c.op_type in _GEMMS for n, _ in users if n.op_type == "DequantizeLinear"
                          for c, _ in g.consumers.get(n.output[0], [])) and users
        if src is not None and src.op_type in _GEMMS and not feeds_gemms:
            _fail(node, "qdq-placement", f"quantizes the output of {src.op_type} '{_label(src)}'; TensorRT "
                  "wants Q/DQ on MatMul/Conv/Gemm inputs only (keep their outputs in float)")
        bad = [n for n, _ in users if n.op_type != "DequantizeLinear"]
        if bad or out in g.outputs:
            _fail(node, "qdq-placement", "its int8 output must feed DequantizeLinear nodes only")
        return
    bad = [n for n, _ in users if n.op_type not in _GEMMS]
    if bad or out in g.outputs:
        what = f"{bad[0].op_type} '{_label(bad[0])}'" if bad else "a graph output"
        _fail(node, "qdq-placement", f"feeds {what}; TensorRT wants DequantizeLinear only on the inputs of "
              "MatMul/Conv/Gemm (leave LayerNorm, softmax, GELU and residual adds in float)")


def _check_qdq(g: _Graph) -> dict:
    counts = Counter()
    for node in g.nodes:
        if node.op_type not in _QDQ:
            continue
        _check_zero_point(node, g)
        scale = _check_scale(node, g)
        per_channel = _check_axis(node, g, scale)
        _check_placement(node, g)
        weight = node.op_type == "DequantizeLinear" and node.input[0] in g.consts
        counts["quantize" if node.op_type == "QuantizeLinear" else "dequantize"] += 1
        counts["per_channel"] += per_channel
        counts["weights" if weight else "activations"] += node.op_type == "DequantizeLinear"
    return {k: counts[k] for k in ("quantize", "dequantize", "weights", "activations", "per_channel")}


def _dims(value_info) -> list:
    """An input's dims: an int where static, the dim_param (or '?' for an unnamed dynamic dim)."""
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?")
            for d in shape.dim]


def _profile_fail(name: str, why: str):
    raise TensorRTCompatError(f"input '{name}': {why}", node=name, rule="profile")


def _ranges(name: str, dims: list, prof) -> list[tuple[int, int, int]]:
    """The (min, opt, max) of every dim of input `name`, checked (profiles come from manifests,
    which users download: every value is validated and bounded)."""
    if not isinstance(prof, dict) or set(prof) != {"min", "opt", "max"}:
        _profile_fail(name, "a profile is {'min': [...], 'opt': [...], 'max': [...]}")
    rows = [prof[k] for k in ("min", "opt", "max")]
    for row in rows:
        if not isinstance(row, (list, tuple)) or len(row) != len(dims) or not all(
                isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= _MAX_DIM for v in row):
            _profile_fail(name, f"profile rows must be {len(dims)} ints in 1..{_MAX_DIM}, got {row!r}")
    out = []
    for axis, (dim, lo, opt, hi) in enumerate(zip(dims, *rows)):
        if not lo <= opt <= hi:
            _profile_fail(name, f"dim {axis} ({dim}) has min {lo}, opt {opt}, max {hi}: needs min <= opt <= max")
        if isinstance(dim, int) and (lo, opt, hi) != (dim, dim, dim):
            _profile_fail(name, f"dim {axis} is static {dim} in the graph but the profile says "
                          f"{lo}/{opt}/{hi}")
        out.append((lo, opt, hi))
    return out


def _check_profiles(g: _Graph, profiles: dict | None) -> dict:
    """Every dynamic dim covered by a valid range; one dim_param gets one range on every input."""
    inputs = {i.name: _dims(i) for i in g.inputs()}
    profiles = {} if profiles is None else profiles
    if not isinstance(profiles, dict):
        raise TensorRTCompatError("profiles must map input names to {'min', 'opt', 'max'}", rule="profile")
    unknown = sorted(set(profiles) - set(inputs), key=str)
    if unknown:
        _profile_fail(str(unknown[0]), f"has a profile but is not an input of the graph ({', '.join(inputs)})")
    report, seen = {}, {}
    for name, dims in inputs.items():
        dynamic = {axis: d for axis, d in enumerate(dims) if not isinstance(d, int)}
        if not dynamic and name not in profiles:
            continue
        if name not in profiles:
            _profile_fail(name, f"dynamic dims {list(dynamic.values())} have no optimization profile; "
                          "give min/opt/max (--profile) or export with static shapes")
        ranges = _ranges(name, dims, profiles[name])
        for axis, param in dynamic.items():
            if param != "?" and seen.setdefault(param, ranges[axis]) != ranges[axis]:
                _profile_fail(name, f"dim {axis} ('{param}') is {ranges[axis]} here but {seen[param]} on "
                              "another input; one symbolic dim needs one range")
        report[name] = {str(axis): {"dim": param, "min": ranges[axis][0], "opt": ranges[axis][1],
                                    "max": ranges[axis][2]} for axis, param in dynamic.items()}
    return report


def check_graph(model, trt_version: str = "10.3", profiles: dict | None = None) -> dict:
    """Check `model` (an onnx.ModelProto) against TensorRT `trt_version`; raises TensorRTCompatError on
    the first violation. `profiles` = {input: {"min": [...], "opt": [...], "max": [...]}} (see
    `profile_for`). -> {"trt_version", "allowlist", "opset", "nodes", "ops", "qdq", "dynamic_dims"}."""
    allow = load_allowlist(trt_version)
    g = _Graph(model)
    for node in g.nodes:  # ops before the opset: "Attention needs 10.14" says more than "opset 23 > 20"
        _check_op(node, allow)
    opset = _check_opset(model, allow)
    qdq = _check_qdq(g)
    dynamic = _check_profiles(g, profiles)
    ops = Counter(n.op_type for n in g.nodes)
    return {"trt_version": allow["requested"], "allowlist": allow["version"], "opset": opset,
            "nodes": len(g.nodes), "ops": dict(sorted(ops.items())), "qdq": qdq, "dynamic_dims": dynamic}


def _triple(value, what: str) -> tuple[int, int, int]:
    if (not isinstance(value, (list, tuple)) or len(value) != 3 or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value)
            or not 1 <= value[0] <= value[1] <= value[2] <= _MAX_DIM):
        raise UsageError(f"{what} must be three ints (min, opt, max) with 1 <= min <= opt <= max, got {value!r}")
    return tuple(value)


def _text_length(name: str, dims: list, dtype: int, length: int | None) -> int | None:
    """The context length of a token-id input ([batch, length] integers), static or from `length`."""
    if len(dims) != 2 or dtype not in (6, 7):  # INT32, INT64
        return None
    if isinstance(dims[1], int):
        return dims[1]
    if length is None:
        raise UsageError(f"input '{name}' has a dynamic length dim '{dims[1]}': pass length= "
                         "(the model's context length, e.g. 77)")
    if isinstance(length, bool) or not isinstance(length, int) or not 1 <= length <= _MAX_DIM:
        raise UsageError(f"length must be a positive int, got {length!r}")
    return length


def profile_for(model, batch=(1, 8, 64), length: int | None = None, length_range=None) -> dict:
    """Default optimization profiles for `model`'s inputs: dim 0 over `batch` (min, opt, max); a
    token-id input's length dim over `length_range` (min, opt, max), by default 1..context length with
    opt = max (the tokenizer pads to the context length); static dims fixed.
    -> {input: {"min": [...], "opt": [...], "max": [...]}}."""
    lo, opt, hi = _triple(batch, "batch")
    text = _triple(length_range, "length") if length_range is not None else None
    g = _Graph(model)
    profiles = {}
    for inp in g.inputs():
        dims = _dims(inp)
        ctx = _text_length(inp.name, dims, g.dtype(inp.name), length)
        rows = {"min": [], "opt": [], "max": []}
        for axis, d in enumerate(dims):
            if isinstance(d, int):
                r = (d, d, d)
            elif axis == 0:
                r = (lo, opt, hi)
            elif axis == 1 and ctx is not None:
                r = text or (1, ctx, ctx)
            else:
                raise UsageError(f"input '{inp.name}' dim {axis} ('{d}') is dynamic and has no default range: "
                                 "pass profiles= to check_graph")
            for k, v in zip(rows, r):
                rows[k].append(v)
        profiles[inp.name] = rows
    return profiles


def inspect_lines(report: dict) -> list[str]:
    """Short lines for `edgeclip inspect` from a `check_graph` report (read back from a manifest, so
    missing fields print as '?' rather than fail)."""
    ops, q = report.get("ops") or {}, report.get("qdq") or {}
    lines = [f"TensorRT {report.get('trt_version', '?')} (allowlist {report.get('allowlist', '?')}): opset "
             f"{report.get('opset', '?')}, {report.get('nodes', '?')} nodes, {len(ops)} op types, all supported"]
    top = sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))[:8]
    lines.append("  ops: " + ", ".join(f"{op} {n}" for op, n in top) + (" ..." if len(ops) > 8 else ""))
    if q.get("quantize") or q.get("dequantize"):
        lines.append(f"  Q/DQ: {q.get('quantize', 0)} Q, {q.get('dequantize', 0)} DQ ({q.get('weights', 0)} "
                     f"weights, {q.get('per_channel', 0)} per-channel), symmetric int8")
    for name, axes in (report.get("dynamic_dims") or {}).items():
        ranges = ", ".join(f"{r.get('dim')} {r.get('min')}/{r.get('opt')}/{r.get('max')}" for r in axes.values())
        lines.append(f"  profile {name}: {ranges} (min/opt/max)")
    return lines
