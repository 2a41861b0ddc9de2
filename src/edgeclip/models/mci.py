"""MobileCLIP's MCi image towers (FastViT family: MCi0-2 of MobileCLIP, MCi3/4 of MobileCLIP2), "mci".

A convolutional stem of MobileOne blocks, stages of RepMixer blocks (depthwise token mixing) and, at
the lowest resolution, attention blocks behind a conditional positional encoding, a final MobileOne
convolution, average pooling and a linear head that is the CLIP projection.

Design notes:
- Module names reproduce timm's `FastVit` state-dict keys (`stem.0.conv_kxk.0.conv.weight`,
  `stages.3.blocks.0.token_mixer.qkv.weight`, `final_conv.se.fc1.weight`, `head.fc.weight`), so an
  open_clip checkpoint's `visual.trunk.<key>` is our `visual.<key>`: no renaming table to maintain.
- Train-time blocks have several linear branches (kxk conv + 1x1 conv + identity, each with a
  BatchNorm). They are sums of linear maps, so `reparameterize()` folds each block into one conv —
  an exact rewrite the export applies to its copy. `config.reparameterized: true` builds the folded
  form timm's `reparameterize_model` produces, for checkpoints saved after it.
- timm keeps some BatchNorms and the layer scales after reparameterizing (the ConvMlp's, the
  attention pre-norm); they are per-channel affine maps next to a conv or linear, so we fold them too.
- Attention subclasses `clip.Attention`, so `ClipModel.set_attention` swaps its kernel like the ViT's.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import InputError, SpecError
from ..kernels.ane import AneAttention, LayerNormANE
from .clip import Attention
from .towers import Tower, register_tower

MIXERS = ("repmixer", "attention")
POS_EMBS = (None, "rcpe")
NORMS = ("batchnorm", "layernorm2d")


# ------------------------------------------------------------------------------------------ config

@dataclass(frozen=True)
class MciConfig:
    """`vision.config` of an "mci" tower; the per-stage lists have one entry per stage."""

    layers: tuple
    embed_dims: tuple
    mlp_ratios: tuple
    token_mixers: tuple
    pos_embs: tuple = None          # None or "rcpe" per stage (default: none)
    downsamples: tuple = None       # default: every stage but the first
    se_downsamples: tuple = None    # squeeze-excite in the stage's patch embedding (default: none)
    lkc_use_act: bool = False       # GELU after the patch embedding's large-kernel conv
    stem_scale_branch: bool = True  # the stem's MobileOne blocks have a 1x1 branch
    norm: str = "batchnorm"         # attention blocks' pre-norm: "batchnorm" or "layernorm2d"
    norm_eps: float = 1e-5
    repmixer_kernel: int = 3
    down_patch_size: int = 7
    down_stride: int = 2
    pos_emb_kernel: int = 7
    head_dim: int = 32
    cls_ratio: float = 2.0          # final conv width = last embed dim x cls_ratio
    layer_scale_init: float | None = 1e-5  # None: no layer scales
    reparameterized: bool = False   # build the folded (inference) form directly

    @property
    def final_features(self) -> int:
        return int(self.embed_dims[-1] * self.cls_ratio)


def _bad(name: str, why: str) -> SpecError:
    return SpecError(f"vision.config.{name} {why} (mci image tower)")


def _stage_list(cfg: dict, name: str, n: int, check, default):
    v = cfg.get(name, default)
    if not isinstance(v, (list, tuple)) or len(v) != n:
        raise _bad(name, f"must be a list with one entry per stage ({n}), got {v!r}")
    for x in v:
        if not check(x):
            raise _bad(name, f"has an invalid entry {x!r}")
    return tuple(v)


def _is_pos_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def _is_pos_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0


def _check_scalars(cfg: dict) -> None:
    for name in ("lkc_use_act", "stem_scale_branch", "reparameterized"):
        if name in cfg and not isinstance(cfg[name], bool):
            raise _bad(name, f"must be true or false, got {cfg[name]!r}")
    for name in ("repmixer_kernel", "down_patch_size", "down_stride", "pos_emb_kernel", "head_dim"):
        if name in cfg and not _is_pos_int(cfg[name]):
            raise _bad(name, f"must be a positive integer, got {cfg[name]!r}")
    for name in ("repmixer_kernel", "down_patch_size", "pos_emb_kernel"):
        if name in cfg and cfg[name] % 2 == 0:
            raise _bad(name, f"must be odd (centred kernels fold exactly), got {cfg[name]}")
    for name in ("norm_eps", "cls_ratio"):
        if name in cfg and not _is_pos_num(cfg[name]):
            raise _bad(name, f"must be a positive number, got {cfg[name]!r}")
    if cfg.get("norm", "batchnorm") not in NORMS:
        raise _bad("norm", f"must be one of {', '.join(NORMS)}, got {cfg['norm']!r}")
    ls = cfg.get("layer_scale_init", 1e-5)
    if ls is not None and not _is_pos_num(ls):
        raise _bad("layer_scale_init", f"must be a positive number or null, got {ls!r}")


def parse_config(cfg: dict) -> MciConfig:
    """Validate an "mci" tower's `vision.config`; a SpecError names the first bad field."""
    if not isinstance(cfg, dict):
        raise SpecError(f"vision.config of an mci tower must be an object, got {type(cfg).__name__}")
    known = {f.name for f in fields(MciConfig)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise _bad(unknown[0], f"is not a setting of the mci tower (known: {', '.join(sorted(known))})")
    for name in ("layers", "embed_dims", "mlp_ratios", "token_mixers"):
        if name not in cfg:
            raise _bad(name, "is required")
    if not isinstance(cfg["layers"], (list, tuple)) or not cfg["layers"]:
        raise _bad("layers", f"must be a non-empty list of block counts, got {cfg['layers']!r}")
    n = len(cfg["layers"])
    stages = {
        "layers": _stage_list(cfg, "layers", n, _is_pos_int, None),
        "embed_dims": _stage_list(cfg, "embed_dims", n, _is_pos_int, None),
        "mlp_ratios": _stage_list(cfg, "mlp_ratios", n, _is_pos_num, None),
        "token_mixers": _stage_list(cfg, "token_mixers", n, lambda x: x in MIXERS, None),
        "pos_embs": _stage_list(cfg, "pos_embs", n, lambda x: x in POS_EMBS, [None] * n),
        "downsamples": _stage_list(cfg, "downsamples", n, lambda x: isinstance(x, bool), [False] + [True] * (n - 1)),
        "se_downsamples": _stage_list(cfg, "se_downsamples", n, lambda x: isinstance(x, bool), [False] * n),
    }
    _check_scalars(cfg)
    out = MciConfig(**{**cfg, **stages})
    _check_widths(out)
    return out


def _check_widths(c: MciConfig) -> None:
    for dim, mixer in zip(c.embed_dims, c.token_mixers):
        if mixer == "attention" and dim % c.head_dim:
            raise _bad("embed_dims", f"entry {dim} of an attention stage is not a multiple of head_dim={c.head_dim}")
    # the patch embeddings and the final conv are grouped by their input channels
    prev = c.embed_dims[0]
    for dim, down in zip(c.embed_dims, c.downsamples):
        if (down or dim != prev) and dim % prev:
            raise _bad("embed_dims", f"entry {dim} is not a multiple of the stage before it ({prev}): the "
                       "downsampling conv has one group per input channel")
        prev = dim
    if c.final_features % prev:
        raise _bad("cls_ratio", f"{c.cls_ratio} makes final_conv {c.final_features} wide, not a multiple of {prev}")


# timm's fastvit_mci0..4 (timm/models/fastvit.py), in our schema
_MCI012 = {"mlp_ratios": [3, 3, 3, 3], "se_downsamples": [False, False, True, True],
           "pos_embs": [None, None, None, "rcpe"], "token_mixers": ["repmixer"] * 3 + ["attention"],
           "lkc_use_act": True}
_MCI34 = {"mlp_ratios": [4] * 5, "se_downsamples": [False] * 5, "downsamples": [False] + [True] * 4,
          "pos_embs": [None, None, None, "rcpe", "rcpe"], "token_mixers": ["repmixer"] * 3 + ["attention"] * 2,
          "lkc_use_act": True, "norm": "layernorm2d", "stem_scale_branch": False}
MCI_PRESETS = {
    "fastvit_mci0": {**_MCI012, "layers": [2, 6, 10, 2], "embed_dims": [64, 128, 256, 512]},
    "fastvit_mci1": {**_MCI012, "layers": [4, 12, 20, 4], "embed_dims": [64, 128, 256, 512]},
    "fastvit_mci2": {**_MCI012, "layers": [4, 12, 24, 4], "embed_dims": [80, 160, 320, 640]},
    "fastvit_mci3": {**_MCI34, "layers": [2, 12, 24, 4, 2], "embed_dims": [96, 192, 384, 768, 1536]},
    "fastvit_mci4": {**_MCI34, "layers": [2, 12, 24, 4, 4], "embed_dims": [128, 256, 512, 1024, 2048]},
}
# timm FastVit keyword -> ours (the rest have the same name in both)
_TIMM_NAMES = {"stem_use_scale_branch": "stem_scale_branch", "repmixer_kernel_size": "repmixer_kernel",
               "layer_scale_init_value": "layer_scale_init", "inference_mode": "reparameterized"}
_TIMM_IGNORED = ("num_classes", "global_pool", "drop_rate", "proj_drop_rate", "drop_path_rate", "in_chans",
                 "fork_feat", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "device",
                 "dtype")


def _factory_name(v) -> str:
    # timm passes layer factories (classes, functools.partial); a JSON record of them names the class,
    # as a string or as {"partial": "module.Class", **keywords}
    return str(v.get("partial", "") if isinstance(v, dict) else v).rsplit(".", 1)[-1].lower()


def _timm_pos_embs(entries, out: dict) -> list:
    kernels = set()
    for v in entries:
        if v is None:
            continue
        if _factory_name(v) not in ("repconditionalposenc", "rcpe"):
            raise SpecError(f"timm pos_embs entry {v!r} is not RepConditionalPosEnc or null")
        shape = v.get("spatial_shape", (7, 7)) if isinstance(v, dict) else (7, 7)
        shape = (shape, shape) if isinstance(shape, int) else tuple(shape)
        if shape[0] != shape[1]:
            raise SpecError(f"timm RepConditionalPosEnc spatial_shape {list(shape)} is not square")
        kernels.add(shape[0])
    if len(kernels) > 1:
        raise SpecError(f"timm pos_embs use different kernels {sorted(kernels)}; one pos_emb_kernel is supported")
    if kernels:
        out["pos_emb_kernel"] = kernels.pop()
    return [None if v is None else "rcpe" for v in entries]


def _timm_norm(v, out: dict) -> None:
    name = _factory_name(v)
    if name not in ("layernorm2d", "batchnorm2d"):
        raise SpecError(f"timm norm_layer {v!r} is neither BatchNorm2d nor LayerNorm2d")
    out["norm"] = "layernorm2d" if name == "layernorm2d" else "batchnorm"
    if name == "layernorm2d":
        # timm's LayerNorm2d defaults to eps 1e-6; fastvit_mci3/4 pass 1e-5
        out["norm_eps"] = v.get("eps", 1e-6) if isinstance(v, dict) else 1e-6


def mci_config_from_timm(kwargs: dict, model_name: str | None = None) -> dict:
    """Our `vision.config` from the keyword arguments timm's `fastvit_mciN` hands to `FastVit` (as a
    reference config records them), on top of that entry point's own settings when `model_name`
    ("fastvit_mci0" .. "fastvit_mci4") is given."""
    if model_name is not None and model_name not in MCI_PRESETS:
        raise SpecError(f"unknown MCi model {model_name!r}; known: {', '.join(MCI_PRESETS)}")
    out = dict(MCI_PRESETS.get(model_name, {}))
    for k, v in kwargs.items():
        if k in _TIMM_IGNORED:
            continue
        if k == "pos_embs":
            out["pos_embs"] = _timm_pos_embs(v, out)
        elif k == "norm_layer":
            _timm_norm(v, out)
        else:
            out[_TIMM_NAMES.get(k, k)] = list(v) if isinstance(v, tuple) else v
    parse_config(out)
    return out


# ----------------------------------------------------------------------------------------- folding

def _pad(k: int, stride: int = 1) -> int:
    return ((stride - 1) + (k - 1)) // 2  # timm's symmetric padding; k // 2 for odd k


def _bn_affine(bn: nn.BatchNorm2d):
    """The inference-time BatchNorm as y = x * scale + shift (per channel)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def _identity_kernel(channels: int, groups: int, k: int, like: torch.Tensor) -> torch.Tensor:
    """The kxk kernel of a (grouped) conv that returns its input."""
    per_group = channels // groups
    w = torch.zeros(channels, per_group, k, k, dtype=like.dtype, device=like.device)
    idx = torch.arange(channels, device=like.device)
    w[idx, idx % per_group, k // 2, k // 2] = 1.0
    return w


def _new_conv(weight, bias, *, stride=1, groups=1) -> nn.Conv2d:
    """A biased conv holding (weight, bias), its padding centred like the train-time convs'."""
    cout, cin_g, k, _ = weight.shape
    conv = nn.Conv2d(cin_g * groups, cout, k, stride=stride, padding=_pad(k, stride), groups=groups, bias=True,
                     device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
    return conv


class TiledDepthwise(nn.Conv2d):
    """A grouped conv with one input channel per group and m > 1 outputs per group (the stage
    entries' large-kernel convs and final_conv: groups = C_in, C_out = m C_in), computed as a
    depthwise conv over the input tiled m times along channels. Its output channels come in tiled
    order (j C_in + g for the grouped conv's g m + j), which the consumers' weights absorb
    (`tile_multiplier_convs`). Why: OpenVINO's CPU plugin has fast depthwise kernels but runs
    multiplier convs on generic ones (measured on MobileCLIP-S1: jit_avx512_f32 ~4x a depthwise
    conv's time, jit_gemm_I8 ~10x), and a channel concat keeps its blocked layout."""

    def forward(self, x):
        m = self.out_channels // x.shape[1]
        return F.conv2d(torch.cat([x] * m, 1), self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.out_channels)


def _tile_conv(conv: nn.Conv2d) -> tuple[TiledDepthwise, torch.Tensor]:
    """(TiledDepthwise equal to `conv` up to output order, perm: tiled output i is conv's output perm[i])."""
    cin, m = conv.in_channels, conv.out_channels // conv.in_channels
    j, g = torch.div(torch.arange(cin * m), cin, rounding_mode="floor"), torch.arange(cin * m) % cin
    perm = g * m + j
    new = TiledDepthwise(cin * m, cin * m, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                         dilation=conv.dilation, groups=cin * m, bias=True,
                         device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(conv.weight[perm])
        new.bias.copy_(conv.bias[perm] if conv.bias is not None else torch.zeros_like(new.bias))
    new.in_channels = cin  # what the module reads (the state dict keeps the grouped conv's shapes)
    return new, perm


def _permute_se(se: nn.Module, perm: torch.Tensor) -> None:
    if isinstance(se, SqueezeExcite):
        se.fc1.weight.data = se.fc1.weight.data[:, perm]
        se.fc2.weight.data, se.fc2.bias.data = se.fc2.weight.data[perm], se.fc2.bias.data[perm]


def _is_multiplier(conv) -> bool:
    return (type(conv) is nn.Conv2d and conv.groups == conv.in_channels > 1
            and conv.out_channels > conv.in_channels and conv.out_channels % conv.in_channels == 0)


def tile_multiplier_convs(tower) -> int:
    """Every folded multiplier conv of an MCi tower as a TiledDepthwise (in place, on an export copy),
    its squeeze-excite and the next layer's input channels permuted to match: the same sums in
    another channel order, so the tower's output is unchanged. Returns how many convs changed."""
    pairs = [(st.downsample.proj[0], lambda p, nxt=st.downsample.proj[1]: _permute_in(nxt.reparam_conv, p))
             for st in tower.stages if isinstance(st.downsample, PatchEmbed)]
    pairs.append((tower.final_conv, lambda p: _permute_in(tower.head.fc, p)))
    n = 0
    for block, permute_next in pairs:
        if not _is_multiplier(block.reparam_conv) or not isinstance(block.act, (nn.GELU, nn.Identity)):
            continue  # unfolded, already tiled, or not the shape this rewrite is for
        block.reparam_conv, perm = _tile_conv(block.reparam_conv)
        _permute_se(block.se, perm)
        permute_next(perm)
        n += 1
    return n


def _permute_in(layer: nn.Module, perm: torch.Tensor) -> None:
    layer.weight.data = layer.weight.data[:, perm]


def _fold_linear_output(layer: nn.Module, gamma: torch.Tensor) -> None:
    """layer(x) * gamma, per output channel, becomes one layer (a conv or linear with a bias)."""
    g = gamma.reshape(-1)
    with torch.no_grad():
        layer.weight.mul_(g.reshape(-1, *([1] * (layer.weight.dim() - 1))))
        if layer.bias is not None:
            layer.bias.mul_(g)


# ----------------------------------------------------------------------------------------- modules

class ConvBn(nn.Module):
    """A bias-free conv followed by a BatchNorm (timm's ConvNormAct without activation: `conv`, `bn`)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=_pad(k, stride), groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn(self.conv(x))

    def fused(self):
        """(kernel, bias) of the conv with the BatchNorm folded in."""
        scale, shift = _bn_affine(self.bn)
        return self.conv.weight * scale.reshape(-1, 1, 1, 1), shift

    def fold_(self) -> int:
        """Fold the BatchNorm into the conv in place; how many BatchNorms went (0 or 1)."""
        if not isinstance(self.bn, nn.BatchNorm2d):
            return 0
        c = self.conv
        w, b = self.fused()
        self.conv = _new_conv(w.detach(), b.detach(), stride=c.stride[0], groups=c.groups)
        self.bn = nn.Identity()
        return 1


class SqueezeExcite(nn.Module):
    """Channel gating from the spatial mean (timm's SEModule: fc1, ReLU, fc2, sigmoid)."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x):
        s = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(s)


def _se_channels(channels: int, ratio: float, divisor: int) -> int:
    # timm's make_divisible(channels * ratio, divisor, round_limit=0)
    v = channels * ratio
    return max(divisor, int(v + divisor / 2) // divisor * divisor)


class _Reparam(nn.Module):
    """A block whose train-time branches fold into one conv, `reparam_conv`."""

    reparam_conv: nn.Conv2d | None

    @property
    def is_folded(self) -> bool:
        return self.reparam_conv is not None


class MobileOne(_Reparam):
    """MobileOne block: kxk conv+BN branches, a 1x1 conv+BN branch and a BN identity branch, summed,
    then squeeze-excite and activation. Folded: one kxk conv."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, *, act: bool = True,
                 se: bool = False, scale_branch: bool = True, conv_branches: int = 1, folded: bool = False):
        super().__init__()
        self.cin, self.cout, self.k, self.stride, self.groups = cin, cout, k, stride, groups
        self.se = SqueezeExcite(cout, _se_channels(cout, 1 / 16, 1)) if se else nn.Identity()
        self.reparam_conv = self.identity = self.conv_kxk = self.conv_scale = None
        if folded:
            self.reparam_conv = nn.Conv2d(cin, cout, k, stride=stride, padding=_pad(k, stride), groups=groups)
        else:
            if cin == cout and stride == 1:
                self.identity = nn.BatchNorm2d(cin)
            if conv_branches > 0:
                self.conv_kxk = nn.ModuleList(ConvBn(cin, cout, k, stride, groups) for _ in range(conv_branches))
            if k > 1 and scale_branch:
                self.conv_scale = ConvBn(cin, cout, 1, stride, groups)
        self.act = nn.GELU() if act else nn.Identity()

    def forward(self, x):
        if self.reparam_conv is not None:
            y = self.reparam_conv(x)
        else:
            y = self.identity(x) if self.identity is not None else 0
            if self.conv_scale is not None:
                y = y + self.conv_scale(x)
            for branch in self.conv_kxk or ():
                y = y + branch(x)
        return self.act(self.se(y))

    def folded_kernel(self):
        """(kernel, bias) of the one conv equal to the sum of the branches."""
        ref = next(self.parameters())
        w = torch.zeros(self.cout, self.cin // self.groups, self.k, self.k, dtype=ref.dtype, device=ref.device)
        b = torch.zeros(self.cout, dtype=ref.dtype, device=ref.device)
        for branch in self.conv_kxk or ():
            bw, bb = branch.fused()
            w, b = w + bw, b + bb
        if self.conv_scale is not None:
            sw, sb = self.conv_scale.fused()
            w, b = w + F.pad(sw, [self.k // 2] * 4), b + sb
        if self.identity is not None:
            scale, shift = _bn_affine(self.identity)
            w = w + _identity_kernel(self.cin, self.groups, self.k, ref) * scale.reshape(-1, 1, 1, 1)
            b = b + shift
        return w, b

    def reparameterize(self) -> int:
        """Fold the branches in place; how many BatchNorms went."""
        if self.reparam_conv is not None:
            return 0
        n = len(self.conv_kxk or ()) + int(self.conv_scale is not None) + int(self.identity is not None)
        w, b = self.folded_kernel()
        self.reparam_conv = _new_conv(w.detach(), b.detach(), stride=self.stride, groups=self.groups)
        self.identity = self.conv_kxk = self.conv_scale = None
        return n


class LargeKernelConv(_Reparam):
    """RepLKNet's large-kernel conv: a kxk and a 3x3 conv+BN branch, summed; squeeze-excite, activation."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, groups: int, small: int = 3, *,
                 se: bool = False, act: bool = False, folded: bool = False):
        super().__init__()
        self.k, self.small, self.stride, self.groups = k, small, stride, groups
        self.reparam_conv = self.large_conv = self.small_conv = None
        if folded:
            self.reparam_conv = nn.Conv2d(cin, cout, k, stride=stride, padding=_pad(k, stride), groups=groups)
        else:
            self.large_conv = ConvBn(cin, cout, k, stride, groups)
            self.small_conv = ConvBn(cin, cout, small, stride, groups)
        self.se = SqueezeExcite(cout, _se_channels(cout, 0.25, 8)) if se else nn.Identity()
        self.act = nn.GELU() if act else nn.Identity()

    def forward(self, x):
        if self.reparam_conv is not None:
            y = self.reparam_conv(x)
        else:
            y = self.large_conv(x) + self.small_conv(x)
        return self.act(self.se(y))

    def reparameterize(self) -> int:
        if self.reparam_conv is not None:
            return 0
        w, b = self.large_conv.fused()
        sw, sb = self.small_conv.fused()
        w, b = w + F.pad(sw, [(self.k - self.small) // 2] * 4), b + sb
        self.reparam_conv = _new_conv(w.detach(), b.detach(), stride=self.stride, groups=self.groups)
        self.large_conv = self.small_conv = None
        return 2


class LayerScale2d(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim, 1, 1), float(init)))

    def forward(self, x):
        return x * self.gamma


def _layer_scale(dim: int, init: float | None) -> nn.Module:
    return LayerScale2d(dim, init) if init is not None else nn.Identity()


class RepMixer(_Reparam):
    """x + layer_scale * (mixer(x) - norm(x)) with depthwise MobileOne mixer and a BN-only `norm`:
    all linear, so it folds into one depthwise conv (the identity included)."""

    def __init__(self, dim: int, k: int, layer_scale: float | None, folded: bool = False):
        super().__init__()
        self.dim, self.k = dim, k
        self.reparam_conv = self.norm = self.mixer = self.layer_scale = None
        if folded:
            self.reparam_conv = nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim)
        else:
            self.norm = MobileOne(dim, dim, k, groups=dim, act=False, scale_branch=False, conv_branches=0)
            self.mixer = MobileOne(dim, dim, k, groups=dim, act=False)
            self.layer_scale = _layer_scale(dim, layer_scale)

    def forward(self, x):
        if self.reparam_conv is not None:
            return self.reparam_conv(x)
        return x + self.layer_scale(self.mixer(x) - self.norm(x))

    def reparameterize(self) -> int:
        if self.reparam_conv is not None:
            return 0
        n = self.mixer.reparameterize() + self.norm.reparameterize()
        mw, mb = self.mixer.reparam_conv.weight, self.mixer.reparam_conv.bias
        nw, nb = self.norm.reparam_conv.weight, self.norm.reparam_conv.bias
        g = self.layer_scale.gamma.reshape(-1) if isinstance(self.layer_scale, LayerScale2d) else torch.ones_like(mb)
        w = _identity_kernel(self.dim, self.dim, self.k, mw) + g.reshape(-1, 1, 1, 1) * (mw - nw)
        self.reparam_conv = _new_conv(w.detach(), (g * (mb - nb)).detach(), groups=self.dim)
        self.norm = self.mixer = self.layer_scale = None
        return n


class RepCPE(_Reparam):
    """Conditional positional encoding x + depthwise_conv(x); folds into one conv."""

    def __init__(self, dim: int, k: int = 7, folded: bool = False):
        super().__init__()
        self.dim, self.k = dim, k
        self.reparam_conv = self.pos_enc = None
        conv = nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim)
        if folded:
            self.reparam_conv = conv
        else:
            self.pos_enc = conv

    def forward(self, x):
        if self.reparam_conv is not None:
            return self.reparam_conv(x)
        return x + self.pos_enc(x)

    def reparameterize(self) -> int:
        if self.reparam_conv is not None:
            return 0
        w = self.pos_enc.weight + _identity_kernel(self.dim, self.dim, self.k, self.pos_enc.weight)
        self.reparam_conv = _new_conv(w.detach(), self.pos_enc.bias.detach(), groups=self.dim)
        self.pos_enc = None
        return 0


class ConvMlp(nn.Module):
    """Depthwise 7x7 conv + BN, then a 1x1 expansion, GELU and a 1x1 projection."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.conv = ConvBn(dim, dim, 7, groups=dim)
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(self.conv(x))))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (timm's LayerNorm2d)."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class MciAttention(Attention):
    """Self-attention over the pixels of an NCHW map: timm's `qkv` (no bias) and `proj` names, the
    kernel from `kernels.get_attention(self.impl)` through `clip.Attention.forward`."""

    def __init__(self, dim: int, head_dim: int):
        super().__init__(dim, dim // head_dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = self._modules.pop("out")  # the output projection under timm's name

    @property
    def out(self):  # clip.Attention.forward calls it `out`
        return self.proj

    def forward(self, x):
        b, c, h, w = x.shape
        y = super().forward(x.flatten(2).transpose(1, 2))
        return y.transpose(1, 2).reshape(b, c, h, w)

    def fold_input_affine_(self, scale, shift) -> None:
        """qkv(x * scale + shift) as one linear (a bias appears where there was none)."""
        old = self.qkv
        new = nn.Linear(old.in_features, old.out_features, bias=True, device=old.weight.device,
                        dtype=old.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(old.weight * scale.reshape(1, -1))
            new.bias.copy_(old.weight @ shift + (old.bias if old.bias is not None else 0))
        self.qkv = new


class MciAneAttention(AneAttention):
    """MciAttention in the Neural Engine layout: the (B, C, H, W) map is viewed as (B, C, 1, H*W) (a
    reshape, no transpose: the tower is channels-first already), qkv/proj run as 1x1 convolutions and
    attention as per-head split einsum; the parameters keep their paths (token_mixer.qkv, .proj)."""

    def __init__(self, attn: MciAttention):
        super().__init__(attn, qkv_name="qkv", out_name="proj")

    def forward(self, x):
        b, c, h, w = x.shape
        return super().forward(x.reshape(b, c, 1, h * w)).reshape(b, c, h, w)


class RepMixerBlock(nn.Module):
    """RepMixer token mixing, then x + layer_scale * ConvMlp(x)."""

    def __init__(self, dim: int, cfg: MciConfig, mlp_ratio: float):
        super().__init__()
        self.token_mixer = RepMixer(dim, cfg.repmixer_kernel, cfg.layer_scale_init, folded=cfg.reparameterized)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio))
        self.layer_scale = _layer_scale(dim, cfg.layer_scale_init)

    def forward(self, x):
        x = self.token_mixer(x)
        return x + self.layer_scale(self.mlp(x))

    def fold_(self) -> Counter:
        """The exact folds timm leaves: the ConvMlp's BatchNorm, the layer scale into fc2."""
        done = Counter(batchnorms=self.mlp.conv.fold_())
        if isinstance(self.layer_scale, LayerScale2d):
            _fold_linear_output(self.mlp.fc2, self.layer_scale.gamma)
            self.layer_scale = nn.Identity()
            done["layer_scales"] += 1
        return done


class AttentionBlock(nn.Module):
    """x + ls1 * attention(norm(x)); x + ls2 * ConvMlp(x)."""

    def __init__(self, dim: int, cfg: MciConfig, mlp_ratio: float):
        super().__init__()
        self.norm = nn.BatchNorm2d(dim) if cfg.norm == "batchnorm" else LayerNorm2d(dim, eps=cfg.norm_eps)
        self.token_mixer = MciAttention(dim, cfg.head_dim)
        self.layer_scale_1 = _layer_scale(dim, cfg.layer_scale_init)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio))
        self.layer_scale_2 = _layer_scale(dim, cfg.layer_scale_init)

    def forward(self, x):
        x = x + self.layer_scale_1(self.token_mixer(self.norm(x)))
        return x + self.layer_scale_2(self.mlp(x))

    def fold_(self) -> Counter:
        """The pre-norm BatchNorm into qkv (it feeds only the attention), the ConvMlp's BatchNorm into
        its conv, the layer scales into the attention's and the MLP's output projections. A LayerNorm
        (MCi3/4) stays: it is not an affine map of its input."""
        done = Counter(batchnorms=self.mlp.conv.fold_())
        if isinstance(self.norm, nn.BatchNorm2d):
            self.token_mixer.fold_input_affine_(*(t.detach() for t in _bn_affine(self.norm)))
            self.norm = nn.Identity()
            done["batchnorms"] += 1
        for name, layer in (("layer_scale_1", self.token_mixer.proj), ("layer_scale_2", self.mlp.fc2)):
            ls = getattr(self, name)
            if isinstance(ls, LayerScale2d):
                _fold_linear_output(layer, ls.gamma)
                setattr(self, name, nn.Identity())
                done["layer_scales"] += 1
        return done


class PatchEmbed(nn.Module):
    """Stage entry: a strided large-kernel depthwise-grouped conv, then a 1x1 MobileOne block."""

    def __init__(self, cin: int, cout: int, cfg: MciConfig, se: bool):
        super().__init__()
        folded = cfg.reparameterized
        self.proj = nn.Sequential(
            LargeKernelConv(cin, cout, cfg.down_patch_size, cfg.down_stride, groups=cin, se=se,
                            act=cfg.lkc_use_act, folded=folded),
            MobileOne(cout, cout, 1, folded=folded),
        )

    def forward(self, x):
        return self.proj(x)


class Stage(nn.Module):
    def __init__(self, i: int, cin: int, cfg: MciConfig):
        super().__init__()
        dim = cfg.embed_dims[i]
        down = cfg.downsamples[i] or cin != dim
        self.downsample = PatchEmbed(cin, dim, cfg, cfg.se_downsamples[i]) if down else nn.Identity()
        self.pos_emb = (RepCPE(dim, cfg.pos_emb_kernel, folded=cfg.reparameterized)
                        if cfg.pos_embs[i] == "rcpe" else nn.Identity())
        block = RepMixerBlock if cfg.token_mixers[i] == "repmixer" else AttentionBlock
        self.blocks = nn.Sequential(*(block(dim, cfg, cfg.mlp_ratios[i]) for _ in range(cfg.layers[i])))

    def forward(self, x):
        return self.blocks(self.pos_emb(self.downsample(x)))


class Head(nn.Module):
    """Global average pool, then the linear layer that is the CLIP projection (`head.fc`)."""

    def __init__(self, features: int, embed_dim: int):
        super().__init__()
        self.fc = nn.Linear(features, embed_dim)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


def _stem(c: int, cfg: MciConfig) -> nn.Sequential:
    kw = {"scale_branch": cfg.stem_scale_branch, "folded": cfg.reparameterized}
    return nn.Sequential(
        MobileOne(3, c, 3, stride=2, **kw),            # dense 3x3, stride 2
        MobileOne(c, c, 3, stride=2, groups=c, **kw),  # depthwise 3x3, stride 2
        MobileOne(c, c, 1, **kw),                      # dense 1x1
    )


@register_tower("mci", "vision")
class MciTower(Tower):
    """MobileCLIP's MCi image tower (timm FastVit layout); settings in `spec.config` (`MciConfig`)."""

    def __init__(self, spec, embed_dim: int):
        super().__init__()
        self.spec = spec
        cfg = self.config = parse_config(spec.config)
        if not _is_pos_int(spec.image_size):
            raise SpecError(f"vision.image_size must be a positive integer, got {spec.image_size!r}")
        self.stem = _stem(cfg.embed_dims[0], cfg)
        stages, cin = [], cfg.embed_dims[0]
        for i in range(len(cfg.layers)):
            stages.append(Stage(i, cin, cfg))
            cin = cfg.embed_dims[i]
        self.stages = nn.Sequential(*stages)
        self.final_conv = MobileOne(cin, cfg.final_features, 3, groups=cin, se=True, folded=cfg.reparameterized)
        self.head = Head(cfg.final_features, embed_dim)
        self.reparameterized = None  # what reparameterize() folded, for the export manifest

    def forward(self, pixels):
        s = self.spec.image_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, s, s):
            raise InputError(f"expected pixels of shape (N, 3, {s}, {s}), got {tuple(pixels.shape)}; "
                             "preprocess images with the model's preprocessing first")
        return self.head(self.final_conv(self.stages(self.stem(pixels))))

    def reparameterize(self) -> dict:
        """Fold every multi-branch block into one conv and every BatchNorm and layer scale next to a
        conv or linear into it, in place (exact up to float rounding); returns and records the counts."""
        done = Counter(blocks=0, batchnorms=0, layer_scales=0)
        with torch.no_grad():
            for m in list(self.modules()):  # pre-order: a RepMixer folds its own MobileOne blocks first
                if isinstance(m, _Reparam) and not m.is_folded:
                    done["batchnorms"] += m.reparameterize()
                    done["blocks"] += 1
                elif isinstance(m, (RepMixerBlock, AttentionBlock)):
                    done.update(m.fold_())
        prev = self.reparameterized or {}
        self.reparameterized = {k: done[k] + prev.get(k, 0) for k in ("blocks", "batchnorms", "layer_scales")}
        return self.reparameterized

    # --- the tower seam (models.towers)
    def prepare_export(self, pooled_only_last: bool) -> None:
        # average pooling reads every position, so there is no pooled-only shortcut; folding is exact
        self.reparameterize()

    def prefer_depthwise(self) -> None:
        self.tiled_convs = tile_multiplier_convs(self)

    def export_report(self) -> dict:
        report = super().export_report()
        if getattr(self, "tiled_convs", 0):
            report["tiled_multiplier_convs"] = self.tiled_convs
        return report

    def quantizable(self, path: str) -> bool:
        # INT8 candidates: the stages' convolutions and linears (1x1 dense MLP convs, attention qkv/proj,
        # patch-embedding and RepMixer depthwise convs: the accuracy guard decides) and final_conv. The
        # stem (raw pixels), squeeze-excite gates (a pooled vector, tiny) and head.fc (the CLIP
        # projection, float in every tower) stay float.
        return path.startswith(("stages.", "final_conv.")) and ".se." not in f".{path}."

    def rewrite_for_ane(self) -> None:
        """The attention blocks in the Neural Engine layout (in place, on an export copy): attention on
        (B, C, 1, H*W) with 1x1 convolutions and per-head split einsum; MCi3/4's LayerNorm2d pre-norm
        normalizes over the channel axis in place instead of permuting to channels-last and back.
        The convolutional blocks are channels-first convolutions already and stay as they are."""
        for block in list(self.modules()):
            if not isinstance(block, AttentionBlock) or not isinstance(block.token_mixer, MciAttention):
                continue  # not an attention block, or rewritten already
            block.token_mixer = MciAneAttention(block.token_mixer)
            if isinstance(block.norm, LayerNorm2d):
                block.norm = LayerNormANE(block.norm)

    def attention_layout(self) -> tuple[int, int | tuple]:
        cfg = self.config
        att = [i for i, m in enumerate(cfg.token_mixers) if m == "attention"]
        heads = [cfg.embed_dims[i] // cfg.head_dim for i in att for _ in range(cfg.layers[i])]
        # one attention op per block; where the stages differ in heads (MCi3/4: 24 and 48) the heads are
        # given per op, in order, so the Neural Engine layout's per-head softmax count is their sum
        if not heads:
            return 0, 0
        return len(heads), heads[0] if len(set(heads)) == 1 else tuple(heads)

    def input_decl(self, trim: bool = False) -> dict:
        s = self.spec.image_size
        return {"pixel_values": {"dtype": "float32", "shape": ["batch", 3, s, s]}}
