"""One class-score rule, read from the manifest: top-level "activation" ("softmax" | "sigmoid").

Exports that predate the field get it from the schema as the manifest is loaded (the zero-shot head's
own activation, else the model family); the pipeline, head fitting and the CLI read it from there (or
from the spec's `logit_activation`), never from the model family. A SigLIP-spec random model,
shrunk to seconds, is exported to ONNX for real and classified through the text graph."""
from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("torch")

from edgeclip.builtin import digit_labels, prompt_templates  # noqa: E402
from edgeclip.errors import ManifestError  # noqa: E402
from edgeclip.runtime.manifest import read_manifest  # noqa: E402
from edgeclip.runtime.pipeline import Pipeline  # noqa: E402
from edgeclip.runtime.schema import validate_manifest  # noqa: E402

TINY_DIGITS = {"model": "builtin:tiny", "target": "onnx", "precision": "fp32", "labels": digit_labels()}
SHARED_EXPORTS = {"tiny_art": [TINY_DIGITS]}
LABELS = ["cat", "dog", "car"]


@pytest.fixture(scope="module")
def tiny_art(shared_exports) -> Path:
    return shared_exports.path(TINY_DIGITS)


def _siglip_mini():
    """SigLIP-B-16's spec (sigmoid scores, attention-pool head, bias -10) at toy sizes; the CLIP BPE
    tokenizer stands in for SigLIP's tokenizer.json, which a random model does not have."""
    from edgeclip.models.loaders import load_model
    from edgeclip.specs import get_spec

    spec = get_spec("SigLIP-B-16").replace(
        name="siglip-mini", embed_dim=32, preprocess={"image_size": 32},
        vision={"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2, "mlp_dim": 64},
        text={"width": 32, "layers": 1, "heads": 2, "mlp_dim": 64, "vocab_size": 49408, "context_length": 16,
              "eot_token_id": 49407},
        tokenizer={"kind": "clip_bpe", "context_length": 16})
    return load_model("random:SigLIP-B-16", spec=spec, seed=0)


@pytest.fixture(scope="module")
def siglip_model():
    return _siglip_mini()


@pytest.fixture(scope="module")
def siglip_art(siglip_model, tmp_path_factory) -> Path:
    import edgeclip

    out = tmp_path_factory.mktemp("siglip") / "art"
    edgeclip.export(siglip_model, target="onnx", out=out)
    return out


def _clone(src: Path, dst: Path, manifest: dict) -> Path:
    """`src` with its files hard-linked and `manifest` as its manifest.json (nothing pins the digest)."""
    shutil.copytree(src, dst, copy_function=os.link, ignore=shutil.ignore_patterns("manifest.json"))
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def _raw(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def _logits(p: Pipeline, image, labels) -> np.ndarray:
    emb = p.encode_image([image])
    return p.manifest["logit_scale"] * emb @ p.class_embeddings(labels).T + (p.manifest.get("logit_bias") or 0.0)


# ----------------------------------------------------------------------------------- the SigLIP spec

def test_siglip_spec_model_classifies_with_sigmoid_through_a_real_onnx_artifact(siglip_art):
    p = Pipeline.load(siglip_art)
    assert p.manifest["model"]["family"] == "siglip" and p.manifest["activation"] == "sigmoid"
    pred = p.classify(_image(), labels=LABELS)
    want = 1.0 / (1.0 + np.exp(-_logits(p, _image(), LABELS).astype(np.float64)))[0]
    np.testing.assert_allclose(pred.scores, want, rtol=1e-4, atol=1e-30)
    assert pred.scores.sum() < 0.5  # independent sigmoids (bias -10), not a softmax summing to 1
    assert pred.ood is None         # max-softmax is no out-of-distribution score for sigmoid scores


def test_top_level_activation_overrides_the_family(siglip_art, tmp_path):
    """The pipeline reads the manifest's activation, not the model family: a SigLIP-family artifact
    whose manifest says softmax is scored with softmax."""
    m = _raw(siglip_art)
    m["activation"] = "softmax"
    p = Pipeline.load(_clone(siglip_art, tmp_path / "a", m))
    pred = p.classify(_image(), labels=LABELS)
    z = _logits(p, _image(), LABELS)[0].astype(np.float64)
    np.testing.assert_allclose(pred.scores, np.exp(z - z.max()) / np.exp(z - z.max()).sum(), rtol=1e-4)
    assert abs(pred.scores.sum() - 1.0) < 1e-5 and pred.ood == {"max_softmax": pred.score}


def test_encoders_take_the_activation_from_the_spec_or_the_manifest(siglip_model, siglip_art):
    from edgeclip import heads as H

    assert H.encoder_for(siglip_model).activation == "sigmoid"   # spec.logit_activation
    assert H.encoder_for(str(siglip_art)).activation == "sigmoid"  # the artifact's manifest
    tiny = H.encoder_for("builtin:tiny")
    assert tiny.activation == "softmax"
    assert tiny.templates == prompt_templates()  # the spec's own templates (tiny.json carries them)


def test_cli_zero_shot_head_of_a_sigmoid_artifact_is_sigmoid(siglip_art, tmp_path, capsys):
    from edgeclip.cli import main
    from edgeclip.heads import load_head

    out = tmp_path / "zs.npz"
    assert main(["heads", "fit", str(siglip_art), "--kind", "zero_shot", "--labels", ",".join(LABELS),
                 "--out", str(out), "--json"]) == 0
    capsys.readouterr()
    head = load_head(out)
    assert head.params["sigmoid"] == 1.0 and head.params["bias"] == pytest.approx(-10.0)


# ------------------------------------------------------------------------- the schema's fill-in

def _without_activation(root: Path) -> dict:
    """The manifest as an export before the field wrote it."""
    m = _raw(root)
    m.pop("activation", None)
    return m


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_old_manifest_with_a_head_takes_the_heads_activation(tiny_art, family):
    m = _without_activation(tiny_art)
    m["model"]["family"] = family  # the head decides, whatever the family says
    assert validate_manifest(copy.deepcopy(m))["activation"] == m["head"]["activation"] == "softmax"
    m["head"]["activation"] = "sigmoid"
    assert validate_manifest(m)["activation"] == "sigmoid"


@pytest.mark.parametrize("family,want", [("clip", "softmax"), ("siglip", "sigmoid"), (None, "softmax")])
def test_old_manifest_without_a_head_takes_the_family(tiny_art, family, want):
    m = _without_activation(tiny_art)
    m["head"] = None
    if family is None:
        del m["model"]["family"]
    else:
        m["model"]["family"] = family
    assert validate_manifest(m)["activation"] == want


def test_old_head_without_its_activation_falls_back_to_the_family(tiny_art):
    """Hand-built manifests may leave head.activation out: the family decided then, and still does."""
    m = _without_activation(tiny_art)
    del m["head"]["activation"]
    m["model"]["family"] = "siglip"
    assert validate_manifest(m)["activation"] == "sigmoid"


def test_the_fill_in_is_in_memory_only_and_the_pipeline_uses_it(tiny_art, tmp_path):
    m = _without_activation(tiny_art)
    m["head"]["activation"] = "sigmoid"
    root = _clone(tiny_art, tmp_path / "a", m)
    assert read_manifest(root)["activation"] == "sigmoid"
    assert "activation" not in _raw(root)  # the file (and so the digest) is what the export wrote
    pred = Pipeline.load(root).classify(_image(), labels=None)  # the baked head, scored with sigmoid
    assert pred.ood is None and not abs(pred.scores.sum() - 1.0) < 1e-3


@pytest.mark.parametrize("value", ["relu", None, 1, "Softmax", ["sigmoid"]])
def test_bad_top_level_activation_is_a_manifest_error(tiny_art, tmp_path, value):
    m = _raw(tiny_art)
    m["activation"] = value
    with pytest.raises(ManifestError) as e:
        Pipeline.load(_clone(tiny_art, tmp_path / "a", m))
    assert e.value.field == "activation"


def test_top_level_activation_must_agree_with_the_head(tiny_art, tmp_path):
    m = _raw(tiny_art)
    m["activation"], m["head"]["activation"] = "sigmoid", "softmax"
    with pytest.raises(ManifestError, match="head.activation") as e:
        read_manifest(_clone(tiny_art, tmp_path / "a", m))
    assert e.value.field == "activation"
    m["head"]["activation"] = "sigmoid"  # agreeing: fine
    assert read_manifest(_clone(tiny_art, tmp_path / "b", m))["activation"] == "sigmoid"
