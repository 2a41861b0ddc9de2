"""MobileCLIP's RepMixer text tower ("repmixer", MobileCLIP-S0) and timm's ViT with the convolutional
stem ("vit-mci", MobileCLIP-B / MobileCLIP2-B; the patch-stem form for MobileCLIP2-L-14), checked
against outputs of the real upstream classes (tests/fixtures/mobileclip: Apple's mobileclip.clip.CLIP
and open_clip's CustomTextCLIP over timm's vit_base_mci_224, reduced sizes; see each fixture's .json)."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

import edgeclip  # noqa: E402
from edgeclip.errors import SpecError  # noqa: E402
from edgeclip.exporter.graphs import trim_supported  # noqa: E402
from edgeclip.models import mobileclip_text, vit_mci  # noqa: E402,F401  (registers the kinds)
from edgeclip.models.clip import ClipModel, TextTower, VisionTower  # noqa: E402
from edgeclip.models.convert import from_openai  # noqa: E402
from edgeclip.models.loaders import read_state_dict  # noqa: E402
from edgeclip.models.mobileclip_text import AppleAttention, RepMixerTextTower  # noqa: E402
from edgeclip.models.vit_mci import MciViTTower, TimmAttention  # noqa: E402
from edgeclip.specs import ModelSpec, TextSpec, VisionSpec, get_spec  # noqa: E402

FIX = Path(__file__).parent / "fixtures" / "mobileclip"


def fixture(name: str):
    """(reduced config, train-time state dict, reparameterized state dict, reference outputs)."""
    cfg = json.loads((FIX / f"{name}.json").read_text())
    return (cfg, read_state_dict(FIX / f"{name}.safetensors"), read_state_dict(FIX / f"{name}.reparam.safetensors"),
            read_state_dict(FIX / f"{name}.outputs.safetensors"))


def under(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def close(got, want, what: str) -> None:
    err = ((got - want).abs() / want.abs().clamp(min=1.0)).max().item()
    assert err <= 1e-4, f"{what}: max error {err:.3g} relative to max(1, |ref|)"


# ------------------------------------------------------------------------- S0 text: Apple's classes

def s0_text_spec(cfg: dict, reparameterized: bool = False) -> TextSpec:
    """Our spec for Apple's text_cfg (variant "mct": a RepMixer block, the transformer layers, a RepMixer
    block; FFN width rounded up to a multiple of 16 as Apple does)."""
    t = cfg["apple_config"]["text_cfg"]
    n = t["n_transformer_layers"]
    return TextSpec(
        context_length=t["context_length"], vocab_size=t["vocab_size"], width=t["dim"], layers=n + 2,
        heads=t["n_heads_per_layer"], mlp_dim=int(math.ceil(t["dim"] * t["ffn_multiplier_per_layer"] / 16) * 16),
        act="gelu", causal=t["causal_masking"], pool="eot", eot_token_id=None, kind="repmixer",
        config={"layer_types": ["repmixer"] + ["attention"] * n + ["repmixer"],
                "kernel_size": cfg["text"]["repmixer_kernel_size"], "norm": t["norm_layer"],
                "reparameterized": reparameterized})


@pytest.fixture(scope="module")
def s0():
    return fixture("apple_s0")


def s0_tower(s0, reparameterized: bool = False) -> RepMixerTextTower:
    cfg, train, reparam, _ = s0
    tower = RepMixerTextTower(s0_text_spec(cfg, reparameterized), cfg["apple_config"]["embed_dim"]).eval()
    tower.load_state_dict(under(reparam if reparameterized else train, "text_encoder."), strict=True)
    return tower


def test_s0_text_matches_apple_train_time(s0):
    tower, out = s0_tower(s0), s0[3]
    with torch.no_grad():
        close(tower(out["input_ids"]), out["text"], "train-time text")


def test_s0_text_reparameterize_folds_exactly_into_apple_layout(s0):
    tower, reparam, out = s0_tower(s0), s0[2], s0[3]
    assert tower.reparameterize() == 2 and tower.reparameterize() == 0  # both RepMixer blocks, once
    assert sorted(tower.state_dict()) == sorted(under(reparam, "text_encoder."))
    with torch.no_grad():
        close(tower(out["input_ids"]), out["text_reparam"], "after reparameterize()")
        close(tower(out["input_ids"]), out["text"], "after reparameterize(), vs train-time")
        tower.prepare_export(pooled_only_last=True)  # also folds the ConvFFN batch norms
        close(tower(out["input_ids"]), out["text"], "after prepare_export")
    assert tower.export_report()["reparameterized"] == {"repmixer": 0, "batchnorm": 2}
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in tower.modules())


def test_s0_text_reparameterized_form_loads_apple_reparam_state_dict(s0):
    tower, out = s0_tower(s0, reparameterized=True), s0[3]
    with torch.no_grad():
        close(tower(out["input_ids"]), out["text_reparam"], "reparameterized form")


def test_s0_text_attention_swaps_through_set_attention(s0):
    cfg, train, _, out = s0
    spec = get_spec("tiny").to_dict()
    spec.update(name="s0-text", embed_dim=cfg["apple_config"]["embed_dim"],
                text=dataclasses.asdict(s0_text_spec(cfg)))
    model = ClipModel(ModelSpec.from_dict(spec)).eval()
    model.text.load_state_dict(under(train, "text_encoder."))
    model.set_attention("sdpa")
    attn = [m for m in model.text.modules() if isinstance(m, AppleAttention)]
    assert len(attn) == 1 and attn[0].impl == "sdpa" and model.text.attention_layout() == (1, 2)
    with torch.no_grad():
        close(model.encode_text(out["input_ids"]), out["text"], "sdpa attention")


# ------------------------------------------------------------- vit-mci: open_clip over timm's trunk

def vit_mci_spec(cfg: dict) -> VisionSpec:
    trunk = cfg["upstream"]["trunk_constructor"]
    stem, kw = trunk["conv_stem"], trunk["kwargs"]
    assert stem["kernel_size"] == stem["stride"] and stem["padding"] == 0  # what the conv stem supports
    return VisionSpec(
        image_size=kw["img_size"], patch_size=math.prod(stem["stride"]), width=kw["embed_dim"],
        layers=kw["depth"], heads=kw["num_heads"], mlp_dim=4 * kw["embed_dim"], act="gelu", ln_eps=1e-6,
        pre_norm=False, kind="vit-mci",
        config={"stem": "conv", "stem_channels": stem["channels"], "stem_kernels": stem["kernel_size"],
                "no_embed_class": kw["no_embed_class"]})


@pytest.fixture(scope="module")
def vit():
    return fixture("openclip_vit_mci")


def vit_tower(vit, sd=None) -> MciViTTower:
    cfg, train = vit[0], vit[1]
    tower = MciViTTower(vit_mci_spec(cfg), cfg["open_clip_config"]["embed_dim"]).eval()
    tower.load_state_dict(under(sd if sd is not None else train, "visual.trunk."), strict=True)
    return tower


def test_vit_mci_matches_open_clip_train_time(vit):
    tower, out = vit_tower(vit), vit[3]
    with torch.no_grad():
        close(tower(out["pixel_values"]), out["image"], "train-time image")


def test_vit_mci_reparameterize_folds_the_stem_exactly(vit):
    tower, out = vit_tower(vit), vit[3]
    tower.reparameterize()
    assert tower.reparameterized == {"batchnorm": 2}
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in tower.modules())
    with torch.no_grad():
        close(tower(out["pixel_values"]), out["image_reparam"], "after reparameterize()")
        tower.prepare_export(pooled_only_last=True)  # last block computes the class token only
        close(tower(out["pixel_values"]), out["image"], "after prepare_export")


def test_vit_mci_loads_timm_reparameterized_state_dict(vit):
    # timm's reparameterize_model leaves this trunk as it is: the same keys load into the same form
    tower, out = vit_tower(vit, sd=vit[2]), vit[3]
    with torch.no_grad():
        close(tower(out["pixel_values"]), out["image_reparam"], "timm-reparameterized weights")


def test_vit_mci_attention_is_swappable_and_named_like_timm(vit):
    tower, out = vit_tower(vit), vit[3]
    attn = [m for m in tower.modules() if isinstance(m, TimmAttention)]
    assert len(attn) == 2 and all(a.out is a.proj for a in attn)
    for a in attn:
        a.impl = "sdpa"
    with torch.no_grad():
        close(tower(out["pixel_values"]), out["image"], "sdpa attention")
    assert "blocks.0.norm1.weight" in tower.state_dict() and tower.quantizable("blocks.1.mlp.fc1")
    assert not tower.quantizable("head") and tower.attention_layout() == (2, 2)


def test_mobileclip_b_text_settings_match_open_clip(vit):
    # the standard transformer tower with MobileCLIP-B's text settings (GELU, causal, argmax pooling)
    cfg, train, _, out = vit
    t = cfg["open_clip_config"]["text_cfg"]
    b = get_spec("MobileCLIP-B").text
    spec = TextSpec(**{**b.__dict__, "context_length": t["context_length"], "vocab_size": t["vocab_size"],
                       "width": t["width"], "heads": t["heads"], "layers": t["layers"], "mlp_dim": 4 * t["width"]})
    tower = TextTower(spec, cfg["open_clip_config"]["embed_dim"]).eval()
    ours, _ = from_openai(under(train, "text."))
    tower.load_state_dict(under(ours, "text."), strict=True)
    with torch.no_grad():
        close(tower(out["input_ids"]), out["text"], "MobileCLIP-B-style text tower")


def test_open_clip_loader_puts_a_mobileclip_b_checkpoint_on_these_towers(vit):
    cfg, _, _, out = vit
    v, t = vit_mci_spec(cfg), cfg["open_clip_config"]["text_cfg"]
    spec = get_spec("MobileCLIP-B").replace(
        embed_dim=cfg["open_clip_config"]["embed_dim"],
        vision={k: getattr(v, k) for k in ("image_size", "width", "layers", "heads", "mlp_dim", "config")},
        text={"context_length": t["context_length"], "vocab_size": t["vocab_size"], "width": t["width"],
              "heads": t["heads"], "layers": t["layers"], "mlp_dim": 4 * t["width"]})
    model = edgeclip.load_model("open_clip:MobileCLIP-B", checkpoint=FIX / "openclip_vit_mci.safetensors", spec=spec)
    with torch.no_grad():
        close(model.encode_image(out["pixel_values"]), out["image"], "open_clip:MobileCLIP-B image")
        close(model.encode_text(out["input_ids"]), out["text"], "open_clip:MobileCLIP-B text")


def test_patch_stem_form_is_the_plain_vit():
    # MobileCLIP2-L-14's trunk (patch conv, pre-norm, positions over the class token too) is our "vit"
    # tower's math plus the head bias: with that bias zero, the two agree weight for weight
    base = dict(image_size=28, patch_size=14, width=32, layers=2, heads=2, mlp_dim=128, act="gelu", pre_norm=True)
    vit = VisionTower(VisionSpec(**base), 24).eval()
    torch.manual_seed(0)
    for p in vit.parameters():
        torch.nn.init.normal_(p, std=0.2)
    mci = MciViTTower(VisionSpec(**base, kind="vit-mci", config={"stem": "patch"}), 24).eval()
    names = {"patch_embed.proj.weight": "patch_embed.weight", "cls_token": "class_embedding", "pos_embed": "pos_embed",
             "norm_pre.weight": "ln_pre.weight", "norm_pre.bias": "ln_pre.bias", "norm.weight": "ln_post.weight",
             "norm.bias": "ln_post.bias", "head.weight": "proj.weight"}
    src = vit.state_dict()
    sd = {}
    for k, v in mci.state_dict().items():
        theirs = names.get(k) or k.replace("norm1", "ln_1").replace("norm2", "ln_2").replace("attn.proj", "attn.out")
        sd[k] = torch.zeros_like(v) if k == "head.bias" else src[theirs].reshape(v.shape)
    mci.load_state_dict(sd, strict=True)
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        close(mci(pixels), vit(pixels), "patch-stem vit-mci vs vit")
        mci.prefer_gemm()
        close(mci(pixels), vit(pixels), "patch stem as a GEMM")


# ------------------------------------------------------------------------------------ specs, errors

def _text_with(**config):
    base = {"layer_types": ["repmixer", "attention"], **config}
    return TextSpec(context_length=8, vocab_size=64, width=16, heads=2, mlp_dim=32, act="gelu", causal=False,
                    kind="repmixer", config=base)


@pytest.mark.parametrize("config, field", [
    ({"layer_types": ["repmixer", "conv"]}, "layer_types"),
    ({"kernel_size": 4}, "kernel_size"),
    ({"norm": "rms"}, "norm"),
    ({"convffn_ratio": 0}, "convffn_ratio"),
    ({"pos_embedding": "yes"}, "pos_embedding"),
    ({"no_such_setting": 1}, "no_such_setting"),
])
def test_invalid_repmixer_config_is_a_spec_error_naming_the_field(config, field):
    with pytest.raises(SpecError, match=field):
        RepMixerTextTower(_text_with(**config), 8)


def test_repmixer_tower_checks_its_text_fields():
    with pytest.raises(SpecError, match=r"text\.causal"):
        RepMixerTextTower(TextSpec(**{**_text_with().__dict__, "causal": True}), 8)
    with pytest.raises(SpecError, match=r"text\.layers"):
        RepMixerTextTower(TextSpec(**{**_text_with().__dict__, "layers": 5}), 8)


@pytest.mark.parametrize("config, field", [
    ({"stem_channels": [8, 8, 16]}, "stem_channels"),
    ({"stem_kernels": [4, 2, 4]}, "stem_kernels"),
    ({"stem": "resnet"}, "stem"),
    ({"no_embed_class": 1}, "no_embed_class"),
    ({"extra": True}, "extra"),
])
def test_invalid_vit_mci_config_is_a_spec_error_naming_the_field(config, field):
    base = {"stem": "conv", "stem_channels": [8, 8, 32], "stem_kernels": [4, 2, 2], **config}
    spec = VisionSpec(image_size=64, patch_size=16, width=32, layers=1, heads=2, mlp_dim=64, act="gelu",
                      kind="vit-mci", config=base)
    with pytest.raises(SpecError, match=field):
        MciViTTower(spec, 8)


def test_specs_carry_the_upstream_settings():
    b, b2, l14, s0 = (get_spec(n) for n in ("MobileCLIP-B", "MobileCLIP2-B", "MobileCLIP2-L-14", "MobileCLIP-S0"))
    assert get_spec("mobileclip_b").name == "MobileCLIP-B" and get_spec("MobileCLIP2-L/14").name == "MobileCLIP2-L-14"
    assert b.text.causal and b2.text.causal and not l14.text.causal and not s0.text.causal  # no_causal_mask
    assert trim_supported(b) and not trim_supported(l14) and not trim_supported(s0)
    for spec in (b, b2):  # open_clip _mccfg: mean 0, std 1, bilinear, shortest side
        p = spec.preprocess_config()
        assert (p["image_size"], p["mean"], p["std"], p["interpolation"], p["resize"]) == \
            (224, [0.0] * 3, [1.0] * 3, "bilinear", "shortest")
    assert l14.preprocess_config()["interpolation"] == "bicubic" and l14.preprocess_config()["mean"][0] == 0.48145466
    assert s0.preprocess_config()["image_size"] == 256 and s0.vision.kind == "mci" and s0.text.kind == "repmixer"


def test_random_full_size_mobileclip_b_and_s0_text_give_finite_features():
    model = edgeclip.load_model("random:MobileCLIP-B")
    assert isinstance(model.visual, MciViTTower) and model.visual.pos_embed.shape == (1, 196, 768)
    ids = torch.zeros(2, 77, dtype=torch.long)
    ids[:, 0], ids[0, 5], ids[1, 76] = 49406, 49407, 49407
    with torch.no_grad():
        img = model.encode_image(torch.rand(1, 3, 224, 224))
        txt = model.encode_text(ids)
    assert img.shape == (1, 512) and txt.shape == (2, 512) and torch.isfinite(img).all() and torch.isfinite(txt).all()
    s0 = get_spec("MobileCLIP-S0")
    text = RepMixerTextTower(s0.text, s0.embed_dim).eval()
    assert text.attention_layout() == (4, 8) and text.input_decl(trim=True)["input_ids"]["shape"] == ["batch", 77]
    with torch.no_grad():
        feats = text(ids)
        text.prepare_export(pooled_only_last=True)
        close(text(ids), feats, "full-size S0 text, folded")
    assert feats.shape == (2, 512) and torch.isfinite(feats).all() and feats.abs().max() > 0


def test_both_towers_export_to_onnx_folded_and_within_tolerance(tmp_path):
    pytest.importorskip("onnxruntime")
    d = get_spec("tiny").to_dict()
    d.update(name="mobileclip-towers", embed_dim=48, preprocess={**d["preprocess"], "image_size": 64},
             vision={"image_size": 64, "patch_size": 16, "width": 32, "layers": 2, "heads": 2, "mlp_dim": 128,
                     "act": "gelu", "ln_eps": 1e-6, "pre_norm": False, "kind": "vit-mci",
                     "config": {"stem": "conv", "stem_channels": [8, 8, 32], "stem_kernels": [4, 2, 2],
                                "no_embed_class": True}},
             text={"context_length": 77, "vocab_size": 49408, "width": 32, "layers": 3, "heads": 2, "mlp_dim": 128,
                   "act": "gelu", "causal": False, "eot_token_id": None, "kind": "repmixer",
                   "config": {"layer_types": ["repmixer", "attention", "repmixer"]}})
    model = ClipModel(ModelSpec.from_dict(d)).init_random(seed=1).eval()
    with torch.no_grad():  # batch-norm statistics that are not the identity, so folding them matters
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.normal_(0, 0.1)
            bn.running_var.uniform_(0.5, 2.0)
    art = edgeclip.export(model, target="onnx", out=tmp_path / "onnx", labels=["a", "b"])
    assert all(r["ok"] for r in art.fidelity.values()), art.fidelity
    towers = art.manifest["towers"]
    assert towers["image"]["reparameterized"] == {"batchnorm": 2}, towers
    assert towers["text"]["reparameterized"] == {"repmixer": 2, "batchnorm": 2}, towers
    assert art.manifest["text"]["trim"] is False
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the caller's model is untouched
