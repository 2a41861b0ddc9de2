"""The smallest ONNX artifacts: int8 tables and end projections in every recipe, and the 4-bit recipes
(w4a16, w4a8: MatMulNBits, GatherBlockQuantized), measured on the written files with real ONNX Runtime
sessions.

The packing is checked against ONNX Runtime's own kernels on small random graphs; the recipes on the
built-in model's artifacts (shared with tests/test_int8.py: same export keys, exported once per
session) and the int8 size on random ViT-B/32 (its FP32 and INT8 exports are shared with
tests/test_export_onnx.py and tests/test_int8.py). The 4-bit ViT-B/32 goals are the benchmark's.
"""
from __future__ import annotations

import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import edgeclip  # noqa: E402
from edgeclip import builtin  # noqa: E402
from edgeclip.calibration import qdq  # noqa: E402
from edgeclip.errors import EdgeClipError, InputError  # noqa: E402
from edgeclip.runtime.pipeline import Pipeline  # noqa: E402
from test_int8 import TINY, _b32_export, _cos  # noqa: E402

B32_FP32 = {"model": "random:ViT-B-32", "target": "onnx", "precision": "fp32"}


TINY_MOBILE = {**TINY["w4a16"], "target": "ort-mobile"}
SHARED_EXPORTS = {"tiny": [TINY["fp32"], TINY["int8"], TINY["w4a16"], TINY["w4a8"], TINY_MOBILE],
                  "b32_sizes": lambda shared: [B32_FP32, _b32_export(shared)[0]]}


@pytest.fixture(scope="module")
def tiny(shared_exports):
    return {"fp32": shared_exports.get(TINY["fp32"]), "int8": shared_exports.get(TINY["int8"]),
            "w4a16": shared_exports.get(TINY["w4a16"]), "w4a8": shared_exports.get(TINY["w4a8"]),
            "mobile": shared_exports.get(TINY_MOBILE)}


def _ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _nodes(path, op):
    return [n for n in onnx.load(str(path)).graph.node if n.op_type == op]


def _attr(node, name):
    return next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def _run(model, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


# ------------------------------------------------------------------ the packing, against ORT's kernels

def _dequantized(q, scale, bits, block):
    rows, k = q.shape
    return ((q.reshape(rows, k // block, block).astype(np.float32) - 2 ** (bits - 1))
            * scale[..., None]).reshape(rows, k)


@pytest.mark.parametrize("bits,block", [(4, 32), (4, 128), (8, 32)])
def test_matmulnbits_packing_matches_onnxruntime(bits, block):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(bits * block)
    k, n = 256, 96
    w = rng.standard_normal((k, n)).astype(np.float32)
    q, scale = qdq.block_quantize(w.T, bits, block)
    deq = _dequantized(q, scale, bits, block).T  # (K, N): what the kernel must compute with
    # the per-block scale search never does worse than the plain largest-weight scale, which is within
    # one step of every weight (half a step, but for the far end of the other sign: code 2**(bits-1) - 1)
    plain = _dequantized(*qdq.block_quantize(w.T, bits, block, search=False), bits, block).T
    assert np.abs(plain - w).max() <= np.abs(w).max() / 2 ** (bits - 1) * 1.001
    assert np.linalg.norm(deq - w) <= np.linalg.norm(plain - w) <= np.linalg.norm(w) * (0.12 if bits == 4 else 0.01)
    packed = qdq.pack_codes(q, bits).reshape(n, k // block, block * bits // 8)
    node = helper.make_node("MatMulNBits", ["A", "B", "s"], ["Y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])],
                              [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scale.reshape(-1), "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    a = rng.standard_normal((5, k)).astype(np.float32)
    np.testing.assert_allclose(_run(model, {"A": a}), a @ deq, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_token_embedding_gathers_the_dequantized_rows(bits):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(bits)
    table = rng.standard_normal((300, 64)).astype(np.float32)
    node = helper.make_node("Gather", ["text.token_embed.weight", "ids"], ["x"], name="node_Gather_3")
    # the module path, as torch's exporter records it on every node
    node.metadata_props.add(key="pkg.torch.onnx.name_scopes", value="['', 'text', 'text.token_embed']")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [None, None])],
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(table, "text.token_embed.weight")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    targets = qdq.table_targets(model)
    assert [(t.kind, t.layer) for t in targets] == [("gather", "text.token_embed")]  # its module path
    assert qdq.quantize_tables(model, targets, bits, block=32) == 1
    gbq, cast = model.graph.node  # float16 scales, the rows cast back to float32
    assert gbq.op_type == "GatherBlockQuantized" and _attr(gbq, "bits") == bits and cast.op_type == "Cast"
    assert _attr(gbq, "block_size") == (64 if bits == 8 else 32)  # 8 bits: one scale per row
    ids = rng.integers(0, 300, (3, 7))
    got = _run(model, {"ids": ids})
    q, scale = qdq.block_quantize(table, bits, 64 if bits == 8 else 32)
    exact = _dequantized(q, scale.astype(np.float16).astype(np.float32), bits, 64 if bits == 8 else 32)[ids]
    np.testing.assert_allclose(got, exact, rtol=1e-3, atol=1e-3)  # dequantized in float16
    assert np.linalg.norm(got - table[ids]) <= np.linalg.norm(table[ids]) * (0.12 if bits == 4 else 0.01)
    stored = sum(len(i.raw_data) for i in model.graph.initializer)
    block = 64 if bits == 8 else 32
    assert stored == table.size * bits // 8 + table.size // block * 2  # the codes plus a float16 scale per block


def test_gptq_rounding_beats_nearest_on_correlated_inputs():
    """On inputs with correlated features (as a tower's are), GPTQ's rounding changes X @ W less than
    rounding each weight to its nearest code, in the same codes-and-scales format."""
    from edgeclip.calibration.gptq import gptq_quantize

    rng = np.random.default_rng(0)
    k, n, block = 256, 128, 32
    mix = rng.standard_normal((k, k)) / np.sqrt(k)
    x = (rng.standard_normal((2048, k)) @ (np.eye(k) + 2 * mix)).astype(np.float32)  # correlated features
    w = rng.standard_normal((k, n)).astype(np.float32)
    h = (x.T.astype(np.float64) @ x) / len(x)
    codes, scales = gptq_quantize(w, h, 4, block)
    assert codes.shape == (n, k) and codes.dtype == np.uint8 and codes.max() <= 15 and scales.shape == (n, k // block)
    near = _dequantized(*qdq.block_quantize(w.T, 4, block), 4, block).T
    gptq = _dequantized(codes, scales, 4, block).T
    held = (rng.standard_normal((512, k)) @ (np.eye(k) + 2 * mix)).astype(np.float32)  # inputs GPTQ never saw
    err = {name: np.linalg.norm(held @ q - held @ w) for name, q in (("nearest", near), ("gptq", gptq))}
    assert err["gptq"] < 0.8 * err["nearest"], err


def test_guard_chain_keeps_the_others_narrow_when_one_layer_needs_float():
    """The chain's algorithm on a drop that adds up per layer: one layer is wrong at any width, the
    others cost 0.001 at 4 bits; the chain ends with that layer float and every other at 4 bits, and
    each width's bound check is the guard's own (candidates are the bit assignments themselves)."""
    from edgeclip.calibration.guard import guard_chain

    cost4, cost8 = {"bad": 1.0}, {"bad": 1.0}
    others = [f"l{i}" for i in range(5)]
    cost4.update({k: 0.001 for k in others})
    cost8.update({k: 0.0001 for k in others})

    def drop(bits: dict) -> float:
        return sum(cost4[k] if b == 4 else cost8[k] if b == 8 else 0.0 for k, b in bits.items())

    quant, report = guard_chain(None, lambda bits: dict(bits), ["bad", *others], {}, "y", chain=(4, 8), max_drop=0.01,
                                drop_fn=drop)
    assert report.bits == {"bad": 32, **{k: 4 for k in others}} and quant == report.bits
    assert report.float_layers == ["bad"] and drop(quant) <= 0.01


# ------------------------------------------------------------------------- the built-in model

def test_int8_stores_the_token_embedding_and_projections_in_int8(tiny):
    text = onnx.load(str(tiny["int8"].path / "text.onnx"))
    (gbq,) = [n for n in text.graph.node if n.op_type == "GatherBlockQuantized"]
    assert _attr(gbq, "bits") == 8 and not any(n.op_type == "Gather" and n.input[0].endswith("token_embed.weight")
                                              for n in text.graph.node)
    floats = [i for i in text.graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
    assert max(int(np.prod(i.dims)) for i in floats) < 1024 * 8  # no float table or projection left
    sizes = {k: tiny[k].manifest["sizes"] for k in ("fp32", "int8")}
    for g in ("image", "text"):
        assert sizes["int8"][g]["bytes"] == (tiny["int8"].path / f"{g}.onnx").stat().st_size
        assert sizes["int8"][g]["weights"] == sizes["fp32"][g]["weights"] > 0
    assert sizes["int8"]["text"]["bytes"] <= 0.3 * sizes["fp32"]["text"]["bytes"]  # was 0.97x before the tables
    assert 32 <= sizes["fp32"]["text"]["bits_per_weight"] <= 33 and sizes["int8"]["text"]["bits_per_weight"] <= 9.5


def test_w4a16_graph_form_bits_and_manifest(tiny):
    art = tiny["w4a16"]
    q = art.manifest["quantization"]["graphs"]
    for g in ("image", "text"):
        r, path = q[g], art.path / f"{g}.onnx"
        widths = Counter(r["bits"].values())
        assert set(widths) <= {4, 8, 32} and widths[4] > 0, widths
        assert r["block_size"] == 32 and art.manifest["graphs"][g]["session_config"] == {"session.disable_quant_qdq": "1"}
        assert r["rounding"] == "gptq"  # the built-in model ships calibration data
        nbits = _nodes(path, "MatMulNBits")
        assert all(_attr(n, "bits") == 4 and _attr(n, "block_size") == 32 for n in nbits)
        level = r["accuracy_level"]
        assert all(_attr(n, "accuracy_level") == level["chosen"] for n in nbits) and level["chosen"] in (1, 2, 3)
        assert str(level["chosen"]) in level["measured"] and "ms" in level["measured"][str(level["chosen"])]
        four = [k for k, b in r["bits"].items() if b == 4 and k != "text.token_embed"]
        assert len(nbits) == len(four)  # every 4-bit linear is one MatMulNBits
    (gbq,) = _nodes(art.path / "text.onnx", "GatherBlockQuantized")
    assert _attr(gbq, "bits") == q["text"]["bits"]["text.token_embed"] == 4
    assert art.manifest["sizes"]["text"]["bytes"] <= 0.18 * tiny["fp32"].manifest["sizes"]["text"]["bytes"]
    out = subprocess.run([sys.executable, "-m", "edgeclip", "inspect", str(art.path)], capture_output=True, text=True,
                         check=True).stdout
    assert "bits/weight" in out and "4-bit" in out


def test_w4a8_computes_in_int8(tiny):
    q = tiny["w4a8"].manifest["quantization"]["graphs"]["image"]
    assert q["accuracy_level"]["chosen"] == 4 and q["activations"] == "dynamic"
    nodes = _nodes(tiny["w4a8"].path / "image.onnx", "MatMulNBits")
    # int8 fallbacks stay MatMulNBits too: its 8-bit kernel at level 4 is ONNX Runtime's int8 GEMM
    assert len(nodes) == sum(1 for k, b in q["bits"].items() if b in (4, 8) and k != "visual.pos_embed")
    assert {_attr(n, "accuracy_level") for n in nodes} == {4}


def test_the_guard_moves_layers_to_int8_then_float(tmp_path):
    """A bound 4 bits cannot meet on every layer: the most sensitive go to int8 (or float), the
    written graph holds the bound on held-out data, and its nodes are what the report says."""
    art = edgeclip.export("builtin:tiny", precision="int8", recipe="w4a16", max_cosine_drop=0.0005,
                          out=tmp_path / "tight")
    r = art.manifest["quantization"]["graphs"]["image"]
    widths = Counter(r["bits"].values())
    assert widths[8] + widths[32] > 0 and r["cosine_drop"] <= 0.0005, widths
    assert r["min_cosine"] >= 0.9995
    nbits = _nodes(art.path / "image.onnx", "MatMulNBits")
    assert len(nbits) == sum(1 for k, b in r["bits"].items() if b == 4)


def test_block_size_option(tmp_path):
    art = edgeclip.export("builtin:tiny", precision="int8", recipe="w4a16", block_size=64, out=tmp_path / "b64")
    nodes = _nodes(art.path / "text.onnx", "MatMulNBits")
    assert nodes and {_attr(n, "block_size") for n in nodes} == {64}
    assert art.manifest["quantization"]["graphs"]["text"]["block_size"] == 64
    with pytest.raises(InputError, match="power of two"):
        edgeclip.export("builtin:tiny", precision="int8", recipe="w4a16", block_size=48, out=tmp_path / "x")
    with pytest.raises(EdgeClipError, match="4-bit recipes"):
        edgeclip.export("builtin:tiny", precision="int8", recipe="int8", block_size=64, out=tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_ort_format_4bit_artifact_loads_and_says_what_it_needs(tiny):
    art = tiny["mobile"]
    pipe = Pipeline.load(art.path)
    files = sorted(builtin.heldout_dir().glob("*/*.png"))[::5]
    truth = [int(f.parent.name) for f in files]
    preds = pipe.classify([str(f) for f in files])
    assert np.mean([p.index == t for p, t in zip(preds, truth)]) >= 0.95
    # the phone graphs are quantized and guarded on their own (plain ops, fixed shapes): within the
    # recipe's bound of FP32, like the server graph
    ref = Pipeline.load(tiny["fp32"].path).encode_image([str(f) for f in files])
    assert _cos(pipe.encode_image([str(f) for f in files]), ref).min() >= 0.99
    ops = art.manifest["ort-mobile"]["contrib_ops"]
    assert "MatMulNBits" in ops["image"] and "GatherBlockQuantized" in ops["text"]
    assert "onnxruntime-android" in art.manifest["ort-mobile"]["packages"]


def _ort_ops(path) -> set:
    """(domain, op) of every node of an ORT-format file, read from its flatbuffer directly."""
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs import InferenceSession

    graph = InferenceSession.InferenceSession.GetRootAsInferenceSession(path.read_bytes(), 0).Model().Graph()
    return {((graph.Nodes(i).Domain() or b"").decode() or "ai.onnx", graph.Nodes(i).OpType().decode())
            for i in range(graph.NodesLength())}


def test_ort_format_artifact_carries_its_reduced_build_config(tiny):
    """The artifact's required_operators.config lists exactly the operators its .ort graphs use (each
    with the types it is used with), names no path of the exporting machine, and is in the manifest."""
    from edgeclip.exporter.formats.ort_mobile import _config_ops

    art = tiny["mobile"]
    cfg = art.path / "required_operators.config"
    text = cfg.read_text()
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    listed = {(line.split(";")[0], op.split("{")[0]) for line in lines for op in _config_ops(line)}
    used = _ort_ops(art.path / "image.ort") | _ort_ops(art.path / "text.ort")
    assert listed == used, (listed ^ used)
    assert any("{" in line for line in lines)  # per-operator types, for --enable_reduced_operator_type_support
    assert str(art.path.parent) not in text and "/tmp" not in text and "image.ort, text.ort" in text
    entry = art.manifest["ort-mobile"]["reduced_build_config"]
    assert entry["file"] == "required_operators.config" and entry["operators"] == len(listed)
    assert "required_operators.config" in art.manifest["files"]
    out = subprocess.run([sys.executable, "-m", "edgeclip", "inspect", str(art.path)], capture_output=True, text=True,
                         check=True).stdout
    assert "reduced build: required_operators.config" in out


# ------------------------------------------------------------------------ random ViT-B/32

@pytest.fixture(scope="module")
def b32_sizes(shared_exports):
    spec, _ = _b32_export(shared_exports)
    return {"fp32": shared_exports.get(B32_FP32), "int8": shared_exports.get(spec)}


def _total(art) -> int:
    return sum(art.manifest["sizes"][g]["bytes"] for g in ("image", "text"))


@pytest.mark.slow
def test_vit_b32_int8_is_a_quarter_of_fp32(b32_sizes):
    """Both towers' int8 graphs against the FP32 ones (exports shared with test_export_onnx/test_int8,
    whose cosines they also check). The 4-bit ViT-B/32 figures are the benchmark's
    (benchmarks/test_lowbit_size_speed.py: a guarded 4-bit B/32 export takes ~5 minutes here)."""
    fp32, int8 = b32_sizes["fp32"], b32_sizes["int8"]
    assert _total(int8) <= 0.27 * _total(fp32), _total(int8) / _total(fp32)
    for g in ("image", "text"):
        assert int8.manifest["sizes"][g]["bits_per_weight"] <= 8.2  # int8 codes and little else
    (gbq,) = _nodes(int8.path / "text.onnx", "GatherBlockQuantized")
    assert _attr(gbq, "bits") == 8
