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
from ..onnxgraph import MS, Graph, attention_bias_to_gemms, copy_model, ensure_opset, remove_dead, replace, toposort
from .observers import make_observer, quantize_weight_per_channel, scale_zero_point


@dataclass(frozen=True)
class QuantTarget:
    node: str        # ONNX node name
    activation: str  # input tensor quantized per tensor
    weight: str      # initializer quantized per output channel
    layer: str       # module path from the exporter's name scopes, e.g. visual.blocks.3.mlp.fc1


def _int8_weight(w: np.ndarray, base: str) -> list:
    """Initializers `{base}_int`, `{base}_scale`, `{base}_zp`: symmetric int8 per output column."""
    from onnx import numpy_helper

    q, scale = quantize_weight_per_channel(w, axis=1)  # (K, N): one scale per output column
    return [numpy_helper.from_array(q, f"{base}_int"),
            numpy_helper.from_array(scale.astype(np.float32), f"{base}_scale"),
            numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), f"{base}_zp")]


def _layer_name(node) -> str:
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            scopes = [s.strip(" '\"") for s in p.value.strip("[]").split(",")]
            named = [s for s in scopes if "." in s or s in ("visual", "text")]
            return named[-1] if named else node.name
    return node.name


def default_quantizable(path: str) -> bool:
    """The layers INT8 quantizes unless told otherwise: linear layers inside the transformer blocks and
    those of adapter heads.

    The patch embedding, the final projections and the baked zero-shot head stay float (numerically
    sensitive, and a negligible share of the compute). Adapter heads are layers like any other: a
    16-shot Tip-Adapter cache over 1000 classes is a 512 x 17000 product, 4x less to read in int8,
    and the guard keeps each head's top-1 agreement."""
    return ".blocks." in path or path.startswith("heads.")


def find_targets(model, quantizable=None) -> list[QuantTarget]:
    """Linear layers (MatMuls with a 2-D initializer as second input) whose module path
    `quantizable(path)` accepts (default: `default_quantizable`)."""
    keep = default_quantizable if quantizable is None else quantizable
    inits = {i.name: i for i in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in inits and len(inits[n.input[1]].dims) == 2:
            layer = _layer_name(n)
            if keep(layer):
                out.append(QuantTarget(n.name, n.input[0], n.input[1], layer))
    return out


def probe_session(model, names):
    """An ORT session over a copy of `model` that also outputs the intermediate tensors `names`."""
    onnx = require("onnx", "INT8 calibration")
    ort = require("onnxruntime", "INT8 calibration")
    probe = copy_model(model)
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
    require("onnx", "INT8 quantization")
    from onnx import TensorProto, helper, numpy_helper

    m = copy_model(model)
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
            base = f"{t.weight}_q"
            new_inits += _int8_weight(numpy_helper.to_array(inits[t.weight]), base)
            new_nodes.append(helper.make_node("DequantizeLinear", [f"{base}_int", f"{base}_scale", f"{base}_zp"],
                                              [f"{base}_dq"], name=f"{base}_DQ", axis=1))
            done_weights[t.weight] = f"{base}_dq"
        node.input[0], node.input[1] = done_acts[t.activation], done_weights[t.weight]
    m.graph.initializer.extend(new_inits)
    # QDQ nodes go first; ONNX wants a topological order, so re-sort the whole graph.
    toposort(m.graph, new_nodes)
    used = {i for n in m.graph.node for i in n.input}
    keep = [i for i in m.graph.initializer if i.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    return m


def _replace_linear(model, targets, exclude, make) -> int:
    """Replace each target MatMul (and its bias Add, when it has one) by the nodes `make` returns.

    make(target, weight (K, N) array, bias name or None, input, output) -> (nodes, initializers)."""
    from onnx import numpy_helper

    g = Graph(model.graph)
    nodes = {n.name: n for n in model.graph.node}
    count = 0
    for t in targets:
        if t.layer in exclude or t.node in exclude:
            continue
        mm = nodes[t.node]
        w = numpy_helper.to_array(g.inits[t.weight])
        add, bias = g.bias_add(mm.output[0], width=w.shape[1])
        drop = [mm] if add is None else [mm, add]
        new_nodes, new_inits = make(t, w, bias, mm.input[0], drop[-1].output[0])
        for n in new_nodes:
            n.metadata_props.extend(mm.metadata_props)
        replace(model, drop[-1], new_nodes, drop)
        model.graph.initializer.extend(new_inits)
        count += 1
    if count:
        ensure_opset(model, MS)
        remove_dead(model)
    return count


def quantize_dynamic(model, targets, exclude=()):
    """INT8 weights per output channel; activations quantized per tensor at run time from their own
    range (ONNX Runtime's `DynamicQuantizeMatMul`). Needs no calibration data."""
    require("onnx", "INT8 quantization")
    from onnx import helper

    m = copy_model(model)

    def make(t, w, bias, x, out):
        base = f"{t.weight}_dq"
        inits = _int8_weight(w, base)
        ins = [x, f"{base}_int", f"{base}_scale", f"{base}_zp"] + ([bias] if bias else [])
        return [helper.make_node("DynamicQuantizeMatMul", ins, [out], name=f"{t.node}_dyn",
                                 domain="com.microsoft")], inits

    _replace_linear(m, targets, exclude, make)
    attention_bias_to_gemms(m)
    return m


def quantize_weights(model, targets, exclude=()):
    """Weights only ("w8a16"): int8 weights per output channel stored as `DequantizeLinear -> MatMul`,
    activations and arithmetic stay float. About 4x smaller linear weights on disk and in downloads;
    ONNX Runtime folds the dequantization once at load when the session sets
    `session.disable_quant_qdq=1` (the manifest asks for it), and then runs at FP32 speed."""
    require("onnx", "weight quantization")
    from onnx import helper

    m = copy_model(model)

    def make(t, w, bias, x, out):
        base = f"{t.weight}_w8"
        inits = _int8_weight(w, base)
        mm_out = f"{out}_w8mm" if bias else out
        nodes = [helper.make_node("DequantizeLinear", [f"{base}_int", f"{base}_scale", f"{base}_zp"], [f"{base}_f"],
                                  name=f"{t.node}_w8_DQ", axis=1),
                 helper.make_node("MatMul", [x, f"{base}_f"], [mm_out], name=f"{t.node}_w8")]
        if bias:
            nodes.append(helper.make_node("Add", [mm_out, bias], [out], name=f"{t.node}_w8_bias"))
        return nodes, inits

    _replace_linear(m, targets, exclude, make)
    return m
