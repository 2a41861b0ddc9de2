"""The TensorRT compatibility check (exporter/trt_check.py) on small graphs built with onnx.helper, each
valid ONNX (checked, and the Q/DQ ones run in ONNX Runtime), and on the built-in model's exported graphs."""
from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeclip.errors import TensorRTCompatError, UsageError
from edgeclip.exporter import trt_check
from edgeclip.exporter.trt_check import check_graph, inspect_lines, load_allowlist, profile_for

F = TensorProto.FLOAT
PROFILE = {"x": {"min": [1, 4], "opt": [8, 4], "max": [64, 4]}}


def _model(nodes, inits=(), opset=18, inputs=None, out=("batch", 3), extra_opsets=(), check=True, outputs=None):
    inputs = inputs or [helper.make_tensor_value_info("x", F, ["batch", 4])]
    outputs = outputs or [helper.make_tensor_value_info("y", F, list(out))]
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, v) for d, v in extra_opsets)]
    m = helper.make_model(graph, opset_imports=opsets, ir_version=10)
    if check:  # valid ONNX, types and shapes inferred strictly: only TensorRT's rules are under test
        onnx.checker.check_model(m)
        onnx.shape_inference.infer_shapes(m, strict_mode=True)
    return m


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def _standard():
    w = _init("w", np.ones((4, 3), np.float32))
    b = _init("b", np.zeros(3, np.float32))
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc/matmul"),
             helper.make_node("Add", ["h", "b"], ["h2"], name="fc/add"),
             helper.make_node("Relu", ["h2"], ["h3"], name="act"),
             helper.make_node("Relu", ["h3"], ["y"], name="act2")]
    return _model(nodes, [w, b])


def _raises(model, rule, node, **kw):
    with pytest.raises(TensorRTCompatError) as e:
        check_graph(model, **kw)
    assert e.value.rule == rule, str(e.value)
    if node is not None:
        assert e.value.node == node and f"'{node}'" in str(e.value)
    return e.value


def test_standard_graph_passes_and_counts_ops():
    r = check_graph(_standard(), "10.3", PROFILE)
    assert r["ops"] == {"Add": 1, "MatMul": 1, "Relu": 2} and r["nodes"] == 4
    assert r["opset"] == 18 and r["trt_version"] == "10.3" and r["allowlist"] == "10.3"
    assert r["dynamic_dims"] == {"x": {"0": {"dim": "batch", "min": 1, "opt": 8, "max": 64}}}
    assert r["qdq"] == {"quantize": 0, "dequantize": 0, "weights": 0, "activations": 0, "per_channel": 0}
    json.dumps(r)  # the report goes into the manifest
    lines = inspect_lines(r)
    assert lines[0].startswith("TensorRT 10.3") and "MatMul 1" in lines[1]
    assert any("profile x: batch 1/8/64" in line for line in lines)


@pytest.mark.parametrize("op", ["QuickGelu", "MultiHeadAttention"])
def test_com_microsoft_node_fails_naming_it(op):
    if op == "QuickGelu":
        nodes = [helper.make_node("QuickGelu", ["x"], ["y"], name="blk0/act", domain="com.microsoft", alpha=1.702)]
    else:
        nodes = [helper.make_node("MultiHeadAttention", ["x", "x", "x"], ["y"], name="blk0/attn",
                                  domain="com.microsoft", num_heads=1)]
    m = _model(nodes, extra_opsets=[("com.microsoft", 1)], check=False)
    e = _raises(m, "domain", nodes[0].name, profiles=PROFILE)
    assert f"com.microsoft.{op}" in str(e)


def _attention(opset=23):
    shape = [1, 2, 5, 8]  # 4-D Q/K/V, the form TensorRT's Attention importer takes
    ins = [helper.make_tensor_value_info(n, F, shape) for n in "qkv"]
    node = helper.make_node("Attention", ["q", "k", "v"], ["y"], name="blk0/sdpa")
    return _model([node], opset=opset, inputs=ins, outputs=[helper.make_tensor_value_info("y", F, shape)])


def test_onnx_attention_op_only_from_10_14():
    e = _raises(_attention(), "op", "blk0/sdpa", trt_version="10.3")
    assert "(Attention)" in str(e) and "10.14" in str(e)
    assert check_graph(_attention(), "10.14")["ops"] == {"Attention": 1}
    assert check_graph(_attention(), "11.0")["allowlist"] == "11.0"


@pytest.mark.parametrize("op,expect", [
    ("STFT", "10.14"),  # real-valued STFT arrived in 10.5
    ("MatMulInteger", "no TensorRT version"),
])
def test_op_outside_the_allowlist(op, expect):
    if op == "STFT":
        ins = [helper.make_tensor_value_info("sig", F, [1, 64, 1])]
        step = _init("step", np.array(16, np.int64))
        node = helper.make_node("STFT", ["sig", "step", "", "flen"], ["y"], name="spec")
        m = _model([node], [step, _init("flen", np.array(16, np.int64))], opset=17, inputs=ins,
                   out=("n", "frames", "bins", 2))
    else:
        ins = [helper.make_tensor_value_info("a", TensorProto.UINT8, [2, 4])]
        node = helper.make_node("MatMulInteger", ["a", "wq"], ["y"], name="qmm")
        m = _model([node], [_init("wq", np.ones((4, 3), np.uint8))], inputs=ins,
                   outputs=[helper.make_tensor_value_info("y", TensorProto.INT32, [2, 3])])
    e = _raises(m, "op", node.name, trt_version="10.3")
    assert expect in str(e)


def test_opset_above_the_version_fails():
    m = _standard()
    m.opset_import[0].version = 21
    e = _raises(m, "opset", None, trt_version="10.3", profiles=PROFILE)
    assert "21" in str(e) and "9..20" in str(e)
    assert check_graph(m, "10.14", PROFILE)["opset"] == 21


def test_version_selection():
    assert load_allowlist("10.3")["max_opset"] == 20 and "Attention" not in load_allowlist("10.3")["ops"]
    assert load_allowlist("10.3.0.30")["version"] == "10.3"
    assert load_allowlist("10.10")["version"] == "10.3"  # between rows: the older, smaller list
    eleven = load_allowlist("11.0")
    assert {"Attention", "Swish", "MatMul"} <= eleven["ops"] and eleven["max_opset"] >= 24
    assert load_allowlist("12.1")["version"] == "11.0"
    with pytest.raises(UsageError, match="10.3.*11.0"):
        load_allowlist("9.0")
    with pytest.raises(UsageError, match="version number"):
        load_allowlist("ten")


# ---- Q/DQ ---------------------------------------------------------------------------------------

def _qdq(zp=np.int8(0), w_axis=1, w_scales=3, after_matmul=False, act_zp=True):
    """x -> Q -> DQ -> MatMul(DQ(int8 W [4, 3], per-channel)) -> y; or with the pair after the MatMul."""
    inits = [_init("s", np.array(0.05, np.float32)), _init("zp", np.array(zp)),
             _init("wq", np.arange(12, dtype=np.int8).reshape(4, 3)),
             _init("ws", np.full(w_scales, 0.01, np.float32)), _init("wzp", np.zeros(w_scales, np.int8))]
    wdq = helper.make_node("DequantizeLinear", ["wq", "ws", "wzp"], ["w"], name="fc/w_dq", axis=w_axis)
    q_in = ["x", "s", "zp"] if act_zp else ["x", "s"]
    if after_matmul:
        nodes = [wdq, helper.make_node("MatMul", ["x", "w"], ["h"], name="fc/matmul"),
                 helper.make_node("QuantizeLinear", ["h", "s", "zp"], ["hq"], name="fc/out_q"),
                 helper.make_node("DequantizeLinear", ["hq", "s", "zp"], ["hd"], name="fc/out_dq"),
                 helper.make_node("Relu", ["hd"], ["y"], name="act")]
    else:
        nodes = [helper.make_node("QuantizeLinear", q_in, ["xq"], name="fc/in_q"),
                 helper.make_node("DequantizeLinear", ["xq", "s", "zp"] if act_zp else ["xq", "s"], ["xd"],
                                  name="fc/in_dq"),
                 wdq, helper.make_node("MatMul", ["xd", "w"], ["y"], name="fc/matmul")]
    return _model(nodes, inits)


def _run(model, x):
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def test_symmetric_int8_qdq_passes_and_runs():
    m = _qdq()
    r = check_graph(m, "10.3", PROFILE)
    assert r["qdq"] == {"quantize": 1, "dequantize": 2, "weights": 1, "activations": 1, "per_channel": 1}
    assert any("Q/DQ: 1 Q, 2 DQ" in line for line in inspect_lines(r))
    x = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)
    ref = np.clip(np.round(x / 0.05), -128, 127) * 0.05 @ (np.arange(12).reshape(4, 3) * 0.01)
    np.testing.assert_allclose(_run(m, x), ref, rtol=1e-5, atol=1e-6)


def test_asymmetric_uint8_qdq_fails():
    m = _qdq(zp=np.uint8(128))
    e = _raises(m, "qdq-symmetric", "fc/in_q", profiles=PROFILE)
    assert "uint8" in str(e) and "zero point" in str(e)
    _run(m, np.zeros((1, 4), np.float32))  # a valid graph ORT runs: only TensorRT refuses it


def test_nonzero_int8_zero_point_and_missing_zero_point_fail():
    e = _raises(_qdq(zp=np.int8(3)), "qdq-symmetric", "fc/in_q", profiles=PROFILE)
    assert "holds 3" in str(e)
    e = _raises(_qdq(act_zp=False), "qdq-symmetric", "fc/in_q", profiles=PROFILE)
    assert "uint8" in str(e)


def test_opset21_quantize_with_int8_output_dtype_needs_no_zero_point():
    nodes = [helper.make_node("QuantizeLinear", ["x", "s"], ["xq"], name="q", output_dtype=TensorProto.INT8),
             helper.make_node("DequantizeLinear", ["xq", "s"], ["xd"], name="dq"),
             helper.make_node("MatMul", ["xd", "w"], ["y"], name="mm")]
    m = _model(nodes, [_init("s", np.array(0.1, np.float32)), _init("w", np.ones((4, 3), np.float32))], opset=21)
    assert check_graph(m, "10.14", PROFILE)["qdq"]["activations"] == 1
    _raises(m, "opset", None, trt_version="10.3", profiles=PROFILE)


def test_qdq_on_a_matmul_output_fails():
    e = _raises(_qdq(after_matmul=True), "qdq-placement", "fc/out_q", profiles=PROFILE)
    assert "MatMul 'fc/matmul'" in str(e)


def test_a_gemm_output_quantized_as_the_next_gemms_input_passes():
    # MatMul -> Q -> DQ -> MatMul: the second layer's input quantization (conv -> conv chains in CNNs)
    m = _qdq(after_matmul=True)
    m.graph.initializer.append(_init("w2", np.eye(3, dtype=np.float32)))
    m.graph.node[-1].CopyFrom(helper.make_node("MatMul", ["hd", "w2"], ["y"], name="fc2/matmul"))
    report = check_graph(m, "10.3", PROFILE)
    assert report["qdq"]["quantize"] == 1


def test_per_channel_axis_must_be_the_output_channels():
    e = _raises(_qdq(w_axis=0, w_scales=4), "qdq-axis", "fc/w_dq", profiles=PROFILE)
    assert "MatMul 'fc/matmul'" in str(e)
    e = _raises(_qdq(w_axis=1, w_scales=4), "qdq-axis", "fc/w_dq", profiles=PROFILE)
    assert "4 scales" in str(e)


def _conv(axis):
    inits = [_init("wq", np.ones((2, 3, 1, 1), np.int8)), _init("ws", np.full(2 if axis == 0 else 3, 0.1, np.float32)),
             _init("wzp", np.zeros(2 if axis == 0 else 3, np.int8))]
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws", "wzp"], ["w"], name="stem/w_dq", axis=axis),
             helper.make_node("Conv", ["x", "w"], ["y"], name="stem/conv")]
    ins = [helper.make_tensor_value_info("x", F, ["batch", 3, 8, 8])]
    return _model(nodes, inits, inputs=ins, out=("batch", 2, 8, 8))


def test_conv_weights_per_channel_on_axis_0():
    prof = profile_for(_conv(0))
    assert prof == {"x": {"min": [1, 3, 8, 8], "opt": [8, 3, 8, 8], "max": [64, 3, 8, 8]}}
    assert check_graph(_conv(0), "10.3", prof)["qdq"]["per_channel"] == 1
    _raises(_conv(1), "qdq-axis", "stem/w_dq", profiles=prof)


def test_activation_dq_feeding_a_non_gemm_fails():
    m = _qdq()
    m.graph.node[3].op_type = "Add"  # the DQ'd activation now feeds a residual add
    _raises(m, "qdq-placement", "fc/in_dq", profiles=PROFILE)


# ---- dynamic dims and profiles ------------------------------------------------------------------

@pytest.mark.parametrize("profiles,why", [
    (None, "no optimization profile"),
    ({}, "no optimization profile"),
    ({"x": {"min": [64, 4], "opt": [8, 4], "max": [1, 4]}}, "min <= opt <= max"),
    ({"x": {"min": [1, 4], "opt": [80, 4], "max": [64, 4]}}, "min <= opt <= max"),
    ({"x": {"min": [1, 5], "opt": [8, 5], "max": [64, 5]}}, "static 4"),
    ({"x": {"min": [1], "opt": [8], "max": [64]}}, "2 ints"),
    ({"x": {"min": [True, 4], "opt": [8, 4], "max": [64, 4]}}, "2 ints"),
    ({"x": {"min": [1, 4], "opt": [8, 4], "max": [2**40, 4]}}, "2 ints"),
    ({"x": {"min": [1, 4], "max": [64, 4]}}, "'min'"),
    ({**PROFILE, "pixels": PROFILE["x"]}, "not an input"),
])
def test_dynamic_dim_outside_or_without_a_profile_fails(profiles, why):
    e = _raises(_standard(), "profile", None, trt_version="10.3", profiles=profiles)
    assert why in str(e) and e.node in ("x", "pixels")


def test_one_symbolic_dim_one_range():
    ins = [helper.make_tensor_value_info("x", F, ["batch", 4]), helper.make_tensor_value_info("z", F, ["batch", 4])]
    m = _model([helper.make_node("Add", ["x", "z"], ["y"], name="add")], inputs=ins, out=("batch", 4))
    good = {"x": PROFILE["x"], "z": PROFILE["x"]}
    assert set(check_graph(m, "10.3", good)["dynamic_dims"]) == {"x", "z"}
    bad = {"x": PROFILE["x"], "z": {"min": [1, 4], "opt": [8, 4], "max": [32, 4]}}
    e = _raises(m, "profile", "z", profiles=bad)
    assert "'batch'" in str(e)


def _text(length):
    ins = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", length])]
    node = helper.make_node("Cast", ["input_ids"], ["y"], name="cast", to=F)
    return _model([node], inputs=ins, out=("batch", length))


def test_profile_for_text_and_static_graphs():
    with pytest.raises(UsageError, match="length="):
        profile_for(_text("length"))
    prof = profile_for(_text("length"), batch=(1, 4, 16), length=77)
    assert prof == {"input_ids": {"min": [1, 1], "opt": [4, 77], "max": [16, 77]}}
    r = check_graph(_text("length"), "10.3", prof)
    assert r["dynamic_dims"]["input_ids"]["1"] == {"dim": "length", "min": 1, "opt": 77, "max": 77}
    assert profile_for(_text(77))["input_ids"]["max"] == [64, 77]
    ins = [helper.make_tensor_value_info("x", F, ["batch", "width"])]
    with pytest.raises(UsageError, match="dim 1"):
        profile_for(_model([helper.make_node("Relu", ["x"], ["y"])], inputs=ins, out=("batch", "width")))
    with pytest.raises(UsageError, match="batch"):
        profile_for(_standard(), batch=(8, 1, 64))


def test_subgraph_nodes_are_checked():
    then = helper.make_graph([helper.make_node("QuickGelu", ["x"], ["t"], name="then/act", domain="com.microsoft")],
                             "then", [], [helper.make_tensor_value_info("t", F, None)])
    other = helper.make_graph([helper.make_node("Relu", ["x"], ["e"], name="else/act")],
                              "else", [], [helper.make_tensor_value_info("e", F, None)])
    ins = [helper.make_tensor_value_info("x", F, [2, 4]), helper.make_tensor_value_info("c", TensorProto.BOOL, [])]
    node = helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then, else_branch=other)
    m = _model([node], inputs=ins, extra_opsets=[("com.microsoft", 1)], check=False)
    _raises(m, "domain", "then/act")


def test_allowlist_data_is_well_formed():
    data = trt_check._table()
    assert data["domains"] == ["", "ai.onnx"]
    known = {s.name for s in onnx.defs.get_all_schemas_with_history() if s.domain == ""}
    # the table still lists three experimental ops ONNX since dropped; every other name is a real op
    legacy = {"ImageScaler", "ParametricSoftplus", "ScaledTanh"}
    rows = [data["versions"][v] for v in trt_check.known_versions()]
    for older, newer in zip(rows, rows[1:]):
        assert set(older["ops"]) <= set(newer["ops"]) and older["max_opset"] <= newer["max_opset"]
    for row in rows:
        assert set(row["ops"]) - legacy <= known
        assert not {"MatMulInteger", "QLinearMatMul", "DynamicQuantizeLinear", "ConvInteger"} & set(row["ops"])


# ---- a real exported graph ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    import edgeclip

    out = tmp_path_factory.mktemp("trt") / "tiny"
    edgeclip.export("builtin:tiny", out=out, fuse=False)
    return out


def test_exported_unfused_graphs_pass(exported):
    from edgeclip.specs import get_spec

    ctx = get_spec("tiny").text.context_length
    for name in ("image.onnx", "text.onnx"):
        model = onnx.load(exported / name)
        r = check_graph(model, "10.3", profile_for(model, length=ctx))
        assert r["nodes"] > 20 and "MatMul" in r["ops"] and r["dynamic_dims"]
        assert {n.domain for n in model.graph.node} <= {""}


def test_exported_fused_graph_fails_on_its_contrib_ops(exported):
    from edgeclip.kernels.onnx_fusions import fuse

    model = copy.deepcopy(onnx.load(exported / "image.onnx"))
    if not any(fuse(model).values()):
        pytest.fail("the ORT fusions fused nothing in the tiny image graph")
    bad = next(n for n in model.graph.node if n.domain == "com.microsoft")
    _raises(model, "domain", bad.name or f"<{bad.op_type} -> {bad.output[0]}>", profiles=profile_for(model))
