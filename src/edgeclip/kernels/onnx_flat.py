"""Exact rewrites that trim what plain ops cost on a CPU, for fixed-shape graphs (the phone graphs):

- `patches_as_gemm`: a patch embedding's strided Conv -> Reshape/Transpose (rank <= 5) and one Gemm;
- `flatten_tokens`: every [B, N, C] stream held as [B*N, C], so each linear layer with its bias is one
  Gemm instead of MatMul and Add. The element order is the same, so flattening needs no copy, and the
  ops along the stream (elementwise ops with their constants, reductions, softmax and splits over the
  last axis) compute the same on the matrix; where the stream leaves for an op that needs its three
  axes, the attention heads' Reshape takes the matrix as it is and anything else gets one Reshape back;
- `centered_stream`: a pre-LN residual stream kept at zero mean, so its LayerNorms skip the mean;
- `fold_scales`: the attention and QuickGELU scales folded into the Gemms beside them, and the mobile
  GELU's cubic coefficient into the layers around it;
- `heads_at_once`: Q, K and V cut into heads by one Reshape and Transpose of the QKV tensor.

NNAPI, Core ML and XNNPACK all take Gemm with a constant B (their fully-connected layer; XNNPACK only
in 2-D).

    flatten_tokens(model)   # {"flattened": 284, "Gemm": 49, "Reshape": 23}
"""
from __future__ import annotations

import numpy as np

from ..onnxgraph import Graph
from .onnx_mobile import _attr, _axes, _Builder, _other, _set_nodes, _shapes

UNARY = {"Sigmoid", "Sqrt", "Relu", "Tanh", "Erf", "Neg", "Reciprocal", "Exp", "Abs", "Identity"}
BINARY = {"Add", "Sub", "Mul", "Div", "Pow"}
REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax"}
LAST_AXIS = {"Softmax": -1, "LogSoftmax": -1, "Split": 0, "LayerNormalization": -1}  # op: default axis
FLOAT = 1


class _Flat:
    """The rewrite's state: which tensors are held flat (name -> its flat name) and their 3-D shapes."""

    def __init__(self, model):
        self.model, self.g, self.shapes = model, Graph(model.graph), _shapes(model)
        self.flat: dict[str, str] = {}
        self.counts = {"flattened": 0, "Gemm": 0, "Reshape": 0}
        self.skip: set[int] = set()  # the bias Adds taken into a Gemm
        self.copies: set[str] = set()  # 3-D tensors that stay, with a flat copy beside them

    def shape3(self, t: str):
        s = self.shapes.get(t)
        ok = s is not None and len(s) == 3 and all(d for d in s) and self.shapes.types.get(t) == FLOAT
        return s if ok else None

    def as_flat(self, t: str, b: _Builder) -> str:
        """The flat name of `t`, a 3-D tensor (a Reshape to [B*N, C] when it is not flat yet)."""
        if t not in self.flat:
            a, n, c = self.shape3(t)
            src = self.g.producer.get(t)
            if src is not None and src.op_type == "Reshape":  # reshape its input straight to the matrix
                t_in = src.input[0]
            else:
                t_in = t
            self.flat[t] = b.op("Reshape", [t_in, b.const([a * n, c], np.int64)], out=f"{t}/flat")
            self.copies.add(t)
            self.counts["Reshape"] += 1
        return self.flat[t]


def _const_for(x: np.ndarray, lead: tuple[int, int]):
    """A constant operand broadcast against [a, n, c], as it broadcasts against [a*n, c]; None if not."""
    if x.ndim <= 1:
        return x
    if x.ndim > 3:
        return None
    p, q, r = (1,) * (3 - x.ndim) + x.shape
    if p == 1 and q == 1:
        return x.reshape(r)
    if (p, q) == lead or (p == 1 and lead[0] == 1 and q == lead[1]):
        return x.reshape(p * q, r)
    return None


def _data_inputs(st: _Flat, node):
    """(flat-able tensor inputs, constant inputs {index: value}) of an elementwise node, or None."""
    tensors, consts = [], {}
    for i, t in enumerate(node.input):
        c = st.g.const(t)
        if c is not None:
            consts[i] = c
        elif st.shape3(t) is not None:
            tensors.append(t)
        else:
            return None
    return tensors, consts


def _try(st: _Flat, node, b: _Builder) -> bool:
    """Add the flat form of `node` to `b` when it has one (and an input already flat)."""
    op = node.op_type if node.domain in ("", "ai.onnx") else None
    out = node.output[0] if len(node.output) == 1 else None
    if op == "MatMul":
        return _matmul(st, node, b)
    if op in UNARY | BINARY | REDUCE or op in LAST_AXIS:
        split = op == "Split"
        outs = list(node.output)
        if (out is None and not split) or any(st.shape3(o) is None for o in outs):
            return False
        ins = _data_inputs(st, node)
        if ins is None or not ins[0] or not any(t in st.flat for t in ins[0]):
            return False
        tensors, consts = ins
        lead = tuple(st.shape3(tensors[0])[:2])
        if any(tuple(st.shape3(t)[:2]) != lead for t in tensors + ([] if split else [out])):
            return False
        inputs = list(node.input)
        for i, t in enumerate(node.input):
            if i in consts:
                if op in BINARY:
                    c = _const_for(consts[i], lead)
                    if c is None:
                        return False
                    inputs[i] = b.const(c, consts[i].dtype)
            else:
                inputs[i] = None  # filled below, once the node is known to flatten
        attrs = {a.name: a for a in node.attribute}
        if op in REDUCE:
            if _attr(node, "keepdims", 1) != 1 or _axes(st.g, node, 3) != [2]:
                return False
            if "axes" in attrs:
                attrs.pop("axes")
                extra = {"axes": [-1]}
            else:
                inputs[1], extra = b.const([-1], np.int64), {}
        elif op in LAST_AXIS:
            if _attr(node, "axis", LAST_AXIS[op]) % 3 != 2:
                return False
            attrs.pop("axis", None)
            extra = {"axis": -1}
        else:
            extra = {}
        inputs = [st.as_flat(t, b) if v is None else v for t, v in zip(node.input, inputs)]
        from onnx import helper

        flat_outs = [f"{o}/flat" for o in outs]
        new = helper.make_node(op, inputs, flat_outs, name=f"{node.name or node.output[0]}/flat", **extra)
        new.attribute.extend(a for a in attrs.values())
        b.nodes.append(new)
        st.flat.update(zip(outs, flat_outs))
        st.counts["flattened"] += 1
        return True
    return False


def _matmul(st: _Flat, node, b: _Builder) -> bool:
    """A linear layer on the stream: [a, n, K] @ [K, M] (+ a constant bias) -> one Gemm on the matrix
    (a MatMul on it when B is computed, e.g. from int8 weights)."""
    a_in, w_in = node.input
    shape_w = st.shapes.get(w_in)
    if st.shape3(a_in) is None or shape_w is None or len(shape_w) != 2 or st.shape3(node.output[0]) is None:
        return False
    out = node.output[0]
    add = st.g.only_consumer(out, "Add")
    bias = None
    if add is not None and w_in in st.g.inits:
        c = st.g.const(add.input[1] if add.input[0] == out else add.input[0])
        if c is not None and c.size == shape_w[1] and c.shape[-1:] == (shape_w[1],) and c.dtype == np.float32:
            bias = c.reshape(-1)
    x = st.as_flat(a_in, b)
    if bias is not None:
        y = b.op("Gemm", [x, w_in, b.const(bias)], out=f"{add.output[0]}/flat")
        st.flat[add.output[0]] = y
        st.skip.add(id(add))
        st.counts["Gemm"] += 1
    else:
        st.flat[out] = b.op("MatMul", [x, w_in], out=f"{out}/flat")
    st.counts["flattened"] += 1
    return True


def _restore(st: _Flat, nodes: list) -> list:
    """Each original name a node that was not flattened (or a graph output) reads, from its flat form."""
    from onnx import helper

    needed = set(o.name for o in st.model.graph.output) - st.copies
    for n in nodes:
        if n.op_type == "Reshape" and n.input[0] in st.flat:
            shape = st.g.const(n.input[1])
            if shape is not None and not np.any(shape == 0):
                n.input[0] = st.flat[n.input[0]]  # a Reshape takes the matrix as it is
                continue
        needed.update(i for i in n.input if i in st.flat and i not in st.copies)
    original = {f: t for t, f in st.flat.items()}
    out = []
    for n in nodes:
        out.append(n)
        for o in n.output:
            t = original.get(o)
            if t in needed:
                b = _Builder(st.model, o)
                out.append(helper.make_node("Reshape", [o, b.const(st.shape3(t), np.int64)], [t], name=f"{o}/restore"))
                st.counts["Reshape"] += 1
    return out


def flatten_tokens(model) -> dict[str, int]:
    """Rewrite, in place, a fixed-shape float graph's [B, N, C] streams as [B*N, C] matrices, linear
    layers with a constant weight and bias as Gemm. Returns counts of the flattened nodes, the Gemms
    and the Reshapes it added (a graph with no such stream is left as it was)."""
    st = _Flat(model)
    nodes = []
    for node in list(model.graph.node):
        if id(node) in st.skip:
            continue
        b = _Builder(model, node.name or node.output[0])
        if _try(st, node, b):
            nodes.extend(b.nodes)
        else:
            nodes.append(node)
    if st.counts["Gemm"] == 0:
        _set_nodes(model, list(model.graph.node))  # (drops the constants of what did not flatten)
        return {}
    _set_nodes(model, _restore(st, nodes))
    return st.counts


def patches_as_gemm(model) -> int:
    """Every patch embedding (a Conv whose stride is its kernel, read as [B, h*w, C] by a Reshape and a
    Transpose) -> the image cut into patches by Reshape and Transpose (rank 5 at most: Core ML's limit)
    and one Gemm: ONNX Runtime's CPU EP runs a strided Conv well below GEMM speed. Needs static shapes;
    returns how many were rewritten."""
    from onnx import helper

    shapes, g = _shapes(model), Graph(model.graph)
    out_nodes, gone, n = [], set(), 0
    for node in list(model.graph.node):
        if id(node) in gone:
            continue
        match = _patch_conv(g, shapes, node)
        if match is None:
            out_nodes.append(node)
            continue
        (bsz, cin, h, w, k, cout), tail = match
        wm = g.const(node.input[1]).reshape(cout, cin * k * k)
        b = _Builder(model, node.name or node.output[0])
        x = node.input[0]
        if bsz == 1:
            x = b.op("Reshape", [x, b.const([cin, h, k, w, k], np.int64)])
            x = b.op("Transpose", [x], perm=[1, 3, 0, 2, 4])
        else:  # two rank-4 transposes
            x = b.op("Reshape", [x, b.const([bsz * cin * h, k, w, k], np.int64)])
            x = b.op("Transpose", [x], perm=[0, 2, 1, 3])
            x = b.op("Reshape", [x, b.const([bsz, cin, h * w, k * k], np.int64)])
            x = b.op("Transpose", [x], perm=[0, 2, 1, 3])
        x = b.op("Reshape", [x, b.const([bsz * h * w, cin * k * k], np.int64)])
        ins = [x, b.const(wm)] + ([node.input[2]] if len(node.input) > 2 and node.input[2] else [])
        y = b.op("Gemm", ins, transB=1)
        out_nodes.extend(b.nodes)
        out_nodes.append(helper.make_node("Reshape", [y, b.const([bsz, h * w, cout], np.int64)], [tail[-1].output[0]],
                                          name=b.name()))
        gone.update(id(t) for t in tail)
        n += 1
    if n:
        _set_nodes(model, out_nodes)
    return n


def _patch_conv(g: Graph, shapes, node):
    """((B, Cin, h, w, k, Cout), [Reshape, Transpose]) when `node` is a patch-embedding Conv."""
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
        return None
    wt = g.const(node.input[1])
    xs = shapes.get(node.input[0])
    if wt is None or wt.ndim != 4 or xs is None or len(xs) != 4 or not all(xs):
        return None
    cout, cin, k, k2 = wt.shape
    strides, pads = _attr(node, "strides", [1, 1]), _attr(node, "pads", [0, 0, 0, 0])
    if (k != k2 or list(strides) != [k, k] or any(pads) or _attr(node, "group", 1) != 1
            or any(d != 1 for d in _attr(node, "dilations", [1, 1])) or xs[1] != cin
            or xs[2] % k or xs[3] % k or _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")):
        return None
    bsz, h, w = xs[0], xs[2] // k, xs[3] // k
    r = g.only_consumer(node.output[0], "Reshape")
    t = g.only_consumer(r.output[0], "Transpose") if r is not None else None
    target = g.const(r.input[1]) if r is not None else None
    if t is None or target is None or list(_attr(t, "perm")) != [0, 2, 1]:
        return None
    target = [int(v) for v in target]
    if target.count(-1) == 1:  # the one inferred dimension
        target[target.index(-1)] = bsz * cout * h * w // max(1, -int(np.prod(target)))
    if target != [bsz, cout, h * w]:
        return None
    return (bsz, cin, h, w, k, cout), [r, t]


VIEWS = {"Reshape", "Slice", "Squeeze", "Unsqueeze", "Gather", "Identity"}


def centered_stream(model) -> int:
    """A pre-LN transformer's residual stream kept at zero mean over its channels, so its LayerNorms
    (decomposed: ReduceMean, Sub, ...) need no mean: every stream tensor is read only by LayerNorms
    (which ignore its mean), residual Adds of a Gemm's output (whose weight and bias are centered over
    the output channels: its output then has zero mean) and token selections or mixes (a slice, a
    gather, a MatMul over tokens: zero-mean rows stay zero-mean). The stream's first tensor is
    centered once. Exact up to float rounding; applies only when every reader qualifies. Returns how
    many LayerNorms lost their mean."""
    g, shapes = Graph(model.graph), _shapes(model)
    lns = {}  # stream tensor -> (ReduceMean, Sub) of its LayerNorm
    for node in model.graph.node:
        rank = len(shapes.get(node.input[0]) or ())
        if node.op_type == "ReduceMean" and _attr(node, "keepdims", 1) == 1 and rank:
            sub = g.only_consumer(node.output[0], "Sub")
            if sub is not None and sub.input == [node.input[0], node.output[0]] and _axes(g, node, rank) == [rank - 1]:
                lns[node.input[0]] = (node, sub)
    stream, adds, roots = _stream(g, lns, shapes)
    if stream is None or not lns:
        return 0
    for add, gemm in adds:
        w, bias = g.const(gemm.input[1]), g.const(gemm.input[2])
        axis = 0 if _attr(gemm, "transB", 0) else 1
        _replace_init(model, gemm, 1, w - w.mean(axis=axis, keepdims=True))
        _replace_init(model, gemm, 2, bias - bias.mean())
    means = {id(m) for m, _ in lns.values()}
    subs = {id(sub) for _, sub in lns.values()}
    rename = {}
    nodes = []
    for node in model.graph.node:
        if id(node) in means:
            continue
        if id(node) in subs:
            rename[node.output[0]] = rename.get(node.input[0], node.input[0])
            continue
        for i, t in enumerate(node.input):
            node.input[i] = rename.get(t, t)
        nodes.append(node)
        for o in node.output:
            if o in roots:  # center the stream's first tensor, once, for every reader
                b = _Builder(model, o)
                m = b.op("ReduceMean", [o, b.const([-1], np.int64)], keepdims=1)
                rename[o] = b.op("Sub", [o, m])
                nodes.extend(b.nodes)
    _set_nodes(model, nodes)
    return len(lns)


def _stream(g: Graph, lns: dict, shapes):
    """(the stream's tensors, its residual (Add, Gemm) pairs, its roots), or (None, ...) when a reader
    of a stream tensor does not qualify."""
    stream, adds, pending = set(), [], []
    todo = list(lns)
    fail = (None, None, None)
    while todo:
        t = todo.pop()
        if t in stream:
            continue
        stream.add(t)
        if t in g.outputs:
            return fail
        for c in g.consumers.get(t, []):
            if t in lns and c in lns[t]:
                continue
            if c.op_type == "Add" and c.domain in ("", "ai.onnx"):
                other = c.input[1] if c.input[0] == t else c.input[0]
                gemm = g.op(other, "Gemm")
                if gemm is not None and _centerable(g, gemm):
                    adds.append((c, gemm))
                else:
                    pending.append(other)  # must turn out a stream tensor too
            elif not ((c.op_type in VIEWS and c.input[0] == t and not _touches_channels(g, c, shapes))
                      or (c.op_type == "MatMul" and c.input[1] == t and c.input[0] != t)):
                return fail
            todo.append(c.output[0])
    if any(t not in stream for t in pending):
        return fail
    derived = {a.output[0] for a, _ in adds} | set(pending)
    written = {gm.output[0] for _, gm in adds}
    roots = set()
    for t in stream:
        p = g.producer.get(t)
        from_stream = p is not None and (
            (p.op_type == "Add" and all(i in stream or i in written for i in p.input)
             and any(i in stream for i in p.input))
            or (p.op_type in VIEWS and p.input[0] in stream) or (p.op_type == "MatMul" and p.input[1] in stream))
        if not from_stream and t not in derived:
            roots.add(t)
        elif not from_stream:
            return fail
    return stream, adds, roots


def _centerable(g: Graph, gemm) -> bool:
    w = g.inits.get(gemm.input[1])
    return (w is not None and len(gemm.input) > 2 and g.const(gemm.input[2]) is not None
            and _attr(gemm, "alpha", 1.0) == 1.0 and _attr(gemm, "beta", 1.0) == 1.0 and not _attr(gemm, "transA", 0)
            and len(g.consumers.get(gemm.output[0], [])) == 1 and gemm.output[0] not in g.outputs)


def _touches_channels(g: Graph, node, shapes) -> bool:
    """Whether a view op moves or cuts the channel (last) axis: each token's channels must stay together
    (a Reshape keeping the last dimension, a Slice, Gather or Squeeze of other axes)."""
    xs, ys = shapes.get(node.input[0]), shapes.get(node.output[0])
    if not xs or not ys or xs[-1] is None or ys[-1] != xs[-1]:
        return True
    if node.op_type in ("Identity", "Reshape"):
        return False
    rank = len(xs) if node.op_type != "Unsqueeze" else len(ys)
    if node.op_type == "Gather":
        return _attr(node, "axis", 0) % rank == rank - 1
    at = {"Slice": 3, "Squeeze": 1, "Unsqueeze": 1}[node.op_type]
    axes = g.const(node.input[at]) if len(node.input) > at and node.input[at] else None
    if axes is None:
        return node.op_type != "Squeeze" or xs[-1] == 1
    return any(int(a) % rank == rank - 1 for a in np.ravel(axes))


def _replace_init(model, node, i: int, value) -> None:
    """Give `node` its own initializer `value` as input `i` (others reading the old one keep it; a name
    no other initializer has, even when two nodes shared one or one node's is replaced twice)."""
    from onnx import numpy_helper

    name = f"{node.output[0]}/input{i}_{len(model.graph.initializer)}"
    model.graph.initializer.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
    node.input[i] = name


def fold_scales(model) -> dict[str, int]:
    """Constant scales folded into the Gemm weights beside them, exactly: the attention's 1/sqrt(d) on
    Q (after a Split, Reshape and Transpose of a fused QKV Gemm: only Q's columns scaled), QuickGELU's
    x * sigmoid(1.702 x), whose 1.702 moves into the Gemm before it and 1/1.702 into the Gemm after,
    and the mobile GELU x * sigmoid(x (c0 + c x^2)) between linear layers (`_gelu_cubic`).
    Returns {"attention scale": n, "QuickGELU": n, "GELU": n}."""
    g = Graph(model.graph)
    drop, rename = set(), {}
    counts = {"attention scale": 0, "QuickGELU": 0, "GELU": 0}
    for node in list(model.graph.node):
        if node.op_type != "Mul" or id(node) in drop or node.output[0] in g.outputs:
            continue
        c = _scalar(g, node)
        if c is None:
            continue
        x = node.input[0] if g.const(node.input[1]) is not None else node.input[1]
        if _quick_gelu(model, g, node, x, c):
            counts["QuickGELU"] += 1
        elif _gelu_cubic(model, g, node, x, c):
            counts["GELU"] += 1
        elif _q_scale(model, g, x, c):
            counts["attention scale"] += 1
        else:
            continue
        drop.add(id(node))
        rename[node.output[0]] = x
    if drop:
        for n in model.graph.node:
            for i, t in enumerate(n.input):
                n.input[i] = rename.get(t, t)
        _set_nodes(model, [n for n in model.graph.node if id(n) not in drop])
    return {k: v for k, v in counts.items() if v}


def _scalar(g: Graph, node):
    for t in node.input:
        c = g.const(t)
        if c is not None and c.size == 1 and c.dtype == np.float32:
            return float(c.reshape(()))
    return None


def _plain_gemm(g: Graph, node) -> bool:
    return (node is not None and node.op_type == "Gemm" and node.input[1] in g.inits and len(node.input) > 2
            and g.const(node.input[2]) is not None and not _attr(node, "transA", 0)
            and _attr(node, "alpha", 1.0) == 1.0 and _attr(node, "beta", 1.0) == 1.0)


def _scale_gemm(model, g: Graph, gemm, c: float, cols: slice | None = None, rows: bool = False) -> None:
    """Scale a Gemm's output columns `cols` (weight and bias) by c, or (rows=True) its inputs: weight only."""
    w = g.const(gemm.input[1]).copy()
    t = bool(_attr(gemm, "transB", 0))
    if rows:
        w = w * np.float32(c)
    else:
        sel = cols or slice(None)
        if t:
            w[sel, :] *= np.float32(c)
        else:
            w[:, sel] *= np.float32(c)
        b = np.broadcast_to(g.const(gemm.input[2]), (w.shape[0] if t else w.shape[1],)).copy()
        b[sel] *= np.float32(c)
        _replace_init(model, gemm, 2, b)
    _replace_init(model, gemm, 1, w)


def _quick_gelu(model, g: Graph, mul, y: str, c: float) -> bool:
    """y = Gemm1(..); u = y * c; m = y * Sigmoid(u); Gemm2(m): c into Gemm1, 1/c into Gemm2."""
    if abs(c - 1.702) > 1e-3:
        return False
    gemm1 = g.producer.get(y)
    sig = g.only_consumer(mul.output[0], "Sigmoid")
    readers = g.consumers.get(y, [])
    if not _plain_gemm(g, gemm1) or sig is None or len(readers) != 2 or y in g.outputs:
        return False
    gate = g.only_consumer(sig.output[0], "Mul")
    if gate is None or gate not in readers or sorted(gate.input) != sorted([y, sig.output[0]]):
        return False
    gemm2 = g.only_consumer(gate.output[0], "Gemm")
    if not _plain_gemm(g, gemm2) or gemm2.input[0] != gate.output[0]:
        return False
    _scale_gemm(model, g, gemm1, c)
    _scale_gemm(model, g, gemm2, 1.0 / c, rows=True)
    return True


def _q_scale(model, g: Graph, x: str, c: float) -> bool:
    """x comes from a Gemm (or one part of a Split of one) through Reshape/Transpose only."""
    t = x
    while True:
        p = g.producer.get(t)
        if p is None or len(g.consumers.get(t, [])) != 1 or t in g.outputs:
            return False
        if p.op_type in ("Reshape", "Transpose"):
            t = p.input[0]
            continue
        break
    if p.op_type == "Gemm" and _plain_gemm(g, p):
        _scale_gemm(model, g, p, c)
        return True
    if p.op_type != "Split":
        return False
    gemm = g.producer.get(p.input[0])
    if not _plain_gemm(g, gemm) or len(g.consumers.get(p.input[0], [])) != 1:
        return False
    axis, sizes = g.split_sizes(p, g.const(gemm.input[1]).shape[0 if _attr(gemm, "transB", 0) else 1])
    if sizes is None or axis not in (-1, 1):
        return False
    k = list(p.output).index(t)
    start = sum(sizes[:k])
    _scale_gemm(model, g, gemm, c, cols=slice(start, start + sizes[k]))
    return True


def _gelu_cubic(model, g: Graph, mul, u2: str, c: float) -> bool:
    """x * Sigmoid(x * (c0 + c * u2)), u2 = x * x, x written by a Conv or Gemm and read only by linear
    layers after: with y = s x, s = c^(1/3) (the layer before scaled by s), the argument is
    y * (c0 / s + y * y) and the output s times the GELU (the layers after scaled by 1/s), so the Mul
    by c goes and the Add's constant becomes c0 / s."""
    sq = g.producer.get(u2)
    if c <= 0 or sq is None or sq.op_type != "Mul" or sq.input[0] != sq.input[1] or u2 in g.outputs:
        return False
    x = sq.input[0]
    add = g.only_consumer(mul.output[0], "Add")
    c0 = None if add is None else g.const(_other(add, mul.output[0]))
    if c0 is None or c0.size != 1 or len(g.consumers.get(u2, [])) != 1:
        return False
    arg = g.only_consumer(add.output[0], "Mul")
    sig = g.only_consumer(arg.output[0], "Sigmoid") if arg is not None and _other(arg, add.output[0]) == x else None
    gate = g.only_consumer(sig.output[0], "Mul") if sig is not None else None
    if gate is None or sorted(gate.input) != sorted([x, sig.output[0]]) or x in g.outputs:
        return False
    after = g.consumers.get(gate.output[0], [])
    if {id(n) for n in g.consumers.get(x, [])} != {id(sq), id(arg), id(gate)} or not after \
            or gate.output[0] in g.outputs or not _scalable(g, g.producer.get(x), None) \
            or not all(_scalable(g, n, gate.output[0]) for n in after):
        return False
    s = float(c) ** (1.0 / 3.0)
    _scale_layer(model, g, g.producer[x], s, None)
    for n in after:
        _scale_layer(model, g, n, 1.0 / s, gate.output[0])
    k = 0 if add.input[0] != mul.output[0] else 1
    _replace_init(model, add, k, np.float32(float(np.ravel(c0)[0]) / s))
    g.refresh()  # a layer scaled again later (between two GELUs) reads its new weights
    return True


def _scalable(g: Graph, node, reads: str | None) -> bool:
    """A Conv with constant weights (and bias), or a plain Gemm, that writes (reads=None) or reads
    (as its data input) the tensor."""
    if node is None or (reads is not None and (node.input[0] != reads or reads in node.input[1:])):
        return False
    if node.op_type == "Conv":
        return g.const(node.input[1]) is not None and (len(node.input) < 3 or not node.input[2]
                                                        or g.const(node.input[2]) is not None)
    return _plain_gemm(g, node)


def _scale_layer(model, g: Graph, node, s: float, reads: str | None) -> None:
    """Scale what a linear layer writes (reads=None: weights and bias) or reads (weights only) by s."""
    if node.op_type == "Gemm":
        _scale_gemm(model, g, node, s, rows=reads is not None)
        return
    _replace_init(model, node, 1, g.const(node.input[1]) * np.float32(s))
    if reads is None and len(node.input) > 2 and node.input[2]:
        _replace_init(model, node, 2, g.const(node.input[2]) * np.float32(s))


HEADS_LAYOUT = (0, 2, 1, 3)  # [1, N, H, D] -> [1, H, N, D], how each part leaves the shared transpose


def heads_at_once(model) -> int:
    """A Split of the QKV tensor (batch 1, [N, 3C]; or K and V, [N, 2C]) into P parts, each reshaped to
    [1, N, H, D] and transposed -> one Reshape to [N, P, H, D], one Transpose to [P, H, N, D] and a
    Split into the P [1, H, N, D] heads, plus a Transpose of a part that wanted another order (K, as
    [1, H, D, N]): four nodes instead of seven for QKV, the same values. Returns how many were
    rewritten."""
    from onnx import helper

    g, shapes = Graph(model.graph), _shapes(model)
    plans = {id(n): p for n in model.graph.node if n.op_type == "Split" for p in [_heads_plan(g, shapes, n)] if p}
    if not plans:
        return 0
    drop = {id(n) for _, parts in plans.values() for r, t, _ in parts for n in (r, t)}
    out_nodes = []
    for node in model.graph.node:
        if id(node) in drop:
            continue
        if id(node) not in plans:
            out_nodes.append(node)
            continue
        (n, h, d), parts = plans[id(node)]
        b = _Builder(model, node.name or node.output[0])
        to = b.const([n, len(parts), h, d], np.int64)
        heads = b.op("Transpose", [b.op("Reshape", [node.input[0], to])], perm=[1, 2, 0, 3])
        # a part already in the order its reader wanted is the Split's output itself
        names = [t.output[0] if order == [0, 1, 2, 3] else b.name() for _, t, order in parts]
        b.nodes.append(helper.make_node("Split", [heads, b.const([1] * len(parts), np.int64)], names, name=b.name(), axis=0))
        for part, (_, t, order) in zip(names, parts):
            if part != t.output[0]:
                b.op("Transpose", [part], out=t.output[0], perm=order)
        out_nodes.extend(b.nodes)
    _set_nodes(model, out_nodes)
    return len(plans)


def _heads_plan(g: Graph, shapes, split):
    """((N, H, D), [(Reshape, Transpose, perm from [1, H, N, D])] per part) for a Split of a [N, PC] or
    [1, N, PC] tensor into P >= 2 equal parts along its last axis, each read only by a Reshape to one
    [1 or -1, N, H, D] and that only by a Transpose keeping axis 0; else None."""
    shape = shapes.get(split.input[0])
    if not shape or None in shape or len(shape) not in (2, 3) or len(split.output) < 2 \
            or (len(shape) == 3 and shape[0] != 1):
        return None
    axis, sizes = g.split_sizes(split, shape[-1])
    if sizes is None or axis % len(shape) != len(shape) - 1 or len(set(sizes)) != 1:
        return None
    parts, target = [], None
    for o in split.output:
        r = g.only_consumer(o, "Reshape")
        to = g.const(r.input[1]) if r is not None else None
        t = g.only_consumer(r.output[0], "Transpose") if to is not None else None
        order = _attr(t, "perm") if t is not None else None
        if order is None or to.size != 4 or (target is not None and list(to) != target):
            return None
        target = [int(v) for v in to]
        # batch 1 (or -1: the one left, as the part holds N * H * D values)
        if target[0] not in (1, -1) or target[1] != shape[-2] or target[2] * target[3] != sizes[0] \
                or min(target[1:]) < 1 or len(order) != 4 or order[0] != 0:
            return None
        parts.append((r, t, [HEADS_LAYOUT.index(a) for a in order]))
    return tuple(target[1:]), parts


