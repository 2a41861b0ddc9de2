"""The OpenVINO target and backend, end to end: real `ov.convert_model` IR on disk, real NNCF INT8,
real OpenVINO CPU compiles. Figures are measured on the written artifact against the torch
reference of the caller's model (inference precision forced to f32 where the bound is FP32's)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ov = pytest.importorskip("openvino")
pytest.importorskip("nncf")

import edgeclip  # noqa: E402
from edgeclip import builtin  # noqa: E402
from edgeclip.errors import ArtifactError, CalibrationError, ChecksumError, EdgeClipError  # noqa: E402
from edgeclip.exporter.graphs import reference_inputs  # noqa: E402
from edgeclip.runtime.backends.openvino import precision_name  # noqa: E402
from edgeclip.runtime.pipeline import Pipeline  # noqa: E402
from edgeclip.runtime.preprocess import Preprocessor  # noqa: E402
from synthetic import calibration_data, outlier_tiny  # noqa: E402
from test_runtime import NO_TORCH, heldout  # noqa: E402


def _heldout():
    files = sorted(builtin.heldout_dir().glob("*/*.png"))
    return [str(f) for f in files], np.array([int(f.parent.name) for f in files])


def _cos(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _ir_ops(path) -> Counter:
    return Counter(op.get_type_name() for op in ov.Core().read_model(str(path)).get_ordered_ops())


def _fq_matmuls(path) -> int:
    """MatMuls whose activation input comes through a FakeQuantize (i.e. run in INT8)."""
    def fed(node):  # through the data-movement ops NNCF places its FakeQuantize in front of
        for _ in range(4):
            if node.get_type_name() == "FakeQuantize":
                return True
            if node.get_type_name() not in ("Reshape", "Transpose", "Gather", "GatherElements", "Squeeze"):
                return False
            node = node.input_value(0).get_node()
        return False

    return sum(op.get_type_name() == "MatMul" and fed(op.input_value(0).get_node())
               for op in ov.Core().read_model(str(path)).get_ordered_ops())


def _features(model, spec, n=3):
    inputs = reference_inputs(spec, n=n, seed=99)
    with torch.no_grad():
        return inputs, model.encode_image(torch.from_numpy(inputs["pixel_values"])).numpy(), \
            model.encode_text(torch.from_numpy(inputs["input_ids"])).numpy()


# builtin:tiny with the digit words baked in: OpenVINO IR per precision, and ONNX FP32 (the artifact the
# runtime, INT8, fusion and export tests read too); exported once per session in background processes
# (conftest.py)
_TINY = {"model": "builtin:tiny", "labels": builtin.digit_labels()}
TINY = {p: {**_TINY, "target": "openvino", "precision": p} for p in ("fp32", "fp16", "int8")}
TINY["w8a16"] = {**_TINY, "target": "openvino", "precision": "int8", "recipe": "w8a16"}
TINY["onnx"] = {**_TINY, "target": "onnx", "precision": "fp32"}
PERCENTILE = {**_TINY, "target": "openvino", "precision": "int8", "observer": "percentile"}
SHARED_EXPORTS = {"tiny": list(TINY.values()), "percentile": [PERCENTILE]}


@pytest.fixture(scope="module")
def tiny(shared_exports):
    return {name: shared_exports.get(spec) for name, spec in TINY.items()}


def test_fp32_ir_matches_torch_within_1e4_with_f32_forced(tiny):
    model = edgeclip.load_model("builtin:tiny")
    inputs, img_ref, txt_ref = _features(model, model.spec)
    pipe = Pipeline.load(tiny["fp32"].path, inference_precision="f32")
    img = pipe._graph("image").run({"pixel_values": inputs["pixel_values"]})["image_embeds"]
    # full padded context and trimmed (dynamic length) text both match
    txt_full = pipe._graph("text").run({"input_ids": inputs["input_ids"]})["text_embeds"]
    assert np.abs(img - img_ref).max() <= 1e-4 * max(1.0, np.abs(img_ref).max())
    assert np.abs(txt_full - txt_ref).max() <= 1e-4 * max(1.0, np.abs(txt_ref).max())
    assert all(info["inference_precision"] == "f32" for info in pipe.info().values())
    m = tiny["fp32"].manifest
    assert m["target"] == "openvino" and m["backend"] == "openvino"
    assert m["graphs"]["image"]["file"] == "image.xml" and m["graphs"]["image"]["weights"] == "image.bin"
    assert m["openvino"]["validated_inference_precision"] == "f32"
    assert m["openvino"]["default_inference_precision_here"] in ("f32", "bf16", "f16")
    assert all(r["ok"] and r["max_abs"] <= 1e-4 * max(1, r["max_abs"]) + r["max_abs_bound"]
               for r in m["fidelity"].values())


def test_fp16_stores_half_weights_within_fp16_bounds(tiny):
    fp32, fp16 = tiny["fp32"], tiny["fp16"]
    size = {p: (a.path / "image.bin").stat().st_size for p, a in (("fp32", fp32), ("fp16", fp16))}
    assert size["fp16"] < 0.55 * size["fp32"], size
    consts = Counter(str(op.get_element_type()) for op in ov.Core().read_model(str(fp16.path / "image.xml"))
                     .get_ordered_ops() if op.get_type_name() == "Constant" and op.get_output_size() and
                     np.prod(list(op.get_output_shape(0))) >= 1024)
    assert any("f16" in t or "float16" in t for t in consts), consts
    model = edgeclip.load_model("builtin:tiny")
    _, img_ref, txt_ref = _features(model, model.spec)
    inputs = reference_inputs(model.spec, n=3, seed=99)
    pipe = Pipeline.load(fp16.path, inference_precision="f32")
    img = pipe._graph("image").run({"pixel_values": inputs["pixel_values"]})["image_embeds"]
    assert _cos(img, img_ref).min() >= 0.999
    assert all(r["ok"] for r in fp16.manifest["fidelity"].values())


def test_int8_ir_is_quantized_and_keeps_digits_accuracy(tiny):
    q = tiny["int8"].manifest["quantization"]
    for name in ("image", "text"):
        g = q["graphs"][name]
        assert g["recipe"] == "int8" and g["int8_layers"] > 0 and g["min_cosine"] >= 1 - q["max_cosine_drop"]
        assert g["quantizer"].startswith("nncf")
        ops = _ir_ops(tiny["int8"].path / f"{name}.xml")
        assert _fq_matmuls(tiny["int8"].path / f"{name}.xml") >= g["int8_layers"], ops
        # attention stays one fused op, unquantized
        assert ops["ScaledDotProductAttention"] == tiny["int8"].manifest["fusions"][name]["attention"] > 0
    files, truth = _heldout()
    for through_text in (False, True):
        kw = {"labels": builtin.digit_labels(), "templates": builtin.prompt_templates()} if through_text else {}
        acc = {p: float(np.mean([x.index == t for x, t in zip(Pipeline.load(tiny[p].path).classify(files, **kw),
                                                                truth)]))
               for p in ("fp32", "int8", "w8a16")}
        assert acc["fp32"] >= 0.98 and acc["int8"] >= acc["fp32"] - 0.01 and acc["w8a16"] >= acc["fp32"] - 0.01, acc


def test_int8_ir_pins_the_precision_it_was_validated_at(tiny, tmp_path):
    # An INT8 IR runs in f32 (pinned in the manifest) unless OpenVINO's default precision on the export
    # machine was measured and kept the bound (OpenVINO's bf16 default broke MobileCLIP-S1's INT8 IR);
    # float IRs keep the device's default; a manifest cannot ask for anything else
    q = tiny["int8"].manifest["quantization"]["graphs"]
    default = precision_name(ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT"))
    pipe = Pipeline.load(tiny["int8"].path)
    ran = {n: pipe._graph(n).info["inference_precision"] for n in ("image", "text")}
    for name in ("image", "text"):
        g, info = q[name], tiny["int8"].manifest["graphs"][name]
        if default == "f32" or g[f"cosine_drop_{default}"] > g["max_cosine_drop"]:
            assert g["inference_precision"] == "f32" and info["ov_config"] == {"INFERENCE_PRECISION_HINT": "f32"}
            assert ran[name] == "f32"
        else:
            assert g["inference_precision"] == "default" and "ov_config" not in info and ran[name] == default
    assert "ov_config" not in tiny["fp32"].manifest["graphs"]["image"]
    assert Pipeline.load(tiny["fp32"].path)._graph("image").info["inference_precision"] == default
    art = tmp_path / "art"
    shutil.copytree(tiny["int8"].path, art)
    m = json.loads((art / "manifest.json").read_text())
    m["graphs"]["image"]["ov_config"] = {"INFERENCE_PRECISION_HINT": "bf16"}
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="ov_config"):
        Pipeline.load(art)


@pytest.fixture(scope="module")
def percentile(shared_exports):
    return shared_exports.get(PERCENTILE)


def test_percentile_observer_quantizes_and_keeps_accuracy(percentile):
    # NNCF's quantile range estimator (named QUANTILE or MEAN_QUANTILE by version)
    files, labels = _heldout()
    p = Pipeline.load(percentile.path, inference_precision="f32")
    assert _ir_ops(percentile.path / "image.xml")["FakeQuantize"] > 0
    acc = float(np.mean([pr.index == lb for pr, lb in zip(p.classify(files), labels)]))
    assert acc >= 0.97, acc


def test_w8a16_has_int8_weights_and_float_activations(tiny):
    ops = _ir_ops(tiny["w8a16"].path / "image.xml")
    assert ops["FakeQuantize"] == 0
    fp32_bin = (tiny["fp32"].path / "image.bin").stat().st_size
    assert (tiny["w8a16"].path / "image.bin").stat().st_size < 0.6 * fp32_bin
    g = tiny["w8a16"].manifest["quantization"]["graphs"]["image"]
    assert g["activations"] == "float" and g["int8_layers"] == g["quantizable_layers"] - len(g["float_layers"])


def test_openvino_and_onnx_artifacts_agree(tiny):
    files, _ = _heldout()
    # f32 forced: on CPUs with bf16 OpenVINO would otherwise run the FP32 artifact in bf16
    a = Pipeline.load(tiny["fp32"].path, inference_precision="f32").encode_image(files[:16])
    b = Pipeline.load(tiny["onnx"].path).encode_image(files[:16])
    assert np.abs(a - b).max() <= 1e-4


def test_compiled_cpu_model_fuses_attention(tiny):
    """OpenVINO's CPU plugin compiles every ScaledDotProductAttention into a Snippets subgraph: no
    Softmax or unfused attention MatMul survives in the runtime model."""
    core = ov.Core()
    for name in ("image", "text"):
        path = tiny["fp32"].path / f"{name}.xml"
        n_attn = _ir_ops(path)["ScaledDotProductAttention"]
        assert n_attn == tiny["fp32"].manifest["fusions"][name]["attention"] and n_attn >= 2
        compiled = core.compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        runtime = compiled.get_runtime_model()
        layers = [(op.get_rt_info()["layerType"].astype(str), op.get_rt_info()["originalLayersNames"].astype(str))
                  for op in runtime.get_ordered_ops()]
        types = Counter(t for t, _ in layers)
        assert types["Softmax"] == 0 and types["ScaledDotProductAttention"] == 0, types
        fused = [names for t, names in layers if "scaled_dot_product_attention" in names]
        assert len(fused) >= n_attn and all(t == "Subgraph" for t, names in layers
                                            if "scaled_dot_product_attention" in names), layers


def test_backend_auto_and_inference_precision(tiny):
    pipe = Pipeline.load(tiny["fp32"].path)
    assert pipe.backend_name == "openvino"
    info = pipe.info()["image"]
    assert info["backend"] == "openvino" and info["inference_precision"] in ("f32", "bf16", "f16")
    assert Pipeline.load(tiny["onnx"].path).backend_name == "ort"
    with pytest.raises(EdgeClipError, match="inference precision"):
        Pipeline.load(tiny["fp32"].path, inference_precision="fp64")
    with pytest.raises(ArtifactError, match="openvino backend only"):
        Pipeline.load(tiny["onnx"].path, inference_precision="bf16")


def test_runtime_classifies_without_torch_on_openvino(tiny, tmp_path):
    images = heldout(per_digit=1)
    art = tiny["fp32"].path
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, str(art), *[str(p) for _, p in images]],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["loaded"] == [] and got["head_only"] is True
    labels = builtin.digit_labels()
    assert sum(g == labels[d] for g, (d, _) in zip(got["labels"], images)) >= 9
    here = Pipeline.load(art).classify([str(p) for _, p in images])
    assert [x.label for x in here] == got["labels"]
    assert np.abs(np.array([x.scores for x in here]) - np.array(got["scores"])).max() <= 1e-5


def test_tampered_or_missing_weights_are_refused(tiny, tmp_path):
    import shutil

    art = shutil.copytree(tiny["fp32"].path, tmp_path / "art")
    data = bytearray((art / "image.bin").read_bytes())
    data[len(data) // 2] ^= 0x01
    (art / "image.bin").write_bytes(bytes(data))
    with pytest.raises(ChecksumError):
        Pipeline.load(art)
    (art / "image.bin").unlink()
    with pytest.raises(ArtifactError):
        Pipeline.load(art)


def test_openvino_int8_errors_are_clear(tmp_path):
    with pytest.raises(CalibrationError, match="int8-dynamic"):
        edgeclip.export("builtin:tiny", target="openvino", precision="int8", recipe="int8-dynamic",
                        out=tmp_path / "a")
    with pytest.raises(CalibrationError, match="observer 'mse'"):
        edgeclip.export("builtin:tiny", target="openvino", precision="int8", observer="mse", out=tmp_path / "b")
    with pytest.raises(CalibrationError, match="needs calibration images"):
        edgeclip.export("random:tiny", target="openvino", precision="int8", out=tmp_path / "c", labels=["a", "b"])
    assert not any((tmp_path / n).exists() for n in "abc")


def test_guard_returns_sensitive_layers_to_float_as_ignored_scopes(tmp_path):
    """Outlier channels (CLIP-like) break plain INT8; the guard puts the worst layers back in float.
    Those layers carry no FakeQuantize in the written IR: NNCF ignored them."""
    model = outlier_tiny()
    calib, fresh, caps = calibration_data(tmp_path, model.spec.vision.image_size, images=64, held=16, caps=48)
    art = edgeclip.export(model, target="openvino", precision="int8", calib=calib, calib_captions=caps,
                          out=tmp_path / "int8")
    g = art.manifest["quantization"]["graphs"]["image"]
    assert g["cosine_drop_all_int8"] > g["max_cosine_drop"] and g["float_layers"], g
    assert g["min_cosine"] >= 0.995 and 0 < g["int8_layers"] < g["quantizable_layers"]
    assert g["int8_layers"] + len(g["float_layers"]) == g["quantizable_layers"]
    pre = Preprocessor.from_config(model.spec.preprocess_config())
    with torch.no_grad():
        ref = model.encode_image(torch.from_numpy(pre([str(p) for p in fresh]))).numpy()
    got = Pipeline.load(art.path).encode_image([str(p) for p in fresh])
    assert _cos(got, ref).min() >= 0.99
    # quantized MatMuls in the IR: the int8 layers, never the ones kept float (+1: the last block's q/k/v
    # count as one packed layer elsewhere, so allow the split form's extra MatMuls)
    fq = _fq_matmuls(art.path / "image.xml")
    assert g["int8_layers"] <= fq < g["quantizable_layers"] + 2


def test_cli_run_and_bench_say_which_precision_ran(tiny, capsys):
    from edgeclip.cli import main

    files, truth = _heldout()
    assert main(["run", str(tiny["int8"].path), "--image", files[0], "--inference-precision", "f32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["images"][0]["label"] == builtin.digit_labels()[truth[0]]
    assert main(["bench", str(tiny["fp32"].path), "--seconds", "0.2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["backend"] == "openvino"
    assert {g["graph"]: g["inference_precision"] for g in rows[0]["graphs"]}.keys() == {"image", "text"}
    assert all(g["inference_precision"] in ("f32", "bf16", "f16") for g in rows[0]["graphs"])
    assert main(["inspect", str(tiny["fp32"].path)]) == 0
    assert "validated with inference precision f32" in capsys.readouterr().out


@pytest.mark.slow
def test_mobileclip_s1_ir_matches_torch_and_fuses_its_attention(tmp_path):
    """The MCi image tower (reparameterized at export) and the non-causal text tower in OpenVINO FP32."""
    from collections import Counter

    model = edgeclip.load_model("random:MobileCLIP-S1", seed=0)
    art = edgeclip.export(model, target="openvino", out=tmp_path / "s1")
    assert all(r["ok"] for r in art.fidelity.values()), art.fidelity
    assert art.manifest["fusions"]["image"]["attention"] == 4 and art.manifest["fusions"]["text"]["attention"] == 12
    import openvino as ov

    ops = Counter(op.get_type_name() for op in ov.Core().read_model(str(art.path / "image.xml")).get_ordered_ops())
    assert ops["BatchNormInference"] == 0 and ops["Convolution"] + ops["GroupConvolution"] > 100, dict(ops)
    # multiplier grouped convs tiled into depthwise ones (OpenVINO's depthwise kernels are the fast ones)
    ir = ov.Core().read_model(str(art.path / "image.xml"))
    shapes = [list(op.input_value(1).get_node().get_output_shape(0)) for op in ir.get_ordered_ops()
              if op.get_type_name() == "GroupConvolution"]
    assert shapes and all(s[1] == s[2] == 1 for s in shapes), shapes
    assert art.manifest["towers"]["image"]["tiled_multiplier_convs"] == 4
    pipe = Pipeline.load(art.path, inference_precision="f32")
    inputs = reference_inputs(model.spec, n=2, seed=99)
    with torch.no_grad():
        want = model.encode_image(torch.from_numpy(inputs["pixel_values"])).numpy()
    want /= np.linalg.norm(want, axis=-1, keepdims=True)
    assert np.abs(pipe.encode_image(inputs["pixel_values"]) - want).max() <= 1e-5
