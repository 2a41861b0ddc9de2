"""The `ort-mobile` target's phone graphs: ONNX Runtime's own mobile usability analysis (one partition
covering >= 95 % of the nodes for NNAPI and Core ML ML Program), fixed shapes through the runtime,
the rewrites' numerics, the reduced build config, and the conformance vectors of every target."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgeclip
from edgeclip import builtin
from edgeclip.errors import ArtifactError, ConformanceError, EdgeClipError, InputError
from edgeclip.runtime.pipeline import Pipeline

DIGITS = builtin.digit_labels()
TINY = {"model": "builtin:tiny", "labels": DIGITS}
MOBILE = {(m, p): {"model": m, "target": "ort-mobile", "precision": p, **({"labels": DIGITS} if m == "builtin:tiny" else {})}
          for m in ("builtin:tiny", "random:ViT-B-32", "random:MobileCLIP-S1") for p in ("fp32", "int8")}
SHAPES = {**TINY, "target": "ort-mobile", "mobile_shapes": "2x16"}
CPU = {**TINY, "target": "ort-mobile", "mobile_eps": "cpu"}
# every target's artifact of the built-in model (the same specs other modules export: shared once)
TARGETS = {"onnx": {**TINY, "target": "onnx", "precision": "fp32"},
           "openvino": {**TINY, "target": "openvino", "precision": "fp32"},
           "coreml": {**TINY, "target": "coreml", "min_ios": 18},
           "tensorrt": {**TINY, "target": "tensorrt"},
           "ort-mobile": MOBILE["builtin:tiny", "fp32"]}
SHARED_EXPORTS = {"mobile": list(MOBILE.values()), "shapes": [SHAPES], "targets": list(TARGETS.values()),
                  "cpu": [CPU]}


@pytest.fixture(scope="module")
def mobile(shared_exports):
    return {k: shared_exports.get(spec) for k, spec in MOBILE.items()}


@pytest.fixture(scope="module")
def targets(shared_exports):
    return {k: shared_exports.get(spec) for k, spec in TARGETS.items()}


def _ort_ops(path: Path) -> list[str]:
    """(domain:op) of every node an ORT-format file holds, read from its flatbuffer."""
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs import InferenceSession as Fbs

    g = Fbs.InferenceSession.GetRootAsInferenceSession(path.read_bytes(), 0).Model().Graph()
    return [f"{(g.Nodes(i).Domain() or b'ai.onnx').decode() or 'ai.onnx'}:{g.Nodes(i).OpType().decode()}"
            for i in range(g.NodesLength())]


# ------------------------------------------------------------------------ the usability analysis

@pytest.mark.parametrize("key", list(MOBILE), ids=[f"{m.split(':')[1]}-{p}" for m, p in MOBILE])
def test_nnapi_and_coreml_take_each_graph_in_one_partition(mobile, key):
    art = mobile[key]
    section = art.manifest["ort-mobile"]
    assert section["eps"] == ["nnapi", "coreml", "xnnpack"] and section["shapes"]["batch"] == 1
    for graph in ("image", "text"):
        report = section["usability"][graph]
        for ep in ("nnapi", "coreml"):
            e = report[ep]  # ONNX Runtime's PartitioningInfo, as its usability checker computed it
            assert e["partitions"] == 1 and e["supported"] / e["nodes"] >= 0.95, (graph, ep, e)
            assert e["dynamic_nodes"] == 0 and e["verdict"] == "YES"
        # the analysed graph is the saved one: same node count as the ORT-format file
        ops = _ort_ops(art.path / f"{graph}.ort")
        assert len(ops) == report["nnapi"]["nodes"]
        assert not [o for o in ops if o.startswith("com.microsoft")]
        assert "ai.onnx:MultiHeadAttention" not in ops and "ai.onnx:LayerNormalization" not in ops
    # graphs run on the CPU EP within the target's tolerance of the torch reference (checked at export)
    assert all(r["ok"] for r in art.manifest["fidelity"].values())
    if key[1] == "int8":
        assert art.manifest["quantization"]["recipe"] == "w8a16"
        # the weights stay int8 in the file: Cast nodes read int8 initializers
        assert art.manifest["sizes"]["image"]["bits_per_weight"] < 20


def test_every_saved_op_is_on_the_nnapi_list(mobile):
    """Cross-check with the list the checker reads: each node type of the saved files is NNAPI's."""
    from onnxruntime.tools.mobile_helpers import usability_checker as uc

    listed = uc._SupportedOpsChecker(Path(uc.__file__).parent / "nnapi_supported_ops.md")._ops
    for key in (("builtin:tiny", "fp32"), ("random:MobileCLIP-S1", "int8")):
        for graph in ("image", "text"):
            assert set(_ort_ops(mobile[key].path / f"{graph}.ort")) <= set(listed), (key, graph)


def test_inspect_shows_the_analysis(mobile, capsys):
    from edgeclip.cli import main

    assert main(["inspect", str(mobile["builtin:tiny", "fp32"].path)]) == 0
    out = capsys.readouterr().out
    assert "fixed shapes: batch 1, text length 77 (int32 ids)" in out
    assert "image: nnapi 100.0% in 1 partition" in out and "coreml" in out


def test_reduced_build_config_lists_the_graphs_ops(mobile):
    from edgeclip.exporter.formats.ort_mobile import _config_ops

    art = mobile["random:MobileCLIP-S1", "int8"]
    used = {o.split(":")[1] for g in ("image", "text") for o in _ort_ops(art.path / f"{g}.ort")}
    body = [line for line in (art.path / "required_operators.config").read_text().splitlines()
            if line and not line.startswith("#")]
    listed = {op.split("{")[0] for line in body for op in _config_ops(line)}
    assert listed == used


# ---------------------------------------------------------------------------------- fixed shapes

def test_fixed_shapes_through_the_runtime(shared_exports, targets):
    art = shared_exports.get(SHAPES)
    g = art.manifest["graphs"]
    assert g["image"]["inputs"]["pixel_values"]["shape"][0] == 2
    assert g["text"]["inputs"]["input_ids"] == {"dtype": "int32", "shape": [2, 16]}
    mob, ref = Pipeline.load(art.path), Pipeline.load(targets["onnx"].path)
    images = sorted(builtin.heldout_dir().glob("*/*.png"))[:5]  # 5 on a batch of 2: the last chunk padded
    assert np.abs(mob.encode_image(images) - ref.encode_image(images)).max() <= 1e-4
    texts = ["a photo of the number seven.", "two", "nine nine nine"]
    assert np.abs(mob.encode_text(texts) - ref.encode_text(texts)).max() <= 1e-4
    with pytest.raises(InputError, match="takes 16 tokens"):
        mob.encode_text(["one " * 30])


def test_the_cpu_eps_graphs_keep_the_fused_kernels_with_fixed_shapes(shared_exports, targets, capsys):
    """`--mobile-ep cpu`: the server graphs' fused CPU kernels (MultiHeadAttention, QuickGelu,
    LayerNormalization) in fixed-shape ORT-format graphs, no accelerator analysis; the same features
    as the server graphs, through the runtime and the conformance vectors."""
    from edgeclip.cli import main

    art = shared_exports.get(CPU)
    section = art.manifest["ort-mobile"]
    assert section["eps"] == ["cpu"] and section["usability"] == {"image": {}, "text": {}}
    assert art.manifest["fusions"]["image"]["attention"] == art.manifest["fusions"]["text"]["attention"] == 3
    for graph in ("image", "text"):
        ops = _ort_ops(art.path / f"{graph}.ort")
        assert {"com.microsoft:MultiHeadAttention", "com.microsoft:QuickGelu", "ai.onnx:LayerNormalization"} <= set(ops)
        assert section["contrib_ops"][graph] == ["MultiHeadAttention", "QuickGelu"]
    g = art.manifest["graphs"]
    assert g["text"]["inputs"]["input_ids"] == {"dtype": "int32", "shape": [1, 77]}
    assert g["image"]["inputs"]["pixel_values"]["shape"][0] == 1
    mob, ref = Pipeline.load(art.path), Pipeline.load(targets["onnx"].path)
    images = sorted(builtin.heldout_dir().glob("*/*.png"))[:3]
    assert np.abs(mob.encode_image(images) - ref.encode_image(images)).max() <= 1e-4
    texts = ["a photo of the number seven.", "two"]
    assert np.abs(mob.encode_text(texts) - ref.encode_text(texts)).max() <= 1e-4
    listed = (art.path / "required_operators.config").read_text()
    assert "com.microsoft;1;" in listed and "MultiHeadAttention" in listed
    assert main(["inspect", str(art.path)]) == 0
    out = capsys.readouterr().out
    assert "made for ONNX Runtime's CPU EP" in out and "usability analysis" not in out
    assert main(["verify", str(art.path), "--vectors"]) == 0


def test_mobile_options_are_checked_before_any_work(tmp_path):
    with pytest.raises(InputError, match="mobile_eps"):
        edgeclip.export("builtin:tiny", target="ort-mobile", mobile_eps="nnapi,qnn", out=tmp_path / "a")
    with pytest.raises(InputError, match="cpu alone"):
        edgeclip.export("builtin:tiny", target="ort-mobile", mobile_eps="cpu,nnapi", out=tmp_path / "e")
    with pytest.raises(InputError, match="BATCH"):
        edgeclip.export("builtin:tiny", target="ort-mobile", mobile_shapes="one", out=tmp_path / "b")
    with pytest.raises(InputError, match="not causal"):
        edgeclip.export("random:MobileCLIP-S0", target="ort-mobile", mobile_shapes="1x16", out=tmp_path / "c")
    with pytest.raises(EdgeClipError, match="ort-mobile"):
        edgeclip.export("builtin:tiny", target="onnx", mobile_shapes="1x16", out=tmp_path / "d")
    assert not any(tmp_path.iterdir())


def test_server_onnx_graphs_keep_their_fused_dynamic_form(targets):
    art = targets["onnx"]
    g = art.manifest["graphs"]
    assert g["text"]["inputs"]["input_ids"]["dtype"] == "int64" and g["image"]["inputs"]["pixel_values"]["shape"][0] == "batch"
    ops = {n.op_type for n in onnx.load(str(art.path / "image.onnx")).graph.node}
    assert "MultiHeadAttention" in ops and "ort-mobile" not in art.manifest


# ------------------------------------------------------------------------------ the rewrites

def _run(model, feeds):
    import onnxruntime as ort

    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, feeds)[0]


def _graph(nodes, inits, x_shape, out_shape, opset=18):
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
                          [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


CASES = {
    "LayerNormalization": ([helper.make_node("LayerNormalization", ["x", "s", "b"], ["y"], epsilon=1e-5)],
                           {"s": np.linspace(0.5, 2, 16, dtype=np.float32), "b": np.linspace(-1, 1, 16, dtype=np.float32)},
                           [2, 5, 16], [2, 5, 16], 1e-5),
    "Gelu": ([helper.make_node("Div", ["x", "r2"], ["u"]), helper.make_node("Erf", ["u"], ["e"]),
              helper.make_node("Add", ["e", "one"], ["a"]), helper.make_node("Mul", ["half", "a"], ["m"]),
              helper.make_node("Mul", ["x", "m"], ["y"])],
             {"r2": np.float32(2 ** 0.5), "one": np.float32(1), "half": np.float32(0.5)}, [4, 64], [4, 64], 3e-4),
    "Erf": ([helper.make_node("Erf", ["x"], ["y"])], {}, [4, 64], [4, 64], 4e-5),
    "ReduceL2": ([helper.make_node("ReduceL2", ["x", "ax"], ["y"], keepdims=1)], {"ax": np.array([-1], np.int64)},
                 [3, 32], [3, 1], 1e-5),
    "ReduceSum": ([helper.make_node("ReduceSum", ["x", "ax"], ["y"], keepdims=0)], {"ax": np.array([1], np.int64)},
                  [3, 32], [3], 1e-5),
    "Where": ([helper.make_node("Where", ["c", "ninf", "x"], ["y"])],
              {"c": np.triu(np.ones((6, 6), bool), 1), "ninf": np.float32(-np.inf)}, [6, 6], [6, 6], 0.0),
    "Gather": ([helper.make_node("Gather", ["x", "i"], ["y"], axis=1)], {"i": np.array(0, np.int64)},
               [2, 7, 8], [2, 8], 0.0),
    "Neg": ([helper.make_node("Neg", ["x"], ["y"])], {}, [5], [5], 0.0),
}


@pytest.mark.parametrize("op", list(CASES))
def test_each_rewrite_keeps_the_values(op):
    from edgeclip.kernels.onnx_mobile import lower_for_mobile

    nodes, inits, xs, ys, tol = CASES[op]
    model = _graph(nodes, inits, xs, ys)
    x = (np.random.RandomState(0).randn(*xs) * 3).astype(np.float32)
    want = _run(model, {"x": x})
    lowered = onnx.load_from_string(model.SerializeToString())
    counts = lower_for_mobile(lowered)
    assert counts == {op: 1} and op.replace("Gelu", "Erf") not in {n.op_type for n in lowered.graph.node}
    got = _run(lowered, {"x": x})
    if op == "Where":  # a masked entry is -inf before, a softmax-equivalent -30000 + x after
        assert np.array_equal(np.isinf(want), got < -1e4) and np.array_equal(got[~np.isinf(want)], want[~np.isinf(want)])
    else:
        assert np.abs(got - want).max() <= tol * max(1.0, np.abs(want).max())


def test_rewrites_follow_the_chosen_eps():
    from edgeclip.exporter.mobile import supported_ops
    from edgeclip.kernels.onnx_mobile import lower_for_mobile

    nodes, inits, xs, ys, _ = CASES["LayerNormalization"]
    model = _graph(nodes, inits, xs, ys)
    assert lower_for_mobile(model, supported_ops(("coreml",))) == {}  # Core ML takes LayerNormalization
    assert lower_for_mobile(model, supported_ops(("coreml", "nnapi"))) == {"LayerNormalization": 1}


def test_mask_pooling_picks_the_first_end_token():
    import torch

    from edgeclip.models.clip import end_token_table, pool_weights

    spec = edgeclip.load_model("builtin:tiny").spec.text
    eot = spec.eot_token_id
    ids = torch.tensor([[1, 5, eot, 0, 0], [eot, 3, eot, eot, 0], [2, 3, 4, 5, eot]])
    w = pool_weights(ids, end_token_table(spec, torch.zeros(1)))
    assert torch.equal(w.argmax(-1), torch.tensor([2, 0, 4])) and torch.equal(w.sum(-1), torch.ones(3))


# ---------------------------------------------------------------------------- conformance vectors

@pytest.mark.parametrize("target", list(TARGETS))
def test_verify_passes_on_every_targets_artifact(targets, target, capsys):
    from edgeclip.cli import main

    art = targets[target]
    assert art.manifest["conformance"]["file"] == "conformance.npz"
    assert main(["verify", str(art.path), "--vectors", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["checks"]["input_ids"]["ok"] and report["checks"]["pixel_values"]["ok"]
    if target == "coreml":  # Core ML predicts on macOS only: the graphs' expected values are torch's
        assert report["expected_from"] == "the float32 torch reference"
    ran = [n for n in ("image_embeds", "logits", "text_embeds") if n in report["checks"]]
    assert ran == ["image_embeds", "logits", "text_embeds"] or (target == "coreml" and report["not_run"])


@pytest.mark.parametrize("edit,named", [("expected_logits", "logits"), ("input_ids", "input_ids"),
                                        ("image_1", "pixel_values"), ("expected_text_embeds", "text_embeds")])
def test_an_edited_vectors_file_fails_naming_the_first_difference(targets, tmp_path, edit, named):
    from edgeclip.runtime.conformance import verify_vectors

    art = targets["ort-mobile"]
    z = dict(np.load(art.path / "conformance.npz"))
    z[edit] = z[edit].copy()
    at = z[edit].size // 2 + 1  # the middle: an image's centre survives the crop
    z[edit].flat[at] = (int(z[edit].flat[at]) + 40) % 256 if z[edit].dtype.kind in "iu" else z[edit].flat[at] + 0.25
    np.savez(tmp_path / "v.npz", **z)
    with pytest.raises(ConformanceError) as e:
        verify_vectors(Pipeline.load(art.path), tmp_path / "v.npz")
    assert e.value.output == named and f"'{named}'" in str(e.value)


def test_hostile_vectors_files_are_refused(targets, tmp_path):
    from edgeclip.runtime.conformance import verify_vectors

    pipe = Pipeline.load(targets["onnx"].path)
    np.savez(tmp_path / "obj.npz", input_ids=np.array([object()], dtype=object), pixel_values=np.zeros(1),
             meta=np.array("{}"))
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not a zip")
    for f in ("obj.npz", "junk.npz"):
        with pytest.raises(ArtifactError):
            verify_vectors(pipe, tmp_path / f)
    with pytest.raises(InputError):
        verify_vectors(pipe, tmp_path / "missing.npz")
    # the artifact's own file is checked against the manifest's digest
    copy = tmp_path / "art"
    shutil.copytree(targets["onnx"].path, copy)
    z = dict(np.load(copy / "conformance.npz"))
    z["expected_image_embeds"] = z["expected_image_embeds"] * 2
    np.savez(copy / "conformance.npz", **z)
    with pytest.raises(ArtifactError):
        verify_vectors(Pipeline.load(copy, verify=False))


def _stream_graph(batch: int, bias_shape: tuple, ln_op: bool = False):
    """A pre-LN transformer block's stream: LayerNorm-as-ops, a linear layer with its bias, a split into
    heads, a softmax over the last axis, a residual Add, and a positional table [1, N, C]."""
    rng = np.random.RandomState(1)
    n, c = 5, 16
    inits = {"pos": rng.randn(1, n, c).astype(np.float32), "ax": np.array([-1], np.int64),
             "eps": np.float32(1e-5), "w": rng.randn(c, 3 * c).astype(np.float32) * 0.2,
             "bias": rng.randn(*bias_shape).astype(np.float32), "sizes": np.array([c, c, c], np.int64),
             "heads": np.array([batch, n, 2, c // 2], np.int64), "w2": rng.randn(c, c).astype(np.float32)}
    nodes = [helper.make_node("Add", ["x", "pos"], ["s"]),
             helper.make_node("ReduceMean", ["s", "ax"], ["m"]), helper.make_node("Sub", ["s", "m"], ["d"]),
             helper.make_node("Mul", ["d", "d"], ["d2"]), helper.make_node("ReduceMean", ["d2", "ax"], ["v"]),
             helper.make_node("Add", ["v", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["sd"]),
             helper.make_node("Div", ["d", "sd"], ["h"]),
             helper.make_node("MatMul", ["h", "w"], ["lin"])]
    if ln_op:  # as --mobile-ep coreml keeps it
        nodes = [nodes[0], helper.make_node("LayerNormalization", ["s", "gamma", "beta"], ["h"], axis=-1),
                 nodes[-1]]
        inits.update(gamma=rng.rand(c).astype(np.float32), beta=rng.randn(c).astype(np.float32))
    nodes += [helper.make_node("Add", ["lin", "bias"], ["qkv"]),
              helper.make_node("Split", ["qkv", "sizes"], ["q", "k", "v2"], axis=2),
              helper.make_node("Reshape", ["q", "heads"], ["qh"]), helper.make_node("Softmax", ["k"], ["ks"], axis=-1),
              helper.make_node("Mul", ["ks", "v2"], ["kv"]), helper.make_node("MatMul", ["kv", "w2"], ["o"]),
              helper.make_node("Add", ["s", "o"], ["y"]), helper.make_node("Sigmoid", ["qh"], ["z"])]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, n, c])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, n, c]),
                           helper.make_tensor_value_info("z", TensorProto.FLOAT, [batch, n, 2, c // 2])],
                          [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("batch,bias_shape,ln_op", [(1, (48,), False), (2, (1, 1, 48), False), (1, (5, 48), False),
                                                   (1, (48,), True)])
def test_token_streams_as_matrices_keep_the_values(batch, bias_shape, ln_op):
    """kernels.onnx_flat: the same outputs, each linear layer with a constant bias one Gemm, no bias Add,
    and nothing done where the bias does not broadcast as a row (a per-token bias)."""
    import onnxruntime as ort

    from edgeclip.kernels.onnx_flat import flatten_tokens

    model = _stream_graph(batch, bias_shape, ln_op)
    x = np.random.RandomState(0).randn(batch, 5, 16).astype(np.float32)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    want = run(model)
    flat = onnx.load_from_string(model.SerializeToString())
    counts = flatten_tokens(flat)
    got = run(flat)
    for a, b in zip(want, got):
        assert a.shape == b.shape and np.abs(a - b).max() <= 1e-5 * max(1.0, np.abs(a).max())
    ops = [n.op_type for n in flat.graph.node]
    outs = [o for n in flat.graph.node for o in n.output]
    assert len(outs) == len(set(outs))  # a tensor read both ways keeps its one definition
    if bias_shape == (5, 48):  # a per-token bias: the linear layer keeps its Add
        assert "Gemm" not in ops and counts.get("Gemm", 0) == 0
    else:
        assert ops.count("Gemm") == 1 and ops.count("Add") == 3 - ln_op and counts["Gemm"] == 1  # pos, eps, residual
        ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in onnx.shape_inference.infer_shapes(flat).graph.value_info}
        nodes = list(flat.graph.node)
        after = [n for n in nodes[ops.index("Gemm") + 1:] if n.op_type in ("Softmax", "Split", "Mul", "MatMul")]
        assert after and all(ranks[n.input[0]] == 2 for n in after)  # downstream of the Gemm: matrices


def _ln_nodes(x: str, out: str) -> list:
    """A LayerNorm as the mobile rewrite leaves it (ReduceMean, Sub, Mul, ReduceMean, Add, Sqrt, Div)."""
    p = f"{out}_"
    return [helper.make_node("ReduceMean", [x, "ax"], [p + "m"]), helper.make_node("Sub", [x, p + "m"], [p + "d"]),
            helper.make_node("Mul", [p + "d", p + "d"], [p + "d2"]), helper.make_node("ReduceMean", [p + "d2", "ax"], [p + "v"]),
            helper.make_node("Add", [p + "v", "eps"], [p + "ve"]), helper.make_node("Sqrt", [p + "ve"], [p + "sd"]),
            helper.make_node("Div", [p + "d", p + "sd"], [out])]


@pytest.mark.parametrize("direct_read", [False, True])
def test_a_centered_stream_drops_the_layernorm_means(direct_read):
    """kernels.onnx_flat.centered_stream: two residual blocks and a token slice; every LayerNorm loses
    its ReduceMean and Sub with the same outputs. A stream read by a layer directly (not through a
    LayerNorm) is left as it was."""
    import onnxruntime as ort

    from edgeclip.kernels.onnx_flat import centered_stream

    rng = np.random.RandomState(2)
    n, c = 6, 16
    inits = {"pos": rng.randn(n, c) * 3 + 1, "ax": np.array([-1], np.int64), "eps": np.float32(1e-5),
             "w1": rng.randn(c, c) * 0.3, "b1": rng.randn(c) + 2, "w2": rng.randn(c, c) * 0.3, "b2": rng.randn(c) - 1,
             "starts": np.array([0], np.int64), "ends": np.array([1], np.int64), "axes0": np.array([0], np.int64)}
    nodes = [helper.make_node("Add", ["x", "pos"], ["s0"]), *_ln_nodes("s0", "h1"),
             helper.make_node("Gemm", ["h1", "w1", "b1"], ["r1"]), helper.make_node("Add", ["s0", "r1"], ["s1"]),
             *_ln_nodes("s1", "h2"), helper.make_node("Gemm", ["s1" if direct_read else "h2", "w2", "b2"], ["r2"]),
             helper.make_node("Add", ["s1", "r2"], ["s2"]),
             helper.make_node("Slice", ["s2", "starts", "ends", "axes0"], ["cls"]), *_ln_nodes("cls", "y")]
    inits = {k: (v.astype(np.float32) if v.dtype == np.float64 else v) for k, v in inits.items()}
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, c])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c])],
                          [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    x = rng.randn(n, c).astype(np.float32) * 2
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    want = run(model)
    centered = onnx.load_from_string(model.SerializeToString())
    count = centered_stream(centered)
    means = [n.op_type for n in centered.graph.node].count("ReduceMean")
    if direct_read:
        assert count == 0 and means == 6
    else:
        assert count == 3 and means == 3 + 1  # one per LayerNorm (the variance) and the stream's start, once
    assert np.abs(run(centered) - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("batch", [1, 2])
def test_a_patch_embedding_becomes_one_gemm(batch):
    """kernels.onnx_flat.patches_as_gemm: Conv (stride = kernel) + Reshape + Transpose -> patches cut by
    Reshape/Transpose of rank 5 at most and one Gemm, the same values."""
    import onnxruntime as ort

    from edgeclip.kernels.onnx_flat import patches_as_gemm

    rng = np.random.RandomState(3)
    inits = {"w": rng.randn(24, 3, 4, 4).astype(np.float32), "bias": rng.randn(24).astype(np.float32),
             "to": np.array([-1, 24, 9], np.int64)}
    nodes = [helper.make_node("Conv", ["x", "w", "bias"], ["c"], strides=[4, 4], kernel_shape=[4, 4]),
             helper.make_node("Reshape", ["c", "to"], ["r"]), helper.make_node("Transpose", ["r"], ["y"], perm=[0, 2, 1])]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 12, 12])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 9, 24])],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    x = rng.rand(batch, 3, 12, 12).astype(np.float32)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    want = run(model)
    gemm = onnx.load_from_string(model.SerializeToString())
    assert patches_as_gemm(gemm) == 1
    ops = [n.op_type for n in gemm.graph.node]
    assert "Conv" not in ops and ops.count("Gemm") == 1
    assert max(len(n.attribute[0].ints) for n in gemm.graph.node if n.op_type == "Transpose") <= 5
    assert np.abs(run(gemm) - want).max() <= 1e-4


def test_attention_and_quickgelu_scales_fold_into_the_gemms():
    """kernels.onnx_flat.fold_scales: Q's 1/sqrt(d) after Split/Reshape/Transpose of the QKV Gemm scales
    only Q's columns; QuickGELU's 1.702 moves into the Gemms around it; the same values, two Muls fewer."""
    import onnxruntime as ort

    from edgeclip.kernels.onnx_flat import fold_scales

    rng = np.random.RandomState(4)
    n, c = 5, 8
    f = lambda *s: rng.randn(*s).astype(np.float32)
    inits = {"wqkv": f(c, 3 * c), "bqkv": f(3 * c), "heads": np.array([1, n, 2, c // 2], np.int64),
             "scale": np.float32(0.5), "w1": f(c, 4 * c), "b1": f(4 * c), "k": np.float32(1.702),
             "w2": f(4 * c, c), "b2": f(c)}
    nodes = [helper.make_node("Gemm", ["x", "wqkv", "bqkv"], ["qkv"]),
             helper.make_node("Split", ["qkv"], ["q", "kk", "v"], axis=1, num_outputs=3),
             helper.make_node("Reshape", ["q", "heads"], ["qh"]), helper.make_node("Transpose", ["qh"], ["qt"], perm=[0, 2, 1, 3]),
             helper.make_node("Mul", ["qt", "scale"], ["qs"]),
             helper.make_node("Gemm", ["kk", "w1", "b1"], ["h"]), helper.make_node("Mul", ["h", "k"], ["hu"]),
             helper.make_node("Sigmoid", ["hu"], ["hs"]), helper.make_node("Mul", ["h", "hs"], ["hg"]),
             helper.make_node("Gemm", ["hg", "w2", "b2"], ["o"]), helper.make_node("Add", ["o", "v"], ["y"])]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, c])],
                          [helper.make_tensor_value_info("qs", TensorProto.FLOAT, [1, 2, n, c // 2]),
                           helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, c])],
                          [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    x = f(n, c)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    want = run(model)
    folded = onnx.load_from_string(model.SerializeToString())
    # a graph output is read as it is: the Q scale stays (its Mul makes the output), QuickGELU folds
    assert fold_scales(folded) == {"QuickGELU": 1}
    for a, b in zip(want, run(folded)):
        assert np.abs(a - b).max() <= 1e-5 * max(1.0, np.abs(a).max())
    nodes.append(helper.make_node("ReduceSum", ["qs"], ["qsum"], keepdims=1))  # Q read inside the graph
    g2 = helper.make_graph(nodes, "t", list(g.input), [helper.make_tensor_value_info("qsum", TensorProto.FLOAT, [1, 1, 1, 1]),
                                                        helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, c])],
                           list(g.initializer))
    model2 = helper.make_model(g2, opset_imports=[helper.make_opsetid("", 18)])
    want2 = run(model2)
    folded2 = onnx.load_from_string(model2.SerializeToString())
    assert fold_scales(folded2) == {"attention scale": 1, "QuickGELU": 1}
    assert [n.op_type for n in folded2.graph.node].count("Mul") == 1
    for a, b in zip(want2, run(folded2)):
        assert np.abs(a - b).max() <= 1e-5 * max(1.0, np.abs(a).max())


def _run_plain(model, feed):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feed)


@pytest.mark.parametrize("reader", ["Conv", "Gemm", "Relu"])
def test_the_mobile_gelu_cubic_folds_into_the_layers_around_it(reader):
    """kernels.onnx_flat.fold_scales on the mobile GELU x * sigmoid(x (c0 + c x^2)) between two linear
    layers (as `lower_for_mobile` writes it, GELU_SHORT): c^(1/3) into the layer before, its inverse
    into the one after, one Mul fewer and the same values. A GELU read by anything else stays."""
    from edgeclip.kernels.onnx_flat import fold_scales
    from edgeclip.kernels.onnx_mobile import GELU_POLY_SHORT, _Builder, _gelu

    rng = np.random.RandomState(5)
    f = lambda *s: rng.randn(*s).astype(np.float32)
    conv = reader != "Gemm"
    shape_in, shape_out = ([1, 4, 6, 6], [1, 4, 6, 6]) if conv else ([5, 8], [5, 8])
    inits = {"w1": f(12, 4, 3, 3) * 0.5 if conv else f(8, 12), "b1": f(12),
             "w2": f(4, 12, 1, 1) * 0.5 if conv else f(12, 8), "b2": f(4 if conv else 8)}
    first = helper.make_node("Conv", ["x", "w1", "b1"], ["y"], pads=[1, 1, 1, 1]) if conv else \
        helper.make_node("Gemm", ["x", "w1", "b1"], ["y"])
    model = helper.make_model(helper.make_graph([first], "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape_in)],
                                                [helper.make_tensor_value_info("out", TensorProto.FLOAT, shape_out)],
                                                [numpy_helper.from_array(v, k) for k, v in inits.items()]),
                              opset_imports=[helper.make_opsetid("", 18)])
    b = _Builder(model, "gelu")
    _gelu(b, "y", "g", short=True)
    last = {"Conv": helper.make_node("Conv", ["g", "w2", "b2"], ["out"]), "Gemm": helper.make_node("Gemm", ["g", "w2", "b2"], ["out"]),
            "Relu": helper.make_node("Relu", ["g"], ["r"])}[reader]
    model.graph.node.extend(b.nodes + [last])
    if reader == "Relu":  # a GELU read by a non-linear op as well as a conv
        model.graph.node.extend([helper.make_node("Conv", ["g", "w2", "b2"], ["o2"]), helper.make_node("Add", ["o2", "r_s"], ["out"]),
                                 helper.make_node("ReduceMean", ["r"], ["r_s"], keepdims=1)])
    x = rng.randn(*shape_in).astype(np.float32) * 2
    want = _run_plain(model, {"x": x})[0]
    muls = [n.op_type for n in model.graph.node].count("Mul")
    counts = fold_scales(model)
    assert counts == ({} if reader == "Relu" else {"GELU": 1})
    assert [n.op_type for n in model.graph.node].count("Mul") == muls - (reader != "Relu")
    add = next(n for n in model.graph.node if n.op_type == "Add" and "gelu" in n.output[0])
    c0 = float(numpy_helper.to_array(next(i for i in model.graph.initializer if i.name in add.input)))
    s = GELU_POLY_SHORT[-1] ** (1 / 3)
    assert c0 == pytest.approx(GELU_POLY_SHORT[0] / (s if reader != "Relu" else 1.0), rel=1e-6)
    got = _run_plain(model, {"x": x})[0]
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("parts", [3, 2])
def test_attention_heads_are_cut_by_one_transpose(parts):
    """kernels.onnx_flat.heads_at_once: the QKV (or KV) Split, each part's Reshape to [-1, N, H, D] and
    Transpose (K's to [1, H, D, N]) -> one Reshape, one Transpose, a Split on the heads' axis and K's
    own Transpose; the same attention output."""
    from edgeclip.kernels.onnx_flat import heads_at_once

    rng = np.random.RandomState(6)
    n, c, h = 7, 8, 2
    f = lambda *s: rng.randn(*s).astype(np.float32)
    inits = {"w": f(c, parts * c), "bias": f(parts * c), "heads": np.array([-1, n, h, c // h], np.int64)}
    names = ["q", "k", "v"][3 - parts:]
    nodes = [helper.make_node("Gemm", ["x", "w", "bias"], ["qkv"]),
             helper.make_node("Split", ["qkv"], [f"{p}_flat" for p in names], axis=-1, num_outputs=parts)]
    for p in names:
        nodes += [helper.make_node("Reshape", [f"{p}_flat", "heads"], [f"{p}_h"], allowzero=1),
                  helper.make_node("Transpose", [f"{p}_h"], [p], perm=[0, 2, 3, 1] if p == "k" else [0, 2, 1, 3])]
    if parts == 2:  # the query of one token (a pooled last layer): its own input
        inits["q0"] = f(1, h, 1, c // h)
        nodes.append(helper.make_node("Identity", ["q0"], ["q"]))
    nodes += [helper.make_node("MatMul", ["q", "k"], ["s"]), helper.make_node("Softmax", ["s"], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", "v"], ["y"])]
    out_n = n if parts == 3 else 1
    model = helper.make_model(helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, c])],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, h, out_n, c // h])],
                                                [numpy_helper.from_array(v, k) for k, v in inits.items()]),
                              opset_imports=[helper.make_opsetid("", 18)])
    x = f(n, c)
    want = _run_plain(model, {"x": x})[0]
    assert heads_at_once(model) == 1
    ops = [nd.op_type for nd in model.graph.node]
    assert ops.count("Transpose") == 2 and ops.count("Reshape") == 1 and ops.count("Split") == 1
    split = next(nd for nd in model.graph.node if nd.op_type == "Split")
    assert split.attribute[0].name == "axis" and split.attribute[0].i == 0
    assert np.abs(_run_plain(model, {"x": x})[0] - want).max() <= 1e-6
    other = onnx.load_from_string(model.SerializeToString())
    assert heads_at_once(other) == 0  # nothing left to rewrite
