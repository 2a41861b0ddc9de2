"""`--target tensorrt`: TensorRT-ready ONNX, verified up to the engine (TensorRT is not installable
here). Each graph holds only standard ONNX ops TensorRT 10.3 parses, passes the compatibility
check, and the very file written runs in ONNX Runtime within the target's tolerance of our torch
model. No engine is built: that happens on the device (`edgeclip engine build`)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import edgeclip  # noqa: E402
from edgeclip.cli import main  # noqa: E402
from edgeclip.errors import CalibrationError, InputError, TensorRTCompatError, UsageError  # noqa: E402
from edgeclip.exporter.trt_check import check_graph, load_allowlist  # noqa: E402
from edgeclip.runtime.preprocess import Preprocessor  # noqa: E402
from synthetic import calibration_data  # noqa: E402

MODELS = {"tiny": "builtin:tiny", "ViT-B-32": "random:ViT-B-32", "MobileCLIP-S1": "random:MobileCLIP-S1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("trt")
    out = {}
    for size in (224, 256):
        calib, held, caps = calibration_data(root / str(size), size, images=32, held=6, caps=48)
        out[size] = (calib, held, caps)
    return root, out


def _export(name, precision, data):
    root, sets = data
    model = edgeclip.load_model(MODELS[name], seed=0)
    kw = {}
    if precision == "int8" and name != "tiny":
        calib, _, caps = sets[model.spec.vision.image_size]
        kw = {"calib": calib, "calib_captions": caps}
    art = edgeclip.export(model, target="tensorrt", precision=precision, out=root / f"{name}-{precision}", **kw)
    return model, art


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _ort_image(path, pixels):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(["image_embeds"], {"pixel_values": pixels.astype(np.float32)})[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_tensorrt_graphs_are_standard_ops_and_match_torch(name, precision, data):
    model, art = _export(name, precision, data)
    allowed = set(load_allowlist("10.3")["ops"])
    m = art.manifest
    for graph in ("image", "text"):
        g = onnx.load(str(art.path / f"{graph}.onnx"))
        domains = Counter(n.domain or "ai.onnx" for n in g.graph.node)
        ops = Counter(n.op_type for n in g.graph.node)
        assert set(domains) == {"ai.onnx"}, domains
        assert set(ops) <= allowed, set(ops) - allowed
        assert max(o.version for o in g.opset_import if o.domain in ("", "ai.onnx")) <= 20
        check_graph(g, "10.3", m["tensorrt"]["graphs"][graph]["profiles"])  # the exported file passes again
        if precision == "int8" and graph == "image":
            # explicit quantization as TensorRT takes it: symmetric int8, Q/DQ only on layer inputs
            zps = [i for i in g.graph.initializer if i.name.endswith("_zp")]
            assert zps and all(onnx.numpy_helper.to_array(z).dtype == np.int8 and
                               not onnx.numpy_helper.to_array(z).any() for z in zps)
            assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > ops["QuantizeLinear"]
    assert m["target"] == "tensorrt" and m["backend"] == "tensorrt" and "ONNX Runtime" in m["tensorrt"]["numerics"]
    assert all(r["ok"] for r in m["fidelity"].values()), m["fidelity"]
    # held-out images through the model's preprocessing, the written file in ONNX Runtime, vs torch
    held = data[1].get(model.spec.vision.image_size, data[1][224])[1]  # resized by the preprocessing
    pixels = Preprocessor.from_config(model.spec.preprocess_config())([str(p) for p in held])
    with torch.no_grad():
        ref = _unit(model.encode_image(torch.from_numpy(pixels)).numpy())
    cos = (_unit(_ort_image(art.path / "image.onnx", pixels)) * ref).sum(-1)
    assert cos.min() >= (0.999 if precision == "fp16" else 0.995 if name == "ViT-B-32" else 0.98), cos


def test_profiles_are_recorded_and_checked(tmp_path):
    art = edgeclip.export("builtin:tiny", target="tensorrt", precision="fp32", out=tmp_path / "a",
                          profiles={"batch": (1, 4, 16)})
    prof = art.manifest["tensorrt"]["graphs"]
    ctx = art.manifest["text"]["context_length"]
    s = art.manifest["preprocess"]["image_size"]
    assert prof["image"]["profiles"]["pixel_values"] == {"min": [1, 3, s, s], "opt": [4, 3, s, s],
                                                         "max": [16, 3, s, s]}
    text = prof["text"]["profiles"]["input_ids"]
    assert text["min"][0] == 1 and text["max"][0] == 16 and text["max"][1] <= ctx
    g = onnx.load(str(art.path / "image.onnx"))
    narrow = {"pixel_values": {**prof["image"]["profiles"]["pixel_values"]}}
    del narrow["pixel_values"]["opt"]
    with pytest.raises(TensorRTCompatError):
        check_graph(g, "10.3", narrow)
    with pytest.raises(InputError, match="min <= opt <= max"):
        edgeclip.export("builtin:tiny", target="tensorrt", out=tmp_path / "b", profiles={"batch": (8, 4, 16)})
    with pytest.raises(InputError, match="unknown TensorRT profile"):
        edgeclip.export("builtin:tiny", target="tensorrt", out=tmp_path / "c", profiles={"height": (1, 2, 3)})
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_tensorrt_option_errors(tmp_path):
    with pytest.raises(UsageError, match="10.3"):
        edgeclip.export("builtin:tiny", target="tensorrt", trt_version="9.0", out=tmp_path / "a")
    with pytest.raises(CalibrationError, match="TensorRT"):
        edgeclip.export("builtin:tiny", target="tensorrt", precision="int8", recipe="int8-dynamic",
                        out=tmp_path / "b")
    with pytest.raises(edgeclip.EdgeClipError, match="trt_version"):  # another target's option
        edgeclip.export("builtin:tiny", target="onnx", trt_version="11.0", out=tmp_path / "c")


def test_cli_export_and_inspect(tmp_path, capsys):
    assert main(["export", "builtin:tiny", "--target", "tensorrt", "--precision", "fp16", "--profile", "batch=1,2,8",
                 "--out", str(tmp_path / "a"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["target"] == "tensorrt" and out["precision"] == "fp16"
    assert main(["inspect", str(tmp_path / "a")]) == 0
    text = capsys.readouterr().out
    assert "TensorRT 10.3" in text and "batch 1/2/8" in text and "not with a TensorRT engine" in text
    assert main(["export", "builtin:tiny", "--target", "tensorrt", "--profile", "batch:1", "--out",
                 str(tmp_path / "b"), "--json"]) != 0


def test_the_artifact_runs_on_onnx_runtime_and_asks_for_tensorrt_by_default(tmp_path):
    # onnxruntime(-gpu) users run the same artifact through execution providers (CPU here); the
    # default backend builds a TensorRT engine, which needs TensorRT: a typed error naming the extra
    from edgeclip.errors import ArtifactError, MissingExtraError
    from edgeclip.runtime import Pipeline

    art = edgeclip.export("builtin:tiny", target="tensorrt", precision="fp16", out=tmp_path / "a")
    ref = edgeclip.export("builtin:tiny", out=tmp_path / "onnx")
    p = Pipeline.load(art.path, backend="ort", providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert p._graph("image").info["providers"] == ["CPUExecutionProvider"]
    texts = ["a photo of the digit seven", "zero"]
    got, want = p.encode_text(texts), Pipeline.load(ref.path).encode_text(texts)
    assert float(((got * want).sum(-1)).min()) >= 0.999
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(MissingExtraError, match="tensorrt"):
            Pipeline.load(art.path)
    with pytest.raises(ArtifactError, match="or ort"):
        Pipeline.load(art.path, backend="openvino")


def test_cli_run_with_providers_and_engine_build_without_tensorrt(tmp_path, capsys):
    from edgeclip.builtin import digit_labels, heldout_dir

    art = tmp_path / "a"
    assert main(["export", "builtin:tiny", "--target", "tensorrt", "--labels", ",".join(digit_labels()),
                 "--out", str(art), "--json"]) == 0
    capsys.readouterr()
    image = str(sorted(heldout_dir().rglob("*.png"))[0])
    assert main(["run", str(art), "--backend", "ort", "--providers", "CPUExecutionProvider", "--image", image,
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"][0]["label"] == digit_labels()[int(Path(image).parent.name)]
    assert main(["run", str(art), "--backend", "ort", "--providers", "NoSuchExecutionProvider", "--image", image,
                 "--json"]) != 0
    assert "NoSuchExecutionProvider" in capsys.readouterr().out
    try:
        import tensorrt  # noqa: F401
    except ImportError:  # the engine is built on the device; here the command says what is missing
        assert main(["engine", "build", str(art), "--json"]) != 0
        assert "tensorrt" in capsys.readouterr().out
