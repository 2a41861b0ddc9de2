"""ONNX Runtime graph fusions (`edgeclip.kernels.onnx_fusions`): golden hand-built graphs in the exact
shape our exporter writes, each fused and run against the unfused graph in real ONNX Runtime
sessions, plus the fused op counts of whole exported models."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edgeclip.kernels.onnx_fusions import (  # noqa: E402
    AttentionFusion, GeluFusion, QuickGeluFusion, SkipLayerNormFusion, fuse)

B, L, N, H = 2, 7, 4, 8
D = N * H


def _const(name, value):
    return numpy_helper.from_array(np.asarray(value), name)


def _attention_graph(mask: str = "none", scale=H ** -0.5):
    """q, k, v (B, L, D) -> reference attention exactly as torch.onnx.export writes ours."""
    nodes, inits = [], [_const("heads_shape", np.array([0, 0, N, H], np.int64)),
                        _const("merge_shape", np.array([0, 0, D], np.int64))]
    for x, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        nodes += [helper.make_node("Reshape", [x, "heads_shape"], [f"{x}4"]),
                  helper.make_node("Transpose", [f"{x}4"], [f"{x}t"], perm=perm)]
    q = "qt"
    if scale is not None:
        inits.append(_const("scale", np.array(scale, np.float32)))
        nodes.append(helper.make_node("Mul", ["qt", "scale"], ["qs"]))
        q = "qs"
    nodes.append(helper.make_node("MatMul", [q, "kt"], ["scores"]))
    inputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [B, L, D]) for x in "qkv"]
    scores = "scores"
    if mask == "causal":
        inits += [_const("ar", np.arange(L, dtype=np.int64)), _const("one", np.array([1], np.int64)),
                  _const("zero", np.array([0], np.int64)), _const("ninf", np.array(-np.inf, np.float32))]
        nodes += [helper.make_node("Unsqueeze", ["ar", "zero"], ["krow"]),
                  helper.make_node("Unsqueeze", ["ar", "one"], ["qcol"]),
                  helper.make_node("Greater", ["krow", "qcol"], ["blocked"]),
                  helper.make_node("Where", ["blocked", "ninf", "scores"], ["masked"])]
        scores = "masked"
    elif mask == "additive":
        inputs.append(helper.make_tensor_value_info("bias", TensorProto.FLOAT, [B, 1, 1, L]))
        nodes.append(helper.make_node("Add", ["scores", "bias"], ["masked"]))
        scores = "masked"
    nodes += [helper.make_node("Softmax", [scores], ["probs"], axis=-1),
              helper.make_node("MatMul", ["probs", "vt"], ["o4"]),
              helper.make_node("Transpose", ["o4"], ["ot"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ot", "merge_shape"], ["out"])]
    graph = helper.make_graph(nodes, "attention", inputs,
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [B, L, D])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(model, feeds):
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, feeds)[0]


def _feeds(mask):
    r = np.random.default_rng(0)
    feeds = {x: r.normal(size=(B, L, D)).astype(np.float32) for x in "qkv"}
    if mask == "additive":
        bias = np.zeros((B, 1, 1, L), np.float32)
        bias[0, ..., 5:] = -np.inf
        feeds["bias"] = bias
    return feeds


@pytest.mark.parametrize("mask", ["none", "causal", "additive"])
def test_attention_fusion_golden(mask):
    model = _attention_graph(mask)
    before = _run(model, _feeds(mask))
    fused = onnx.ModelProto()
    fused.CopyFrom(model)
    assert AttentionFusion().fuse(fused) == 1
    onnx.checker.check_model(fused)
    ops = Counter(n.op_type for n in fused.graph.node)
    assert ops["MultiHeadAttention"] == 1
    assert ops["Softmax"] == ops["Transpose"] == ops["MatMul"] == ops["Where"] == 0  # nothing of it left
    mha = next(n for n in fused.graph.node if n.op_type == "MultiHeadAttention")
    attrs = {a.name: helper.get_attribute_value(a) for a in mha.attribute}
    assert attrs["num_heads"] == N and attrs["unidirectional"] == int(mask == "causal")
    assert attrs["scale"] == pytest.approx(H ** -0.5)
    np.testing.assert_allclose(_run(fused, _feeds(mask)), before, atol=1e-5, rtol=1e-5)


def test_attention_fusion_takes_the_scale_from_the_graph():
    model = _attention_graph(scale=0.3)
    before = _run(model, _feeds("none"))
    assert AttentionFusion().fuse(model) == 1
    np.testing.assert_allclose(_run(model, _feeds("none")), before, atol=1e-5, rtol=1e-5)


def test_attention_fusion_skips_what_it_does_not_recognise(caplog):
    model = _attention_graph()
    for n in model.graph.node:  # softmax over the wrong operand order: not our pattern
        if n.op_type == "Transpose" and list(n.input) == ["o4"]:
            del n.attribute[:]
            n.attribute.extend([helper.make_attribute("perm", [0, 1, 2, 3])])
    original = model.SerializeToString()
    with caplog.at_level("INFO", logger="edgeclip.kernels.onnx_fusions"):
        assert AttentionFusion().fuse(model) == 0
    assert model.SerializeToString() == original
    assert "no match" in caplog.text


# ------------------------------------------------------------- projection biases inside the fused node

PROJ = np.random.default_rng(4)
W_QKV = (PROJ.normal(size=(D, 3 * D)) * D ** -0.5).astype(np.float32)
B_QKV = PROJ.normal(size=3 * D).astype(np.float32)


def _projected(mask: str = "none", layout: str = "packed"):
    """The reference attention fed by linear projections of x (B, L, D), as our exporter writes them:
    "packed"   x @ Wqkv + b -> Split(3)                       (every block but a pooled-only last one)
    "pooled"   xq @ Wq + bq (xq: B, 1, D); x @ Wkv + bkv -> Split(2)   (pooled-only last block)
    "separate" x @ Wq + bq, x @ Wk + bk, bv + x @ Wv          (three plain linears, bias first in one)
    "no_v_bias" like "separate" with no bias on V: nothing to move, the Adds stay."""
    model = _attention_graph(mask)
    g = model.graph
    for x in [i for i in g.input if i.name in "qkv"]:
        g.input.remove(x)
    # batch left dynamic as in our exports (with every dimension known ONNX Runtime would rewrite
    # MatMul + Add into Gemm itself)
    g.input.insert(0, helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", L, D]))
    inits, nodes = [], []

    def linear(name, x, cols, out, bias=True, bias_first=False):
        inits.append(_const(f"W_{name}", W_QKV[:, cols]))
        mm = f"{name}_mm" if bias else out
        nodes.append(helper.make_node("MatMul", [x, f"W_{name}"], [mm], name=f"visual.blocks.0.attn.{name}"))
        if bias:
            inits.append(_const(f"b_{name}", B_QKV[cols]))
            ins = [f"b_{name}", mm] if bias_first else [mm, f"b_{name}"]
            nodes.append(helper.make_node("Add", ins, [out], name=f"{name}_bias"))

    q, k, v = (slice(i * D, (i + 1) * D) for i in range(3))
    if layout == "packed":
        linear("qkv", "x", slice(0, 3 * D), "qkv")
        nodes.append(helper.make_node("Split", ["qkv"], ["q", "k", "v"], axis=2, num_outputs=3))
    elif layout == "pooled":
        g.input.insert(1, helper.make_tensor_value_info("xq", TensorProto.FLOAT, ["batch", 1, D]))
        linear("q_proj", "xq", q, "q")
        linear("kv_proj", "x", slice(D, 3 * D), "kv")
        nodes.append(helper.make_node("Split", ["kv"], ["k", "v"], axis=-1, num_outputs=2))
    else:
        linear("q_proj", "x", q, "q")
        linear("k_proj", "x", k, "k")
        linear("v_proj", "x", v, "v", bias=layout != "no_v_bias", bias_first=True)
    for n in reversed(nodes):
        g.node.insert(0, n)
    g.initializer.extend(inits)
    out = g.output[0].type.tensor_type.shape
    out.dim[0].dim_param, out.dim[1].dim_param = "batch", "Lq"  # Lq = 1 for the pooled query
    return model


def _projected_feeds(mask, layout):
    r = np.random.default_rng(5)
    feeds = {"x": r.normal(size=(B, L, D)).astype(np.float32)}
    if layout == "pooled":
        feeds["xq"] = r.normal(size=(B, 1, D)).astype(np.float32)
    if mask == "additive":
        feeds["bias"] = _feeds("additive")["bias"]
    return feeds


def _fused(model, **kw):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    assert AttentionFusion(**kw).fuse(m) == 1
    onnx.checker.check_model(m)
    return m


def _qkv_sources(model, mha):
    """The op that makes each of the node's q, k, v inputs, looking through a Split."""
    producer = {o: n for n in model.graph.node for o in n.output}
    out = []
    for t in mha.input[:3]:
        p = producer[t]
        out.append(producer[p.input[0]].op_type if p.op_type == "Split" else p.op_type)
    return out


@pytest.mark.parametrize("layout,mask", [("packed", "none"), ("packed", "causal"), ("packed", "additive"),
                                         ("separate", "none"), ("separate", "causal"), ("separate", "additive"),
                                         ("pooled", "none"), ("pooled", "additive")])
def test_attention_fusion_moves_projection_biases_into_the_fused_node(layout, mask):
    model = _projected(mask, layout)
    feeds = _projected_feeds(mask, layout)
    before = _run(model, feeds)
    fused = _fused(model)
    ops = Counter(n.op_type for n in fused.graph.node)
    assert ops["MultiHeadAttention"] == 1 and ops["Softmax"] == 0
    assert ops["Add"] == 0  # no bias Add left in front of q, k, v (nor the mask's Add)
    assert ops["MatMul"] == {"packed": 1, "pooled": 2, "separate": 3}[layout]
    mha = next(n for n in fused.graph.node if n.op_type == "MultiHeadAttention")
    assert _qkv_sources(fused, mha) == ["MatMul"] * 3
    inits = {i.name: numpy_helper.to_array(i) for i in fused.graph.initializer}
    np.testing.assert_array_equal(inits[mha.input[3]], B_QKV)  # q | k | v, shape (3 * hidden,)
    if layout == "packed":
        assert mha.input[3] == "b_qkv"  # the packed bias keeps its name; nothing copied
    assert not {f"b_{n}" for n in ("q_proj", "k_proj", "v_proj", "kv_proj")} & set(inits)  # no stale copies
    attrs = {a.name: helper.get_attribute_value(a) for a in mha.attribute}
    assert attrs["unidirectional"] == int(mask == "causal")
    assert (len(mha.input) > 5 and mha.input[5] != "") == (mask == "additive")
    after = _run(fused, feeds)
    assert after.shape == before.shape
    np.testing.assert_allclose(after, before, atol=1e-5, rtol=1e-5)
    # the same as the fused node with the Adds left in front of it
    np.testing.assert_allclose(after, _run(_fused(model, fold_bias=False), feeds), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mask", ["none", "causal"])
def test_attention_fusion_keeps_the_adds_when_one_projection_has_no_bias(mask):
    model = _projected(mask, "no_v_bias")
    feeds = _projected_feeds(mask, "no_v_bias")
    fused = _fused(model)
    ops = Counter(n.op_type for n in fused.graph.node)
    assert ops["MultiHeadAttention"] == 1 and ops["Add"] == 2  # q and k keep their bias Adds
    mha = next(n for n in fused.graph.node if n.op_type == "MultiHeadAttention")
    assert len(mha.input) == 3 and _qkv_sources(fused, mha) == ["Add", "Add", "MatMul"]
    np.testing.assert_allclose(_run(fused, feeds), _run(model, feeds), atol=1e-5, rtol=1e-5)


def test_attention_fusion_keeps_the_adds_when_a_biased_projection_is_read_elsewhere():
    model = _projected("none", "separate")
    model.graph.output.append(helper.make_tensor_value_info("k", TensorProto.FLOAT, [B, L, D]))
    fused = _fused(model)
    mha = next(n for n in fused.graph.node if n.op_type == "MultiHeadAttention")
    assert len(mha.input) == 3 and Counter(n.op_type for n in fused.graph.node)["Add"] == 3
    feeds = _projected_feeds("none", "separate")
    for a, b in zip(ort.InferenceSession(fused.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds),
                    ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def _int8_batches(mask, layout):
    r = np.random.default_rng(6)
    return [{k: r.normal(size=v.shape).astype(np.float32) for k, v in _projected_feeds(mask, layout).items()}
            for _ in range(3)]


def _bias_inputs(model):
    """{op: [bias input or None per node]} for the ops that can carry the Q/K/V projection bias."""
    where = {"MultiHeadAttention": 3, "QAttention": 2, "MatMulIntegerToFloat": 6, "DynamicQuantizeMatMul": 4}
    out: dict[str, list] = {}
    for n in model.graph.node:
        if n.op_type in where:
            i = where[n.op_type]
            out.setdefault(n.op_type, []).append(n.input[i] if len(n.input) > i and n.input[i] else None)
    return out


@pytest.mark.parametrize("layout,mask", [("packed", "none"), ("packed", "causal"), ("packed", "additive"),
                                         ("pooled", "none"), ("separate", "causal")])
def test_int8_lowering_takes_the_qkv_bias_from_the_fused_node(layout, mask):
    """Static INT8 of a fused graph: packed QKV -> Split -> MultiHeadAttention(bias) lowers to one
    QAttention with that bias; where the attention stays float (pooled block, masked attention,
    separate projections) the bias goes back into the MatMulIntegerToFloat GEMMs. Either way the
    lowered graph is the one the graph with the Adds left in front lowers to, and it computes the
    same numbers as the QDQ graph it lowers."""
    from edgeclip import onnxgraph
    from edgeclip.calibration import qdq

    model = _projected(mask, layout)
    batches = _int8_batches(mask, layout)
    results = {}
    for fold in (True, False):
        fused = _fused(model, fold_bias=fold)
        targets = qdq.find_targets(fused)
        assert len(targets) == {"packed": 1, "pooled": 2, "separate": 3}[layout]
        quant = qdq.quantize(fused, targets, qdq.collect_ranges(fused, targets, batches[:2]))
        lowered = onnxgraph.copy_model(quant)
        qattention = layout == "packed" and mask != "additive"
        assert onnxgraph.lower_for_ort(lowered) == len(targets) + int(qattention)
        onnx.checker.check_model(lowered)
        ops = Counter(n.op_type for n in lowered.graph.node)
        assert ops["DequantizeLinear"] == 0 and ops["Softmax"] == 0 and ops["Add"] == 0
        biases = _bias_inputs(lowered)
        if qattention:
            assert ops["QAttention"] == 1 and ops["MultiHeadAttention"] == ops["MatMulIntegerToFloat"] == 0
            qa = next(n for n in lowered.graph.node if n.op_type == "QAttention")
            assert qa.input[2] == "b_qkv"
            attrs = {a.name: helper.get_attribute_value(a) for a in qa.attribute}
            assert attrs["unidirectional"] == int(mask == "causal") and attrs["num_heads"] == N
        else:
            assert ops["MatMulIntegerToFloat"] == len(targets) and ops["MultiHeadAttention"] == 1
            assert biases["MultiHeadAttention"] == [None] and None not in biases["MatMulIntegerToFloat"]
            gemm_bias = np.concatenate([numpy_helper.to_array(i) for n in biases["MatMulIntegerToFloat"]
                                        for i in lowered.graph.initializer if i.name == n])
            np.testing.assert_array_equal(gemm_bias, B_QKV)
        after = _run(lowered, batches[2])
        np.testing.assert_allclose(after, _run(quant, batches[2]), atol=1e-5, rtol=1e-5)
        results[fold] = (ops, after)
    (ops_fold, out_fold), (ops_add, out_add) = results[True], results[False]
    assert ops_fold == ops_add
    np.testing.assert_array_equal(out_fold, out_add)


@pytest.mark.parametrize("layout", ["packed", "pooled"])
def test_dynamic_int8_takes_the_qkv_bias_from_the_fused_node(layout):
    """DynamicQuantizeMatMul GEMMs get the Q/K/V bias back from the fused node, as they had it when
    the Adds stayed in front of the attention; weight-only int8 leaves it in the fused node."""
    from edgeclip.calibration import qdq

    model = _projected("causal" if layout == "packed" else "none", layout)
    feeds = _int8_batches("none", layout)[0]
    outs = {}
    for fold in (True, False):
        fused = _fused(model, fold_bias=fold)
        dyn = qdq.quantize_dynamic(fused, qdq.find_targets(fused))
        onnx.checker.check_model(dyn)
        biases = _bias_inputs(dyn)
        assert biases["MultiHeadAttention"] == [None] and None not in biases["DynamicQuantizeMatMul"]
        assert Counter(n.op_type for n in dyn.graph.node)["Add"] == 0
        outs[fold] = _run(dyn, feeds)
    np.testing.assert_array_equal(outs[True], outs[False])
    fused = _fused(model)
    w8 = qdq.quantize_weights(fused, qdq.find_targets(fused))
    assert _bias_inputs(w8)["MultiHeadAttention"] != [None]
    ops = Counter(n.op_type for n in w8.graph.node)
    assert ops["Add"] == 0 and ops["DequantizeLinear"] == ops["MatMul"] == {"packed": 1, "pooled": 2}[layout]
    np.testing.assert_allclose(_run(w8, feeds), _run(model, feeds), atol=0.05)


def _skip_ln_graph(reuse_sum: bool):
    r = np.random.default_rng(1)
    inits = [_const("g", r.normal(size=D).astype(np.float32)), _const("b", r.normal(size=D).astype(np.float32))]
    nodes = [helper.make_node("Add", ["x", "y"], ["s"]),
             helper.make_node("LayerNormalization", ["s", "g", "b"], ["n"], axis=-1, epsilon=1e-5)]
    outputs = [helper.make_tensor_value_info("n", TensorProto.FLOAT, [B, L, D])]
    if reuse_sum:
        nodes.append(helper.make_node("Mul", ["s", "n"], ["m"]))
        outputs.append(helper.make_tensor_value_info("m", TensorProto.FLOAT, [B, L, D]))
    inputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [B, L, D]) for x in "xy"]
    return helper.make_model(helper.make_graph(nodes, "skipln", inputs, outputs, inits),
                             opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("reuse_sum", [False, True])
def test_skip_layernorm_fusion_golden(reuse_sum):
    model = _skip_ln_graph(reuse_sum)
    r = np.random.default_rng(2)
    feeds = {x: r.normal(size=(B, L, D)).astype(np.float32) for x in "xy"}
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    before = s.run(None, feeds)
    assert SkipLayerNormFusion().fuse(model) == 1
    onnx.checker.check_model(model)
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["SkipLayerNormalization"] == 1 and ops["Add"] == 0 and ops["LayerNormalization"] == 0
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    for a, b in zip(after, before):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def _quick_gelu_graph(alpha=1.702, const_first=False):
    inits = [_const("a", np.array(alpha, np.float32))]
    mul_in = ["a", "x"] if const_first else ["x", "a"]
    nodes = [helper.make_node("Mul", mul_in, ["ax"]), helper.make_node("Sigmoid", ["ax"], ["s"]),
             helper.make_node("Mul", ["s", "x"], ["y"])]
    return helper.make_model(helper.make_graph(
        nodes, "qg", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, L, D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, L, D])], inits),
        opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("alpha,const_first", [(1.702, False), (1.0, True)])
def test_quick_gelu_fusion_golden(alpha, const_first):
    model = _quick_gelu_graph(alpha, const_first)
    x = {"x": np.random.default_rng(3).normal(size=(B, L, D)).astype(np.float32) * 3}
    before = _run(model, x)
    assert QuickGeluFusion().fuse(model) == 1
    onnx.checker.check_model(model)
    (node,) = model.graph.node
    assert node.op_type == "QuickGelu" and helper.get_attribute_value(node.attribute[0]) == pytest.approx(alpha)
    np.testing.assert_allclose(_run(model, x), before, atol=1e-5, rtol=1e-5)


def test_quick_gelu_fusion_leaves_other_gates_alone():
    model = _quick_gelu_graph()
    model.graph.node[2].input[1] = "ax"  # sigmoid(ax) * ax: not x * sigmoid(a x)
    assert QuickGeluFusion().fuse(model) == 0


def _gelu_graph(scale_op="Div", half_first=True, x_first=False):
    """x * 0.5 * (1 + erf(x / sqrt 2)) in the orders exporters write it."""
    inits = [_const("c", np.array(2 ** 0.5 if scale_op == "Div" else 2 ** -0.5, np.float32)),
             _const("one", np.array(1.0, np.float32)), _const("half", np.array(0.5, np.float32))]
    nodes = [helper.make_node(scale_op, ["x", "c"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["one", "e"], ["a"])]
    if half_first:
        nodes += [helper.make_node("Mul", ["half", "a"], ["m"]),
                  helper.make_node("Mul", ["x", "m"] if x_first else ["m", "x"], ["y"])]
    else:
        nodes += [helper.make_node("Mul", ["x", "a"] if x_first else ["a", "x"], ["m"]),
                  helper.make_node("Mul", ["m", "half"], ["y"])]
    return helper.make_model(helper.make_graph(
        nodes, "gelu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, L, D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, L, D])], inits),
        opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("scale_op,half_first,x_first", [("Div", True, True), ("Div", False, False),
                                                          ("Mul", True, False), ("Mul", False, True)])
def test_gelu_fusion_golden(scale_op, half_first, x_first):
    model = _gelu_graph(scale_op, half_first, x_first)
    x = {"x": np.random.default_rng(4).normal(size=(B, L, D)).astype(np.float32) * 3}
    before = _run(model, x)
    assert GeluFusion().fuse(model) == 1
    onnx.checker.check_model(model)
    (node,) = model.graph.node
    assert node.op_type == "Gelu" and node.domain == "com.microsoft" and not model.graph.initializer
    np.testing.assert_allclose(_run(model, x), before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("edit", ["scale", "half", "gate"])
def test_gelu_fusion_leaves_near_misses_alone(edit):
    model = _gelu_graph()
    if edit == "scale":  # x / 2: not erf(x / sqrt 2)
        model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.array(2.0, np.float32), "c"))
    elif edit == "half":  # 0.25 * (1 + erf) * x
        model.graph.initializer[2].CopyFrom(numpy_helper.from_array(np.array(0.25, np.float32), "half"))
    else:  # (1 + erf(x / sqrt 2)) * 0.5 * d: gated by another tensor than the erf's input
        model.graph.node[4].input[1] = "d"
    assert GeluFusion().fuse(model) == 0


# ------------------------------------------------------------------------------ exported models

def _tiny_pair_exports():
    from edgeclip.builtin import digit_labels

    # builtin:tiny to ONNX FP32 with a baked head, fused (the artifact the runtime, INT8, OpenVINO and
    # export tests read too) and unfused; exported once per session (conftest.py)
    fused = {"model": "builtin:tiny", "target": "onnx", "precision": "fp32", "labels": digit_labels()}
    return [fused, {**fused, "fuse": False}]


SHARED_EXPORTS = {"tiny_pair": lambda shared: _tiny_pair_exports()}


@pytest.fixture(scope="module")
def tiny_pair(shared_exports):
    import edgeclip

    model = edgeclip.load_model("builtin:tiny")
    fused, plain = (shared_exports.get(spec) for spec in _tiny_pair_exports())
    return model, fused, plain


def test_exported_graphs_have_no_unfused_attention(tiny_pair):
    model, fused, plain = tiny_pair
    for name, blocks in (("image", len(model.visual.blocks)), ("text", len(model.text.blocks))):
        ops = Counter(n.op_type for n in onnx.load(str(fused.path / f"{name}.onnx")).graph.node)
        assert ops["MultiHeadAttention"] == blocks and ops["Softmax"] == 0, (name, ops)
        assert ops["QuickGelu"] == blocks and ops["Sigmoid"] == 0
        assert fused.manifest["fusions"][name]["attention"] == blocks
        raw = Counter(n.op_type for n in onnx.load(str(plain.path / f"{name}.onnx")).graph.node)
        assert raw["MultiHeadAttention"] == 0 and raw["Softmax"] == blocks
    assert plain.manifest["fusions"] == {}


def test_exported_attention_adds_the_projection_biases_itself(tiny_pair):
    """Every fused attention of both towers (packed-QKV blocks, the pooled-only last block, the text
    tower's masked one) takes the Q/K/V projection biases as its `bias` input: no Add in front of it."""
    model, fused, _ = tiny_pair
    width = {"image": model.spec.vision.width, "text": model.spec.text.width}
    for name in ("image", "text"):
        graph = onnx.load(str(fused.path / f"{name}.onnx"))
        inits = {i.name: i for i in graph.graph.initializer}
        mhas = [n for n in graph.graph.node if n.op_type == "MultiHeadAttention"]
        for mha in mhas:
            assert _qkv_sources(graph, mha) == ["MatMul"] * 3, (name, mha.name)
            assert list(inits[mha.input[3]].dims) == [3 * width[name]], (name, mha.name)
        # the packed blocks' biases keep their checkpoint names
        assert sum(mha.input[3].endswith("attn.qkv.bias") for mha in mhas) == len(mhas) - 1, name


def test_fused_and_unfused_exports_agree(tiny_pair):
    from edgeclip.builtin import heldout_dir
    from edgeclip.runtime.pipeline import Pipeline

    _, fused, plain = tiny_pair
    images = [str(p) for p in sorted(heldout_dir().glob("*/*.png"))[::30]]
    texts = ["a photo of the digit seven", "zero", "a handwritten number nine, slightly tilted"]
    a, b = Pipeline.load(fused.path), Pipeline.load(plain.path)
    np.testing.assert_allclose(a.encode_image(images), b.encode_image(images), atol=1e-5)
    np.testing.assert_allclose(a.encode_text(texts), b.encode_text(texts), atol=1e-5)


def test_fuse_reports_counts_per_fusion():
    model = _attention_graph("causal")
    assert fuse(model) == {"attention": 1, "quick_gelu": 0, "gelu": 0}
    assert fuse(_skip_ln_graph(True), ("attention", "skip_layernorm")) == {"attention": 0, "skip_layernorm": 1}
