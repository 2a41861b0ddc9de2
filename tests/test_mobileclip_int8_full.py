"""Full-size random-weight MobileCLIP-S1, -S2 and MobileCLIP2-S0 in INT8, as users export them: the
default recipe with calibration images, the accuracy guard and the export's own validation on. The
artifacts are checked again here on images the calibration never saw, against our float torch model,
and the S1 artifact runs in a process where torch cannot be imported.

Each export takes ~30-60 s on 2 cores (the guard passes at once: nothing to probe), in the session's
background export workers."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

import edgeclip  # noqa: E402
from edgeclip.exporter import get_target  # noqa: E402
from edgeclip.runtime import Pipeline  # noqa: E402
from edgeclip.runtime.preprocess import Preprocessor  # noqa: E402
from synthetic import calibration_data  # noqa: E402

MODELS = ["MobileCLIP-S1", "MobileCLIP-S2", "MobileCLIP2-S0"]
CALIB, HELD, CAPTIONS = 32, 6, 48


def _specs(shared) -> dict:
    """{(model, target): export spec}: INT8 with calibration images and captions written once per session
    (exported in the background beside the other tests, `conftest.SharedExports`)."""
    calib, _, caps = _data(shared)
    return {(name, target): {"model": f"random:{name}", "target": target, "precision": "int8", "calib": calib,
                             "calib_captions": caps}
            for name, target in [(m, "onnx") for m in MODELS] + [("MobileCLIP-S1", "openvino")]}


def _data(shared):
    return shared.once("mobileclip-int8", lambda root: calibration_data(root, 256, images=CALIB, held=HELD, caps=CAPTIONS))


SHARED_EXPORTS = {"data": lambda shared: list(_specs(shared).values())}


@pytest.fixture(scope="module")
def data(shared_exports):
    return shared_exports


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _export(name, shared, target="onnx"):
    held = _data(shared)[1]
    art = shared.get(_specs(shared)[name, target])
    model = edgeclip.load_model(f"random:{name}", seed=0)
    pixels = Preprocessor.from_config(model.spec.preprocess_config())([str(p) for p in held])
    with torch.no_grad():
        ref = _unit(model.encode_image(torch.from_numpy(pixels)).numpy())
    return model, art, pixels, ref


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_full_size_int8_is_within_the_int8_tolerance(name, data, tmp_path):
    model, art, pixels, ref = _export(name, data)
    tol = get_target("onnx").tolerances["int8"]
    assert all(r["ok"] for r in art.fidelity.values()), art.fidelity  # the export's own validation
    q = art.manifest["quantization"]["graphs"]["image"]
    # convolutions are quantized, not only the attention stage's linears
    assert q["int8_conv_layers"] > 20 and q["int8_layers"] > 0.5 * q["quantizable_layers"], q
    got = _unit(Pipeline.load(art.path).encode_image(pixels))
    cos = (got * ref).sum(-1)
    assert cos.min() >= max(tol.min_cosine, 1 - q["max_cosine_drop"] - 0.005), cos
    assert np.abs(got - ref).max() <= tol.max_abs
    if name == "MobileCLIP-S1":
        _runs_with_torch_blocked(art.path, pixels, got, tmp_path)


def _runs_with_torch_blocked(path, pixels, want, tmp):
    np.save(tmp / "s1-pixels.npy", pixels)
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any "import torch" now raises ImportError
        import numpy as np
        from edgeclip.runtime import Pipeline
        p = Pipeline.load({str(path)!r})
        np.save({str(tmp / "s1-img.npy")!r}, p.encode_image(np.load({str(tmp / "s1-pixels.npy")!r})))
        p.encode_text(["a photo of a cat"])
        assert sys.modules["torch"] is None
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert np.abs(np.load(tmp / "s1-img.npy") - want).max() <= 1e-5


@pytest.mark.slow
def test_full_size_s1_openvino_int8(data):
    """The OpenVINO INT8 artifact (the fastest MobileCLIP artifact on x86 CPUs, benchmarks/
    test_mobileclip_speed.py): validated, grouped convs float, multiplier convs tiled to depthwise."""
    ov = pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    model, art, pixels, ref = _export("MobileCLIP-S1", data, target="openvino")
    assert all(r["ok"] for r in art.fidelity.values()), art.fidelity
    q = art.manifest["quantization"]["graphs"]["image"]
    assert q["float_for_speed"]["layers"] > 40 and q["int8_conv_layers"] > 40, q
    assert art.manifest["towers"]["image"]["tiled_multiplier_convs"] == 4
    ir = ov.Core().read_model(str(art.path / "image.xml"))
    fq = {op.get_friendly_name() for op in ir.get_ordered_ops() if op.get_type_name() == "FakeQuantize"}
    for op in ir.get_ordered_ops():
        if op.get_type_name() == "GroupConvolution":  # depthwise only, and float (no FakeQuantize feeds it)
            assert list(op.input_value(1).get_node().get_output_shape(0))[1:3] == [1, 1]
            assert op.input_value(0).get_node().get_friendly_name() not in fq
    pipe = Pipeline.load(art.path)  # at the precision the manifest asks for (see test_openvino.py)
    cos = (_unit(pipe.encode_image(pixels)) * ref).sum(-1)
    assert cos.min() >= 1 - q["max_cosine_drop"] - 0.005, cos
