"""INT8 of convolutions: a reduced MobileCLIP MCi image tower (every stage's convs and its attention
stage, 64 px) exported to ONNX (recipes int8, w8a16) and OpenVINO (int8) through `edgeclip.export`
with a calibration folder of real PNG files. Each figure is measured here on the written artifact
(ONNX Runtime's own optimized graph, the runtime's Pipeline) against the torch reference; the
manifest's numbers are checked against those counts.

The model is random, so its activations are less tame than a trained tower's: layer scales of 0.1
and OpenAI mean/std preprocessing (as MobileCLIP2-S3/S4 use; pixels then span the range of the fixed
validation inputs) keep the export's own synthetic-input check meaningful."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import edgeclip  # noqa: E402
from edgeclip.calibration import qdq  # noqa: E402
from edgeclip.models.clip import ClipModel  # noqa: E402
from edgeclip.runtime import Pipeline  # noqa: E402
from edgeclip.runtime.preprocess import Preprocessor  # noqa: E402
from edgeclip.specs import get_spec  # noqa: E402

SIZE = 64
LABELS = ["a cat", "a dog"]
OPENAI = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}
MAX_DROP = 0.005
# the reduced tower's convs by kind: 1x1 MLP convs and dense 1x1 downsampling projections; RepMixer,
# ConvMlp and positional 3x3/7x7 depthwise convs; 7x7 downsampling and final_conv with two output
# channels per input channel (stem and squeeze-excite convs are not quantizable)
KINDS = {"conv": 11, "depthwise": 8, "grouped": 4}


def small_spec():
    base = get_spec("MobileCLIP-S1")
    cfg = {**base.vision.config, "layers": [1, 1, 1, 1], "embed_dims": [16, 32, 64, 128], "layer_scale_init": 0.1}
    return base.replace(name="mci-int8-test", embed_dim=32, vision={"image_size": SIZE, "config": cfg},
                        text={"width": 32, "layers": 1, "heads": 2, "mlp_dim": 64, "context_length": 16},
                        preprocess={"image_size": SIZE, **OPENAI}, tokenizer={"context_length": 16})


def write_pngs(folder, n: int, seed: int):
    """`n` smooth random RGB images (bicubic upscales of 4x4 noise), saved as PNG files."""
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        low = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
        Image.fromarray(low).resize((SIZE, SIZE), Image.BICUBIC).save(folder / f"{i:03d}.png")
    return sorted(folder.glob("*.png"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("int8_conv")
    model = ClipModel(small_spec()).init_random(0).eval()
    write_pngs(root / "calib", 32, seed=0)
    test_files = write_pngs(root / "test", 8, seed=1)  # seen by neither calibration nor the guard
    pixels = Preprocessor.from_config(model.spec.preprocess_config())([str(f) for f in test_files])
    with torch.no_grad():
        ref = torch.nn.functional.normalize(model.encode_image(torch.from_numpy(pixels)), dim=-1).numpy()
    return {"root": root, "model": model, "pixels": pixels, "ref": ref}


def export(setup, target: str, recipe: str, name: str):
    return edgeclip.export(setup["model"], target=target, precision="int8", recipe=recipe, calib=setup["root"] / "calib",
                           labels=LABELS, out=setup["root"] / name)


@pytest.fixture(scope="module")
def onnx_int8(setup):
    return export(setup, "onnx", "int8", "onnx-int8")


def _cos(a, b) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def runtime_cosine(setup, art) -> float:
    """Min cosine of the runtime's image embeddings to the torch reference on the unseen images."""
    return float(_cos(Pipeline.load(art.path).encode_image(setup["pixels"]), setup["ref"]).min())


def qdq_convs(path) -> dict:
    """{layer: how its Conv reads} in a written graph: "int8" (DQ activation, DQ weight, Q on its only
    output), "weights" (DQ weight, float activation), "float"."""
    m = onnx.load(str(path))
    producer = {o: n.op_type for n in m.graph.node for o in n.output}
    readers = Counter(i for n in m.graph.node for i in n.input)
    q_inputs = {n.input[0] for n in m.graph.node if n.op_type == "QuantizeLinear"}
    out = {}
    for n in m.graph.node:
        if n.op_type != "Conv":
            continue
        dq_w, dq_x = producer.get(n.input[1]) == "DequantizeLinear", producer.get(n.input[0]) == "DequantizeLinear"
        q_out = n.output[0] in q_inputs and readers[n.output[0]] == 1
        out[qdq._layer_name(n)] = "int8" if dq_w and dq_x and q_out else "weights" if dq_w else "float"
    return out


def ort_optimized_ops(path) -> Counter:
    """Op counts of the graph ONNX Runtime actually runs (its optimized model, default session options)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(path.with_name(path.stem + ".ort-optimized.onnx"))
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


def test_conv_targets_by_kind_follow_the_towers_rule(setup):
    fp32 = edgeclip.export(setup["model"], target="onnx", labels=LABELS, out=setup["root"] / "fp32")
    graph = onnx.load(str(fp32.path / "image.onnx"))
    rule = setup["model"].quantizable
    targets = qdq.find_targets(graph, rule)
    convs = [t for t in targets if t.is_conv]
    assert Counter(t.kind for t in convs) == KINDS
    every = [qdq._layer_name(n) for n in graph.graph.node if n.op_type == "Conv"]
    assert sorted(t.layer for t in convs) == sorted(p for p in every if rule(p))
    assert any(".se." in p for p in every) and any(".stem." in p for p in every)  # present, and left float
    # int8-dynamic: no dynamic conv kernel worth running (ConvInteger), so convs stay float there
    dyn = qdq.quantize_dynamic(graph, targets)
    assert Counter(n.op_type for n in dyn.graph.node)["Conv"] == len(every)
    producer = {o: n.op_type for n in dyn.graph.node for o in n.output}
    assert not [n.name for n in dyn.graph.node if n.op_type == "Conv" and producer.get(n.input[1])]
    assert Counter(n.op_type for n in dyn.graph.node)["DynamicQuantizeMatMul"] == 2  # attention qkv, proj


def test_onnx_static_int8_convs_run_as_qlinearconv_within_the_guard(setup, onnx_int8):
    rep = onnx_int8.manifest["quantization"]["graphs"]["image"]
    forms = qdq_convs(onnx_int8.path / "image.onnx")
    int8 = sorted(k for k, v in forms.items() if v == "int8")
    assert len(int8) == rep["int8_conv_layers"] > KINDS["conv"]  # depthwise convs too, where the guard keeps them
    assert rep["int8_matmul_layers"] + rep["int8_conv_layers"] == rep["int8_layers"]
    # + the 2 quantizable linears, + head.fc (the CLIP projection, stored int8 by every recipe)
    assert rep["quantizable_layers"] == KINDS["conv"] + KINDS["depthwise"] + 2 + 1 and rep["bits"]["visual.head.fc"] == 8
    # grouped convs with a channel multiplier stay float (QLinearConv runs them far slower than float)
    assert rep["convs_left_float"]["count"] == KINDS["grouped"] and rep["convs_left_float"]["kinds"] == ["grouped"]
    assert all(forms[p] == "float" for p in rep["convs_left_float"]["layers"])
    # the guard returned conv layers to float like any other, and they are float in the graph
    float_convs = [p for p in rep["float_layers"] if p in forms]
    assert float_convs and all(forms[p] == "float" for p in float_convs)
    assert set(rep["sensitivity"]) >= set(float_convs)
    assert rep["cosine_drop_all_int8"] > MAX_DROP >= rep["cosine_drop"] >= 0.0
    assert rep["max_cosine_drop"] == MAX_DROP
    # ONNX Runtime runs every quantized conv with its int8 kernel
    assert ort_optimized_ops(onnx_int8.path / "image.onnx")["QLinearConv"] == len(int8)
    assert runtime_cosine(setup, onnx_int8) >= 0.99
    assert onnx_int8.fidelity["image_embeds"]["ok"]


def test_int8_conv_bias_is_int32_at_input_times_weight_scale(onnx_int8):
    from onnx import numpy_helper

    m = onnx.load(str(onnx_int8.path / "image.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    producer = {o: n for n in m.graph.node for o in n.output}
    checked = 0
    for n in m.graph.node:  # every int8 conv with a bias (the folded zero biases are gone from the graph)
        x = producer.get(n.input[0])
        if n.op_type != "Conv" or len(n.input) < 3 or x is None or x.op_type != "DequantizeLinear":
            continue
        w, b = producer[n.input[1]], producer[n.input[2]]
        assert b.op_type == "DequantizeLinear" and inits[b.input[0]].dtype == np.int32 and not inits[b.input[2]].any()
        np.testing.assert_array_equal(inits[b.input[1]], (inits[x.input[1]] * inits[w.input[1]]).astype(np.float32))
        checked += 1
    assert checked >= 4


def test_onnx_w8a16_stores_every_quantizable_conv_in_int8(setup):
    art = export(setup, "onnx", "w8a16", "onnx-w8a16")
    rep = art.manifest["quantization"]["graphs"]["image"]
    forms = qdq_convs(art.path / "image.onnx")
    weights = [k for k, v in forms.items() if v == "weights"]
    assert len(weights) == rep["int8_conv_layers"] == sum(KINDS.values())  # any groups: folded at load
    assert "int8" not in forms.values() and "convs_left_float" not in rep
    assert Counter(n.op_type for n in onnx.load(str(art.path / "image.onnx")).graph.node)["QuantizeLinear"] == 0
    assert art.manifest["graphs"]["image"]["session_config"] == {"session.disable_quant_qdq": "1"}
    assert rep["cosine_drop"] <= MAX_DROP
    assert runtime_cosine(setup, art) >= 0.999


def test_openvino_int8_quantizes_convolutions_under_the_guard(setup):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    import openvino as ov

    art = export(setup, "openvino", "int8", "openvino-int8")
    rep = art.manifest["quantization"]["graphs"]["image"]
    ir = ov.Core().read_model(str(art.path / "image.xml"))
    fq_convs = [op for op in ir.get_ordered_ops() if op.get_type_name() in ("Convolution", "GroupConvolution")
                and op.input_value(0).get_node().get_type_name() == "FakeQuantize"]
    # dense convs INT8 under the guard; grouped and depthwise convs stay float on OpenVINO (no faster
    # in INT8 on its CPU plugin), counted apart, with no FakeQuantize in front of them
    assert len(fq_convs) == rep["int8_conv_layers"] > 0.5 * KINDS["conv"]
    assert all(op.get_type_name() == "Convolution" for op in fq_convs)
    assert rep["float_for_speed"] == {"ops": ["GroupConvolution"], "layers": KINDS["depthwise"] + KINDS["grouped"]}
    assert rep["int8_conv_layers"] + rep["int8_matmul_layers"] == rep["int8_layers"]
    assert rep["quantizable_layers"] == KINDS["conv"] + 2
    assert rep["cosine_drop"] <= MAX_DROP and rep["max_cosine_drop"] == MAX_DROP
    assert runtime_cosine(setup, art) >= 0.99
