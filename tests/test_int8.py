"""INT8 through the public path: `edgeclip.export(..., precision="int8", recipe=...)`, the CLI and
the runtime. Every figure is measured on the written artifact with real ONNX Runtime sessions against
the torch reference of the caller's model; the manifest's own numbers are only checked for presence
and consistency.

The ViT-B-32 case exports a random-weight B/32 (both towers; ~1 min on 2 cores). The fixtures' exports run
once per test session, in background processes started with the session (conftest.py).
"""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import edgeclip  # noqa: E402
from edgeclip import builtin  # noqa: E402
from edgeclip.calibration.recipes import RECIPES  # noqa: E402
from edgeclip.errors import CalibrationError, EdgeClipError, ValidationError  # noqa: E402
from edgeclip.runtime.pipeline import Pipeline  # noqa: E402
from edgeclip.runtime.preprocess import Preprocessor  # noqa: E402
from synthetic import calibration_data, captions, outlier_tiny, write_images  # noqa: E402

ALL_RECIPES = ["int8", "int8-dynamic", "int8-smoothquant", "w8a16", "w4a16", "w4a8"]


def _heldout():
    files = sorted(builtin.heldout_dir().glob("*/*.png"))
    return [str(f) for f in files], np.array([int(f.parent.name) for f in files])


def _top1(pipe, files, truth, through_text: bool) -> float:
    kw = {"labels": builtin.digit_labels(), "templates": builtin.prompt_templates()} if through_text else {}
    preds = pipe.classify(files, **kw)
    return float(np.mean([p.index == t for p, t in zip(preds, truth)]))


def _cos(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


# ------------------------------------------------------------------------------ built-in model

# builtin:tiny with the digit words baked in: FP32 (the artifact the runtime, OpenVINO, fusion and export
# tests read too) and every INT8 recipe; exported once per session in background processes (conftest.py)
TINY = {"fp32": {"model": "builtin:tiny", "target": "onnx", "precision": "fp32", "labels": builtin.digit_labels()}}
TINY.update({recipe: {**TINY["fp32"], "precision": "int8", "recipe": recipe} for recipe in ALL_RECIPES})


@pytest.fixture(scope="module")
def tiny_artifacts(shared_exports):
    return {name: shared_exports.get(spec) for name, spec in TINY.items()}


@pytest.mark.parametrize("recipe", ALL_RECIPES)
def test_builtin_int8_top1_within_one_point_of_fp32(tiny_artifacts, recipe):
    files, truth = _heldout()
    fp32 = Pipeline.load(tiny_artifacts["fp32"].path)
    q = Pipeline.load(tiny_artifacts[recipe].path)
    for through_text in (False, True):  # the baked head, and class embeddings from the INT8 text tower
        ref, got = _top1(fp32, files, truth, through_text), _top1(q, files, truth, through_text)
        assert ref >= 0.98
        assert got >= ref - 0.01, (recipe, through_text, ref, got)


def test_int8_manifest_records_recipe_layers_and_fidelity(tiny_artifacts):
    m = tiny_artifacts["int8"].manifest
    assert m["precision"] == "int8"
    q = m["quantization"]
    assert q["recipe"] == "int8" and q["max_cosine_drop"] == 0.005
    for name in ("image", "text"):
        r = q["graphs"][name]
        assert r["int8_layers"] + len(r["float_layers"]) == r["quantizable_layers"] > 0
        assert 0 <= r["cosine_drop"] <= 0.005 and r["min_cosine"] == pytest.approx(1 - r["cosine_drop"])
        assert r["data"]["held_out"] > 0 and r["data"]["calibration"] > 0 and r["data"]["source"] == "builtin"
        assert r["observer"] == "minmax"
    # static INT8 runs as ONNX Runtime's fused integer kernels, nothing left as QDQ: GEMMs with the
    # bias inside, and packed-QKV projections fused with their attention (the pooled-only last block
    # keeps its separate Q and KV projections and a float MultiHeadAttention)
    image = _ops(tiny_artifacts["int8"].path / "image.onnx")
    r = q["graphs"]["image"]
    int8_layers = r["int8_matmul_layers"]
    assert r["int8_layers"] == int8_layers + r["int8_tables"] and r["int8_tables"] == 1  # the positional table
    assert image["MatMulIntegerToFloat"] + image["QAttention"] == int8_layers
    assert image["QAttention"] == 2 and image["MultiHeadAttention"] == 1 and image["Softmax"] == 0
    # the only DequantizeLinear left reads the int8 positional table; the patch and final projections
    # are int8 GEMMs like the blocks' (their layers are in the report)
    assert image["DequantizeLinear"] == 1 and 0 < image["QuantizeLinear"] <= int8_layers
    assert r["bits"]["visual.patch_linear"] == 8 or "visual.patch_linear" in r["float_layers"]
    assert {"visual.patch_linear", "visual.proj"} <= set(r["bits"])
    assert image["SkipLayerNormalization"] == 0  # measured slower than Add + LayerNorm on ORT's CPU


def test_recipes_produce_their_own_graph_forms(tiny_artifacts):
    dyn = _ops(tiny_artifacts["int8-dynamic"].path / "image.onnx")
    r = tiny_artifacts["int8-dynamic"].manifest["quantization"]["graphs"]["image"]
    assert dyn["DynamicQuantizeMatMul"] == r["int8_matmul_layers"] >= 13 and dyn["QuantizeLinear"] == 0
    smooth = tiny_artifacts["int8-smoothquant"].manifest["quantization"]["graphs"]["image"]
    assert smooth["smoothquant"]["alpha"] == 0.5 and smooth["smoothquant"]["layernorms"] > 0
    w8 = tiny_artifacts["w8a16"]
    ops = _ops(w8.path / "image.onnx")
    r = w8.manifest["quantization"]["graphs"]["image"]
    # every block linear, the patch and final projections and the positional table: int8 behind DequantizeLinear
    assert ops["DequantizeLinear"] == r["int8_layers"] == 16 and r["float_layers"] == []
    assert ops["MatMulIntegerToFloat"] == 0 and ops["QuantizeLinear"] == 0
    assert w8.manifest["graphs"]["image"]["session_config"] == {"session.disable_quant_qdq": "1"}
    # weight-only: the block linears' weights take a quarter of their float bytes
    from edgeclip.calibration.qdq import find_targets

    fp32_path = tiny_artifacts["fp32"].path / "image.onnx"
    fp32 = onnx.load(str(fp32_path))
    inits = {i.name: i for i in fp32.graph.initializer}
    linear_bytes = sum(len(inits[t.weight].raw_data) for t in find_targets(fp32))
    saved = fp32_path.stat().st_size - (w8.path / "image.onnx").stat().st_size
    assert saved >= 0.6 * linear_bytes, (saved, linear_bytes)  # 3/4 of them, less the scales


def test_inspect_shows_recipe_float_layers_and_fidelity(tiny_artifacts):
    out = subprocess.run([sys.executable, "-m", "edgeclip", "inspect", str(tiny_artifacts["int8"].path)],
                         capture_output=True, text=True, check=True).stdout
    assert "recipe int8" in out and "layers int8" in out and "min cosine" in out and "held-out" in out
    assert "attention 3" in out


def test_export_help_lists_every_recipe():
    out = subprocess.run([sys.executable, "-m", "edgeclip", "export", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for name in RECIPES:
        assert name in out
    assert "--calib" in out and "--calib-captions" in out and "--max-cosine-drop" in out


def test_cli_int8_export_with_broken_calibration_files(tmp_path):
    """A calibration folder with unreadable files still calibrates and says what it skipped."""
    calib = tmp_path / "calib" / "nested"
    calib.mkdir(parents=True)
    for f in sorted(builtin.calib_dir().glob("*.png"))[:40]:
        (calib / f.name).write_bytes(f.read_bytes())
    (calib / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (calib / "not-an-image.jpg").write_text("hello")
    caps = tmp_path / "captions.jsonl"
    caps.write_text("\n".join(json.dumps({"caption": c}) for c in builtin.calib_captions()[:40]))
    out = tmp_path / "art"
    r = subprocess.run([sys.executable, "-m", "edgeclip", "export", "builtin:tiny", "--precision", "int8",
                        "--calib", str(tmp_path / "calib"), "--calib-captions", str(caps), "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "2 file(s) skipped" in r.stdout
    data = json.loads((out / "manifest.json").read_text())["quantization"]["graphs"]
    assert data["image"]["data"]["images"] == 40 and data["image"]["data"]["skipped"] == 2
    assert sorted(Path(p).name for p in data["image"]["data"]["skipped_files"]) == ["not-an-image.jpg",
                                                                                  "truncated.png"]
    assert data["text"]["data"]["captions"] == 40


def test_int8_errors_are_clear(tmp_path):
    with pytest.raises(EdgeClipError, match="unknown quantization recipe 'int4'"):
        edgeclip.export("builtin:tiny", precision="int8", recipe="int4", out=tmp_path / "a")
    with pytest.raises(EdgeClipError, match="only apply to precision='int8'"):
        edgeclip.export("builtin:tiny", precision="fp32", recipe="int8", out=tmp_path / "b")
    model = edgeclip.load_model("random:tiny", seed=0)
    with pytest.raises(CalibrationError, match="needs calibration images"):
        edgeclip.export(model, precision="int8", out=tmp_path / "c")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="no images"):
        edgeclip.export(model, precision="int8", calib=tmp_path / "empty", out=tmp_path / "d")
    for name in "bcd":
        assert not (tmp_path / name).exists()  # nothing half-written


# ------------------------------------------------------------------- outlier channels (CLIP-like)

def test_outliers_break_plain_int8_and_smoothquant_or_the_guard_fix_it(tmp_path):
    model = outlier_tiny()
    calib, fresh, caps = calibration_data(tmp_path, model.spec.vision.image_size, images=96, held=32, caps=64)
    pre = Preprocessor.from_config(model.spec.preprocess_config())
    with torch.no_grad():
        ref = model.encode_image(torch.from_numpy(pre([str(p) for p in fresh]))).numpy()

    def export(name, **kw):
        art = edgeclip.export(model, precision="int8", calib=calib, calib_captions=caps, out=tmp_path / name, **kw)
        fresh_cos = float(_cos(Pipeline.load(art.path).encode_image([str(p) for p in fresh]), ref).min())
        return art.manifest["quantization"]["graphs"]["image"], fresh_cos

    # Plain min-max INT8 with the guard out of the way: the outliers wreck it.
    plain, plain_fresh = export("plain", recipe="int8", max_cosine_drop=0.9, validate=False)
    assert plain["float_layers"] == [] and plain["min_cosine"] < 0.98 and plain_fresh < 0.98, (plain, plain_fresh)
    # The guard alone: sensitive layers back to float until held-out cosine >= 0.995.
    guarded, guarded_fresh = export("guarded", recipe="int8")
    assert guarded["cosine_drop_all_int8"] > 0.02 and 0 < len(guarded["float_layers"]) < guarded["quantizable_layers"]
    assert guarded["min_cosine"] >= 0.995 and guarded_fresh >= 0.99, (guarded, guarded_fresh)
    # SmoothQuant moves the outliers into the weights: far better than plain before any guarding,
    # and with the guard fewer layers go back to float.
    smooth, smooth_fresh = export("smooth", recipe="int8-smoothquant")
    assert smooth["cosine_drop_all_int8"] < plain["cosine_drop_all_int8"] / 3, (smooth, plain)
    assert smooth["min_cosine"] >= 0.995 and smooth_fresh >= 0.99
    assert len(smooth["float_layers"]) <= len(guarded["float_layers"])


def test_guard_failure_is_a_validation_error_with_a_report(tmp_path):
    model = outlier_tiny()
    write_images(tmp_path / "calib", 24, model.spec.vision.image_size, seed=0)
    with pytest.raises(ValidationError, match="misses the accuracy bound") as e:
        # no quantized model can be within 1e-9 of float: the guard returns everything and still fails
        edgeclip.export(model, precision="int8", calib=tmp_path / "calib", labels=["a", "b"],
                        max_cosine_drop=1e-9, out=tmp_path / "x")
    assert e.value.failures and "sensitivity" in e.value.failures[0]
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------ random-weight ViT-B-32

def _b32_export(shared) -> tuple[dict, list[Path]]:
    """(export spec, held-out images): random:ViT-B-32 (seed 0) to INT8, calibrated on synthetic data
    written once per session."""
    calib, held, caps = shared.once("int8-b32", lambda root: calibration_data(root, 224, images=48, held=12, caps=96))
    return {"model": "random:ViT-B-32", "precision": "int8", "calib": calib, "calib_captions": caps}, held


SHARED_EXPORTS = {"tiny_artifacts": list(TINY.values()), "b32": lambda shared: [_b32_export(shared)[0]]}


@pytest.fixture(scope="module")
def b32(shared_exports):
    spec, held = _b32_export(shared_exports)
    model = edgeclip.load_model("random:ViT-B-32", seed=0)  # the torch reference
    return model, shared_exports.get(spec), held, captions(16, 1)


@pytest.mark.slow
def test_vit_b32_int8_image_and_text_cosine(b32):
    model, art, held, caps = b32
    pipe = Pipeline.load(art.path)
    pre = Preprocessor.from_config(model.spec.preprocess_config())
    with torch.no_grad():
        img_ref = model.encode_image(torch.from_numpy(pre(held))).numpy()
        txt_ref = model.encode_text(torch.from_numpy(pipe.tokenizer(caps, truncate=True))).numpy()
    img_cos = _cos(pipe.encode_image(held), img_ref).min()
    txt_cos = _cos(pipe.encode_text(caps), txt_ref).min()
    assert img_cos >= 0.995 and txt_cos >= 0.995, (img_cos, txt_cos)
    q = art.manifest["quantization"]["graphs"]
    assert q["image"]["int8_layers"] >= 44 and q["text"]["int8_layers"] >= 44  # nearly every linear is INT8
    ops = _ops(art.path / "image.onnx")
    assert ops["QAttention"] == 11 and ops["MultiHeadAttention"] == 1 and ops["Softmax"] == 0
    assert ops["MatMulIntegerToFloat"] + ops["QAttention"] == q["image"]["int8_matmul_layers"]
    assert q["image"]["int8_layers"] == q["image"]["int8_matmul_layers"] + q["image"]["int8_tables"]
