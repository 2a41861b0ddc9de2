"""timm's VisionTransformer as open_clip wraps it for MobileCLIP ("vit-mci"): MobileCLIP-B /
MobileCLIP2-B (`vit_base_mci_224`: a convolutional stem, then ViT-B/16) and MobileCLIP2-L-14
(`vit_large_patch14_clip_224`: a patch convolution, pre-norm).

Submodules carry timm's names (`patch_embed.backbone.N.conv|bn` or `patch_embed.proj`, `cls_token`,
`pos_embed`, `norm_pre`, `blocks.N.norm1|attn.qkv|attn.proj|norm2|mlp.fc1|mlp.fc2`, `norm`, `head`), so
an open_clip checkpoint's `visual.trunk.<key>` is this tower's `visual.<key>`. open_clip builds the
trunk with `num_classes=embed_dim, global_pool="token"` (`timm_pool: "token"`, `timm_proj: null`):
the class token after the final norm goes through timm's `head` (a Linear with bias), which is the
projection.

The spec (`vision.kind: "vit-mci"`) uses the ViT fields (image_size, patch_size = the stem's total
stride, width, layers, heads, mlp_dim, act, ln_eps, pre_norm, patch_bias, proj) and `vision.config`:

    stem             "conv" (timm ConvStem: conv+BN+act, ..., last conv with bias) or "patch"
    stem_channels    conv stem: output channels per conv (last = width); timm: [192, 192, 768]
    stem_kernels     conv stem: kernel = stride per conv, no padding; timm: [4, 2, 2]
    stem_act         conv stem: activation after each BN (timm: "gelu")
    no_embed_class   positions cover only the patches, added before the class token is prepended
                     (timm's no_embed_class; vit_base_mci_224: true, the CLIP ViTs: false)
    head_bias        the head's bias (timm: true)

timm's `reparameterize_model` leaves this trunk as it is (ConvStem has no multi-branch blocks), so
checkpoints saved before and after it load alike; our `reparameterize()` folds the stem's batch norms
into its convolutions for exports (exact).
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn as nn

from ..errors import InputError, SpecError
from ..specs import ACTIVATIONS, VisionSpec
from .clip import MLP, Attention, Block, PatchLinear, _split_last_qkv, make_act
from .mobileclip_text import conv_from, fold_bn
from .towers import Tower, register_tower

STEMS = ("conv", "patch")
_DEFAULTS = {"stem": "conv", "stem_channels": None, "stem_kernels": None, "stem_act": "gelu",
             "no_embed_class": False, "head_bias": True}


class TimmAttention(Attention):
    """models.clip.Attention under timm's names: `qkv`, `proj`."""

    def __init__(self, width: int, heads: int):
        super().__init__(width, heads)
        self.proj = self._modules.pop("out")

    out = property(lambda self: self.proj)  # what the inherited code and the ANE rewrite read


class TimmBlock(Block):
    """models.clip.Block (pre-norm, packed QKV with bias, GELU MLP, no layer scale: timm's ViT block
    with init_values=None) under timm's names: norm1, attn, norm2, mlp."""

    def __init__(self, width: int, heads: int, mlp_dim: int, act: str, eps: float):
        nn.Module.__init__(self)
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = TimmAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, mlp_dim, act)

    ln_1 = property(lambda self: self.norm1)
    ln_2 = property(lambda self: self.norm2)


class ConvNormAct(nn.Module):
    """timm's ConvNormAct as ConvStem uses it: `conv`, then `bn` (BatchNorm2d, or an empty Sequential
    for the last conv and once folded) and the activation."""

    def __init__(self, cin: int, cout: int, k: int, act: str | None):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=k, padding=0, bias=act is None)
        self.bn = nn.BatchNorm2d(cout) if act is not None else nn.Sequential()
        self.act = make_act(act) if act is not None else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))

    def fold_bn(self) -> int:
        """Fold `bn` into `conv` (exact); how many were folded (0 or 1)."""
        if not isinstance(self.bn, nn.BatchNorm2d):
            return 0
        kernel, bias = fold_bn(self.conv.weight, self.bn)
        self.conv = conv_from(kernel.detach(), bias.detach(), self.conv)
        self.bn = nn.Sequential()
        return 1


class HybridEmbed(nn.Module):
    """timm's HybridEmbed without a projection: `backbone` (the conv stem), flattened to tokens."""

    def __init__(self, channels: list, kernels: list, act: str):
        super().__init__()
        cins = [3] + list(channels[:-1])
        last = len(channels) - 1
        self.backbone = nn.Sequential(*(ConvNormAct(ci, co, k, None if i == last else act)
                                        for i, (ci, co, k) in enumerate(zip(cins, channels, kernels))))

    def forward(self, pixels):
        return self.backbone(pixels).flatten(2).transpose(1, 2)


class PatchEmbed(nn.Module):
    """timm's PatchEmbed: `proj`, a stride-p convolution, flattened to tokens."""

    def __init__(self, width: int, p: int, bias: bool):
        super().__init__()
        self.proj = nn.Conv2d(3, width, p, stride=p, bias=bias)
        self.linear = None  # prefer_gemm: the same sums as patchify + one GEMM

    def forward(self, pixels):
        if self.linear is not None:
            return self.linear(pixels)
        return self.proj(pixels).flatten(2).transpose(1, 2)


# ----------------------------------------------------------------------------------------- the spec

def vision_config(spec: VisionSpec) -> dict:
    """`spec.config` with defaults filled in, checked with the ViT fields this tower reads; a SpecError
    names the first bad field."""
    if not isinstance(spec.config, dict):
        raise SpecError("vision.config must be an object for a vit-mci image tower")
    unknown = set(spec.config) - set(_DEFAULTS)
    if unknown:
        raise SpecError(f"vision.config has unknown keys for a vit-mci tower: {', '.join(sorted(unknown))} "
                        f"(known: {', '.join(_DEFAULTS)})")
    cfg = {**_DEFAULTS, **spec.config}
    for key in ("width", "layers", "heads", "mlp_dim", "patch_size"):
        v = getattr(spec, key)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise SpecError(f"vision.{key} must be a positive integer for a vit-mci tower, got {v!r}")
    if spec.width % spec.heads:
        raise SpecError(f"vision.width={spec.width} is not divisible by vision.heads={spec.heads}")
    if spec.image_size % spec.patch_size:
        raise SpecError(f"vision.image_size={spec.image_size} is not a multiple of vision.patch_size={spec.patch_size}")
    if spec.act not in ACTIVATIONS:
        raise SpecError(f"vision.act={spec.act!r} (known: {', '.join(ACTIVATIONS)})")
    if spec.pool != "cls" or not spec.class_token:
        raise SpecError(f"vision.pool must be 'cls' with class_token true for a vit-mci tower (timm_pool "
                        f"'token'), got pool={spec.pool!r}, class_token={spec.class_token!r}")
    if cfg["stem"] not in STEMS:
        raise SpecError(f"vision.config.stem must be one of {', '.join(STEMS)}, got {cfg['stem']!r}")
    for key in ("no_embed_class", "head_bias"):
        if not isinstance(cfg[key], bool):
            raise SpecError(f"vision.config.{key} must be true or false, got {cfg[key]!r}")
    if cfg["stem"] == "conv":
        _check_stem(spec, cfg)
    return cfg


def _check_stem(spec: VisionSpec, cfg: dict) -> None:
    ch, ks = cfg["stem_channels"], cfg["stem_kernels"]
    for key, v in (("stem_channels", ch), ("stem_kernels", ks)):
        if not isinstance(v, list) or not v or any(not isinstance(i, int) or isinstance(i, bool) or i <= 0 for i in v):
            raise SpecError(f"vision.config.{key} must be a non-empty list of positive integers, got {v!r}")
    if len(ch) != len(ks):
        raise SpecError(f"vision.config.stem_kernels has {len(ks)} entries, stem_channels {len(ch)}")
    if ch[-1] != spec.width:
        raise SpecError(f"vision.config.stem_channels ends with {ch[-1]}, not vision.width={spec.width}")
    if math.prod(ks) != spec.patch_size:
        raise SpecError(f"vision.config.stem_kernels multiply to a stride of {math.prod(ks)}, "
                        f"not vision.patch_size={spec.patch_size}")
    if cfg["stem_act"] not in ACTIVATIONS:
        raise SpecError(f"vision.config.stem_act={cfg['stem_act']!r} (known: {', '.join(ACTIVATIONS)})")


@register_tower("vit-mci", "vision")
class MciViTTower(Tower):
    """Stem (conv stem or patch conv), class token, positions, optional pre-norm, pre-norm blocks,
    final norm, class-token pooling, `head`."""

    def __init__(self, spec: VisionSpec, embed_dim: int):
        super().__init__()
        self.spec = spec
        self.cfg = cfg = vision_config(spec)
        w, grid = spec.width, spec.image_size // spec.patch_size
        if cfg["stem"] == "conv":
            self.patch_embed = HybridEmbed(cfg["stem_channels"], cfg["stem_kernels"], cfg["stem_act"])
        else:
            self.patch_embed = PatchEmbed(w, spec.patch_size, spec.patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, w))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + (0 if cfg["no_embed_class"] else 1), w))
        self.norm_pre = nn.LayerNorm(w, eps=spec.ln_eps) if spec.pre_norm else None
        self.blocks = nn.ModuleList(TimmBlock(w, spec.heads, spec.mlp_dim, spec.act, spec.ln_eps)
                                    for _ in range(spec.layers))
        self.norm = nn.LayerNorm(w, eps=spec.ln_eps)
        self.head = nn.Linear(w, embed_dim, bias=cfg["head_bias"]) if spec.proj else None
        self.pooled_only_last = False
        self.ane_blocks = None
        self.reparameterized = None  # what reparameterize() folded, for the export manifest

    def forward(self, pixels):
        s = self.spec
        if pixels.dim() != 4 or pixels.shape[1] != 3 or pixels.shape[2] != s.image_size or pixels.shape[3] != s.image_size:
            raise InputError(f"expected pixels of shape (N, 3, {s.image_size}, {s.image_size}), got "
                             f"{tuple(pixels.shape)}; preprocess images with the model's preprocessing first")
        x = self.patch_embed(pixels)
        cls = self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1)
        pos = self.pos_embed.to(x.dtype)
        # timm's no_embed_class: the positions skip the class token (added, then the token prepended)
        x = torch.cat([cls, x + pos], dim=1) if self.cfg["no_embed_class"] else torch.cat([cls, x], dim=1) + pos
        if self.norm_pre is not None:
            x = self.norm_pre(x)
        if self.ane_blocks is not None:
            x = self.ane_blocks(x)
        else:
            last = len(self.blocks) - 1
            for i, blk in enumerate(self.blocks):
                # only the class token is read after the last block: compute just it there (exact)
                x = blk(x, pool_index=0) if self.pooled_only_last and i == last else blk(x)
        x = self.norm(x[:, 0])
        return self.head(x) if self.head is not None else x

    # --- reparameterization
    def reparameterize(self) -> None:
        """Fold the conv stem's batch norms into its convolutions, in place (exact; timm's ConvStem has
        no multi-branch blocks, so this is all there is)."""
        if isinstance(self.patch_embed, HybridEmbed):
            folded = sum(layer.fold_bn() for layer in self.patch_embed.backbone)
            if folded:
                self.reparameterized = {"batchnorm": folded}  # Tower.export_report records it

    # --- the tower seam (models.towers)
    def prepare_export(self, pooled_only_last: bool) -> None:
        self.reparameterize()
        self.pooled_only_last = pooled_only_last
        if pooled_only_last:
            _split_last_qkv(self.blocks)

    def prefer_gemm(self) -> None:
        # a stride-p patch convolution is patchify + one GEMM (ORT's CPU GEMM beats its convolution)
        if isinstance(self.patch_embed, PatchEmbed):
            self.patch_embed.linear = PatchLinear(self.patch_embed.proj)

    def rewrite_for_ane(self) -> None:
        from ..kernels.ane import AneBlocks

        self.pooled_only_last = False
        self.ane_blocks = AneBlocks(self.blocks)

    def quantizable(self, path: str) -> bool:
        # the blocks' linear layers; stem, head and positions stay float
        return path.startswith("blocks.")

    def attention_layout(self) -> tuple[int, int]:
        return self.spec.layers, self.spec.heads

    def random_parameters(self) -> list:
        return [self.cls_token]

    def input_decl(self, trim: bool = False) -> dict:
        s = self.spec.image_size
        return {"pixel_values": {"dtype": "float32", "shape": ["batch", 3, s, s]}}
