"""MobileCLIP-S0's text tower ("repmixer"): Apple's hybrid of convolutional RepMixer blocks and
pre-norm transformer layers over the token axis.

Submodules carry the names of Apple's `TextTransformer` (`mobileclip/text_encoder.py`), so a
checkpoint's `text_encoder.<key>` is this tower's `<key>`, in both of Apple's forms: the train-time
multi-branch RepMixer (`token_mixer.norm.rbr_skip`, `token_mixer.mixer.rbr_conv.0.conv`, ...) and the
reparameterized one (`token_mixer.reparam_conv`, spec `config.reparameterized: true`).

The spec (`text.kind: "repmixer"`) uses the TextSpec fields for what every text tower has
(context_length, vocab_size, width, heads and mlp_dim of the attention layers, act, ln_eps, causal,
pool, eot_token_id, proj) and `text.config` for the rest:

    layer_types      ["repmixer", "attention", ...]: one entry per layer, in order (required)
    kernel_size      RepMixer / ConvFFN kernel along the tokens (odd; Apple: 11)
    convffn_ratio    ConvFFN hidden width = int(width * ratio) (Apple: 4.0)
    layer_scale_init initial layer scale of train-time RepMixer blocks (Apple: 1e-5)
    norm             "layer_norm_fp32" (normalize in float32, Apple's default) or "layer_norm"
    pos_embedding    learned positions (Apple's no_pos_embedding inverted; default true)
    reparameterized  build the folded inference form (default false)

Apple's `no_scale_embedding` has no counterpart: its TextTransformer computes `embed_scale` but never
applies it. Pooling is Apple's: the row's argmax id (`eot_token_id: null`) after the final norm, then
`x @ projection_layer`.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import InputError, SpecError
from ..kernels.ane import AneAttention, LayerNormANE, causal_mask, conv1x1
from ..specs import ACTIVATIONS, TEXT_POOLS, TextSpec
from .clip import Attention, TextTower, _take, make_act
from .towers import Tower, register_tower

LAYER_TYPES = ("repmixer", "attention")
NORMS = ("layer_norm_fp32", "layer_norm")
_DEFAULTS = {"kernel_size": 11, "convffn_ratio": 4.0, "layer_scale_init": 1e-5, "norm": "layer_norm_fp32",
             "pos_embedding": True, "reparameterized": False}


# ---------------------------------------------------------------------------------- reparameterization

def fold_bn(kernel: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel, bias) of conv(kernel) followed by eval-mode `bn`, as one convolution."""
    std = (bn.running_var + bn.eps).sqrt()
    t = bn.weight / std
    return kernel * t.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * t


def identity_kernel(channels: int, in_per_group: int, kh: int, kw: int, like: torch.Tensor) -> torch.Tensor:
    """The kernel of a grouped convolution that passes its input through (a centred 1 per channel)."""
    k = torch.zeros(channels, in_per_group, kh, kw, dtype=like.dtype, device=like.device)
    for i in range(channels):
        k[i, i % in_per_group, kh // 2, kw // 2] = 1.0
    return k


def conv_from(weight: torch.Tensor, bias: torch.Tensor, like: nn.Conv2d) -> nn.Conv2d:
    """A Conv2d with `like`'s geometry, a bias, and the given tensors."""
    conv = nn.Conv2d(like.in_channels, like.out_channels, like.kernel_size, like.stride, like.padding,
                     like.dilation, like.groups, bias=True)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
    return conv.to(weight.device)


def _token_conv(dim: int, k: int, bias: bool) -> nn.Conv2d:
    """Depthwise convolution along the token axis of (B, C, 1, L)."""
    return nn.Conv2d(dim, dim, (1, k), padding=(0, k // 2), groups=dim, bias=bias)


def _conv_bn(dim: int, k: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict(conv=_token_conv(dim, k, bias=False), bn=nn.BatchNorm2d(dim)))


class RepBranches(nn.Module):
    """Apple's MobileOneBlock as the text RepMixer builds it, on (B, C, 1, L): a batch-norm skip branch
    plus `branches` depthwise conv+BN branches (a (1, k) kernel gets no scale branch, activation or SE)."""

    def __init__(self, dim: int, k: int, branches: int):
        super().__init__()
        self.k = k
        self.rbr_skip = nn.BatchNorm2d(dim)
        self.rbr_conv = nn.ModuleList(_conv_bn(dim, k) for _ in range(branches)) if branches else None

    def forward(self, x):
        out = self.rbr_skip(x)
        for branch in self.rbr_conv or ():
            out = out + branch(x)
        return out

    def fused(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(kernel, bias) of the sum of the branches, as one depthwise (1, k) convolution."""
        bn = self.rbr_skip
        ident = identity_kernel(bn.num_features, 1, 1, self.k, bn.weight)
        kernel, bias = fold_bn(ident, bn)
        for branch in self.rbr_conv or ():
            kb, bb = fold_bn(branch.conv.weight, branch.bn)
            kernel, bias = kernel + kb, bias + bb
        return kernel, bias


class RepMixer(nn.Module):
    """Token mixing x + layer_scale * (mixer(x) - norm(x)); after `reparameterize()` one depthwise
    convolution (`reparam_conv`), the identity folded in."""

    def __init__(self, dim: int, k: int, layer_scale_init: float, reparameterized: bool):
        super().__init__()
        if reparameterized:
            self.reparam_conv = _token_conv(dim, k, bias=True)
        else:
            self.norm = RepBranches(dim, k, branches=0)
            self.mixer = RepBranches(dim, k, branches=1)
            self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), float(layer_scale_init)))

    def forward(self, x):
        if hasattr(self, "reparam_conv"):
            return self.reparam_conv(x)
        return x + self.layer_scale * (self.mixer(x) - self.norm(x))

    def reparameterize(self) -> int:
        """Fold into `reparam_conv`, in place (exact); how many mixers were folded (0 or 1)."""
        if hasattr(self, "reparam_conv"):
            return 0
        km, bm = self.mixer.fused()
        kn, bn = self.norm.fused()
        ls = self.layer_scale.detach()
        ident = identity_kernel(km.shape[0], 1, 1, km.shape[-1], km)
        # Apple's order of operations, so the folded kernel is the one their reparameterize_model writes
        kernel = ident + ls.unsqueeze(-1) * (km - kn)
        bias = ls.reshape(-1) * (bm - bn)
        like = self.mixer.rbr_conv[0].conv
        with torch.no_grad():
            self.reparam_conv = conv_from(kernel.detach(), bias.detach(), like)
        del self.mixer, self.norm, self.layer_scale
        return 1


class ConvFFN(nn.Module):
    """Depthwise token conv + BN, then a 1x1-conv MLP (Apple's ConvFFN)."""

    def __init__(self, dim: int, hidden: int, k: int, act: str):
        super().__init__()
        self.conv = _conv_bn(dim, k)
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = make_act(act)
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(self.conv(x))))

    def fold_bn(self) -> int:
        """Fold the batch norm into the depthwise conv (exact; an export rewrite Apple does not do, so
        the state dict then leaves Apple's layout); how many were folded (0 or 1)."""
        if not hasattr(self.conv, "bn"):
            return 0
        kernel, bias = fold_bn(self.conv.conv.weight, self.conv.bn)
        self.conv = nn.Sequential(OrderedDict(conv=conv_from(kernel.detach(), bias.detach(), self.conv.conv)))
        return 1


class RepMixerBlock(nn.Module):
    """MetaFormer block with RepMixer token mixing, on (B, L, C) tokens like the attention layers."""

    def __init__(self, dim: int, k: int, ffn_ratio: float, act: str, layer_scale_init: float, reparameterized: bool):
        super().__init__()
        self.token_mixer = RepMixer(dim, k, layer_scale_init, reparameterized)
        self.convffn = ConvFFN(dim, int(dim * ffn_ratio), k, act)
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), float(layer_scale_init)))

    def forward(self, x, *, causal: bool = False):
        x = x.transpose(1, 2).unsqueeze(2)  # (B, C, 1, L): tokens along the convolution's width
        x = self.token_mixer(x)
        x = x + self.layer_scale * self.convffn(x)
        return x.squeeze(2).transpose(1, 2)


class AppleAttention(Attention):
    """models.clip.Attention (swappable kernel, packed QKV) under Apple's names qkv_proj / out_proj."""

    def __init__(self, width: int, heads: int):
        super().__init__(width, heads)
        self.qkv_proj = self._modules.pop("qkv")
        self.out_proj = self._modules.pop("out")

    # the inherited code (forward, split_qkv) and the ANE / export rewrites read .qkv and .out
    qkv = property(lambda self: self.qkv_proj)
    out = property(lambda self: self.out_proj)


class LayerNormFP32(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype (Apple's layer_norm_fp32)."""

    def forward(self, x):
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


def _norm(kind: str, width: int, eps: float) -> nn.LayerNorm:
    return (LayerNormFP32 if kind == "layer_norm_fp32" else nn.LayerNorm)(width, eps=eps)


class AttentionLayer(nn.Module):
    """Apple's pre-norm TransformerEncoder layer: x + MHA(LN(x)), then x + FFN(x), FFN = LN, fc, act, fc."""

    def __init__(self, width: int, heads: int, mlp_dim: int, act: str, norm: str, eps: float):
        super().__init__()
        self.pre_norm_mha = nn.Sequential(_norm(norm, width, eps), AppleAttention(width, heads), nn.Identity())
        # Identity where Apple has Dropout: same indices, so the same state-dict keys
        self.pre_norm_ffn = nn.Sequential(_norm(norm, width, eps), nn.Linear(width, mlp_dim), make_act(act),
                                          nn.Identity(), nn.Linear(mlp_dim, width), nn.Identity())

    def forward(self, x, *, causal: bool = False):
        x = x + self.pre_norm_mha[1](self.pre_norm_mha[0](x), causal=causal)
        return x + self.pre_norm_ffn(x)


# ------------------------------------------------------------------- the Neural Engine layout (Core ML)

class AneRepMixerBlock(nn.Module):
    """A RepMixerBlock without its layout transposes: the ANE stack runs on (B, C, 1, L) throughout."""

    def __init__(self, block: RepMixerBlock):
        super().__init__()
        self.token_mixer, self.convffn, self.layer_scale = block.token_mixer, block.convffn, block.layer_scale

    def forward(self, x, mask=None):
        x = self.token_mixer(x)
        return x + self.layer_scale * self.convffn(x)


class AneAttentionLayer(nn.Module):
    """An AttentionLayer on (B, C, 1, L): channel-axis LayerNorms, 1x1 convolutions for every
    projection, per-head split einsum (`kernels.ane`). Parameters keep Apple's paths and indices
    (pre_norm_mha.1.qkv_proj, pre_norm_ffn.4, ...), so compressed weights map back by name."""

    def __init__(self, layer: AttentionLayer):
        super().__init__()
        mha, ffn = layer.pre_norm_mha, layer.pre_norm_ffn
        self.pre_norm_mha = nn.Sequential(LayerNormANE(mha[0]), AneAttention(mha[1], "qkv_proj", "out_proj"))
        self.pre_norm_ffn = nn.Sequential(LayerNormANE(ffn[0]), conv1x1(ffn[1]), ffn[2], nn.Identity(),
                                          conv1x1(ffn[4]))

    def forward(self, x, mask=None):
        x = x + self.pre_norm_mha[1](self.pre_norm_mha[0](x), mask)
        return x + self.pre_norm_ffn(x)


class AneTextLayers(nn.Module):
    """The whole layer stack in the ANE layout: (B, L, C) in and out, one transpose each way, every
    layer on (B, C, 1, L) in between (the RepMixer convolutions run there anyway). The LayerNorms
    normalize in the input's dtype: a Core ML FP16 program has no float32 to compute Apple's
    layer_norm_fp32 in."""

    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(
            AneAttentionLayer(layer) if isinstance(layer, AttentionLayer) else AneRepMixerBlock(layer)
            for layer in layers)

    def forward(self, x, *, causal: bool = False):
        x = x.transpose(1, 2).unsqueeze(2)
        mask = causal_mask(x.shape[-1], x.dtype, x.device) if causal else None
        for layer in self.layers:
            x = layer(x, mask)
        return x.squeeze(2).transpose(1, 2)


class _LearnedPositions(nn.Module):
    def __init__(self, length: int, width: int):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, 1, length, width))


class PositionalEmbedding(nn.Module):
    """Apple's two-level `positional_embedding.pos_embed.pos_embed` (1, 1, L, C)."""

    def __init__(self, length: int, width: int):
        super().__init__()
        self.pos_embed = _LearnedPositions(length, width)

    def forward(self, n: int):
        p = self.pos_embed.pos_embed
        if n != p.shape[2]:  # Apple resamples the table to a shorter input rather than slicing it
            p = F.interpolate(p, size=(n, p.shape[3]), mode="bilinear")
        return p.reshape(1, n, p.shape[3])


# ----------------------------------------------------------------------------------------- the spec

def text_config(spec: TextSpec) -> dict:
    """`spec.config` with defaults filled in, checked with the TextSpec fields this tower reads; a
    SpecError names the first bad field."""
    cfg = spec.config if isinstance(spec.config, dict) else None
    if cfg is None:
        raise SpecError("text.config must be an object for a repmixer text tower")
    unknown = set(cfg) - set(_DEFAULTS) - {"layer_types"}
    if unknown:
        raise SpecError(f"text.config has unknown keys for a repmixer tower: {', '.join(sorted(unknown))} "
                        f"(known: layer_types, {', '.join(_DEFAULTS)})")
    cfg = {**_DEFAULTS, **cfg}
    types = cfg.get("layer_types")
    if not isinstance(types, list) or not types or any(t not in LAYER_TYPES for t in types):
        raise SpecError(f"text.config.layer_types must be a non-empty list of {' / '.join(LAYER_TYPES)}, got {types!r}")
    k = cfg["kernel_size"]
    if not isinstance(k, int) or isinstance(k, bool) or k < 1 or k % 2 == 0:
        raise SpecError(f"text.config.kernel_size must be an odd positive integer, got {k!r}")
    for key in ("convffn_ratio", "layer_scale_init"):
        if not isinstance(cfg[key], (int, float)) or isinstance(cfg[key], bool) or cfg[key] <= 0:
            raise SpecError(f"text.config.{key} must be a positive number, got {cfg[key]!r}")
    if cfg["norm"] not in NORMS:
        raise SpecError(f"text.config.norm must be one of {', '.join(NORMS)}, got {cfg['norm']!r}")
    for key in ("pos_embedding", "reparameterized"):
        if not isinstance(cfg[key], bool):
            raise SpecError(f"text.config.{key} must be true or false, got {cfg[key]!r}")
    _check_fields(spec, types)
    return cfg


def _check_fields(spec: TextSpec, types: list) -> None:
    if spec.layers is not None and spec.layers != len(types):
        raise SpecError(f"text.layers={spec.layers} disagrees with the {len(types)} entries of text.config.layer_types")
    if "attention" in types:
        for key in ("heads", "mlp_dim"):
            v = getattr(spec, key)
            if not isinstance(v, int) or v <= 0:
                raise SpecError(f"text.{key} must be a positive integer for the attention layers, got {v!r}")
        if spec.width % spec.heads:
            raise SpecError(f"text.width={spec.width} is not divisible by text.heads={spec.heads}")
    if spec.act not in ACTIVATIONS:
        raise SpecError(f"text.act={spec.act!r} (known: {', '.join(ACTIVATIONS)})")
    if spec.pool not in TEXT_POOLS:
        raise SpecError(f"text.pool={spec.pool!r} (known: {', '.join(TEXT_POOLS)})")
    if spec.causal and "repmixer" in types:
        # the token convolutions see past the end token: a causal mask would not make trimming exact
        raise SpecError("text.causal must be false for a repmixer tower with RepMixer layers (their token "
                        "convolutions see every position)")


@register_tower("repmixer", "text")
class RepMixerTextTower(Tower):
    """Token embedding, learned positions, RepMixer and attention layers (`transformer.N`), final norm,
    end-token pooling, `x @ projection_layer`."""

    def __init__(self, spec: TextSpec, embed_dim: int):
        super().__init__()
        self.spec = spec
        self.cfg = cfg = text_config(spec)
        w = spec.width
        self.embedding_layer = nn.Embedding(spec.vocab_size, w)
        self.positional_embedding = PositionalEmbedding(spec.context_length, w) if cfg["pos_embedding"] else None
        self.transformer = nn.ModuleList(self._layer(t) for t in cfg["layer_types"])
        self.final_layer_norm = _norm(cfg["norm"], w, spec.ln_eps)
        self.projection_layer = nn.Parameter(torch.zeros(w, embed_dim)) if spec.proj else None
        self._init_bare(embed_dim)
        self.pooled_only_last = False  # nothing to gain: the last layer may be a convolution over all tokens
        self.reparameterized = None  # what prepare_export folded, for the export manifest
        self.mask_pooling, self.pool_table = False, None  # prefer_mask_pooling

    def _layer(self, kind: str) -> nn.Module:
        s, cfg = self.spec, self.cfg
        if kind == "attention":
            return AttentionLayer(s.width, s.heads, s.mlp_dim, s.act, cfg["norm"], s.ln_eps)
        return RepMixerBlock(s.width, cfg["kernel_size"], cfg["convffn_ratio"], s.act, cfg["layer_scale_init"],
                             cfg["reparameterized"])

    def _init_bare(self, embed_dim: int) -> None:
        """Bare parameters ClipModel.init_random does not reach: drawn here, from a fixed seed, so a
        random model is the same every time (Apple's scales: positions C^-0.5, projection C^-0.5)."""
        g = torch.Generator().manual_seed(0)
        w = self.spec.width
        with torch.no_grad():
            if self.positional_embedding is not None:
                p = self.positional_embedding.pos_embed.pos_embed
                p.copy_(torch.randn(p.shape, generator=g) * w ** -0.5)
            if self.projection_layer is not None:
                self.projection_layer.copy_(torch.randn(w, embed_dim, generator=g) * w ** -0.5)

    def pool_index(self, ids):
        # the same rule as the transformer tower: argmax of ids (Apple) or the first end token
        return TextTower.pool_index(self, ids)

    def forward(self, ids):
        s = self.spec
        if ids.dim() != 2 or ids.shape[1] > s.context_length:
            raise InputError(f"expected token ids of shape (N, L) with L <= {s.context_length}, got {tuple(ids.shape)}")
        x = self.embedding_layer(ids)
        if self.positional_embedding is not None:
            x = x + self.positional_embedding(ids.shape[1]).to(x.dtype)
        for layer in self.transformer:
            x = layer(x, causal=s.causal)
        x = _take(self.final_layer_norm(x), TextTower.pool_at(self, ids))[:, 0]
        return x @ self.projection_layer.to(x.dtype) if self.projection_layer is not None else x

    # --- reparameterization
    def reparameterize(self) -> int:
        """Fold every train-time RepMixer into its single convolution, in place (Apple's
        reparameterize_model: the state dict then has Apple's reparameterized keys); how many."""
        return sum(layer.token_mixer.reparameterize() for layer in self._mixer_blocks())

    def fold_batchnorm(self) -> int:
        """Also fold the ConvFFN batch norms (exact; beyond Apple's form, for exports); how many."""
        return sum(layer.convffn.fold_bn() for layer in self._mixer_blocks())

    def _mixer_blocks(self) -> list:
        return [layer for layer in self.transformer if isinstance(layer, RepMixerBlock)]

    # --- the tower seam (models.towers)
    def prefer_mask_pooling(self) -> None:
        from .clip import end_token_table

        self.mask_pooling = True
        self.pool_table = end_token_table(self.spec, self.embedding_layer.weight)

    def prepare_export(self, pooled_only_last: bool) -> None:
        counts = {"repmixer": self.reparameterize(), "batchnorm": self.fold_batchnorm()}
        if any(counts.values()):
            self.reparameterized = counts  # Tower.export_report records what was folded

    def quantizable(self, path: str) -> bool:
        # the attention layers' linear layers; the 1x1 convolutions of ConvFFN are no MatMuls
        return path.startswith("transformer.") and ".pre_norm_" in path

    def rewrite_for_ane(self) -> None:
        """Every layer in the Neural Engine layout (in place, on an export copy; `AneTextLayers`). The
        RepMixer layers' convolutions stay; forward runs each `transformer` entry on (B, L, C), so the
        whole stack becomes its one entry and the tokens are transposed once each way, not per layer."""
        if len(self.transformer) == 1 and isinstance(self.transformer[0], AneTextLayers):
            return
        self.transformer = nn.ModuleList([AneTextLayers(self.transformer)])

    def attention_layout(self) -> tuple[int, int]:
        return self.cfg["layer_types"].count("attention"), self.spec.heads or 0

    def input_decl(self, trim: bool = False) -> dict:
        # never trimmed: the tower is bidirectional (spec.text.causal is false, so exports do not ask)
        return {"input_ids": {"dtype": "int64", "shape": ["batch", self.spec.context_length]}}
