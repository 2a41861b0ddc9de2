"""Parity of our model + loaders with transformers' CLIP/SigLIP, via every checkpoint layout."""
from __future__ import annotations

import pickle

import pytest
import torch

import edgeclip
from edgeclip.errors import CheckpointError, EdgeClipError, UnknownModelError, WeightShapeError
from hf_layouts import clip_config, clip_ids, features, hf_to_openai, randomize_

transformers = pytest.importorskip("transformers")

TOL = 1e-4

CLIP_SHAPES = {
    "quick_gelu": dict(act="quick_gelu"),
    "gelu": dict(act="gelu", text_width=48, vision_width=64, vision_heads=4, text_heads=3, layers=3,
                 image=48, patch=16, proj=40),
    # heads = width // 64, OpenAI's convention, so the architecture can be inferred from weights alone
    "openai-heads": dict(act="quick_gelu", text_width=128, vision_width=64, text_heads=2, vision_heads=1,
                         image=32, patch=16, proj=48, layers=2),
    "wide-heads": dict(act="quick_gelu", text_width=32, vision_width=32, text_heads=1, vision_heads=2,
                       image=28, patch=7, proj=16, layers=1),
}


def _hf_clip(tmp_path, seed=0, **shape):
    torch.manual_seed(seed)
    model = randomize_(transformers.CLIPModel(clip_config(**shape)).eval(), seed)
    model.save_pretrained(tmp_path)
    return model


def _inputs(model, n=3, seed=1):
    vc, tc = model.config.vision_config, model.config.text_config
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n, 3, vc.image_size, vc.image_size, generator=g)
    return pixels, clip_ids(n, tc.max_position_embeddings, seed=seed)


def _assert_parity(ours, ref, pixels, ids):
    ref_img, ref_txt = features(ref, pixels, ids)
    with torch.no_grad():
        img, txt = ours.encode_image(pixels), ours.encode_text(ids)
    assert img.shape == ref_img.shape and txt.shape == ref_txt.shape
    err_img, err_txt = (img - ref_img).abs().max().item(), (txt - ref_txt).abs().max().item()
    assert err_img <= TOL, f"image features differ by {err_img:.3g}"
    assert err_txt <= TOL, f"text features differ by {err_txt:.3g}"
    assert ours.logit_scale.item() == pytest.approx(ref.logit_scale.item(), abs=1e-6)


@pytest.mark.parametrize("shape", sorted(CLIP_SHAPES))
def test_hf_clip_safetensors(tmp_path, shape):
    ref = _hf_clip(tmp_path, **CLIP_SHAPES[shape])
    ours = edgeclip.load_model(f"hf:{tmp_path}")
    assert ours.spec.vision.act == CLIP_SHAPES[shape]["act"]
    _assert_parity(ours, ref, *_inputs(ref))


def test_hf_clip_pytorch_bin(tmp_path):
    ref = _hf_clip(tmp_path, seed=3)
    (tmp_path / "model.safetensors").unlink()
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    _assert_parity(edgeclip.load_model(f"hf:{tmp_path}"), ref, *_inputs(ref))


def test_hf_clip_pooled_only_last_block_is_exact(tmp_path):
    ref = _hf_clip(tmp_path, seed=4)
    ours = edgeclip.load_model(f"hf:{tmp_path}").set_pooled_only_last(True)
    _assert_parity(ours, ref, *_inputs(ref))


def test_hf_siglip(tmp_path):
    cfg = transformers.SiglipConfig(
        text_config=dict(vocab_size=500, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, projection_size=40,
                         pad_token_id=1, eos_token_id=1, bos_token_id=None),
        vision_config=dict(hidden_size=40, intermediate_size=80, num_hidden_layers=2, num_attention_heads=5,
                           image_size=32, patch_size=8),
    )
    torch.manual_seed(0)
    ref = randomize_(transformers.SiglipModel(cfg).eval())
    ref.save_pretrained(tmp_path)
    ours = edgeclip.load_model(f"hf:{tmp_path}")
    assert ours.spec.family == "siglip" and ours.spec.vision.pool == "map" and ours.logit_bias is not None
    pixels = torch.randn(2, 3, 32, 32)
    ids = torch.randint(2, 500, (2, 16))
    _assert_parity(ours, ref, pixels, ids)
    with torch.no_grad():
        logits = ref(input_ids=ids, pixel_values=pixels).logits_per_image
        assert (ours(pixels, ids) - logits).abs().max().item() <= TOL


def _openai_file(tmp_path, ref, name="clip.pt"):
    path = tmp_path / name
    torch.save(hf_to_openai(ref.state_dict()), path)
    return path


def test_openai_state_dict_infers_architecture(tmp_path):
    ref = _hf_clip(tmp_path / "hf", **CLIP_SHAPES["openai-heads"])
    ours = edgeclip.load_model(f"openai:{_openai_file(tmp_path, ref)}")
    assert ours.spec.name == "custom"  # small test shapes match no shipped spec: inferred from weights
    assert (ours.spec.vision.layers, ours.spec.text.width, ours.spec.text.heads) == (2, 128, 2)
    _assert_parity(ours, ref, *_inputs(ref))


@pytest.mark.parametrize("shape", ["quick_gelu", "wide-heads"])
def test_openai_state_dict_with_spec(tmp_path, shape):
    """Head counts are not in the weights: a spec supplies them when they break OpenAI's convention."""
    ref = _hf_clip(tmp_path / "hf", **CLIP_SHAPES[shape])
    spec = edgeclip.load_model(f"hf:{tmp_path / 'hf'}").spec
    ours = edgeclip.load_model(f"openai:{_openai_file(tmp_path, ref)}", spec=spec)
    _assert_parity(ours, ref, *_inputs(ref))


def _scripted(sd: dict) -> torch.jit.ScriptModule:
    """A TorchScript archive whose parameters carry OpenAI's names, like OpenAI's released .pt files."""
    class Node(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    root = Node()
    for key, value in sd.items():
        *path, leaf = key.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, Node())
            mod = getattr(mod, part)
        mod.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False))
    for attr in ("input_resolution", "context_length", "vocab_size"):
        root.register_buffer(attr, torch.tensor(0))
    return torch.jit.script(root)


def test_openai_torchscript_archive(tmp_path):
    ref = _hf_clip(tmp_path / "hf", seed=5, **CLIP_SHAPES["openai-heads"])
    path = tmp_path / "ViT-custom.pt"
    torch.jit.save(_scripted(hf_to_openai(ref.state_dict())), str(path))
    _assert_parity(edgeclip.load_model(f"openai:{path}"), ref, *_inputs(ref))


@pytest.mark.parametrize("loader", ["openai", "open_clip"])
def test_long_clip_checkpoint(tmp_path, loader):
    ref = _hf_clip(tmp_path / "hf", seed=6, **{**CLIP_SHAPES["openai-heads"], "context": 248})
    sd = hf_to_openai(ref.state_dict())
    # Long-CLIP stores CLIP's first 20 positions and a residual table for the rest; each table's
    # unused rows hold junk that must not reach the model.
    pos = sd["positional_embedding"]
    junk = torch.randn_like(pos) * 10
    sd["positional_embedding"] = torch.cat([pos[:20], junk[20:]])
    sd["positional_embedding_res"] = torch.cat([junk[:20], pos[20:]])
    path = tmp_path / "longclip-custom.pt"
    torch.save(sd, path)
    if loader == "openai":
        ours = edgeclip.load_model(f"openai:{path}")
    else:  # open_clip: the arch's spec supplies what weights cannot say (here: QuickGELU, head counts)
        spec = edgeclip.load_model(f"hf:{tmp_path / 'hf'}").spec
        ours = edgeclip.load_model("open_clip:Long-CLIP-custom-quickgelu", checkpoint=path, spec=spec)
    assert ours.spec.text.context_length == 248
    pixels, _ = _inputs(ref)
    ids = clip_ids(3, 248, seed=2)
    ids[0, 200] = 49407  # a long caption: pooled past position 77
    ids[0, 201:] = 0
    _assert_parity(ours, ref, pixels, ids)


@pytest.mark.parametrize("shape,arch", [("quick_gelu", "custom-quickgelu"), ("gelu", "custom")])
def test_open_clip_state_dict(tmp_path, shape, arch):
    ref = _hf_clip(tmp_path / "hf", **CLIP_SHAPES[shape])
    spec = edgeclip.load_model(f"hf:{tmp_path / 'hf'}").spec.to_dict()
    spec["vision"]["act"] = spec["text"]["act"] = "quick_gelu" if shape == "gelu" else "gelu"  # wrong on purpose
    # open_clip training checkpoints wrap the weights and prefix them with DDP's 'module.'
    ckpt = {"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in hf_to_openai(ref.state_dict()).items()}}
    torch.save(ckpt, tmp_path / "epoch_3.pt")
    ours = edgeclip.load_model(f"open_clip:{arch}", checkpoint=tmp_path / "epoch_3.pt", spec=spec)
    assert ours.spec.vision.act == CLIP_SHAPES[shape]["act"]  # the arch name decides, as in open_clip
    _assert_parity(ours, ref, *_inputs(ref))


def test_random_spec_is_deterministic():
    a = edgeclip.load_model("random:tiny", seed=3)
    b = edgeclip.load_model("random:tiny", seed=3)
    c = edgeclip.load_model("random:tiny", seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["visual.pos_embed"], sc["visual.pos_embed"])


def test_export_helpers_do_not_change_results_across_attention_impls():
    m = edgeclip.load_model("random:tiny", seed=0)
    pixels = torch.randn(2, 3, 32, 32)
    ids = clip_ids(2, 77)
    with torch.no_grad():
        ref = m.encode_image(pixels), m.encode_text(ids)
        m.set_attention("sdpa")
        got = m.encode_image(pixels), m.encode_text(ids)
    for r, g in zip(ref, got):
        assert (r - g).abs().max().item() <= 1e-5


# ------------------------------------------------------------------------------------------ errors

def test_unknown_uri_lists_known_models():
    with pytest.raises(UnknownModelError) as e:
        edgeclip.load_model("ViT-Z-99")
    msg = str(e.value)
    assert "random:SPEC" in msg and "ViT-B-32" in msg and "builtin:tiny" in msg


def test_unknown_spec_and_builtin():
    with pytest.raises(UnknownModelError, match="ViT-B-16"):
        edgeclip.load_model("random:ViT-Q-1")
    with pytest.raises(UnknownModelError, match="builtin:tiny"):
        edgeclip.load_model("builtin:huge")


def test_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        edgeclip.load_model(f"openai:{tmp_path / 'nope.pt'}")
    with pytest.raises(CheckpointError, match="config.json"):
        edgeclip.load_model(f"hf:{tmp_path}")
    with pytest.raises(CheckpointError, match="checkpoint="):
        edgeclip.load_model("open_clip:ViT-B-32")


def test_wrong_shaped_weights_name_the_key(tmp_path):
    ref = _hf_clip(tmp_path / "hf")
    path = _openai_file(tmp_path, ref)
    with pytest.raises(WeightShapeError) as e:
        edgeclip.load_model(f"openai:{path}", spec="ViT-B-32")
    msg = str(e.value)
    assert "visual.conv1.weight" in msg and "vision.width=48" in msg and "768" in msg

    sd = hf_to_openai(ref.state_dict())
    sd["transformer.resblocks.1.mlp.c_fc.weight"] = sd["transformer.resblocks.1.mlp.c_fc.weight"][:-1]
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(WeightShapeError, match=r"'transformer\.resblocks\.1\.mlp\.c_fc\.weight' has shape \(127, 64\)"):
        edgeclip.load_model(f"openai:{tmp_path / 'bad.pt'}")


def test_unsafe_pickle_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"visual.proj": Payload()}, f)
    with pytest.raises(CheckpointError, match="weights-only"):
        edgeclip.load_model(f"openai:{path}")


def test_corrupt_safetensors(tmp_path):
    ref = _hf_clip(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="corrupt"):
        edgeclip.load_model(f"hf:{tmp_path}")
    del ref


def test_errors_are_edgeclip_errors():
    for cls in (UnknownModelError, CheckpointError, WeightShapeError):
        assert issubclass(cls, EdgeClipError)
