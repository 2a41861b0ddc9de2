"""ONNX graphs in the ops phones' accelerators take: every node rewritten into operators that Android's
NNAPI, Core ML's ML Program and XNNPACK execution providers of ONNX Runtime all support (ONNX
Runtime's `mobile_helpers/*_supported_ops.md`, the lists its usability checker reads).

Run on a fixed-shape graph (`onnx.shape_inference` must give every rewritten node's input a static
shape). Each rewrite is exact, except `Erf`, which NNAPI lacks: `tanh` of an odd polynomial, within
3.7e-5 of erf everywhere (float16, which the accelerators compute in, is 4.9e-4 apart at 1).

    counts = lower_for_mobile(model)   # {"LayerNormalization": 9, "Erf": 4, "Gather": 1, ...}
    to_weight_casts(model)             # weight DequantizeLinear -> Cast, Mul (int8 stays in the file)
"""
from __future__ import annotations

import numpy as np

from ..onnxgraph import Graph, remove_dead

# tanh(u (B1 + B3 u^2 + B5 u^4)) on u clipped to [-4, 4]: max |error| 3.7e-5 against erf (erf(4) = 1 - 1.5e-8)
ERF_CLIP = 4.0
ERF_POLY = (1.1281433796437987, 0.10408118539509376, -0.0017864744320624758)


class _Builder:
    """Nodes and constants for one rewrite, named after the node they replace."""

    def __init__(self, model, base: str):
        self.model, self.base, self.nodes, self.k = model, base, [], 0

    def name(self) -> str:
        self.k += 1
        return f"{self.base}/mobile_{self.k}"

    def const(self, value, dtype=np.float32) -> str:
        from onnx import numpy_helper

        n = self.name()
        self.model.graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), n))
        return n

    def op(self, op_type: str, inputs: list, out: str | None = None, **attrs) -> str:
        from onnx import helper

        out = out or self.name()
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=self.name(), **attrs))
        return out


def _set_nodes(model, nodes: list) -> None:
    """Make `nodes` the graph's node list (a rewrite's output, in order) and drop what nothing reads."""
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    remove_dead(model)


def _shapes(model) -> dict:
    """Static shapes of every value shape inference reaches (None entries for unknown dims)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    out = _Shapes()
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        t = v.type.tensor_type
        out.types[v.name] = t.elem_type
        if t.HasField("shape"):
            out[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    for i in model.graph.initializer:
        out[i.name], out.types[i.name] = list(i.dims), i.data_type
    return out


class _Shapes(dict):
    """{value: static shape}, with `types` {value: ONNX element type}."""

    def __init__(self):
        super().__init__()
        self.types: dict = {}


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            from onnx import helper

            return helper.get_attribute_value(a)
    return default


def _axes(g: Graph, node, rank: int) -> list[int] | None:
    """The reduction axes of a Reduce* node (input from opset 18, attribute before), non-negative."""
    axes = _attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        c = g.const(node.input[1])
        if c is None:
            return None
        axes = [int(a) for a in np.ravel(c)]
    if axes is None:
        return list(range(rank))
    return sorted(a % rank for a in axes)


def _layer_norm(b: _Builder, g, node, shapes):
    x, scale = node.input[0], node.input[1]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    shape = shapes.get(x)
    axis = _attr(node, "axis", -1)
    if shape is None or (axis % len(shape)) != len(shape) - 1:
        return None
    axes = b.const([-1], np.int64)
    mean = b.op("ReduceMean", [x, axes], keepdims=1)
    d = b.op("Sub", [x, mean])
    var = b.op("ReduceMean", [b.op("Mul", [d, d]), axes], keepdims=1)
    std = b.op("Sqrt", [b.op("Add", [var, b.const(_attr(node, "epsilon", 1e-5))])])
    if _fold_affine(b, g, node.output[0], scale, bias):  # the scale and shift went into the next layers
        b.op("Div", [d, std], out=node.output[0])
        return True
    y = b.op("Mul", [b.op("Div", [d, std]), scale], out=None if bias else node.output[0])
    if bias:
        b.op("Add", [y, bias], out=node.output[0])
    return True


def _fold_affine(b: _Builder, g: Graph, out: str, scale: str, bias: str | None) -> bool:
    """Fold a LayerNorm's scale and shift into the linear layers it feeds, when every reader is a
    MatMul by a constant weight of its own followed by the Add of a constant bias (x W + c with x =
    n * s + t is n (s W) + (t W + c)): two nodes and two passes fewer per LayerNorm."""
    from onnx import numpy_helper

    s, t = g.const(scale), (g.const(bias) if bias else None)
    readers = g.consumers.get(out, [])
    if s is None or (bias and t is None) or not readers or out in g.outputs:
        return False
    plan = []
    for mm in readers:
        w = g.inits.get(mm.input[1]) if mm.op_type == "MatMul" and mm.input[0] == out else None
        add, c = g.bias_add(mm.output[0]) if w is not None else (None, None)
        if w is None or add is None or c not in g.inits or len(g.consumers.get(mm.input[1], [])) != 1 \
                or len(g.consumers.get(c, [])) != 1 or len(w.dims) != 2 or w.dims[0] != s.size:
            return False
        plan.append((w, g.inits[c]))
    for w, c in plan:
        wv, cv = numpy_helper.to_array(w).astype(np.float32), numpy_helper.to_array(c).astype(np.float32)
        new_c = cv + (t.reshape(-1) @ wv if t is not None else 0.0)
        w.CopyFrom(numpy_helper.from_array((s.reshape(-1, 1) * wv).astype(np.float32), w.name))
        c.CopyFrom(numpy_helper.from_array(new_c.astype(np.float32), c.name))
    return True


def _erf(b: _Builder, g, node, shapes):
    u = b.op("Clip", [node.input[0], b.const(-ERF_CLIP), b.const(ERF_CLIP)])
    u2 = b.op("Mul", [u, u])
    p = b.op("Add", [b.op("Mul", [u2, b.const(ERF_POLY[2])]), b.const(ERF_POLY[1])])
    p = b.op("Add", [b.op("Mul", [p, u2]), b.const(ERF_POLY[0])])
    b.op("Tanh", [b.op("Mul", [p, u])], out=node.output[0])
    return True


# GELU: x * sigmoid(x (C0 + C1 x^2 + C2 x^4)), x clipped to [-GELU_CLIP, GELU_CLIP] inside the polynomial;
# max |error| 2.5e-5 against x * Phi(x) (the tanh form's is 4.7e-4)
GELU_CLIP = 8.0
GELU_POLY = (1.5950157685702555, 0.07401129204501143, -0.0007030335771250796)
GELU_POLY_SHORT = (1.6003141570983934, 0.06940178686427867)  # no clip, no x^4: max |error| 2.7e-4
# the short form: six elementwise passes instead of nine (ONNX Runtime's CPU EP runs each as one pass over
# the activations, and GELU towers spend most of their elementwise time there); its error is half a
# float16 step at 1, and the accelerators compute in float16
GELU_SHORT = True


def _other(node, tensor):
    return node.input[1] if node.input[0] == tensor else node.input[0]


def _is(g: Graph, tensor: str, value: float, tol: float = 1e-5) -> bool:
    c = g.const(tensor)
    return c is not None and c.size == 1 and abs(float(np.ravel(c)[0]) - value) <= tol * max(1.0, abs(value))


def _gelu_pattern(g: Graph, erf):
    """The nodes of x * 0.5 * (1 + erf(x / sqrt 2)) around `erf` (as torch exports exact GELU), or None."""
    div = g.producer.get(erf.input[0])
    if div is None or not ((div.op_type == "Div" and _is(g, div.input[1], 2 ** 0.5))
                           or (div.op_type == "Mul" and _is(g, _other(div, div.input[0]), 2 ** -0.5))):
        return None
    x = div.input[0] if div.op_type == "Div" else (div.input[0] if g.const(div.input[0]) is None else div.input[1])
    add = g.only_consumer(erf.output[0], "Add")
    if add is None or not _is(g, _other(add, erf.output[0]), 1.0):
        return None
    m1 = g.only_consumer(add.output[0], "Mul")
    if m1 is None:
        return None
    m2 = g.only_consumer(m1.output[0], "Mul")
    if m2 is None:
        return None
    halves = (_is(g, _other(m1, add.output[0]), 0.5) and _other(m2, m1.output[0]) == x) or \
             (_other(m1, add.output[0]) == x and _is(g, _other(m2, m1.output[0]), 0.5))
    if not halves or len(g.consumers.get(div.output[0], [])) != 1:
        return None
    return x, [div, erf, add, m1, m2]


def _gelu(b: _Builder, x: str, out: str, short: bool = False) -> None:
    u = x if short else b.op("Clip", [x, b.const(-GELU_CLIP), b.const(GELU_CLIP)])
    u2 = b.op("Mul", [u, u])
    c = GELU_POLY_SHORT if short else GELU_POLY
    p = b.op("Add", [b.op("Mul", [u2, b.const(c[-1])]), b.const(c[-2])])
    if not short:
        p = b.op("Add", [b.op("Mul", [p, u2]), b.const(c[0])])
    b.op("Mul", [x, b.op("Sigmoid", [b.op("Mul", [p, u])])], out=out)


def _reduce_count(g, node, shapes):
    shape = shapes.get(node.input[0])
    if not shape:
        return None, None
    axes = _axes(g, node, len(shape))
    if axes is None or any(shape[a] is None for a in axes) or _attr(node, "noop_with_empty_axes", 0):
        return None, None
    return axes, int(np.prod([shape[a] for a in axes]))


def _reduce_sum(b: _Builder, g, node, shapes, square: bool = False):
    """ReduceSum (Core ML only) and ReduceL2 (neither) as n * ReduceMean (both)."""
    axes, n = _reduce_count(g, node, shapes)
    if axes is None:
        return None
    x = node.input[0]
    if square:
        x = b.op("Mul", [x, x])
    keep = _attr(node, "keepdims", 1)
    mean = b.op("ReduceMean", [x, b.const(axes, np.int64)], keepdims=keep)
    if square:
        b.op("Sqrt", [b.op("Mul", [mean, b.const(float(n))])], out=node.output[0])
    else:
        b.op("Mul", [mean, b.const(float(n))], out=node.output[0])
    return True


def _gather(b: _Builder, g, node, shapes):
    """Gather of constant positions from a computed tensor (a class token) -> Slice [+ Squeeze]."""
    data, idx = node.input
    c = g.const(idx)
    shape = shapes.get(data)
    if data in g.inits or c is None or shape is None or c.ndim > 1:
        return None
    axis = _attr(node, "axis", 0) % len(shape)
    flat = [int(v) % shape[axis] if shape[axis] else int(v) for v in np.ravel(c)]
    if not flat or flat != list(range(flat[0], flat[0] + len(flat))):
        return None
    ax = b.const([axis], np.int64)
    out = None if c.ndim == 0 else node.output[0]
    s = b.op("Slice", [data, b.const([flat[0]], np.int64), b.const([flat[0] + len(flat)], np.int64), ax], out=out)
    if c.ndim == 0:
        b.op("Squeeze", [s, ax], out=node.output[0])
    return True


def _neg(b, g, node, shapes):
    b.op("Mul", [node.input[0], b.const(-1.0)], out=node.output[0])
    return True


def _reciprocal(b, g, node, shapes):
    b.op("Div", [b.const(1.0), node.input[0]], out=node.output[0])
    return True


# an additive mask entry that removes a key in float16 as in float32: exp(-30000 + s) == 0
MASKED = 30000.0


def _where(b: _Builder, g, node, shapes):
    """Where(constant mask, fill, x) with a -inf (or very negative) fill: an attention mask, which NNAPI
    takes as an Add of a constant (-30000 where masked: the softmax gives those keys exactly 0)."""
    cond, a, c = (g.const(i) for i in node.input)
    if cond is None:
        return None
    for fill, other, where_fill in ((a, node.input[2], cond), (c, node.input[1], ~cond.astype(bool))):
        if fill is not None and fill.size == 1 and float(np.ravel(fill)[0]) <= -MASKED:
            mask = np.where(where_fill.astype(bool), -MASKED, 0.0).astype(np.float32)
            b.op("Add", [other, b.const(mask)], out=node.output[0])
            return True
    return None


def _expand(b: _Builder, g, node, shapes):
    """Expand of a computed float tensor to a constant shape (normalize's denominator) -> Mul by ones."""
    shape = g.const(node.input[1])
    if shape is None or node.input[0] in g.inits or shapes.get(node.output[0]) is None \
            or shapes.types.get(node.input[0]) != 1:  # float32 only
        return None
    out = shapes[node.output[0]]
    if any(d is None for d in out) or int(np.prod(out)) > 1 << 20:
        return None
    b.op("Mul", [node.input[0], b.const(np.ones(out, np.float32))], out=node.output[0])
    return True


REWRITES = {
    "Expand": _expand,                   # neither
    "Where": _where,                     # Core ML only
    "LayerNormalization": _layer_norm,   # Core ML only
    "Erf": _erf,                         # Core ML only
    "ReduceL2": lambda b, g, n, s: _reduce_sum(b, g, n, s, square=True),
    "ReduceSum": _reduce_sum,            # Core ML only
    "Gather": _gather,                   # Core ML has none
    "Neg": _neg,                         # NNAPI only
    "Reciprocal": _reciprocal,           # Core ML only
}


def lower_for_mobile(model, supported: set | None = None) -> dict[str, int]:
    """Rewrite, in place, every node of `model` that one of the mobile EPs lacks into ops they all
    take (REWRITES; float32 graphs). `supported`: the "domain:Op" names every EP the graph is for
    takes (those stay as they are); None rewrites everything REWRITES knows. Returns {op: rewritten};
    a node whose shapes are not static enough stays as it is (the usability analysis counts it)."""
    def wanted(op: str) -> bool:
        return supported is None or f"ai.onnx:{op}" not in supported

    shapes = _shapes(model)
    g = Graph(model.graph)
    counts: dict[str, int] = {}
    out_nodes, gone = [], set()
    for node in list(model.graph.node):
        if node.op_type == "Erf" and node.domain in ("", "ai.onnx") and wanted("Erf"):
            match = _gelu_pattern(g, node)
            if match is not None:  # the whole GELU at once: fewer, cheaper nodes than erf alone
                x, nodes = match
                b = _Builder(model, node.name or node.output[0])
                _gelu(b, x, nodes[-1].output[0], short=GELU_SHORT)
                gone.update(id(n) for n in nodes)
                out_nodes = [n for n in out_nodes if id(n) not in gone]
                out_nodes.extend(b.nodes)
                counts["Gelu"] = counts.get("Gelu", 0) + 1
                continue
        if id(node) in gone:
            continue
        fn = REWRITES.get(node.op_type) if node.domain in ("", "ai.onnx") and wanted(node.op_type) else None
        b = _Builder(model, node.name or node.output[0])
        if fn is not None and fn(b, g, node, shapes):
            out_nodes.extend(b.nodes)
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
        else:
            out_nodes.append(node)
    _set_nodes(model, out_nodes)
    return counts


def to_weight_casts(model) -> int:
    """Every DequantizeLinear of a constant integer tensor (weights, tables) -> Cast + Mul [+ Sub]:
    the same values, from ops the mobile EPs take (none of Core ML's takes DequantizeLinear), and the
    integers stay integers in the file. Returns how many were rewritten."""
    g = Graph(model.graph)
    out_nodes, n = [], 0
    for node in list(model.graph.node):
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
            out_nodes.append(node)
            continue
        q = g.inits.get(node.input[0])
        scale = g.const(node.input[1])
        zp = g.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if q is None or scale is None or _attr(node, "block_size", 0):
            out_nodes.append(node)
            continue
        rank, axis = len(q.dims), _attr(node, "axis", 1)
        shape = [1] * rank
        if scale.ndim == 1 and scale.size > 1:
            shape[axis % rank] = scale.size
        b = _Builder(model, node.name or node.output[0])
        x = b.op("Cast", [node.input[0]], to=1)
        if zp is not None and np.any(zp):
            x = b.op("Sub", [x, b.const(zp.astype(np.float32).reshape(shape))])
        b.op("Mul", [x, b.const(scale.astype(np.float32).reshape(shape))], out=node.output[0])
        out_nodes.extend(b.nodes)
        n += 1
    _set_nodes(model, out_nodes)
    return n


def gathers_to_plain(model) -> int:
    """Every 8-bit GatherBlockQuantized (a quantized token embedding: ONNX Runtime's contrib op, which
    no mobile EP takes) -> Gather of int8 rows and of their scales, Cast, Mul: the same values, the
    codes still one byte each. Needs static index shapes for more than one block per row. Returns how
    many were rewritten."""
    from onnx import numpy_helper

    g = Graph(model.graph)
    shapes = None
    out_nodes, n = [], 0
    for node in list(model.graph.node):
        attrs = {a: _attr(node, a) for a in ("bits", "block_size", "gather_axis", "quantize_axis")}
        codes = g.inits.get(node.input[0])
        scale = g.const(node.input[2]) if len(node.input) > 2 else None
        plain = (node.op_type == "GatherBlockQuantized" and attrs["bits"] == 8 and codes is not None
                 and scale is not None and (len(node.input) < 4 or not node.input[3])
                 and attrs["gather_axis"] in (0, None) and attrs["quantize_axis"] == 1 and len(codes.dims) == 2)
        if not plain:
            out_nodes.append(node)
            continue
        q = (numpy_helper.to_array(codes).astype(np.int16) - 128).astype(np.int8)
        rows, width = q.shape
        blocks = scale.reshape(rows, -1).astype(np.float32)
        b = _Builder(model, node.name or node.output[0])
        ids = node.input[1]
        x = b.op("Cast", [b.op("Gather", [b.const(q, np.int8), ids], axis=0)], to=1)
        s = b.op("Gather", [b.const(blocks), ids], axis=0)                       # (..., blocks)
        if blocks.shape[1] == 1:
            b.op("Mul", [x, s], out=node.output[0])
        else:
            shapes = shapes or _shapes(model)
            lead = shapes.get(ids)
            if lead is None or any(d is None for d in lead):
                out_nodes.append(node)
                continue
            nb = blocks.shape[1]
            xb = b.op("Reshape", [x, b.const(lead + [nb, width // nb], np.int64)])
            sb = b.op("Unsqueeze", [s, b.const([-1], np.int64)])
            b.op("Reshape", [b.op("Mul", [xb, sb]), b.const(lead + [width], np.int64)], out=node.output[0])
        out_nodes.extend(b.nodes)
        n += 1
    _set_nodes(model, out_nodes)
    return n
