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

from edgeclip.kernels.onnx_fusions import AttentionFusion, QuickGeluFusion, SkipLayerNormFusion, fuse  # noqa: E402

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


# ------------------------------------------------------------------------------ exported models

@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    import edgeclip

    root = tmp_path_factory.mktemp("fusions")
    model = edgeclip.load_model("builtin:tiny")
    fused = edgeclip.export(model, out=root / "fused", labels=["zero", "one"])
    plain = edgeclip.export(model, out=root / "plain", labels=["zero", "one"], fuse=False)
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
    assert fuse(model) == {"attention": 1, "quick_gelu": 0}
    assert fuse(_skip_ln_graph(True), ("attention", "skip_layernorm")) == {"attention": 0, "skip_layernorm": 1}
