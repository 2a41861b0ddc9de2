"""Graph fusions for ONNX Runtime: patterns of our exported graphs replaced by fused contrib ops.

Each fusion is a small class: `match(graph, anchor)` finds one instance of its pattern around an
anchor node (or returns None), `fuse(model)` rewrites every instance and returns how many it fused.
A pattern that does not match is logged and skipped; the graph stays valid either way.

    counts = fuse(model)            # {"attention": 24}
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..onnxgraph import MS, Graph, ensure_opset, perm, remove_dead, replace

log = logging.getLogger(__name__)


@dataclass
class _Attention:
    q: str
    k: str
    v: str
    out: str
    heads: int
    scale: float
    causal: bool
    bias: str | None  # additive attention bias (B|1, N|1, Lq, Lk)


class AttentionFusion:
    """softmax(QKᵀ·scale [+mask]) V with head split/merge → com.microsoft.MultiHeadAttention.

    Matches what our model exports: Reshape(B,L,N,H) → Transpose → Mul(scale) → MatMul(Kᵀ) →
    [Where(causal, -inf) | Add(bias)] → Softmax → MatMul(V) → Transpose → Reshape(B,L,D).
    Causal masks become `unidirectional=1`; additive masks become `attention_bias`.

    When Q, K and V all come from linear projections (MatMul + constant 1-D bias Add, packed behind a
    Split or not), their biases move into the fused node's `bias` input (q | k | v concatenated), which
    the kernel adds while it lays Q/K/V out per head: one float Add fewer per block. Anything else
    keeps its Adds in front of the node."""

    name = "attention"

    def __init__(self, fold_bias: bool = True):
        self.fold_bias = fold_bias

    def match(self, g: Graph, softmax) -> _Attention | None:
        scores = softmax.input[0]
        causal, bias = False, None
        where = g.op(scores, "Where")
        add = g.op(scores, "Add")
        if where is not None:
            fill = g.const(where.input[1])
            cond = g.producer.get(where.input[0])
            if fill is None or not np.all(np.isneginf(fill)) or cond is None or cond.op_type != "Greater":
                return None
            causal, scores = True, where.input[2]
        elif add is not None:
            for a, b in ((0, 1), (1, 0)):
                if g.op(add.input[a], "MatMul") is not None:
                    scores, bias = add.input[a], add.input[b]
                    break
            else:
                return None
        qk = g.op(scores, "MatMul")
        if qk is None or len(g.consumers.get(scores, [])) != 1:
            return None
        scale = 1.0
        q_side = qk.input[0]
        mul = g.op(q_side, "Mul")
        if mul is not None:
            c = g.const(mul.input[1])
            if c is None or c.size != 1:
                return None
            scale, q_side = float(np.ravel(c)[0]), mul.input[0]
        q3, heads = self._heads(g, q_side, [0, 2, 1, 3])
        k3, _ = self._heads(g, qk.input[1], [0, 2, 3, 1])
        av = g.only_consumer(softmax.output[0], "MatMul")
        if av is None or av.input[0] != softmax.output[0]:
            return None
        v3, _ = self._heads(g, av.input[1], [0, 2, 1, 3])
        merge = g.only_consumer(av.output[0], "Transpose")
        if merge is None or perm(merge) != [0, 2, 1, 3]:
            return None
        out = g.only_consumer(merge.output[0], "Reshape")
        if None in (q3, k3, v3, out) or not heads:
            return None
        return _Attention(q3, k3, v3, out.output[0], heads, scale, causal, bias)

    @staticmethod
    def _heads(g: Graph, tensor: str, expected_perm):
        """(the 3-D tensor before the head split, heads) for Transpose(Reshape(x, [.., N, H]))."""
        t = g.op(tensor, "Transpose")
        if t is None or perm(t) != expected_perm:
            return None, 0
        r = g.op(t.input[0], "Reshape")
        if r is None:
            return None, 0
        tail = g.trailing_shape(r.input[1])
        return r.input[0], (tail[-2] if len(tail) >= 2 and tail[-2] > 0 else 0)

    def fuse(self, model) -> int:
        from onnx import helper

        g = Graph(model.graph)
        found = []
        for n in list(model.graph.node):
            if n.op_type == "Softmax":
                m = self.match(g, n)
                if m is None:
                    log.info("attention fusion: no match at %s", n.name)
                else:
                    found.append((n, m))
        if not found:
            return 0
        ensure_opset(model, MS)
        for i, (sm, m) in enumerate(found):
            new_nodes = []
            bias = ""
            if m.bias:
                # MultiHeadAttention wants the bias as (B|1, N|1, Lq, Lk) with no broadcast over queries:
                # expand it to the scores' trailing shape, read from the q and k tensors at run time.
                p = f"{sm.name}_bias"
                ones = f"{p}_ones"
                model.graph.initializer.append(helper.make_tensor(ones, 7, [2], [1, 1]))
                new_nodes += [
                    helper.make_node("Shape", [m.q], [f"{p}_lq"], start=1, end=2, name=f"{p}_lq"),
                    helper.make_node("Shape", [m.k], [f"{p}_lk"], start=1, end=2, name=f"{p}_lk"),
                    helper.make_node("Concat", [ones, f"{p}_lq", f"{p}_lk"], [f"{p}_shape"], axis=0,
                                     name=f"{p}_shape"),
                    helper.make_node("Expand", [m.bias, f"{p}_shape"], [f"{p}_full"], name=f"{p}_expand"),
                ]
                bias = f"{p}_full"
            inputs = [m.q, m.k, m.v, "", "", bias]
            while inputs[-1] == "":
                inputs.pop()
            node = helper.make_node("MultiHeadAttention", inputs, [m.out], name=f"{sm.name}_mha",
                                    domain=MS, num_heads=m.heads, scale=m.scale, unidirectional=int(m.causal))
            node.metadata_props.extend(sm.metadata_props)
            # The fused node takes the place of the final Reshape, which produced m.out.
            old = g.producer[m.out]
            replace(model, old, new_nodes + [node], [old])
        remove_dead(model)
        if self.fold_bias:
            g.refresh()
            for node in [n for n in model.graph.node if n.op_type == "MultiHeadAttention" and n.domain == MS]:
                self.fold_projection_bias(model, g, node)
            remove_dead(model)  # the bias constants the removed Adds read
        return len(found)

    @staticmethod
    def fold_projection_bias(model, g: Graph, mha) -> bool:
        """Move the Q/K/V projection bias Adds in front of `mha` into its `bias` input; True if moved.

        Each of q, k, v must be `MatMul -> Add(1-D constant)` read by nothing but `mha` (and shape-only
        readers), or one output of a last-axis `Split` of such an Add whose every output goes to `mha`
        alone (packed QKV, packed KV)."""
        from onnx import numpy_helper

        if len(mha.input) > 3 and mha.input[3]:
            return False
        biases, edits, adds, sources = [], [], {}, []
        for slot in range(3):
            found = AttentionFusion._projection_bias(g, mha, mha.input[slot])
            if found is None:
                return False
            bias, edit, add, source = found
            biases.append(bias)
            edits.append(edit)
            adds[add.output[0]] = add
            sources.append(source)
        hidden = [b.shape[0] for b in biases]
        heads = next(a.i for a in mha.attribute if a.name == "num_heads")
        if hidden[0] != hidden[1] or any(h % heads for h in hidden):
            return False
        packed = sources[0][0]  # one packed bias already laid out q | k | v: keep it under its own name
        if packed in g.inits and sources == [(packed, 0), (packed, hidden[0]), (packed, 2 * hidden[0])] \
                and sum(hidden) == int(np.prod(g.inits[packed].dims)):
            name = packed
        else:
            name = f"{mha.name}_qkv_bias"
            model.graph.initializer.append(numpy_helper.from_array(np.concatenate(biases).astype(np.float32), name))
        for edit in edits:
            edit()
        while len(mha.input) < 4:
            mha.input.append("")
        mha.input[3] = name
        for add in adds.values():
            model.graph.node.remove(add)
        g.refresh()
        return True

    @staticmethod
    def _projection_bias(g: Graph, mha, tensor: str):
        """(bias values, edit that bypasses the Add, the Add, (bias tensor, offset of the values in it))
        for one of mha's q/k/v inputs, or None."""
        def is_mha(node):
            return node.op_type == mha.op_type and node.output[0] == mha.output[0]

        def readers_ok(t):  # t goes to mha once, and otherwise only to Shape nodes (shapes do not change)
            readers = g.consumers.get(t, [])
            return t not in g.outputs and all(is_mha(c) or c.op_type == "Shape" for c in readers) \
                and sum(list(c.input).count(t) for c in readers if is_mha(c)) == 1

        def linear(t):  # (Add, MatMul output, bias values, bias tensor) when t = MatMul(x, W) + 1-D constant
            add = g.op(t, "Add")
            if add is None:
                return None
            for i, j in ((0, 1), (1, 0)):
                mm = g.op(add.input[i], "MatMul")
                c = g.const(add.input[j])
                if mm is None or c is None or c.ndim != 1 or c.dtype != np.float32:
                    continue
                w = g.inits.get(mm.input[1])
                if w is None or len(w.dims) != 2 or w.dims[1] != c.shape[0]:
                    continue
                mm_add, _ = g.bias_add(mm.output[0], width=c.shape[0])
                if mm_add is None or mm_add.output[0] != add.output[0]:
                    continue
                return add, mm.output[0], c, add.input[j]
            return None

        split = g.op(tensor, "Split")
        if split is None:
            found = linear(tensor)
            if found is None or not readers_ok(tensor):
                return None
            add, pre, c, bias_name = found

            def edit():
                for reader in g.consumers.get(tensor, []):
                    for i, name in enumerate(reader.input):
                        if name == tensor:
                            reader.input[i] = pre
            return c, edit, add, (bias_name, 0)
        found = linear(split.input[0])
        if found is None or len(g.consumers.get(split.input[0], [])) != 1 or split.input[0] in g.outputs:
            return None
        add, pre, c, bias_name = found
        axis, sizes = g.split_sizes(split, c.shape[0])
        if axis not in (-1, 2) or sizes is None or not all(readers_ok(o) for o in split.output):
            return None
        j = list(split.output).index(tensor)
        start = sum(sizes[:j])

        def edit():
            split.input[0] = pre
        return c[start:start + sizes[j]], edit, add, (bias_name, start)


class SkipLayerNormFusion:
    """Residual add + LayerNorm → com.microsoft.SkipLayerNormalization (the sum stays available as
    its fourth output for the next residual)."""

    name = "skip_layernorm"

    def fuse(self, model) -> int:
        from onnx import helper

        g = Graph(model.graph)
        count = 0
        for ln in list(model.graph.node):
            if ln.op_type != "LayerNormalization" or len(ln.input) < 3 or len(ln.output) != 1:
                continue
            attrs = {a.name: helper.get_attribute_value(a) for a in ln.attribute}
            if attrs.get("axis", -1) != -1:
                continue
            add = g.op(ln.input[0], "Add")
            if add is None or any(g.const(i) is not None for i in add.input):
                continue
            others = [c for c in g.consumers.get(add.output[0], []) if c is not ln]
            keep_sum = bool(others) or add.output[0] in g.outputs
            outputs = [ln.output[0], "", "", add.output[0]] if keep_sum else [ln.output[0]]
            node = helper.make_node("SkipLayerNormalization", [add.input[0], add.input[1], ln.input[1], ln.input[2]],
                                    outputs, name=f"{ln.name}_skip", domain=MS, epsilon=attrs.get("epsilon", 1e-5))
            node.metadata_props.extend(ln.metadata_props)
            replace(model, add, [node], [add, ln])  # where the Add was: its sum's readers come after
            g.refresh()
            count += 1
        if count:
            ensure_opset(model, MS)
            remove_dead(model)  # constants only the replaced nodes read
        return count


class QuickGeluFusion:
    """x * sigmoid(a * x) (CLIP's QuickGELU, a = 1.702) → com.microsoft.QuickGelu(alpha=a)."""

    name = "quick_gelu"

    def fuse(self, model) -> int:
        from onnx import helper

        g = Graph(model.graph)
        count = 0
        for sig in list(model.graph.node):
            if sig.op_type != "Sigmoid":
                continue
            scale = g.op(sig.input[0], "Mul")
            if scale is None:
                continue
            consts = [g.const(i) for i in scale.input]
            if consts[0] is None and consts[1] is not None and consts[1].size == 1:
                x, alpha = scale.input[0], float(np.ravel(consts[1])[0])
            elif consts[1] is None and consts[0] is not None and consts[0].size == 1:
                x, alpha = scale.input[1], float(np.ravel(consts[0])[0])
            else:
                continue
            gate = g.only_consumer(sig.output[0], "Mul")
            if gate is None or sorted(gate.input) != sorted([x, sig.output[0]]):
                continue
            if len(g.consumers.get(scale.output[0], [])) != 1:
                continue
            node = helper.make_node("QuickGelu", [x], [gate.output[0]], name=f"{gate.name}_quickgelu", domain=MS,
                                    alpha=alpha)
            node.metadata_props.extend(gate.metadata_props)
            replace(model, gate, [node], [gate, sig, scale])
            g.refresh()
            count += 1
        if count:
            ensure_opset(model, MS)
            remove_dead(model)  # constants only the replaced nodes read
        return count


class GeluFusion:
    """x * 0.5 * (1 + erf(x / sqrt(2))) (exact GELU: what torch's nn.GELU exports to below opset 20)
    → com.microsoft.Gelu. ONNX Runtime's own optimizer leaves the Erf chain of our exports unfused (the
    two Muls come in the order torch's decomposition writes them), and the five ops around each 1x1
    convolution of an MCi tower also break the NCHWc layout into reorders (MobileCLIP-S1: 50 GELUs,
    ~57 reorder pairs)."""

    name = "gelu"

    def fuse(self, model) -> int:
        from onnx import helper

        g = Graph(model.graph)
        count = 0
        for erf in list(model.graph.node):
            found = erf.op_type == "Erf" and self._match(g, erf)
            if not found:
                continue
            x, out, chain = found
            node = helper.make_node("Gelu", [x], [out.output[0]], name=f"{out.name}_gelu", domain=MS)
            node.metadata_props.extend(out.metadata_props)
            replace(model, out, [node], chain)
            g.refresh()
            count += 1
        if count:
            ensure_opset(model, MS)
            remove_dead(model)
        return count

    @staticmethod
    def _scalar(g: Graph, node, value: float):
        """The input of a binary `node` that is not the scalar constant `value` (else None)."""
        consts = [g.const(i) for i in node.input]
        for i, c in enumerate(consts):
            if c is not None and c.size == 1 and abs(float(np.ravel(c)[0]) - value) <= 1e-4 * abs(value):
                return node.input[1 - i]
        return None

    def _match(self, g: Graph, erf):
        """(x, the last node, every node of the chain) when `erf` is the middle of an exact GELU."""
        scale = g.producer.get(erf.input[0])
        if scale is None or len(g.consumers.get(scale.output[0], [])) != 1:
            return None
        x = (self._scalar(g, scale, 2 ** 0.5) if scale.op_type == "Div" else
             self._scalar(g, scale, 2 ** -0.5) if scale.op_type == "Mul" else None)
        one = g.only_consumer(erf.output[0], "Add")
        if x is None or one is None or self._scalar(g, one, 1.0) != erf.output[0]:
            return None
        m1 = g.only_consumer(one.output[0], "Mul")
        m2 = g.only_consumer(m1.output[0], "Mul") if m1 is not None else None
        if m2 is None:
            return None
        # the two Muls take x and 0.5 (either one first, either operand order)
        a, b = (i for i in m1.input if i != one.output[0]), (i for i in m2.input if i != m1.output[0])
        others = [next(a, None), next(b, None)]
        half = [self._scalar(g, m, 0.5) is not None for m in (m1, m2)]
        if sorted(half) != [False, True] or others[half.index(False)] != x:
            return None
        return x, m2, [m2, m1, one, erf, scale]


FUSIONS = {"attention": AttentionFusion, "quick_gelu": QuickGeluFusion, "gelu": GeluFusion, "skip_layernorm": SkipLayerNormFusion}


# What export applies. SkipLayerNormalization is left out: on ONNX Runtime 1.32's CPU kernel it measured
# ~2.5x slower than the separate Add + LayerNormalization it replaces (ViT-B/32, 23 instances:
# 2.9 ms vs 1.1 ms per image), so fusing it would make artifacts slower.
DEFAULT_FUSIONS = ("attention", "quick_gelu", "gelu")


def fuse(model, names=DEFAULT_FUSIONS) -> dict[str, int]:
    """Apply the named fusions in place; {fusion: instances fused}."""
    return {name: FUSIONS[name]().fuse(model) for name in names}
