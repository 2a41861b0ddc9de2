"""Observers on known distributions; calibration data readers on real files."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from edgeclip.calibration.data import list_images, load_images, read_captions
from edgeclip.calibration.observers import (make_observer, quantize_weight_per_channel, scale_zero_point)
from edgeclip.errors import CalibrationError, EdgeClipError
from edgeclip.runtime.preprocess import Preprocessor
from synthetic import outlier_tiny

RNG = np.random.default_rng(0)
GAUSS = [RNG.normal(scale=2.0, size=50_000).astype(np.float32) for _ in range(8)]
UNIFORM = [RNG.uniform(-3.0, 3.0, size=50_000).astype(np.float32) for _ in range(8)]


def _observe(name, batches, **kw):
    o = make_observer(name, **kw)
    for b in batches:
        o.observe(b)
    return o


def test_minmax_is_exact_and_includes_zero():
    o = _observe("minmax", [np.array([0.5, 2.0]), np.array([1.0, 3.0])])
    assert o.range() == (0.0, 3.0)
    o = _observe("minmax", UNIFORM)
    lo, hi = o.range()
    assert lo == min(b.min() for b in UNIFORM) and hi == max(b.max() for b in UNIFORM)


@pytest.mark.parametrize("name", ["percentile", "entropy", "mse"])
def test_uniform_range_is_its_support(name):
    lo, hi = _observe(name, UNIFORM).range()
    assert lo == -hi and hi == pytest.approx(3.0, rel=0.03)


def test_gaussian_percentile_matches_the_normal_quantile():
    _, t = _observe("percentile", GAUSS, percentile=99.99).range()
    assert t == pytest.approx(2.0 * 3.8906, rel=0.03)  # two-sided 99.99% of |N(0, σ=2)|
    _, t99 = _observe("percentile", GAUSS, percentile=99.0).range()
    assert t99 == pytest.approx(2.0 * 2.5758, rel=0.03)


def test_gaussian_mse_clips_inside_the_tail():
    _, t = _observe("mse", GAUSS).range()
    amax = max(np.abs(b).max() for b in GAUSS)
    assert 3.0 * 2.0 < t < 5.0 * 2.0 and t < amax


@pytest.mark.parametrize("name", ["percentile", "entropy"])
def test_outliers_do_not_stretch_robust_observers(name):
    batches = [b.copy() for b in GAUSS]
    batches[3][:4] = 400.0  # four huge values among 400k
    _, robust = _observe(name, batches).range()
    _, hi = _observe("minmax", batches).range()
    assert hi == 400.0 and robust < 0.1 * hi


def test_histogram_growth_keeps_the_answer():
    """Ranges grow over batches: the rebinned histogram must give what one pass over all data gives."""
    growing = [b * s for b, s in zip(GAUSS, (0.25, 0.5, 1, 1, 2, 2, 4, 4))]
    one = _observe("percentile", [np.concatenate(growing)]).range()[1]
    many = _observe("percentile", growing).range()[1]
    assert many == pytest.approx(one, rel=0.02)


def test_unknown_observer_and_empty_observer():
    with pytest.raises(EdgeClipError, match="minmax"):
        make_observer("median")
    with pytest.raises(EdgeClipError, match="no data"):
        make_observer("entropy").range()


def test_per_channel_weights():
    w = RNG.normal(size=(16, 32)).astype(np.float32) * np.linspace(0.01, 5.0, 16, dtype=np.float32)[:, None]
    q, scale = quantize_weight_per_channel(w, axis=0)
    assert q.dtype == np.int8 and scale.shape == (16,)
    np.testing.assert_allclose(scale, np.abs(w).max(axis=1) / 127, rtol=1e-6)
    err = np.abs(q * scale[:, None] - w)
    assert np.all(err <= scale[:, None] / 2 + 1e-7)
    assert np.abs(q).max() == 127


def test_scale_zero_point():
    assert scale_zero_point(-2.0, 1.0) == pytest.approx((2.0 / 127, 0))
    s, zp = scale_zero_point(-1.0, 3.0, "uint8")
    assert s == pytest.approx(4.0 / 255) and zp == 64


# ------------------------------------------------------------------------------------ data readers

def _digits(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(RNG.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_folder_with_broken_files_still_calibrates(tmp_path):
    _digits(tmp_path / "a", 3)
    _digits(tmp_path / "b" / "deep", 2)
    (tmp_path / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (tmp_path / "b" / "text.png").write_text("not an image")
    (tmp_path / "notes.txt").write_text("ignored: not an image extension")
    pre = Preprocessor.from_config({"image_size": 8})
    data = load_images(tmp_path, pre)
    assert data.pixels.shape == (5, 3, 8, 8) and data.pixels.dtype == np.float32
    assert sorted(p.split("/")[-1] for p, _ in data.skipped) == ["broken.jpg", "text.png"]
    np.testing.assert_array_equal(data.pixels[0], pre(data.files[0])[0])  # same preprocessing as the runtime
    cal, held = data.split(0.4, seed=1)
    assert len(cal) == 3 and len(held) == 2


def test_sampling_is_seeded(tmp_path):
    _digits(tmp_path, 20)
    a, b = list_images(tmp_path, limit=5, seed=3), list_images(tmp_path, limit=5, seed=3)
    assert a == b and len(a) == 5 and a != list_images(tmp_path, limit=5, seed=4)


def test_unusable_folders(tmp_path):
    with pytest.raises(CalibrationError, match="not found"):
        list_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="no images"):
        list_images(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"junk")
    with pytest.raises(CalibrationError, match="none of the 1 images"):
        load_images(tmp_path / "bad", Preprocessor.from_config({"image_size": 8}))


def test_captions_txt_and_jsonl(tmp_path):
    (tmp_path / "c.txt").write_text("a photo of a cat\n\n  a dog on grass  \n")
    assert read_captions(tmp_path / "c.txt") == ["a photo of a cat", "a dog on grass"]
    (tmp_path / "c.jsonl").write_text('{"caption": "one"}\n{"text": "two"}\n"three"\n')
    assert read_captions(tmp_path / "c.jsonl") == ["one", "two", "three"]
    (tmp_path / "bad.jsonl").write_text('{"caption": \n')
    with pytest.raises(CalibrationError, match="bad.jsonl:1"):
        read_captions(tmp_path / "bad.jsonl")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(CalibrationError, match="no captions"):
        read_captions(tmp_path / "empty.txt")


# ----------------------------------------------------------------------------------- QDQ quantizer

@pytest.fixture(scope="module")
def tiny_digits(tmp_path_factory):
    import edgeclip
    from edgeclip.builtin import calib_dir, digit_labels, heldout_dir

    out = tmp_path_factory.mktemp("qdq") / "tiny"
    art = edgeclip.export("builtin:tiny", out=out, labels=digit_labels())
    pre = Preprocessor.from_config(art.manifest["preprocess"])
    held = load_images(heldout_dir(), pre, limit=None)
    truth = np.array([digit_labels().index(digit_labels()[int(p.parent.name)]) for p in held.files])
    return out, load_images(calib_dir(), pre), held, truth


@pytest.mark.parametrize("observer", ["minmax", "percentile", "entropy", "mse"])
def test_qdq_int8_keeps_builtin_accuracy_and_fuses(tmp_path, tiny_digits, observer):
    import onnx
    import onnxruntime as ort

    from edgeclip.calibration import qdq

    art, cal, held, truth = tiny_digits
    model = onnx.load(art / "image.onnx")
    targets = qdq.find_targets(model)
    # 4 linears in each of the first two blocks; the pooled-only last block has separate Q and KV
    # projections (export splits the packed QKV weight), so 5 there
    assert len(targets) == 4 + 4 + 5 and all(t.layer.startswith("visual.blocks.") for t in targets)
    batches = [{"pixel_values": cal.pixels[i:i + 32]} for i in range(0, len(cal.pixels), 32)]
    quant = qdq.quantize(model, targets, qdq.collect_ranges(model, targets, batches, observer))
    onnx.checker.check_model(quant)

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    int8 = ort.InferenceSession(quant.SerializeToString(), so, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    assert fused.count("MatMulIntegerToFloat") == len(targets)  # every quantized GEMM runs in integer

    fp32 = ort.InferenceSession(str(art / "image.onnx"), providers=["CPUExecutionProvider"])
    top1 = {name: float(np.mean(s.run(["logits"], {"pixel_values": held.pixels})[0].argmax(1) == truth))
            for name, s in (("fp32", fp32), ("int8", int8))}
    assert top1["fp32"] >= 0.9
    assert top1["int8"] >= top1["fp32"] - 0.01, top1


def test_qdq_exclude_keeps_layers_float(tiny_digits):
    import onnx

    from edgeclip.calibration import qdq

    art, cal, _, _ = tiny_digits
    model = onnx.load(art / "image.onnx")
    targets = qdq.find_targets(model)
    ranges = qdq.collect_ranges(model, targets, [{"pixel_values": cal.pixels}])
    quant = qdq.quantize(model, targets, ranges, exclude={"visual.blocks.0.mlp.fc1", "visual.blocks.2.mlp.fc2"})
    weight_dq = [n for n in quant.graph.node if n.op_type == "DequantizeLinear" and n.attribute]
    assert len(weight_dq) == len(targets) - 2


def test_quantize_graph_quantizes_only_the_layers_its_rule_accepts(tiny_digits):
    import onnx

    from edgeclip.calibration import qdq
    from edgeclip.calibration.recipes import get_recipe, image_calibration, quantize_graph

    art, cal, _, _ = tiny_digits
    model = onnx.load(art / "image.onnx")
    assert qdq.default_quantizable("visual.blocks.3.mlp.fc1") and qdq.default_quantizable("heads.tip.fc")
    assert not qdq.default_quantizable("visual.patch_linear") and not qdq.default_quantizable("visual.proj")
    every = [t.layer for t in qdq.find_targets(model, lambda path: True)]
    assert "visual.patch_linear" in every  # the default rule leaves the patch embedding float
    assert [t.layer for t in qdq.find_targets(model)] == [p for p in every if qdq.default_quantizable(p)]

    def block0(path):
        return path.startswith("visual.blocks.0.")

    data = image_calibration(cal.pixels[:16], {"source": "builtin"})
    quant, report = quantize_graph(model, get_recipe("int8-dynamic"), data, max_drop=0.5, quantizable=block0)
    # the rule's 4 layers, plus what every recipe stores int8: the end projections and the positional table
    ends = ["visual.patch_linear", "visual.proj"]  # the projection is a Gemm in the graph: quantize_graph reads it as MatMul
    assert [p for p in every if qdq.is_end_layer(p)] == ends[:1] and all(qdq.is_end_layer(p) for p in ends)
    assert report["quantizable_layers"] == 4 + 2 + 1 and report["int8_layers"] == 7 and report["int8_tables"] == 1
    dyn = [n for n in quant.graph.node if n.op_type == "DynamicQuantizeMatMul"]
    assert sorted(qdq._layer_name(n) for n in dyn) == sorted([p for p in every if block0(p)] + ends)
    # a rule that accepts nothing still leaves the tables and end projections to quantize
    _, none = quantize_graph(model, get_recipe("int8-dynamic"), data, max_drop=0.5, quantizable=lambda path: False)
    assert sorted(none["bits"]) == sorted(ends + ["visual.pos_embed"])


def test_a_recipe_is_one_entry_carrying_its_quantizers(tiny_digits):
    """A Recipe built here (in no registry) quantizes through the quantizers it carries; nothing picks
    them by its name."""
    import onnx

    from edgeclip.calibration.recipes import (RECIPES, NoOpenVinoForm, OnnxWeightsOnly, Recipe, image_calibration,
                                              quantize_graph)

    assert all(r.onnx is not None and r.openvino is not None for r in RECIPES.values())
    art, cal, _, _ = tiny_digits
    model = onnx.load(art / "image.onnx")
    custom = Recipe("w8-custom", "weights only, under another name", "float", onnx=OnnxWeightsOnly(),
                    openvino=NoOpenVinoForm("a test recipe"))
    quant, report = quantize_graph(model, custom, image_calibration(cal.pixels[:16], {"source": "builtin"}))
    ops = [n.op_type for n in quant.graph.node]
    # 13 block linears, the patch and final projections and the positional table
    assert report["recipe"] == "w8-custom" and report["int8_layers"] == 16 and "fused_int8_kernels" not in report
    assert ops.count("DequantizeLinear") == 16 and "QuantizeLinear" not in ops
    with pytest.raises(CalibrationError, match="recipe 'w8-custom' has no OpenVINO form \\(a test recipe\\)"):
        custom.openvino.check(custom)


# -------------------------------------------------------------------------------------- SmoothQuant

def _smooth_images(n, seed):
    r = np.random.default_rng(seed)
    coarse = r.normal(size=(n, 3, 4, 4)).astype(np.float32)
    up = np.kron(coarse, np.ones((1, 1, 8, 8), np.float32))
    return up + 0.1 * r.normal(size=up.shape).astype(np.float32)


def test_smoothquant_is_exact_in_float_and_rescues_int8(tmp_path):
    import onnx
    import onnxruntime as ort

    import edgeclip
    from edgeclip.calibration import qdq, smoothquant

    edgeclip.export(outlier_tiny(), out=tmp_path / "a", validate=True)
    model = onnx.load(tmp_path / "a" / "image.onnx")
    cal = [{"pixel_values": _smooth_images(32, s)} for s in range(4)]
    held = _smooth_images(64, 99)

    def run(m):
        s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return s.run(["image_embeds"], {"pixel_values": held})[0]

    ref = run(model)

    def min_cos(m):
        y = run(m)
        return float(np.min((y * ref).sum(1) / np.linalg.norm(y, axis=1) / np.linalg.norm(ref, axis=1)))

    targets = qdq.find_targets(model)
    pairs = smoothquant.smoothable_pairs(model, targets)
    assert len(pairs) == 6  # every LayerNorm -> linear pair, the pooled last block's Q through its Gather
    plain = min_cos(qdq.quantize(model, targets, qdq.collect_ranges(model, targets, cal, "minmax")))
    smoothed = smoothquant.smooth(model, targets, cal, alpha=0.5)
    np.testing.assert_allclose(run(smoothed), ref, rtol=1e-4, atol=1e-4)  # scale migration is exact
    rescued = min_cos(qdq.quantize(smoothed, targets, qdq.collect_ranges(smoothed, targets, cal, "minmax")))
    assert plain < 0.9, plain            # the outliers wreck plain min-max INT8
    assert rescued > 0.975 and rescued > plain + 0.2, (plain, rescued)


# ---------------------------------------------------------------------------------- accuracy guard

def test_guard_returns_sensitive_layers_to_float_until_it_passes(tmp_path):
    import onnx

    import edgeclip
    from edgeclip.calibration import qdq, smoothquant
    from edgeclip.calibration.guard import guarded_quantize

    edgeclip.export(outlier_tiny(), out=tmp_path / "a")
    model = onnx.load(tmp_path / "a" / "image.onnx")
    cal = [{"pixel_values": _smooth_images(32, s)} for s in range(4)]
    held = {"pixel_values": _smooth_images(64, 99)}
    targets = qdq.find_targets(model)
    for smoothed, m in ((False, model), (True, smoothquant.smooth(model, targets, cal, alpha=0.5))):
        ranges = qdq.collect_ranges(m, targets, cal, "minmax")
        quant, report = guarded_quantize(m, targets, ranges, held, "image_embeds", max_drop=0.005)
        assert report.ok and report.drop <= 0.005     # min cosine >= 0.995 on held-out images
        weight_dq = [n for n in quant.graph.node if n.op_type == "DequantizeLinear" and n.attribute]
        if smoothed and report.drop_all_int8 <= 0.005:
            # SmoothQuant alone meets the bound where the CPU's INT8 GEMM does not saturate its 16-bit
            # sums (VNNI); then the guard must return nothing to float
            assert report.float_layers == [] and len(weight_dq) == len(targets)
            continue
        assert report.drop_all_int8 > 0.005           # without the guard the bound is missed
        assert 0 < len(report.float_layers) < len(targets)
        # the layer returned first is the one that hurts most on its own
        assert report.float_layers[0] == max(report.sensitivity, key=report.sensitivity.get)
        assert len(weight_dq) == len(targets) - len(report.float_layers)
