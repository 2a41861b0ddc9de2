"""The MobileCLIP reference fixtures (tests/fixtures/mobileclip/) are whole and self-consistent.

They were made from the real upstream code (timm, open_clip, Apple's ml-mobileclip) by
tests/fixtures/make_mobileclip.py in a throwaway venv; these checks need none of those libraries.
Upstream's reparameterization is exact, so the fused outputs must equal the train-time ones.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures" / "mobileclip"
NAMES = ["openclip_mci0", "openclip_mci1", "openclip_mci3", "openclip_vit_mci", "apple_s0"]
# Where each layout keeps its towers (open_clip custom-text CLIP vs Apple's CLIP).
PREFIXES = {
    "openclip": ("visual.trunk.", "text."),
    "apple": ("image_encoder.model.", "text_encoder."),
}


def _meta(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def _prefixes(name: str):
    return PREFIXES["apple" if name.startswith("apple") else "openclip"]


def test_every_fixture_has_its_four_files_and_the_total_stays_small():
    files = sorted(p.name for p in FIXTURES.iterdir() if p.suffix in (".safetensors", ".json"))
    want = sorted(f"{n}{s}" for n in NAMES
                  for s in (".safetensors", ".reparam.safetensors", ".outputs.safetensors", ".json"))
    assert files == want
    total = sum(p.stat().st_size for p in FIXTURES.iterdir())
    assert total < 8 * 2**20, f"fixtures take {total} bytes"


@pytest.mark.parametrize("name", NAMES)
def test_outputs_match_the_json_and_are_finite(name):
    meta = _meta(name)
    out = load_file(str(FIXTURES / f"{name}.outputs.safetensors"))
    assert sorted(out) == sorted(meta["outputs"])
    for key, info in meta["outputs"].items():
        assert list(out[key].shape) == info["shape"], key
        assert str(out[key].dtype) == f"torch.{info['dtype']}", key
    size, ctx = meta["image_size"], meta["context_length"]
    assert out["pixel_values"].shape == (2, 3, size, size)
    assert out["input_ids"].shape == (2, ctx) and out["input_ids"].dtype == torch.int64
    for key in ("image", "text", "image_reparam", "text_reparam"):
        assert torch.isfinite(out[key]).all(), key


@pytest.mark.parametrize("name", NAMES)
def test_input_ids_follow_clips_tokenizer_rules(name):
    meta = _meta(name)
    ids = load_file(str(FIXTURES / f"{name}.outputs.safetensors"))["input_ids"]
    assert (ids[:, 0] == meta["sot_token"]).all()
    eot_at = ids.argmax(dim=-1)  # upstream's pooling rule: EOT is the largest id in each row
    assert (ids[torch.arange(2), eot_at] == meta["eot_token"]).all()
    assert eot_at[0] != eot_at[1], "the two captions should differ in length"
    assert int(ids.max()) < meta["vocab_size"]
    for row, end in enumerate(eot_at.tolist()):
        assert (ids[row, end + 1:] == meta["pad_token"]).all()


@pytest.mark.parametrize("name", NAMES)
def test_reparameterized_outputs_equal_train_time_outputs(name):
    out = load_file(str(FIXTURES / f"{name}.outputs.safetensors"))
    for tower in ("image", "text"):
        ref, got = out[tower], out[f"{tower}_reparam"]
        bound = 1e-4 * max(1.0, ref.abs().max().item())
        assert (got - ref).abs().max().item() <= bound, tower
        # The fixture must discriminate: two different inputs give clearly different features.
        assert (ref[0] - ref[1]).abs().max().item() > 1e-2, tower


@pytest.mark.parametrize("name", NAMES)
def test_state_dicts_match_the_json_layout_and_widths(name):
    meta = _meta(name)
    vision, text = _prefixes(name)
    for file, layout in ((f"{name}.safetensors", meta["keys"]),
                         (f"{name}.reparam.safetensors", meta["reparam_keys"])):
        with safe_open(str(FIXTURES / file), framework="pt") as f:
            keys = list(f.keys())
            floats = [f.get_slice(k).get_dtype() for k in keys if "num_batches_tracked" not in k]
        assert len(keys) == layout["n_tensors"], file
        assert set(layout["examples"]) <= set(keys), file
        assert all(k == "logit_scale" or k.startswith((vision, text)) for k in keys), file
        assert set(floats) == {"F32"}, file
    reparam = load_file(str(FIXTURES / f"{name}.reparam.safetensors"))
    if meta["reparam_changes_keys"]:
        assert any(".reparam_conv." in k or ".lkb_reparam." in k for k in reparam)
    _check_widths(name, meta, load_file(str(FIXTURES / f"{name}.safetensors")))


def _check_widths(name: str, meta: dict, state: dict) -> None:
    """The json's vocabulary, context and output widths are the ones the tensors carry."""
    dim = meta["outputs"]["image"]["shape"][1]
    if name.startswith("apple"):
        assert state["text_encoder.embedding_layer.weight"].shape[0] == meta["vocab_size"]
        assert state["text_encoder.positional_embedding.pos_embed.pos_embed"].shape[2] == meta["context_length"]
        assert state["text_encoder.projection_layer"].shape[1] == dim
        assert state["image_encoder.model.head.proj"].shape[1] == dim
        return
    cfg = meta["open_clip_config"]
    assert state["text.token_embedding.weight"].shape == (meta["vocab_size"], cfg["text_cfg"]["width"])
    assert state["text.positional_embedding"].shape[0] == meta["context_length"]
    assert state["text.text_projection"].shape == (cfg["text_cfg"]["width"], cfg["embed_dim"])
    head = "visual.trunk.head.weight" if "visual.trunk.head.weight" in state else "visual.trunk.head.fc.weight"
    assert state[head].shape[0] == cfg["embed_dim"] == dim
    blocks = {k.split(".")[3] for k in state if k.startswith("text.transformer.resblocks.")}
    assert len(blocks) == cfg["text_cfg"]["layers"]
    assert meta["text"]["causal"] is not cfg["text_cfg"]["no_causal_mask"]
