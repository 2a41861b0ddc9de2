"""Core ML exports of the MobileCLIP towers on every deployment target: the MCi image tower (MCi3/4's
shape: two attention stages with different head counts, LayerNorm2d pre-norm) and MobileCLIP-S0's
RepMixer text tower, at reduced sizes. iOS 18 gets fused SDPA; iOS 16 the Neural Engine layout
(`rewrite_for_ane`: attention as 1x1 convolutions and per-head split einsum on (B, C, 1, S)), checked
in torch against the float32 reference and in the converted programs' ops; compressed exports have
their convolution weights compressed and mapped back for the torch simulation."""
from __future__ import annotations

import copy
import json
from collections import Counter

import pytest

torch = pytest.importorskip("torch")
ct = pytest.importorskip("coremltools")
import torch.nn as nn  # noqa: E402

from edgeclip.exporter.formats.coreml import (  # noqa: E402
    COMPRESSED_OPS, compress_weights, convert, load_decompressed, program_ops,
)
from edgeclip.exporter.graphs import ImageGraph, reference_inputs  # noqa: E402
from edgeclip.kernels.ane import LayerNormANE  # noqa: E402
from edgeclip.models.clip import Attention, ClipModel  # noqa: E402
from edgeclip.models.mci import LayerNorm2d, MciTower  # noqa: E402
from edgeclip.models.mobileclip_text import AneTextLayers, RepMixerTextTower  # noqa: E402
from edgeclip.specs import get_spec  # noqa: E402

# MCi3/4's layout at 128 px: attention stages of width 64 and 128 (head dim 32: 2 and 4 heads) on 4x4
# and 2x2 maps. Layer scales of 0.05, not timm's 1e-5: the blocks must move the features, or a broken
# attention would still pass every check (without the attention the features' cosine is 0.75); larger
# ones make a random network amplify 4-bit weight noise past what a trained one does (0.5: cosine 0.87
# after palettize4, 0.05: 0.98).
MCI_CONFIG = {"layers": [1, 1, 1, 2, 1], "embed_dims": [16, 32, 64, 64, 128], "mlp_ratios": [2] * 5,
              "token_mixers": ["repmixer"] * 3 + ["attention"] * 2, "pos_embs": [None, None, None, "rcpe", "rcpe"],
              "downsamples": [False] + [True] * 4, "norm": "layernorm2d", "norm_eps": 1e-5, "lkc_use_act": True,
              "stem_scale_branch": False, "layer_scale_init": 0.05}
MCI_SOFTMAX = 2 * 2 + 1 * 4  # two 2-head blocks, one 4-head block
# MCi0's layout (one attention stage, BatchNorm pre-norm) with S0's text tower: RepMixer, two attention
# layers, RepMixer
S0_VISION = {"layers": [1, 1, 1, 1], "embed_dims": [16, 32, 64, 64], "mlp_ratios": [2] * 4,
             "token_mixers": ["repmixer"] * 3 + ["attention"], "pos_embs": [None, None, None, "rcpe"],
             "se_downsamples": [False, False, True, True], "lkc_use_act": True, "layer_scale_init": 0.05}
S0_TEXT_LAYERS = ["repmixer", "attention", "attention", "repmixer"]


def mci_spec():
    """MobileCLIP-S1's spec with an MCi3-shaped image tower and a 2-layer text transformer."""
    return get_spec("MobileCLIP-S1").replace(
        name="mci-coreml-test", embed_dim=32, preprocess={"image_size": 128},
        vision={"image_size": 128, "config": MCI_CONFIG},
        text={"width": 64, "layers": 2, "heads": 2, "mlp_dim": 128})


def s0_spec():
    """MobileCLIP-S0's spec, reduced: MCi0-shaped image tower, RepMixer/attention text tower."""
    return get_spec("MobileCLIP-S0").replace(
        name="s0-coreml-test", embed_dim=32, preprocess={"image_size": 64},
        vision={"image_size": 64, "config": S0_VISION},
        text={"width": 64, "layers": 4, "heads": 2, "mlp_dim": 128,
              "config": {**get_spec("MobileCLIP-S0").text.config, "layer_types": S0_TEXT_LAYERS,
                         "layer_scale_init": 0.05}})


def _spec_files(shared) -> dict:
    def write(root):
        out = {}
        for name, spec in (("mci", mci_spec()), ("s0", s0_spec())):
            # conftest names an export's folder after the URI's text past its last ':', which must not be
            # an absolute path: the colon in the file name keeps it to the file's own name
            path = root / f"spec:{name}.json"
            path.write_text(json.dumps(spec.to_dict()))
            out[name] = f"random:{path}"
        return out

    return shared.once("coreml-mobileclip-specs", write)


CASES = {"mci-ios18": ("mci", dict(min_ios=18)), "mci-ios16": ("mci", dict(min_ios=16)),
         "s0-ios18": ("s0", dict(min_ios=18)), "s0-ios16": ("s0", dict(min_ios=16)),
         "mci-w8": ("mci", dict(min_ios=16, compress="w8")),
         "mci-palettize4": ("mci", dict(min_ios=18, compress="palettize4"))}


def _exports(shared) -> dict:
    uris = _spec_files(shared)
    return {name: {"model": uris[model], "target": "coreml", **kw}
            for name, (model, kw) in CASES.items()}


# converted in the background (conftest.py), two at a time, before the first test asks
SHARED_EXPORTS = {"arts": lambda shared: list(_exports(shared).values())}


@pytest.fixture(scope="module")
def arts(shared_exports):
    """The artifact of a case, by name (each test waits only for the exports it reads)."""
    specs = _exports(shared_exports)
    return lambda name: shared_exports.get(specs[name])


def _program(path):
    """(op type counts, names of the weights conv ops read from a compressed-weight op) of a saved package."""
    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    block = next(iter(spec.mlProgram.functions["main"].block_specializations.values()))
    ops, compressed, conv_weights = Counter(), set(), set()
    for op in block.operations:
        ops[op.type] += 1
        if op.type in COMPRESSED_OPS:
            compressed.update(o.name for o in op.outputs)
        if op.type == "conv":
            conv_weights.update(a.name for a in op.inputs["weight"].arguments)
    return ops, conv_weights & compressed


def _fidelity_ok(art):
    assert art.fidelity and all(r["ok"] for r in art.fidelity.values()), art.fidelity


# ------------------------------------------------------------------------------ the exports

@pytest.mark.parametrize("model", ["mci", "s0"])
def test_ios18_exports_fuse_attention_and_pass_validation(arts, model):
    art = arts(f"{model}-ios18")
    _fidelity_ok(art)
    graphs = art.manifest["coreml"]["graphs"]
    image_ops = 3 if model == "mci" else 1
    text_ops = 2 if model == "mci" else S0_TEXT_LAYERS.count("attention")
    assert graphs["image"]["fused_attention"] == image_ops and graphs["text"]["fused_attention"] == text_ops
    assert graphs["image"]["softmax"] == graphs["text"]["softmax"] == 0
    assert art.manifest["towers"]["text"]["kind"] == ("transformer" if model == "mci" else "repmixer")


@pytest.mark.parametrize("model, image_softmax, text_softmax", [
    ("mci", MCI_SOFTMAX, 2 * 2),
    ("s0", 2, S0_TEXT_LAYERS.count("attention") * 2),
])
def test_ios16_exports_run_the_ane_layout_and_pass_validation(arts, model, image_softmax, text_softmax):
    art = arts(f"{model}-ios16")
    _fidelity_ok(art)
    c = art.manifest["coreml"]
    assert c["minimum_deployment_target"] == "iOS16" and c["attention"].startswith("ANE layout")
    for name, want in (("image", image_softmax), ("text", text_softmax)):
        ops, _ = _program(art.path / f"{name}.mlpackage")
        # no fused attention, and exactly one softmax per head of every attention op
        assert ops["scaled_dot_product_attention"] == 0 and ops["softmax"] == want, (name, dict(ops))
        assert c["graphs"][name]["softmax"] == want and c["graphs"][name]["float32_compute_ops"] == 0
    assert art.fidelity["image_embeds"]["min_cosine"] > 0.999


@pytest.mark.parametrize("case, op", [("mci-w8", "constexpr_affine_dequantize:int8"),
                                      ("mci-palettize4", "constexpr_lut_to_dense:uint4")])
def test_compressed_mci_exports_compress_the_conv_weights(arts, case, op):
    art = arts(case)
    _fidelity_ok(art)  # the torch simulation with the weights decompressed from the program
    graphs = art.manifest["coreml"]["graphs"]
    assert graphs["image"]["compressed_weights"].get(op, 0) >= 20, graphs["image"]["compressed_weights"]
    assert graphs["image"]["size"]["ratio"] < 0.8
    _, conv = _program(art.path / "image.mlpackage")
    # the convolutions themselves read compressed weights: the attention's 1x1 qkv/proj (ANE layout
    # on iOS 16), the MLPs' 1x1 convs, the folded depthwise and final convs
    for part in ("mlp_fc1_weight", "mlp_conv_conv_weight", "pos_emb_reparam_conv_weight",
                 "final_conv_reparam_conv_weight"):
        assert any(part in n for n in conv), (part, sorted(conv))
    if case == "mci-w8":
        assert any("token_mixer_qkv_weight" in n for n in conv) and any("token_mixer_proj_weight" in n for n in conv)


def test_compressed_conv_weights_map_back_by_parameter_name():
    """Every compressed weight of an ANE-layout MCi program lands on a parameter of the rewritten
    module (conv weights included), so the torch simulation runs the compressed model."""
    model = ClipModel(mci_spec()).init_random(seed=2).eval()
    m = copy.deepcopy(model)
    m.visual.prepare_export(False)
    m.visual.rewrite_for_ane()
    graph = ImageGraph(m).eval()
    example = torch.from_numpy(reference_inputs(model.spec)["pixel_values"][:1])
    ml = compress_weights(ct, convert(ct, graph, example, "image", 16, "fp16"), "w8", 16)
    compressed = [op for op in program_ops(ml) if op.op_type in COMPRESSED_OPS]
    before = {k: v.clone() for k, v in graph.state_dict().items()}
    assert load_decompressed(graph, ml) == len(compressed) >= 20
    changed = [k for k, v in graph.state_dict().items() if not torch.equal(v, before[k])]
    convs = [k for k in changed if before[k].dim() == 4]
    assert "visual.stages.3.blocks.0.token_mixer.qkv.weight" in convs and len(convs) >= len(changed) - 1


# ------------------------------------------------------------------------- the rewrite, in torch

def _perturb_norms(model) -> None:
    """BatchNorm statistics and LayerNorm affines that are not the identity, so folding them matters."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=g) * 0.1)
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g) + 0.5)
            elif isinstance(mod, nn.LayerNorm):
                mod.weight.copy_(1 + 0.2 * torch.randn(mod.weight.shape, generator=g))
                mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=g))


def _rel(got, want) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("fold", [False, True])
def test_mci_ane_rewrite_matches_the_reference_fp32(fold):
    spec = mci_spec()
    tower = MciTower(spec.vision, spec.embed_dim)
    _perturb_norms(tower)
    tower.eval()
    x = torch.from_numpy(reference_inputs(spec, n=2)["pixel_values"])
    ane = copy.deepcopy(tower)
    if fold:
        ane.prepare_export(False)
    ane.rewrite_for_ane()
    ane.rewrite_for_ane()  # a second call finds nothing left to rewrite
    assert not any(isinstance(mod, (Attention, LayerNorm2d)) for mod in ane.modules())
    assert sum(isinstance(mod, LayerNormANE) for mod in ane.modules()) == 3
    qkv = ane.stages[3].blocks[0].token_mixer.qkv
    assert isinstance(qkv, nn.Conv2d) and qkv.kernel_size == (1, 1)
    with torch.no_grad():
        want, got = tower(x), ane(x)
        # the attention moves the features: with its branch zeroed the output differs
        blind = copy.deepcopy(ane)
        for stage in blind.stages[3:]:
            for blk in stage.blocks:
                blk.layer_scale_1 = nn.Identity()
                blk.token_mixer = ZeroMixer()
        assert _rel(blind(x), want) > 1e-2
    assert _rel(got, want) < 1e-5
    assert tower.attention_layout() == (3, (2, 2, 4))


class ZeroMixer(nn.Module):
    """An attention branch that adds nothing (the blind control of the rewrite test)."""

    def forward(self, x):
        return torch.zeros_like(x)


def test_mci_attention_layout_per_op_heads_for_mci3_and_4():
    s3 = MciTower(get_spec("MobileCLIP2-S3").vision, 768)
    assert s3.attention_layout() == (6, (24,) * 4 + (48,) * 2)  # 4 x 768/32 + 2 x 1536/32 softmax ops
    assert MciTower(get_spec("MobileCLIP2-S0").vision, 512).attention_layout() == (2, 16)


@pytest.mark.parametrize("reparameterized", [False, True])
def test_s0_text_ane_rewrite_matches_the_reference_fp32(reparameterized):
    spec = s0_spec()
    text = RepMixerTextTower(spec.text, spec.embed_dim)
    _perturb_norms(text)
    text.eval()
    ids = torch.from_numpy(reference_inputs(spec, n=3)["input_ids"])
    ane = copy.deepcopy(text)
    if reparameterized:
        ane.prepare_export(False)
    ane.rewrite_for_ane()
    ane.rewrite_for_ane()
    assert len(ane.transformer) == 1 and isinstance(ane.transformer[0], AneTextLayers)
    assert not any(isinstance(mod, (Attention, nn.Linear)) for mod in ane.transformer.modules())
    with torch.no_grad():
        want, got = text(ids), ane(ids)
    assert _rel(got, want) < 1e-5
    names = dict(ane.named_parameters())
    assert "transformer.0.layers.1.pre_norm_mha.1.qkv_proj.weight" in names
    assert names["transformer.0.layers.1.pre_norm_ffn.4.weight"].dim() == 4


def test_causal_attention_only_repmixer_text_in_the_ane_layout_matches():
    """A repmixer-kind tower of attention layers alone may be causal: the ANE stack masks like the reference."""
    base = s0_spec().text
    spec = s0_spec().replace(text={"layers": 2, "causal": True, "config": {**base.config, "layer_types": ["attention"] * 2}})
    text = RepMixerTextTower(spec.text, spec.embed_dim)
    _perturb_norms(text)
    text.eval()
    ids = torch.from_numpy(reference_inputs(spec, n=3)["input_ids"])
    ane = copy.deepcopy(text)
    ane.rewrite_for_ane()
    with torch.no_grad():
        want, got = text(ids), ane(ids)
        bidirectional = copy.deepcopy(ane)
        bidirectional.spec = s0_spec().replace(text={"layers": 2, "config": spec.text.config}).text
        assert _rel(bidirectional(ids), want) > 1e-3  # the mask matters for these inputs
    assert _rel(got, want) < 1e-5
