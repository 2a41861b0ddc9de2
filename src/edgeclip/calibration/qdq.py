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


def copy_model(model):
    from onnx import ModelProto

    m = ModelProto()
    m.CopyFrom(model)
    return m


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


def find_targets(model) -> list[QuantTarget]:
    """Linear layers inside the transformer blocks and of adapter heads: MatMuls with a 2-D initializer
    as second input.

    The patch embedding, the final projections and the baked zero-shot head stay float (numerically
    sensitive, and a negligible share of the compute). Adapter heads are layers like any other: a
    16-shot Tip-Adapter cache over 1000 classes is a 512 x 17000 product, 4x less to read in int8,
    and the guard keeps each head's top-1 agreement."""
    inits = {i.name: i for i in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in inits and len(inits[n.input[1]].dims) == 2:
            layer = _layer_name(n)
            if ".blocks." in layer or layer.startswith("heads."):
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
            if o:  # "" marks an omitted optional output
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


def lower_for_ort(model, attention: bool = True) -> int:
    """Rewrite `DQ(x) -> MatMul <- DQ(W)` [+ bias Add] into ONNX Runtime's fused
    `com.microsoft.MatMulIntegerToFloat` with the bias inside, in place; returns how many.

    ONNX Runtime does this fusion itself when loading a QDQ graph, but leaves the bias as a separate
    Add; folding it saves one pass over every GEMM output. The numbers are the same."""
    from onnx import helper

    from ..kernels.onnx_fusions import MS, Graph, ensure_opset, remove_dead, replace

    g = Graph(model.graph)
    count = 0
    for mm in list(model.graph.node):
        if mm.op_type != "MatMul":
            continue
        a, b = g.op(mm.input[0], "DequantizeLinear"), g.op(mm.input[1], "DequantizeLinear")
        if a is None or b is None or b.input[0] not in g.inits:
            continue
        inputs = [a.input[0], b.input[0], a.input[1], b.input[1], a.input[2], b.input[2]]
        add, bias = g.bias_add(mm.output[0])
        drop = [mm] if add is None else [mm, add]
        node = helper.make_node("MatMulIntegerToFloat", inputs + ([bias] if bias else []), [drop[-1].output[0]],
                                name=f"{mm.name}_int8", domain=MS)
        node.metadata_props.extend(mm.metadata_props)
        replace(model, drop[-1], [node], drop)
        count += 1
    if count:
        ensure_opset(model, MS)
        remove_dead(model)
        if attention:
            count += _lower_attention(model)
        _attention_bias_to_gemms(model)
    return count


# Integer GEMMs of ONNX Runtime that add a bias as they write their output: op -> index of that input.
GEMM_BIAS_INPUT = {"MatMulIntegerToFloat": 6, "DynamicQuantizeMatMul": 4}


def _attention_bias_to_gemms(model) -> int:
    """Give each float MultiHeadAttention's Q/K/V projection bias (its `bias` input, where the attention
    fusion puts it) back to the integer GEMMs that make its q, k and v, when every one of them takes a
    bias input and has none: the GEMM adds it while writing its output, where the attention would spend
    a pass over Q, K and V. The graph is then the one lowered from an unfolded fusion. Returns how many
    attentions gave theirs up."""
    from onnx import numpy_helper

    from ..kernels.onnx_fusions import Graph, remove_dead

    g = Graph(model.graph)
    count = 0
    for mha in [n for n in model.graph.node if n.op_type == "MultiHeadAttention"]:
        if len(mha.input) < 4 or mha.input[3] not in g.inits:
            continue
        plan = _gemm_bias_plan(g, mha)
        if plan is None:
            continue
        bias = numpy_helper.to_array(g.inits[mha.input[3]])
        widths = {slot: width for _, parts in plan for slot, width in parts}
        if len(widths) != 3 or widths[0] != widths[1] or sum(widths.values()) != bias.shape[0]:
            continue
        start = {0: 0, 1: widths[0], 2: 2 * widths[0]}
        for gemm, parts in plan:
            values = np.concatenate([bias[start[slot]:start[slot] + width] for slot, width in parts])
            if [slot for slot, _ in parts] == [0, 1, 2]:  # one packed QKV GEMM: the very same tensor
                name = mha.input[3]
            else:
                name = f"{gemm.name}_bias"
                model.graph.initializer.append(numpy_helper.from_array(values.astype(np.float32), name))
            idx = GEMM_BIAS_INPUT[gemm.op_type]
            while len(gemm.input) <= idx:
                gemm.input.append("")
            gemm.input[idx] = name
        mha.input[3] = ""
        while mha.input and not mha.input[-1]:
            del mha.input[-1]
        count += 1
    if count:
        remove_dead(model)
    return count


def _gemm_bias_plan(g, mha):
    """[(bias-less integer GEMM, [(q/k/v slot, columns) for each block of its output columns])] for the
    GEMMs that make mha's q, k and v (directly, or through a last-axis Split read only by mha), else None."""
    plan, seen = [], set()
    for t in mha.input[:3]:
        p = g.producer.get(t)
        if p is None:
            return None
        if p.op_type == "Split":
            src, parts = p.input[0], list(p.output)
            if len(g.consumers.get(src, [])) != 1 or src in g.outputs:
                return None
        else:
            src, parts = t, [t]
        gemm = g.producer.get(src)
        if gemm is None or gemm.op_type not in GEMM_BIAS_INPUT or gemm.input[1] not in g.inits:
            return None
        idx = GEMM_BIAS_INPUT[gemm.op_type]
        if len(gemm.input) > idx and gemm.input[idx]:
            return None
        if gemm.output[0] in seen:
            continue
        seen.add(gemm.output[0])
        cols = int(g.inits[gemm.input[1]].dims[-1])
        sizes = [cols]
        if p.op_type == "Split":
            axis, sizes = g.split_sizes(p, cols)
            if axis not in (-1, 2) or sizes is None:
                return None
        slots = []
        for part, size in zip(parts, sizes):  # each output block goes to mha alone (shape-only readers aside)
            readers = [c for c in g.consumers.get(part, []) if c.op_type != "Shape"]
            if part in g.outputs or len(readers) != 1 or readers[0].output[0] != mha.output[0] \
                    or list(mha.input[:3]).count(part) != 1:
                return None
            slots.append((list(mha.input[:3]).index(part), size))
        plan.append((gemm, slots))
    return plan


def _lower_attention(model) -> int:
    """INT8 packed-QKV projection -> Split -> MultiHeadAttention  ==>  one `com.microsoft.QAttention`
    (the integer QKV GEMM, its bias and the attention in one kernel). Only self-attention without an
    additive mask qualifies; causal masks carry over as `unidirectional`. The QKV bias is the
    MultiHeadAttention's own `bias` input (where the attention fusion puts it) or, in graphs fused
    without that, the GEMM's."""
    from onnx import helper

    from ..kernels.onnx_fusions import Graph, remove_dead, replace

    g = Graph(model.graph)
    count = 0
    for mha in list(model.graph.node):
        if mha.op_type != "MultiHeadAttention" or len(mha.input) < 3 or any(mha.input[4:]):
            continue
        qkv = list(mha.input[:3])
        split = g.producer.get(qkv[0])
        if split is None or split.op_type != "Split" or list(split.output) != qkv:
            continue
        mm = g.op(split.input[0], "MatMulIntegerToFloat")
        if mm is None or len(mm.input) < 6 or len(g.consumers.get(mm.output[0], [])) != 1:
            continue
        gemm_bias = mm.input[6] if len(mm.input) > 6 else ""
        mha_bias = mha.input[3] if len(mha.input) > 3 else ""
        if bool(gemm_bias) == bool(mha_bias):  # neither (QAttention needs one), or both
            continue
        a, w, a_scale, w_scale, a_zp, w_zp = mm.input[:6]
        bias = mha_bias or gemm_bias
        attrs = {x.name: helper.get_attribute_value(x) for x in mha.attribute}
        node = helper.make_node("QAttention", [a, w, bias, a_scale, w_scale, "", a_zp, w_zp], [mha.output[0]],
                                name=f"{mha.name}_int8", domain="com.microsoft", num_heads=attrs["num_heads"],
                                unidirectional=attrs.get("unidirectional", 0), scale=attrs.get("scale", 0.0))
        node.metadata_props.extend(mm.metadata_props)
        replace(model, mha, [node], [mha])
        count += 1
    if count:
        remove_dead(model)
    return count


def _replace_linear(model, targets, exclude, make) -> int:
    """Replace each target MatMul (and its bias Add, when it has one) by the nodes `make` returns.

    make(target, weight (K, N) array, bias name or None, input, output) -> (nodes, initializers)."""
    from onnx import numpy_helper

    from ..kernels.onnx_fusions import MS, Graph, ensure_opset, remove_dead, replace

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
    _attention_bias_to_gemms(m)
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
