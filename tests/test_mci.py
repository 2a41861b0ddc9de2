"""MobileCLIP's MCi image tower ("mci"): parity with the real timm/open_clip classes (reduced fixtures in
tests/fixtures/mobileclip/, made by tests/fixtures/make_mobileclip.py), in train-time form, after our
reparameterization, and from upstream's reparameterized state dict; exactness of our folding on a
full-size random MCi1; the tower's hooks; config errors."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
st = pytest.importorskip("safetensors.torch")
import torch.nn as nn  # noqa: E402

import edgeclip  # noqa: E402
from edgeclip.errors import InputError, SpecError  # noqa: E402
from edgeclip.models.clip import ClipModel  # noqa: E402
from edgeclip.models.mci import (  # noqa: E402
    LargeKernelConv, MciAttention, MciTower, MobileOne, RepCPE, RepMixer, mci_config_from_timm,
)
from edgeclip.specs import VisionSpec, get_spec  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "mobileclip"
NAMES = ("openclip_mci0", "openclip_mci1", "openclip_mci3")
TRUNK = "visual.trunk."


def rel_err(got, want) -> float:
    """max |got - want| / max(1, |want|), elementwise."""
    return ((got - want).abs() / want.abs().clamp(min=1.0)).max().item()


def load_fixture(name: str) -> dict:
    meta = json.loads((FIXTURES / f"{name}.json").read_text())
    return {"meta": meta,
            "train": st.load_file(str(FIXTURES / f"{name}.safetensors")),
            "reparam": st.load_file(str(FIXTURES / f"{name}.reparam.safetensors")),
            "out": st.load_file(str(FIXTURES / f"{name}.outputs.safetensors"))}


@pytest.fixture(scope="module", params=NAMES)
def fx(request):
    return load_fixture(request.param)


def vision_spec(meta: dict, **config) -> VisionSpec:
    ctor = meta["upstream"]["trunk_constructor"]
    cfg = mci_config_from_timm(ctor["kwargs"], ctor["variant"])
    return VisionSpec(image_size=meta["image_size"], kind="mci", config={**cfg, **config})


def trunk(sd: dict) -> dict:
    """open_clip's `visual.trunk.<key>` is our tower's `<key>`."""
    return {k[len(TRUNK):]: v for k, v in sd.items() if k.startswith(TRUNK)}


def tower_from(fx, form: str = "train") -> MciTower:
    t = MciTower(vision_spec(fx["meta"], reparameterized=form == "reparam"), fx["meta"]["image"]["output_dim"])
    t.load_state_dict(trunk(fx[form]), strict=True)  # every key of upstream's, none of ours left over
    return t.eval()


def encode(tower, pixels):
    with torch.no_grad():
        return tower(pixels)


def assert_fully_folded(tower: MciTower) -> None:
    mods = list(tower.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in mods)
    for m in mods:
        if isinstance(m, (MobileOne, LargeKernelConv, RepMixer, RepCPE)):
            assert m.reparam_conv is not None
            assert not [c for c in m.children() if c is not m.reparam_conv and not isinstance(c, nn.Identity)
                        and type(c).__name__ not in ("SqueezeExcite", "GELU")], type(m).__name__


# ------------------------------------------------------------------------- parity with upstream

def test_train_time_tower_matches_open_clip(fx):
    out = fx["out"]
    got = encode(tower_from(fx), out["pixel_values"])
    assert got.shape == out["image"].shape
    assert rel_err(got, out["image"]) <= 1e-4


def test_our_reparameterization_matches_open_clip_and_folds_everything(fx):
    out = fx["out"]
    tower = tower_from(fx)
    folded = copy.deepcopy(tower)
    record = folded.reparameterize()
    assert rel_err(encode(folded, out["pixel_values"]), out["image"]) <= 1e-4
    assert_fully_folded(folded)
    assert record == folded.reparameterized and record["blocks"] > 0 and record["batchnorms"] > 0
    # the BatchNorms timm keeps after its own reparameterization are gone too
    assert record["batchnorms"] == sum(isinstance(m, nn.BatchNorm2d) for m in tower.modules())
    assert tower.reparameterized is None and any(isinstance(m, nn.BatchNorm2d) for m in tower.modules())


def test_upstream_reparameterized_state_dict_loads_into_the_folded_form(fx):
    out = fx["out"]
    tower = tower_from(fx, "reparam")
    got = encode(tower, out["pixel_values"])
    assert rel_err(got, out["image_reparam"]) <= 1e-4 and rel_err(got, out["image"]) <= 1e-4
    record = tower.reparameterize()  # what timm leaves: ConvMlp and attention BatchNorms, layer scales
    assert record["blocks"] == 0 and record["layer_scales"] > 0
    assert rel_err(encode(tower, out["pixel_values"]), out["image"]) <= 1e-4
    assert_fully_folded(tower)


def _mobileclip_spec(meta: dict):
    """MobileCLIP-S1's spec at the fixture's sizes: the text settings (bidirectional, GELU, argmax
    pooling, no projection bias) are the shipped spec's own."""
    t = meta["open_clip_config"]["text_cfg"]
    base = get_spec("MobileCLIP-S1")
    d = base.to_dict()
    d["embed_dim"] = meta["open_clip_config"]["embed_dim"]
    d["vision"] = {"image_size": meta["image_size"], "kind": "mci", "config": vision_spec(meta).config}
    d["text"].update(context_length=t["context_length"], vocab_size=t["vocab_size"], width=t["width"],
                     heads=t["heads"], layers=t["layers"], mlp_dim=4 * t["width"])
    d["tokenizer"]["context_length"] = t["context_length"]
    d["preprocess"]["image_size"] = meta["image_size"]
    return get_spec(d)


def _text_state(sd: dict) -> dict:
    """open_clip's text tower keys onto ours (the test's own map: the real loader lives elsewhere)."""
    out = {"token_embed.weight": sd["text.token_embedding.weight"], "pos_embed": sd["text.positional_embedding"],
           "ln_final.weight": sd["text.ln_final.weight"], "ln_final.bias": sd["text.ln_final.bias"],
           "proj.weight": sd["text.text_projection"].t()}
    names = {"ln_1": "ln_1", "ln_2": "ln_2", "attn.in_proj_weight": "attn.qkv.weight",
             "attn.in_proj_bias": "attn.qkv.bias", "attn.out_proj": "attn.out", "mlp.c_fc": "mlp.fc1",
             "mlp.c_proj": "mlp.fc2"}
    for k, v in sd.items():
        if k.startswith("text.transformer.resblocks."):
            i, rest = k[len("text.transformer.resblocks."):].split(".", 1)
            for theirs, ours in names.items():
                if rest.startswith(theirs):
                    out[f"blocks.{i}.{ours}{rest[len(theirs):]}"] = v
    return out


def test_the_mobileclip_spec_reproduces_open_clip_image_and_text_features(fx):
    out, meta = fx["out"], fx["meta"]
    model = ClipModel(_mobileclip_spec(meta)).eval()
    model.visual.load_state_dict(trunk(fx["train"]), strict=True)
    model.text.load_state_dict(_text_state(fx["train"]), strict=True)
    with torch.no_grad():
        img = model.encode_image(out["pixel_values"])
        txt = model.encode_text(out["input_ids"])
        model.set_attention("sdpa")  # the fused kernel the OpenVINO and Core ML targets pick
        img_sdpa = model.encode_image(out["pixel_values"])
    assert rel_err(img, out["image"]) <= 1e-4 and rel_err(txt, out["text"]) <= 1e-4
    assert rel_err(img_sdpa, out["image"]) <= 1e-4
    attn = [m for m in model.visual.modules() if isinstance(m, MciAttention)]
    assert attn and all(m.impl == "sdpa" for m in attn)  # set_attention reaches the MCi attention


def test_onnx_export_reparameterizes_fuses_attention_and_matches(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    fx = load_fixture("openclip_mci0")
    model = ClipModel(_mobileclip_spec(fx["meta"])).eval()
    model.visual.load_state_dict(trunk(fx["train"]), strict=True)
    model.text.load_state_dict(_text_state(fx["train"]), strict=True)
    art = edgeclip.export(model, target="onnx", out=tmp_path / "a")
    assert all(r["ok"] for r in art.fidelity.values())
    record = art.manifest["towers"]["image"]["reparameterized"]
    assert record["blocks"] > 0 and record["batchnorms"] > 0
    assert model.visual.reparameterized is None  # the caller's model keeps its train-time form
    ops = {n.op_type for n in onnx.load(str(art.path / "image.onnx")).graph.node}
    assert "BatchNormalization" not in ops
    assert art.manifest["fusions"]["image"]["attention"] == model.visual.attention_layout()[0]
    from edgeclip.runtime import Pipeline

    got = Pipeline.load(art.path).encode_image(fx["out"]["pixel_values"].numpy())
    want = torch.nn.functional.normalize(fx["out"]["image"], dim=-1).numpy()
    assert abs(got - want).max() <= 1e-5


# ------------------------------------------------------------------------- full-size random model

@pytest.fixture(scope="module")
def random_s1():
    model = edgeclip.load_model("random:MobileCLIP-S1", seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # statistics and layer scales that are not the identity, so every fold matters
        for m in model.visual.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.8 + 0.6)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.05)
        for name, p in model.visual.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.15 + 0.05)
    return model


def test_random_mobileclip_s1_builds_with_open_clips_feature_count(random_s1):
    spec = random_s1.spec
    assert isinstance(random_s1.visual, MciTower) and spec.embed_dim == 512
    pixels = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = edgeclip.load_model("random:mobileclip_s1", seed=0).encode_image(pixels)
    assert feats.shape == (2, 512) and torch.isfinite(feats).all()
    assert 1e-3 < feats.std().item() < 10  # timm's init values keep activations bounded over 40 blocks
    assert random_s1.visual.head.fc.out_features == 512 and random_s1.visual.config.final_features == 1024


def test_reparameterize_on_full_size_mci1_is_exact(random_s1):
    tower = random_s1.visual
    pixels = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    want = encode(tower, pixels)
    folded = copy.deepcopy(tower)
    folded.prepare_export(pooled_only_last=True)  # the export path's call: it reparameterizes
    assert rel_err(encode(folded, pixels), want) <= 1e-5
    assert_fully_folded(folded)
    # blocks: 3 stem + 3 patch embeddings x 2 + 36 RepMixers + 1 RepCPE + final_conv; batchnorms: every
    # one of the train-time tower's; layer scales: the 36 RepMixer blocks' and 2 per attention block
    # (a RepMixer's own layer scale goes with its block)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in tower.modules())
    assert folded.reparameterized == {"blocks": 47, "batchnorms": n_bn, "layer_scales": 44} and n_bn == 208


def test_prefer_depthwise_tiles_the_multiplier_convs_exactly(random_s1):
    # OpenVINO's rewrite: the stage entries' 7x7 convs and final_conv (two outputs per input channel)
    # become depthwise convs over a tiled input, their consumers' channels permuted to match
    from edgeclip.models.mci import TiledDepthwise

    tower = copy.deepcopy(random_s1.visual)
    tower.prefer_depthwise()
    assert tower.tiled_convs == 0  # unfolded: nothing to tile
    tower.prepare_export(pooled_only_last=True)
    pixels = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(3))
    want = encode(tower, pixels)
    tower.prefer_depthwise()
    tiled = [m for m in tower.modules() if isinstance(m, TiledDepthwise)]
    grouped = [m for m in tower.modules() if type(m) is nn.Conv2d and 1 < m.groups and m.out_channels != m.groups]
    assert tower.tiled_convs == len(tiled) == 4 and not grouped  # 3 stage entries + final_conv
    assert all(m.groups == m.out_channels for m in tiled)
    assert rel_err(encode(tower, pixels), want) <= 1e-6
    assert tower.export_report()["tiled_multiplier_convs"] == 4
    tower.prefer_depthwise()  # a second call finds nothing left
    assert tower.tiled_convs == 0 and rel_err(encode(tower, pixels), want) <= 1e-6


# ------------------------------------------------------------------------- hooks and errors

def test_tower_hooks(random_s1):
    t = random_s1.visual
    assert t.input_decl() == {"pixel_values": {"dtype": "float32", "shape": ["batch", 3, 256, 256]}}
    assert t.attention_layout() == (4, 16)  # MCi1: 4 attention blocks of width 512, head dim 32
    assert t.quantizable("stages.2.blocks.3.mlp.fc1") and t.quantizable("stages.3.blocks.0.token_mixer.qkv")
    assert t.quantizable("final_conv.reparam_conv")
    assert not t.quantizable("stem.0.reparam_conv") and not t.quantizable("head.fc")
    assert not t.quantizable("stages.2.downsample.proj.0.se.fc1")
    with pytest.raises(InputError, match=r"\(N, 3, 256, 256\)"):
        t(torch.zeros(1, 3, 224, 224))


def test_the_mobileclip_specs_build():
    for name, dim, attention in (("MobileCLIP-S2", 512, (4, 20)), ("MobileCLIP2-S0", 512, (2, 16)),
                                 ("MobileCLIP2-S2", 512, (4, 20)), ("MobileCLIP2-S3", 768, (6, (24,) * 4 + (48,) * 2)),
                                 ("MobileCLIP2-S4", 768, (8, (32,) * 4 + (64,) * 4))):  # heads per op differ
        spec = get_spec(name)
        assert spec.family == "mobileclip" and spec.embed_dim == dim and not spec.text.causal
        tower = MciTower(spec.vision, spec.embed_dim)
        assert tower.attention_layout() == attention
    s3, s1 = get_spec("mobileclip2_s3"), get_spec("MobileCLIP-S1")
    assert s3.preprocess["mean"][0] == pytest.approx(0.48145466) and s1.preprocess["std"] == [1.0, 1.0, 1.0]
    assert s1.preprocess_config()["interpolation"] == "bilinear" and s1.preprocess_config()["image_size"] == 256


@pytest.mark.parametrize("change, field", [
    ({"tokens": 3}, "tokens"),
    ({"token_mixers": ["repmixer", "conv", "repmixer", "attention"]}, "token_mixers"),
    ({"mlp_ratios": [3, 3, 3]}, "mlp_ratios"),
    ({"pos_embs": [None, None, None, "sincos"]}, "pos_embs"),
    ({"norm": "groupnorm"}, "norm"),
    ({"embed_dims": [64, 128, 256, 500]}, "embed_dims"),
    ({"lkc_use_act": "yes"}, "lkc_use_act"),
    ({"layers": []}, "layers"),
    ({"repmixer_kernel": 4}, "repmixer_kernel"),
    ({"embed_dims": [64, 96, 256, 512]}, "embed_dims"),
    ({"cls_ratio": 1.5}, "cls_ratio"),
])
def test_an_invalid_config_field_is_a_spec_error_naming_it(change, field):
    spec = get_spec("MobileCLIP-S1")
    bad = VisionSpec(image_size=256, kind="mci", config={**spec.vision.config, **change})
    with pytest.raises(SpecError, match=rf"vision\.config\.{field}\b"):
        MciTower(bad, 512)


def test_a_missing_required_field_is_named():
    with pytest.raises(SpecError, match=r"vision\.config\.embed_dims is required"):
        MciTower(VisionSpec(image_size=64, kind="mci", config={"layers": [1], "mlp_ratios": [3],
                                                               "token_mixers": ["repmixer"]}), 8)
