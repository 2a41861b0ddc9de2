"""The tower seam: a new image tower kind is one class registered from this module, named by a spec's
`vision.kind`, and it exports and runs through the ordinary targets with nothing else changed."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402

import edgeclip  # noqa: E402
from edgeclip.errors import EdgeClipError, SpecError  # noqa: E402
from edgeclip.models.clip import ClipModel  # noqa: E402
from edgeclip.models.towers import Tower, register_tower, tower_kinds  # noqa: E402
from edgeclip.specs import get_spec  # noqa: E402


@register_tower("toy-conv", "vision")
class ToyConvTower(Tower):
    """A small convolutional image tower (stem, depthwise-separable residual blocks with batch norm,
    global average pool, projection): nothing a ViT target rewrite knows about."""

    def __init__(self, spec, embed_dim: int):
        super().__init__()
        self.spec, w = spec, spec.width
        self.stem = nn.Conv2d(3, w, 3, stride=2, padding=1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(w, w, 3, padding=1, groups=w), nn.BatchNorm2d(w),
                                                  nn.GELU(), nn.Conv2d(w, w, 1)) for _ in range(spec.layers))
        self.proj = nn.Linear(w, embed_dim)

    def forward(self, pixels):
        x = self.stem(pixels)
        for blk in self.blocks:
            x = x + blk(x)
        return self.proj(x.mean(dim=(2, 3)))

    def input_decl(self, trim: bool = False) -> dict:
        s = self.spec.image_size
        return {"pixel_values": {"dtype": "float32", "shape": ["batch", 3, s, s]}}


def toy_model() -> ClipModel:
    spec = get_spec("tiny").replace(name="tiny-conv", vision={"kind": "toy-conv", "layers": 2})
    m = ClipModel(spec).init_random(seed=3).eval()
    with torch.no_grad():  # batch-norm statistics that are not the identity, so folding them matters
        for bn in (b[1] for b in m.visual.blocks):
            bn.running_mean.normal_(0, 0.1)
            bn.running_var.uniform_(0.5, 2.0)
    return m


def test_the_spec_kind_picks_the_registered_class():
    m = toy_model()
    assert isinstance(m.visual, ToyConvTower) and "toy-conv" in tower_kinds("vision")
    assert type(ClipModel(get_spec("tiny")).visual).kind == "vit"


def test_an_unknown_tower_kind_is_a_spec_error_naming_the_known_ones():
    with pytest.raises(SpecError, match=r"unknown vision tower kind 'no-such'.*vit"):
        ClipModel(get_spec("tiny").replace(vision={"kind": "no-such"}))


@pytest.mark.parametrize("target", ["onnx", "openvino"])
def test_a_new_tower_exports_and_runs_like_the_reference(target, tmp_path):
    if target == "openvino":
        pytest.importorskip("openvino")
    model = toy_model()
    art = edgeclip.export(model, target=target, out=tmp_path / target, labels=["zero", "one", "two"])
    assert art.manifest["model"]["spec"]["vision"]["kind"] == "toy-conv"
    assert all(r["ok"] for r in art.fidelity.values())
    from edgeclip.runtime import Pipeline

    pipe = Pipeline.load(art.path, **({"inference_precision": "f32"} if target == "openvino" else {}))
    pixels = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want = model.encode_image(torch.from_numpy(pixels)).numpy()
    want /= np.linalg.norm(want, axis=-1, keepdims=True)
    assert np.abs(pipe.encode_image(pixels) - want).max() <= 1e-4  # preprocessed pixels go in as they are
    assert pipe.classify(pixels[:1])[0].label in ("zero", "one", "two")


def test_a_target_needing_a_rewrite_the_tower_lacks_says_so(tmp_path):
    pytest.importorskip("coremltools")
    with pytest.raises(EdgeClipError, match="no Neural Engine layout.*--min-ios 18"):
        edgeclip.export(toy_model(), target="coreml", min_ios=16, out=tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_int8_may_quantize_only_the_layers_a_tower_names():
    model = toy_model()
    assert not any(model.quantizable(f"visual.{n}") for n, _ in model.visual.named_modules())
    assert model.quantizable("text.blocks.0.mlp.fc1") and not model.quantizable("text.proj")


def test_the_manifest_records_each_tower_and_why_a_non_causal_text_is_not_trimmed(tmp_path):
    spec = get_spec("tiny").replace(name="tiny-bidirectional", text={"causal": False})
    art = edgeclip.export(ClipModel(spec).init_random(seed=1), target="onnx", out=tmp_path / "a")
    m = art.manifest
    assert m["towers"] == {"image": {"kind": "vit"}, "text": {"kind": "transformer"}}
    assert m["text"]["trim"] is False and "not causal" in m["text"]["trim_note"]
    assert m["graphs"]["text"]["inputs"]["input_ids"]["shape"] == ["batch", spec.text.context_length]
    causal = edgeclip.export(ClipModel(get_spec("tiny")).init_random(seed=1), target="onnx", out=tmp_path / "b")
    assert causal.manifest["text"]["trim"] is True and "trim_note" not in causal.manifest["text"]
