"""`edgeclip bench --baselines` on MobileCLIP-shaped models: the baseline builder (bench/baselines.py) on a
reduced MCi image tower (MCi1's block types at 64 px, 2-1-1-2 layers), real ONNX Runtime sessions.

A tower with train-time branches gets the plain export as loaded *and* the export after upstream's
`reparameterize_model` (the blocks' own `reparameterize()`, BatchNorms and layer scales left alone);
both match the torch model; the folded graph holds fewer convolutions, the caller's model keeps its
branches, and the OpenVINO + NNCF baseline reads the reparameterized export."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

import edgeclip  # noqa: E402
from edgeclip.bench import baselines  # noqa: E402
from edgeclip.bench.baselines import upstream_reparameterized  # noqa: E402
from edgeclip.models.clip import ClipModel  # noqa: E402
from edgeclip.models.inputs import reference_inputs  # noqa: E402
from edgeclip.models.mci import LayerScale2d  # noqa: E402
from edgeclip.specs import get_spec  # noqa: E402

ORT_NAMES = ["plain-onnx-fp32", "plain-onnx-int8-dynamic", "plain-onnx-reparam-fp32",
             "plain-onnx-reparam-int8-dynamic"]


def reduced_mobileclip() -> ClipModel:
    """MobileCLIP-S1's spec with MCi1's stage types at a test's size; BatchNorm statistics and layer
    scales far from their init, so a fold that went wrong would show in the outputs."""
    d = get_spec("MobileCLIP-S1").to_dict()
    d.update(name="MobileCLIP-S1-reduced", embed_dim=48)
    d["vision"].update(image_size=64, config={**d["vision"]["config"], "layers": [2, 1, 1, 2],
                                              "embed_dims": [16, 16, 32, 64], "mlp_ratios": [3, 3, 3, 1.5]})
    d["text"].update(context_length=16, width=32, heads=2, layers=1, mlp_dim=128)
    d["tokenizer"]["context_length"] = 16
    d["preprocess"]["image_size"] = 64
    model = ClipModel(get_spec(d)).init_random(seed=3).eval()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for m in model.visual.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
            elif isinstance(m, LayerScale2d):
                m.gamma.copy_(torch.rand(m.gamma.shape, generator=g) * 0.5 + 0.25)
    return model


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-mobileclip")
    model = reduced_mobileclip()
    ex = reference_inputs(model.spec, n=4, seed=11)
    pixels, ids = ex["pixel_values"], ex["input_ids"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    logs = []
    variants = baselines.build(model, root / "cache", str(root), pixels, ids, openvino=baselines.openvino_available(),
                               openvino_fp32=True, key="k1", log=logs.append)
    return model, root, pixels, ids, before, {v.name: v for v in variants}, logs


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _convs(path) -> int:
    return sum(n.op_type == "Conv" for n in onnx.load(str(path)).graph.node)


def test_mci_towers_get_the_plain_and_the_reparameterized_baselines_matching_torch(built):
    model, root, pixels, ids, _, variants, _ = built
    assert [n for n in variants if n in ORT_NAMES] == ORT_NAMES
    cache = root / "cache"
    with torch.no_grad():
        want = model.encode_image(torch.from_numpy(pixels)).numpy()
    for name in ("plain-onnx-fp32", "plain-onnx-reparam-fp32"):
        got = _session(cache / variants[name].graphs["image"]).run(["image_embeds"], {"pixel_values": pixels})[0]
        assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max()), name
    for name in ("plain-onnx-int8-dynamic", "plain-onnx-reparam-int8-dynamic"):
        got = _session(cache / variants[name].graphs["image"]).run(["image_embeds"], {"pixel_values": pixels})[0]
        cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
        assert got.shape == want.shape and cos.min() > 0.9, (name, cos)
    # the text tower has no branches: the reparameterized baseline reuses the plain text graph
    assert variants["plain-onnx-reparam-fp32"].graphs["text"] == variants["plain-onnx-fp32"].graphs["text"]
    assert all(v.size_bytes > 0 for v in variants.values())


def test_the_reparameterized_baseline_folds_the_branches_as_upstream_does(built):
    model, root, _, _, before, variants, _ = built
    folded, changed = upstream_reparameterized(model)
    assert changed == ["image"]
    keys = set(folded.visual.state_dict())
    assert any(".reparam_conv." in k for k in keys) and not any(".conv_kxk." in k for k in keys)
    # what upstream leaves and our export folds: the ConvMlp BatchNorms and the layer scales
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.visual.modules())
    assert any(isinstance(m, LayerScale2d) for m in folded.visual.modules())
    cache = root / "cache"
    n_folded = sum(isinstance(m, torch.nn.Conv2d) for m in folded.visual.modules())
    assert _convs(cache / variants["plain-onnx-reparam-fp32"].graphs["image"]) == n_folded
    assert _convs(cache / variants["plain-onnx-fp32"].graphs["image"]) > n_folded
    after = model.state_dict()  # the caller's model: untouched, train-time branches and all
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_towers_without_branches_get_no_reparameterized_baseline():
    assert upstream_reparameterized(edgeclip.load_model("random:tiny", seed=0)) == (None, [])


def test_baselines_are_reused_for_the_same_key_and_nncf_reads_the_reparameterized_export(built):
    model, root, pixels, ids, _, variants, logs = built
    assert not any("reused" in line for line in logs)
    again = baselines.build(model, root / "cache", str(root), pixels, ids, openvino=baselines.openvino_available(),
                            openvino_fp32=True, key="k1", log=logs.append)
    assert [v.name for v in again] == list(variants) and "reused" in logs[-1]
    if not baselines.openvino_available():
        pytest.skip("openvino/nncf not installed: the ONNX Runtime baselines were checked")
    ov = pytest.importorskip("openvino")
    nncf_v = variants["plain-openvino-nncf-int8"]
    assert "reparameterized" in nncf_v.description and "reparameterized" in variants["plain-openvino-fp32"].description
    fp32 = ov.Core().compile_model(str(root / "cache" / variants["plain-openvino-fp32"].graphs["image"]), "CPU",
                                   {"INFERENCE_PRECISION_HINT": "f32"})
    with torch.no_grad():
        want = model.encode_image(torch.from_numpy(pixels)).numpy()
    got = np.asarray(fp32.create_infer_request().infer([pixels])[fp32.output(0)])
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
