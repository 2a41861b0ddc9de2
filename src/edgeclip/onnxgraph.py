"""ONNX graph editing shared by the fusions (`kernels.onnx_fusions`) and INT8 (`calibration`): producer and
consumer indexes over a GraphProto, node replacement, dead-code removal, opset bookkeeping, and the lowering
of quantized graphs onto ONNX Runtime's fused integer kernels (MatMulIntegerToFloat, QAttention).

numpy and onnx only (onnx imported where it is used), so both layers can read it without importing each other.

    g = Graph(model.graph); n = g.op("t", "MatMul"); replace(model, n, [new], [n]); remove_dead(model)
    lower_for_ort(qdq_model)   # DQ -> MatMul <- DQ [+ bias]  ==>  com.microsoft.MatMulIntegerToFloat
"""
from __future__ import annotations

import numpy as np

MS = "com.microsoft"


class Graph:
    """Producer/consumer indexes and constant lookup over an onnx GraphProto."""

    def __init__(self, graph):
        self.g = graph
        self.refresh()

    def refresh(self) -> None:
        self.producer = {o: n for n in self.g.node for o in n.output if o}
        self.consumers: dict[str, list] = {}
        for n in self.g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.inits = {i.name: i for i in self.g.initializer}
        self.outputs = {o.name for o in self.g.output}

    def op(self, tensor: str, op_type: str):
        n = self.producer.get(tensor)
        return n if n is not None and n.op_type == op_type else None

    def only_consumer(self, tensor: str, op_type: str):
        cs = self.consumers.get(tensor, [])
        if len(cs) == 1 and cs[0].op_type == op_type and tensor not in self.outputs:
            return cs[0]
        return None

    def const(self, tensor: str):
        """The value of an initializer or Constant node output, else None."""
        from onnx import numpy_helper

        if tensor in self.inits:
            return numpy_helper.to_array(self.inits[tensor])
        n = self.producer.get(tensor)
        if n is not None and n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
                if a.name in ("value_float", "value_int"):
                    return np.array(a.f if a.name == "value_float" else a.i)
        return None

    def bias_add(self, tensor: str, width: int | None = None):
        """(Add node, bias tensor) when `tensor`'s only reader adds a 1-D constant to it (a linear
        layer's bias, of `width` entries when given), else (None, None)."""
        add = self.only_consumer(tensor, "Add")
        if add is None:
            return None, None
        other = add.input[1] if add.input[0] == tensor else add.input[0]
        c = self.const(other)
        if c is None or c.ndim != 1 or (width is not None and c.shape[0] != width):
            return None, None
        return add, other

    def split_sizes(self, split, total: int):
        """(axis, sizes) of a Split node that cuts `total` entries along its axis. The sizes come from
        its `split` input (opset >= 13), else its `split` attribute (older opsets), else equal parts,
        one per output; they are None when not constant or not one part per output summing to `total`."""
        attrs = {a.name: a for a in split.attribute}
        axis = attrs["axis"].i if "axis" in attrs else 0
        if len(split.input) > 1 and split.input[1]:
            c = self.const(split.input[1])
            sizes = None if c is None else [int(v) for v in np.ravel(c)]
        elif "split" in attrs:
            sizes = list(attrs["split"].ints)
        else:
            n = len(split.output)
            sizes = None if total % n else [total // n] * n
        if sizes is not None and (sum(sizes) != total or len(sizes) != len(split.output)):
            sizes = None
        return axis, sizes

    def trailing_shape(self, tensor: str):
        """Known trailing entries of a shape tensor (a constant, or a Concat ending in constants)."""
        c = self.const(tensor)
        if c is not None:
            return [int(v) for v in np.ravel(c)]
        n = self.producer.get(tensor)
        if n is None or n.op_type != "Concat":
            return []
        tail: list[int] = []
        for i in reversed(n.input):
            c = self.const(i)
            if c is None:
                break
            tail = [int(v) for v in np.ravel(c)] + tail
        return tail


def perm(node) -> list[int] | None:
    for a in node.attribute:
        if a.name == "perm":
            return list(a.ints)
    return None


def replace(model, at, new_nodes, drop) -> None:
    """Put `new_nodes` where node `at` stands (so they follow whatever `at` read) and remove `drop`."""
    idx = list(model.graph.node).index(at)
    for k, n in enumerate(new_nodes):
        model.graph.node.insert(idx + k, n)
    for d in drop:
        model.graph.node.remove(d)


def remove_dead(model) -> int:
    """Drop nodes whose outputs nothing reads (iteratively) and initializers nothing reads."""
    g = model.graph
    needed = {o.name for o in g.output}
    keep = []
    for n in reversed(list(g.node)):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(i for i in n.input if i)
    removed = len(g.node) - len(keep)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    inits = [i for i in g.initializer if i.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
    return removed


def ensure_opset(model, domain: str, version: int = 1) -> None:
    if not any(o.domain == domain for o in model.opset_import):
        from onnx import helper

        model.opset_import.append(helper.make_opsetid(domain, version))


def copy_model(model):
    """A deep copy of an onnx ModelProto (edits on it leave `model` alone)."""
    from onnx import ModelProto

    m = ModelProto()
    m.CopyFrom(model)
    return m


KEPT_METADATA = ("pkg.torch.onnx.name_scopes",)  # module paths: what the quantizers and a reader need


def strip_metadata(model, keep=KEPT_METADATA) -> int:
    """Drop the exporter's per-node debugging metadata (stack traces with the exporting machine's file
    paths, FX node text, class hierarchies) except `keep`, in place; returns the bytes removed. A
    shipped artifact needs none of it, and on ViT-B/32 it is ~150 KB a graph."""
    removed = 0
    for n in model.graph.node:
        drop = [x for x in n.metadata_props if x.key not in keep]
        for x in drop:
            removed += len(x.key) + len(x.value)
            n.metadata_props.remove(x)
    return removed


def gemms_to_matmuls(model) -> int:
    """In place: every Gemm with a constant 2-D weight (alpha = beta = 1, no transposed input) becomes
    MatMul against the weight as (K, N) [+ Add of its bias], the form the quantizers read; exact. Returns
    how many."""
    from onnx import helper, numpy_helper

    g = Graph(model.graph)
    done = 0
    for n in list(model.graph.node):
        if n.op_type != "Gemm" or len(n.input) < 2 or n.input[1] not in g.inits:
            continue
        a = {x.name: (x.f if x.type == 1 else x.i) for x in n.attribute}
        if a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0 or a.get("transA", 0):
            continue
        w = numpy_helper.to_array(g.inits[n.input[1]])
        if w.ndim != 2:
            continue
        name = f"{n.input[1]}_kn" if a.get("transB", 0) else n.input[1]
        if a.get("transB", 0) and name not in g.inits:
            model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T), name))
            g.inits[name] = model.graph.initializer[-1]
        bias = n.input[2] if len(n.input) > 2 and n.input[2] else ""
        mm_out = f"{n.output[0]}_mm" if bias else n.output[0]
        new = [helper.make_node("MatMul", [n.input[0], name], [mm_out], name=f"{n.name}_mm")]
        if bias:
            new.append(helper.make_node("Add", [mm_out, bias], [n.output[0]], name=f"{n.name}_bias"))
        for x in new:
            x.metadata_props.extend(n.metadata_props)
        replace(model, n, new, [n])
        done += 1
    if done:
        remove_dead(model)
    return done


def toposort(graph, extra=()) -> None:
    """Re-order `graph`'s nodes, and the `extra` nodes added to them, so every node follows its inputs'
    producers (ONNX wants a topological order)."""
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
        attention_bias_to_gemms(model)
    return count


# Integer GEMMs of ONNX Runtime that add a bias as they write their output: op -> index of that input.
GEMM_BIAS_INPUT = {"MatMulIntegerToFloat": 6, "DynamicQuantizeMatMul": 4}


def attention_bias_to_gemms(model) -> int:
    """Give each float MultiHeadAttention's Q/K/V projection bias (its `bias` input, where the attention
    fusion puts it) back to the integer GEMMs that make its q, k and v, when every one of them takes a
    bias input and has none: the GEMM adds it while writing its output, where the attention would spend
    a pass over Q, K and V. The graph is then the one lowered from an unfolded fusion. Returns how many
    attentions gave theirs up."""
    from onnx import numpy_helper

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
