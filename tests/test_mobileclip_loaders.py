"""open_clip MobileCLIP / MobileCLIP2 checkpoints through the real loader (`open_clip:ARCH`,
checkpoint=FILE), against the outputs the upstream classes computed (tests/fixtures/mobileclip,
made by tests/fixtures/make_mobileclip.py in a throwaway environment with timm and open_clip)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
st = pytest.importorskip("safetensors.torch")

import edgeclip  # noqa: E402
from edgeclip.errors import CheckpointError, WeightShapeError  # noqa: E402
from edgeclip.models.mci import mci_config_from_timm  # noqa: E402
from edgeclip.specs import get_spec  # noqa: E402

FIX = Path(__file__).parent / "fixtures" / "mobileclip"
MCI = ["openclip_mci0", "openclip_mci1", "openclip_mci3"]


def meta(name: str) -> dict:
    return json.loads((FIX / f"{name}.json").read_text())


def reduced_spec(name: str):
    """The release spec the fixture was shrunk from, with the fixture's sizes (what a user passes as
    spec= for a checkpoint of their own size)."""
    m = meta(name)
    m["release_shape"] = m["release_shape"].split(" ")[0]  # "MobileCLIP-S1 (S2: mci2)"
    ctor = m["upstream"]["trunk_constructor"]
    text = m["open_clip_config"]["text_cfg"]
    size = m["image_size"]
    return get_spec(m["release_shape"]).replace(
        name=f"{m['release_shape']}-fixture", embed_dim=m["open_clip_config"]["embed_dim"],
        vision={"image_size": size, "config": mci_config_from_timm(ctor["kwargs"], ctor["variant"])},
        text={"context_length": text["context_length"], "vocab_size": text["vocab_size"], "width": text["width"],
              "heads": text["heads"], "layers": text["layers"], "mlp_dim": 4 * text["width"],
              "causal": not text.get("no_causal_mask", False)},
        preprocess={"image_size": size}, tokenizer={"context_length": text["context_length"]})


def close(got, want) -> bool:
    return float(np.abs(got - want).max()) <= 1e-4 * max(1.0, float(np.abs(want).max()))


def features(model, out: dict):
    with torch.no_grad():
        return (model.encode_image(out["pixel_values"]).numpy(), model.encode_text(out["input_ids"]).numpy())


@pytest.mark.parametrize("name", MCI)
@pytest.mark.parametrize("form", ["", ".reparam"])
def test_open_clip_checkpoints_load_and_match_upstream(name, form):
    out = st.load_file(str(FIX / f"{name}.outputs.safetensors"))
    arch = meta(name)["release_shape"].split(" ")[0]
    model = edgeclip.load_model(f"open_clip:{arch}", checkpoint=str(FIX / f"{name}{form}.safetensors"),
                                spec=reduced_spec(name))
    img, txt = features(model, out)
    suffix = "_reparam" if form else ""
    assert close(img, out["image" + suffix].numpy()) and close(txt, out["text" + suffix].numpy())
    assert bool(model.visual.config.reparameterized) == bool(form)  # the key set decides the form


def test_a_ddp_prefixed_checkpoint_loads(tmp_path):
    name = "openclip_mci1"
    sd = st.load_file(str(FIX / f"{name}.safetensors"))
    path = tmp_path / "ddp.safetensors"
    st.save_file({f"module.{k}": v for k, v in sd.items()}, str(path))
    out = st.load_file(str(FIX / f"{name}.outputs.safetensors"))
    model = edgeclip.load_model("open_clip:MobileCLIP-S1", checkpoint=str(path), spec=reduced_spec(name))
    assert close(features(model, out)[0], out["image"].numpy())


def test_the_wrong_arch_names_the_key_and_the_expected_shape():
    with pytest.raises(CheckpointError, match=r"visual\.stages\.\d+\.blocks\.\d+\.[\w.]+.*spec"):
        edgeclip.load_model("open_clip:MobileCLIP-S1", checkpoint=str(FIX / "openclip_mci0.safetensors"))
    wider = reduced_spec("openclip_mci1").replace(embed_dim=64)
    with pytest.raises(WeightShapeError, match=r"checkpoint key 'visual\.trunk\.head\.fc\.(weight|bias)' has shape "
                                               r"\(48(, 128)?,?\) but .* expects \(64(, 128)?,?\)"):
        edgeclip.load_model("open_clip:MobileCLIP-S1", checkpoint=str(FIX / "openclip_mci1.safetensors"), spec=wider)


def test_a_vit_name_for_a_mobileclip_checkpoint_is_a_typed_error():
    with pytest.raises(CheckpointError):
        edgeclip.load_model("open_clip:ViT-B-32", checkpoint=str(FIX / "openclip_mci0.safetensors"))


def test_an_apple_checkpoint_passed_as_open_clip_names_its_key():
    with pytest.raises(CheckpointError, match=r"'(image|text)_encoder\.[^']*'.*Apple.*apple:MobileCLIP-S0"):
        edgeclip.load_model("open_clip:MobileCLIP-S0", checkpoint=str(FIX / "apple_s0.safetensors"))


def test_a_truncated_checkpoint_is_a_checkpoint_error(tmp_path):
    data = (FIX / "openclip_mci0.safetensors").read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        edgeclip.load_model("open_clip:MobileCLIP2-S0", checkpoint=str(path), spec=reduced_spec("openclip_mci0"))


def test_the_caller_model_stays_train_time_after_an_export(tmp_path):
    """Reparameterization runs on the export copy only; the export matches the train-time reference."""
    name = "openclip_mci0"
    model = edgeclip.load_model("open_clip:MobileCLIP2-S0", checkpoint=str(FIX / f"{name}.safetensors"),
                                spec=reduced_spec(name))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    art = edgeclip.export(model, target="onnx", out=tmp_path / "a")
    assert set(model.state_dict()) == set(before)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert art.manifest["towers"]["image"]["reparameterized"]["batchnorms"] > 0
    assert all(r["ok"] for r in art.fidelity.values())


# ------------------------------------------------------------------------------- Apple's layout

def apple_spec():
    """MobileCLIP-S0 at the Apple fixture's sizes (Apple's FastViT kwargs on timm's mci0 preset)."""
    m = meta("apple_s0")
    kwargs = {k: v for k, v in m["upstream"]["trunk_constructor"]["kwargs"].items()
              if k not in ("projection_dim", "downsamples")}  # Apple downsamples after a stage, timm before
    kwargs["pos_embs"] = [None if p is None else {**p, "partial": "timm.models.fastvit.RepConditionalPosEnc"}
                          for p in kwargs["pos_embs"]]  # Apple's RepCPE is timm's class under another name
    t = m["apple_config"]["text_cfg"]
    n = t["n_transformer_layers"]
    return get_spec("MobileCLIP-S0").replace(
        name="MobileCLIP-S0-fixture", embed_dim=m["apple_config"]["embed_dim"],
        vision={"image_size": m["image_size"], "config": mci_config_from_timm(kwargs, "fastvit_mci0")},
        text={"context_length": t["context_length"], "vocab_size": t["vocab_size"], "width": t["dim"],
              "heads": t["n_heads_per_layer"], "layers": n + 2, "mlp_dim": 4 * t["dim"],
              "config": {**get_spec("MobileCLIP-S0").text.config, "layer_types": ["repmixer"] + ["attention"] * n
                         + ["repmixer"]}},
        preprocess={"image_size": m["image_size"]}, tokenizer={"context_length": t["context_length"]})


@pytest.mark.parametrize("form", ["", ".reparam"])
def test_apple_checkpoints_load_and_match_apples_outputs(form):
    out = st.load_file(str(FIX / "apple_s0.outputs.safetensors"))
    model = edgeclip.load_model("apple:MobileCLIP-S0", checkpoint=str(FIX / f"apple_s0{form}.safetensors"),
                                spec=apple_spec())
    img, txt = features(model, out)
    suffix = "_reparam" if form else ""
    assert close(img, out["image" + suffix].numpy()) and close(txt, out["text" + suffix].numpy())


def test_an_open_clip_checkpoint_passed_as_apple_is_a_typed_error():
    with pytest.raises(CheckpointError, match=r"no image_encoder\.model\.\* keys.*open_clip:ARCH"):
        edgeclip.load_model("apple:MobileCLIP-S0", checkpoint=str(FIX / "openclip_mci0.safetensors"),
                            spec=apple_spec())
    with pytest.raises(CheckpointError, match="needs checkpoint="):
        edgeclip.load_model("apple:MobileCLIP-S0")


# ----------------------------------------------------------------- open_clip folders (hf:DIR)

# open_clip's own model configs (src/open_clip/model_configs/*.json), as its Hub folders carry them
S1_CFG = {"embed_dim": 512, "vision_cfg": {"timm_model_name": "fastvit_mci1", "timm_model_pretrained": False,
                                           "timm_pool": "avg", "timm_proj": None, "image_size": 256},
          "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12,
                       "no_causal_mask": True}, "custom_text": True}
S2_CFG = {**S1_CFG, "vision_cfg": {**S1_CFG["vision_cfg"], "timm_model_name": "fastvit_mci2"}}
B_CFG = {"embed_dim": 512, "vision_cfg": {"timm_model_name": "vit_base_mci_224", "timm_pool": "token",
                                          "timm_proj": None, "image_size": 224},
         "text_cfg": {**S1_CFG["text_cfg"], "no_causal_mask": False}, "custom_text": True}


@pytest.mark.parametrize("cfg, folder, want", [
    (S1_CFG, "MobileCLIP-S1-OpenCLIP", "MobileCLIP-S1"),
    (S2_CFG, "MobileCLIP2-S2-OpenCLIP", "MobileCLIP2-S2"),   # one architecture, two names: the folder says
    (S2_CFG, "MobileCLIP-S2-OpenCLIP", "MobileCLIP-S2"),
    (B_CFG, "MobileCLIP-B-OpenCLIP", "MobileCLIP-B"),
])
def test_an_open_clip_model_config_names_its_spec(tmp_path, cfg, folder, want):
    from edgeclip.models.loaders import spec_from_open_clip_config

    assert spec_from_open_clip_config(cfg, tmp_path / folder / "open_clip_config.json").name == want


def test_an_unknown_trunk_names_the_field(tmp_path):
    from edgeclip.models.loaders import spec_from_open_clip_config

    bad = {**S1_CFG, "vision_cfg": {**S1_CFG["vision_cfg"], "timm_model_name": "resnet50"}}
    with pytest.raises(CheckpointError, match=r"timm_model_name 'resnet50'"):
        spec_from_open_clip_config(bad, tmp_path / "open_clip_config.json")


def test_an_open_clip_hub_folder_loads_with_its_preprocessing(tmp_path):
    import shutil

    name = "openclip_mci0"
    d = tmp_path / "MobileCLIP2-S0-OpenCLIP"
    d.mkdir()
    shutil.copy(FIX / f"{name}.safetensors", d / "open_clip_model.safetensors")
    pre = {"size": [80, 80], "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "interpolation": "bicubic",
           "resize_mode": "shortest"}
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": meta(name)["open_clip_config"],
                                                         "preprocess_cfg": pre}))
    out = st.load_file(str(FIX / f"{name}.outputs.safetensors"))
    model = edgeclip.load_model(f"hf:{d}", spec=reduced_spec(name))
    img, txt = features(model, out)
    assert close(img, out["image"].numpy()) and close(txt, out["text"].numpy())
    p = model.spec.preprocess_config()
    assert p["mean"] == pre["mean"] and p["std"] == pre["std"] and p["interpolation"] == "bicubic"
    (d / "open_clip_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="open_clip_model.safetensors"):
        edgeclip.load_model(f"hf:{d}", spec=reduced_spec(name))


@pytest.mark.parametrize("target", ["onnx", "ort-mobile", "openvino"])
def test_an_upstream_checkpoint_exports_and_runs_like_upstream(target, tmp_path):
    """open_clip's checkpoint -> our artifact -> the runtime: the features open_clip computed."""
    if target == "openvino":
        pytest.importorskip("openvino")
    from edgeclip.runtime import Pipeline

    name = "openclip_mci1"
    model = edgeclip.load_model("open_clip:MobileCLIP-S1", checkpoint=str(FIX / f"{name}.safetensors"),
                                spec=reduced_spec(name))
    art = edgeclip.export(model, target=target, out=tmp_path / target)
    out = st.load_file(str(FIX / f"{name}.outputs.safetensors"))
    pipe = Pipeline.load(art.path, **({"inference_precision": "f32"} if target == "openvino" else {}))
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    # the phone graphs' GELU is sigmoid-polynomial (NNAPI has no Erf): within 2.7e-4 per activation
    tol = 2e-3 if target == "ort-mobile" else 1e-5
    assert np.abs(pipe.encode_image(out["pixel_values"].numpy()) - unit(out["image"].numpy())).max() <= tol
    assert np.abs(pipe.encode_text(out["input_ids"].numpy()) - unit(out["text"].numpy())).max() <= tol
