"""Static INT8 by QuantizeLinear/DequantizeLinear (QDQ) insertion on our exported ONNX graphs.

Only GEMMs with constant weights are quantized (MatMul with a 2-D initializer): weights per output
channel, symmetric int8; activations per tensor from an observer's range. LayerNorm, softmax, GELU,
residual adds and attention's activation x activation products stay float. ONNX Runtime fuses each
`DQ(x) -> MatMul <- DQ(W)` into one MatMulIntegerToFloat kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._lazy import require
from .observers import make_observer, quantize_weight_per_channel, scale_zero_point


@dataclass(frozen=True)
class QuantTarget:
    node: str        # ONNX node name
    activation: str  # input tensor quantized per tensor
    weight: str      # initializer quantized per output channel
    layer: str       # module path from the exporter's name scopes, e.g. visual.blocks.3.mlp.fc1


def _layer_name(node) -> str:
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            scopes = [s.strip(" '\"") for s in p.value.strip("[]").split(",")]
            named = [s for s in scopes if "." in s or s in ("visual", "text")]
            return named[-1] if named else node.name
    return node.name


def find_targets(model) -> list[QuantTarget]:
    """Linear layers inside the transformer blocks: MatMuls with a 2-D initializer as second input.

    The patch embedding, the final projections and baked heads are outside the blocks and stay float
    (numerically sensitive, and a negligible share of the compute)."""
    inits = {i.name: i for i in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in inits and len(inits[n.input[1]].dims) == 2:
            layer = _layer_name(n)
            if ".blocks." in layer:
                out.append(QuantTarget(n.name, n.input[0], n.input[1], layer))
    return out


def probe_session(model, names):
    """An ORT session over a copy of `model` that also outputs the intermediate tensors `names`."""
    onnx = require("onnx", "INT8 calibration")
    ort = require("onnxruntime", "INT8 calibration")
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for name in names:
        if name not in existing:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor visible
    return ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])


def collect_ranges(model, targets, batches, observer: str = "minmax", **observer_kw) -> dict:
    """Run the float graph on calibration batches; {activation tensor: (lo, hi)}."""
    names = sorted({t.activation for t in targets})
    sess = probe_session(model, names)
    observers = {n: make_observer(observer, **observer_kw) for n in names}
    for feeds in batches:
        outs = sess.run(names, feeds)
        for n, v in zip(names, outs):
            observers[n].observe(v)
    return {n: o.range() for n, o in observers.items()}


def quantize(model, targets, ranges: dict, act_type: str = "uint8", exclude=()):
    """A QDQ copy of `model`; targets whose layer (or node) is in `exclude` stay float."""
    onnx = require("onnx", "INT8 quantization")
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {i.name: i for i in m.graph.initializer}
    nodes = {n.name: n for n in m.graph.node}
    new_nodes, new_inits, done_acts, done_weights = [], [], {}, {}
    zp_type = TensorProto.UINT8 if act_type == "uint8" else TensorProto.INT8
    for t in targets:
        if t.layer in exclude or t.node in exclude:
            continue
        node = nodes[t.node]
        if t.activation not in done_acts:
            lo, hi = ranges[t.activation]
            scale, zp = scale_zero_point(lo, hi, act_type)
            base = f"{t.activation}_q"
            new_inits += [numpy_helper.from_array(np.array(scale, np.float32), f"{base}_scale"),
                          helper.make_tensor(f"{base}_zp", zp_type, [], [zp])]
            new_nodes += [
                helper.make_node("QuantizeLinear", [t.activation, f"{base}_scale", f"{base}_zp"], [f"{base}_int"],
                                 name=f"{base}_Q"),
                helper.make_node("DequantizeLinear", [f"{base}_int", f"{base}_scale", f"{base}_zp"], [f"{base}_dq"],
                                 name=f"{base}_DQ"),
            ]
            done_acts[t.activation] = f"{base}_dq"
        if t.weight not in done_weights:
            w = numpy_helper.to_array(inits[t.weight])
            q, scale = quantize_weight_per_channel(w, axis=1)  # (K, N): one scale per output column
            base = f"{t.weight}_q"
            new_inits += [numpy_helper.from_array(q, f"{base}_int"),
                          numpy_helper.from_array(scale.astype(np.float32), f"{base}_scale"),
                          numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), f"{base}_zp")]
            new_nodes.append(helper.make_node("DequantizeLinear", [f"{base}_int", f"{base}_scale", f"{base}_zp"],
                                              [f"{base}_dq"], name=f"{base}_DQ", axis=1))
            done_weights[t.weight] = f"{base}_dq"
        node.input[0], node.input[1] = done_acts[t.activation], done_weights[t.weight]
    m.graph.initializer.extend(new_inits)
    # QDQ nodes go first; ONNX wants a topological order, so re-sort the whole graph.
    _toposort(m.graph, new_nodes)
    used = {i for n in m.graph.node for i in n.input}
    keep = [i for i in m.graph.initializer if i.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    return m


def _toposort(graph, extra) -> None:
    produced_by = {}
    all_nodes = list(graph.node) + list(extra)
    for n in all_nodes:
        for o in n.output:
            produced_by[o] = n
    order, seen = [], set()

    def visit(n):
        stack = [(n, iter(n.input))]
        while stack:
            cur, it = stack[-1]
            advanced = False
            for i in it:
                dep = produced_by.get(i)
                if dep is not None and id(dep) not in seen:
                    seen.add(id(dep))
                    stack.append((dep, iter(dep.input)))
                    advanced = True
                    break
            if not advanced:
                stack.pop()
                order.append(cur)

    for n in all_nodes:
        if id(n) not in seen:
            seen.add(id(n))
            visit(n)
    del graph.node[:]
    graph.node.extend(order)
