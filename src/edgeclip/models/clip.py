"""Our own export-friendly CLIP: vision and text towers built from a ModelSpec.

Design notes:
- Attention goes through `kernels.get_attention(name)` so targets can swap the implementation
  on a deep copy (the export path never touches the caller's model).
- Q, K and V share one packed projection (`qkv`), like OpenAI/open_clip checkpoints; HF's split
  projections are concatenated by the loader.
- `pooled_only_last` makes the last block compute only the token that is pooled (class token,
  EOT token, last token). Earlier blocks must see every token, the last one need not: an exact
  speed-up, not an approximation. It is off by default on the reference model.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import InputError
from ..kernels import get_attention
from ..specs import ModelSpec, TextSpec, VisionSpec
from .towers import Tower, build_tower, register_tower


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


def make_act(name: str) -> nn.Module:
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    raise ValueError(f"unknown activation {name!r}")


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = make_act(act)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention with a packed QKV projection and a swappable kernel."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = width // heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.impl = "reference"
        self.q_proj = self.kv_proj = None  # set by split_qkv() for export

    def split_qkv(self) -> None:
        """Separate Q and KV projections for the pooled-query path, so exported graphs hold them as
        plain weights (quantizable, no per-call slicing) instead of slices of the packed weight."""
        w = self.qkv.weight.shape[1]
        self.q_proj, self.kv_proj = nn.Linear(w, w), nn.Linear(w, 2 * w)
        with torch.no_grad():
            self.q_proj.weight.copy_(self.qkv.weight[:w])
            self.q_proj.bias.copy_(self.qkv.bias[:w])
            self.kv_proj.weight.copy_(self.qkv.weight[w:])
            self.kv_proj.bias.copy_(self.qkv.bias[w:])

    def _split(self, x):  # (B, L, W) -> (B, H, L, D)
        b, n, _ = x.shape
        return x.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x, *, causal: bool = False, query=None, attn_mask=None):
        """Self-attention over x; with `query` (B, Lq, W) only those queries are computed."""
        w = self.qkv.weight.shape[1]
        if query is None:
            q, k, v = self.qkv(x).split(w, dim=-1)
        elif self.q_proj is not None:
            q = self.q_proj(query)
            k, v = self.kv_proj(x).split(w, dim=-1)
        else:
            q = F.linear(query, self.qkv.weight[:w], self.qkv.bias[:w])
            k, v = F.linear(x, self.qkv.weight[w:], self.qkv.bias[w:]).split(w, dim=-1)
        fn = get_attention(self.impl)
        o = fn(self._split(q), self._split(k), self._split(v), causal=causal,
               scale=self.head_dim**-0.5, attn_mask=attn_mask)
        b, _, n, _ = o.shape
        return self.out(o.transpose(1, 2).reshape(b, n, w))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_dim: int, act: str, eps: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, mlp_dim, act)

    def forward(self, x, *, causal: bool = False, pool_index=None, attn_mask=None):
        """pool_index (B,) selects one query token per row: the block returns (B, 1, W)."""
        h = self.ln_1(x)
        if pool_index is None:
            x = x + self.attn(h, causal=causal, attn_mask=attn_mask)
        else:
            x = _take(x, pool_index)
            x = x + self.attn(h, query=_take(h, pool_index), attn_mask=attn_mask)
        return x + self.mlp(self.ln_2(x))


def end_token_table(spec: TextSpec, like) -> torch.Tensor | None:
    """(V,) 1.0 at the id the text tower pools at (the end token; with `eot_token_id: null`, Apple's
    argmax of ids, the vocabulary's last id, which is the end token of CLIP's vocabulary), else 0.
    None for last-position pooling (a constant slice)."""
    if spec.pool == "last":
        return None
    table = torch.zeros(spec.vocab_size, dtype=like.dtype, device=like.device)
    table[spec.vocab_size - 1 if spec.eot_token_id is None else spec.eot_token_id] = 1.0
    return table


def pool_weights(ids, table) -> torch.Tensor:
    """(B, L) one-hot of the first position whose id `table` marks, by plain ops: a lookup of the
    marked ids, then a running count of them (a MatMul with a triangular constant) that keeps the
    first. The same position as `pool_index` for every row that holds a marked id (the runtime's
    tokenizer always ends a row with one)."""
    hit = F.embedding(ids, table.unsqueeze(1)).squeeze(-1)                       # (B, L) 0/1
    n = ids.shape[1]
    upto = torch.ones(n, n, dtype=hit.dtype, device=hit.device).triu()        # upto[i, j] = i <= j
    return hit * torch.relu(2.0 - hit @ upto)


def _pooled_causal_mask(index, n: int, x):
    """(B, 1, 1, L) additive mask: the pooled query at position p may see keys 0..p only."""
    if isinstance(index, int):
        return None if index == n - 1 else _pooled_causal_mask(torch.full((x.shape[0],), index), n, x)
    if index.is_floating_point():  # one-hot weights: keys at or before p are the reverse running sum
        seen = index @ torch.ones(n, n, dtype=index.dtype, device=index.device).tril()
        return ((seen - 1.0) * MASKED).to(x.dtype)[:, None, None, :]
    keys = torch.arange(n, device=index.device).unsqueeze(0)
    blocked = keys > index.unsqueeze(1)
    mask = torch.zeros(blocked.shape, dtype=x.dtype, device=x.device)
    return mask.masked_fill(blocked, float("-inf"))[:, None, None, :]


# an additive attention mask entry that removes a key in float16 as in float32 (exp(-30000) == 0)
MASKED = 30000.0


def _take(x, index):
    """x (B, L, W), index (B,) or one int for every row, or a (B, L) float one-hot of the position
    (`pool_weights`: plain ops, for mobile graphs) -> (B, 1, W)."""
    if isinstance(index, int):
        return x[:, index:index + 1]
    if index.is_floating_point():
        return index.unsqueeze(1).to(x.dtype) @ x
    # repeat, not expand: Core ML's converter turns an expanded int index into float
    idx = index.reshape(-1, 1, 1).repeat(1, 1, x.shape[-1])
    return torch.gather(x, 1, idx)


class AttentionPool(nn.Module):
    """SigLIP's multi-head attention pooling head (a learned probe attends over all tokens)."""

    def __init__(self, width: int, heads: int, mlp_dim: int, act: str, eps: float):
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(1, 1, width))
        self.attn = Attention(width, heads)
        self.ln = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, mlp_dim, act)

    def forward(self, x):
        q = self.probe.expand(x.shape[0], -1, -1)
        h = self.attn(x, query=q)
        return (h + self.mlp(self.ln(h)))[:, 0]


class PatchLinear(nn.Module):
    """A Conv2d with kernel = stride = p, as patchify + linear: (N, 3, H, W) -> (N, (H/p)(W/p), C)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.p = conv.kernel_size[0]
        self.weight = nn.Parameter(conv.weight.detach().reshape(conv.out_channels, -1).t().contiguous(),
                                   requires_grad=False)  # (3 p p, C), rows in (channel, y, x) order
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)

    def forward(self, pixels):
        n, c, h, w = pixels.shape
        p = self.p
        x = pixels.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // p) * (w // p), c * p * p)
        x = x @ self.weight
        return x if self.bias is None else x + self.bias


def _split_last_qkv(blocks) -> None:
    blocks[-1].attn.split_qkv()  # the pooled query alone takes its own projection


@register_tower("vit", "vision")
class VisionTower(Tower):
    """ViT image tower: patch embedding, class token, pre-norm transformer blocks, class-token or
    attention-pool (SigLIP) pooling, projection."""

    def __init__(self, spec: VisionSpec, embed_dim: int):
        super().__init__()
        self.spec = spec
        w = spec.width
        self.patch_embed = nn.Conv2d(3, w, spec.patch_size, spec.patch_size, bias=spec.patch_bias)
        self.class_embedding = nn.Parameter(torch.zeros(w)) if spec.class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(spec.num_tokens, w))
        self.ln_pre = nn.LayerNorm(w, eps=spec.ln_eps) if spec.pre_norm else None
        self.blocks = nn.ModuleList(
            Block(w, spec.heads, spec.mlp_dim, spec.act, spec.ln_eps) for _ in range(spec.layers)
        )
        self.ln_post = nn.LayerNorm(w, eps=spec.ln_eps)
        self.attn_pool = (
            AttentionPool(w, spec.heads, spec.mlp_dim, spec.act, spec.ln_eps) if spec.pool == "map" else None
        )
        self.proj = nn.Linear(w, embed_dim, bias=False) if spec.proj else None
        self.pooled_only_last = False
        self.patch_linear = None  # set_patch_as_matmul
        self.ane_blocks = None    # kernels.ane.rewrite_for_ane: the blocks in the Neural Engine layout

    def set_patch_as_matmul(self, on: bool = True) -> None:
        """Run the stride-p patch convolution as a patchify reshape + one GEMM (`PatchLinear`): the
        same sums, and runtimes whose GEMMs beat their convolutions (ONNX Runtime on CPU) gain."""
        self.patch_linear = PatchLinear(self.patch_embed) if on else None

    # --- the tower seam (models.towers)
    def prepare_export(self, pooled_only_last: bool) -> None:
        self.pooled_only_last = pooled_only_last
        if pooled_only_last:
            _split_last_qkv(self.blocks)
        if self.attn_pool is not None:
            self.attn_pool.attn.split_qkv()

    def prefer_gemm(self) -> None:
        self.set_patch_as_matmul(True)  # ORT's CPU GEMM beats its convolution for stride-p patches

    def rewrite_for_ane(self) -> None:
        from ..kernels.ane import AneBlocks

        # ANE prefers the whole block in one layout to a gathered single query
        self.pooled_only_last = False
        self.ane_blocks = AneBlocks(self.blocks)
        if self.attn_pool is not None:
            self.attn_pool.attn.impl = "ane"

    def quantizable(self, path: str) -> bool:
        # the linear layers of the transformer blocks; the patch embedding, attention pool and final
        # projection stay float (numerically sensitive, little of the compute)
        return path.startswith("blocks.")

    def attention_layout(self) -> tuple[int, int]:
        return self.spec.layers + (1 if self.attn_pool is not None else 0), self.spec.heads

    def input_decl(self, trim: bool = False) -> dict:
        s = self.spec.image_size
        return {"pixel_values": {"dtype": "float32", "shape": ["batch", 3, s, s]}}

    def embed_patches(self, pixels):
        """(N, 3, H, W) -> (N, L, width)."""
        if self.patch_linear is not None:
            return self.patch_linear(pixels)
        return self.patch_embed(pixels).flatten(2).transpose(1, 2)

    def forward(self, pixels):
        s = self.spec
        if pixels.dim() != 4 or pixels.shape[1] != 3 or pixels.shape[2] != s.image_size or pixels.shape[3] != s.image_size:
            raise InputError(
                f"expected pixels of shape (N, 3, {s.image_size}, {s.image_size}), got {tuple(pixels.shape)}; "
                "preprocess images with the model's preprocessing first"
            )
        x = self.embed_patches(pixels)
        if self.class_embedding is not None:
            cls = self.class_embedding.reshape(1, 1, -1).expand(x.shape[0], 1, -1)
            x = torch.cat([cls.to(x.dtype), x], dim=1)
        x = x + self.pos_embed.to(x.dtype)
        if self.ln_pre is not None:
            x = self.ln_pre(x)
        # The class token is the only one read after the last block: compute just it there.
        fast = self.pooled_only_last and s.pool == "cls"
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks if self.ane_blocks is None else ()):
            if fast and i == last:
                x = blk(x, pool_index=0)  # the class token: a slice, no gather
            else:
                x = blk(x)
        if self.ane_blocks is not None:
            x = self.ane_blocks(x)
        if s.pool == "cls":
            x = self.ln_post(x[:, 0])
        else:
            x = self.attn_pool(self.ln_post(x))
        return self.proj(x) if self.proj is not None else x


@register_tower("transformer", "text")
class TextTower(Tower):
    """Transformer text tower: token and position embeddings, causal (CLIP) or bidirectional
    (SigLIP) blocks, end-token or last-position pooling, projection."""

    def __init__(self, spec: TextSpec, embed_dim: int):
        super().__init__()
        self.spec = spec
        w = spec.width
        self.token_embed = nn.Embedding(spec.vocab_size, w)
        self.pos_embed = nn.Parameter(torch.zeros(spec.context_length, w))
        self.blocks = nn.ModuleList(
            Block(w, spec.heads, spec.mlp_dim, spec.act, spec.ln_eps) for _ in range(spec.layers)
        )
        self.ln_final = nn.LayerNorm(w, eps=spec.ln_eps)
        self.proj = nn.Linear(w, embed_dim, bias=spec.proj_bias) if spec.proj else None
        self.pooled_only_last = False
        self.ane_blocks = None
        self.mask_pooling, self.pool_table = False, None  # prefer_mask_pooling

    def pool_at(self, ids):
        """What `_take` pools with: `pool_index`, or with mask pooling the one-hot weights (or the
        last position, a constant slice)."""
        if not self.mask_pooling:
            return self.pool_index(ids)
        return ids.shape[1] - 1 if self.pool_table is None else pool_weights(ids, self.pool_table)

    def pool_index(self, ids):
        """Position of the pooled token per row, (B,) int64."""
        s = self.spec
        if s.pool == "last":
            return torch.full((ids.shape[0],), ids.shape[1] - 1, dtype=torch.long, device=ids.device)
        if s.eot_token_id is None:
            return ids.argmax(dim=-1)
        # first occurrence of the end token (argmax returns the first maximum)
        return (ids == s.eot_token_id).to(torch.int32).argmax(dim=-1).to(torch.long)

    def forward(self, ids):
        s = self.spec
        if ids.dim() != 2 or ids.shape[1] > s.context_length:
            raise InputError(
                f"expected token ids of shape (N, L) with L <= {s.context_length}, got {tuple(ids.shape)}"
            )
        n = ids.shape[1]
        x = self.token_embed(ids) + self.pos_embed[:n].to(self.token_embed.weight.dtype)
        index = self.pool_at(ids)
        if self.ane_blocks is not None:
            return self._pool(self.ane_blocks(x), index)
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            if self.pooled_only_last and i == last:
                mask = _pooled_causal_mask(index, n, x) if s.causal else None
                x = blk(x, pool_index=index, attn_mask=mask)[:, 0]
                x = self.ln_final(x)
                break
            x = blk(x, causal=s.causal)
        else:
            return self._pool(x, index)
        return self.proj(x) if self.proj is not None else x

    # --- the tower seam (models.towers)
    def prepare_export(self, pooled_only_last: bool) -> None:
        self.pooled_only_last = pooled_only_last
        if pooled_only_last:
            _split_last_qkv(self.blocks)

    def prefer_mask_pooling(self) -> None:
        self.mask_pooling, self.pool_table = True, end_token_table(self.spec, self.token_embed.weight)

    def rewrite_for_ane(self) -> None:
        from ..kernels.ane import AneBlocks

        self.pooled_only_last = False
        self.ane_blocks = AneBlocks(self.blocks, causal=self.spec.causal)

    def quantizable(self, path: str) -> bool:
        return path.startswith("blocks.")

    def attention_layout(self) -> tuple[int, int]:
        return self.spec.layers, self.spec.heads

    def input_decl(self, trim: bool = False) -> dict:
        length = "length" if trim else self.spec.context_length
        return {"input_ids": {"dtype": "int64", "shape": ["batch", length]}}

    def _pool(self, x, index):
        x = _take(self.ln_final(x), index)[:, 0]
        return self.proj(x) if self.proj is not None else x


class ClipModel(nn.Module):
    """A CLIP-family model: `encode_image`, `encode_text` (unnormalized features), logit scale/bias."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.visual = build_tower("vision", spec.vision, spec.embed_dim)
        self.text = build_tower("text", spec.text, spec.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(spec.logit_scale)))
        self.logit_bias = (
            nn.Parameter(torch.tensor(float(spec.logit_bias))) if spec.logit_bias is not None else None
        )

    def encode_image(self, pixels):
        return self.visual(pixels)

    def encode_text(self, ids):
        return self.text(ids)

    def forward(self, pixels, ids):
        """Image-text logits (N_images, N_texts), as the model was trained to score them."""
        img = F.normalize(self.encode_image(pixels), dim=-1)
        txt = F.normalize(self.encode_text(ids), dim=-1)
        logits = self.logit_scale.exp() * img @ txt.t()
        return logits + self.logit_bias if self.logit_bias is not None else logits

    def set_attention(self, name: str) -> "ClipModel":
        """Use attention implementation `name` (see kernels.attention_impls()) everywhere, in place."""
        get_attention(name)  # fail early on an unknown name
        for m in self.modules():
            if isinstance(m, Attention):
                m.impl = name
        return self

    def towers(self) -> dict:
        """{module path: tower}: the image and text towers, as the export graphs name them."""
        return {"visual": self.visual, "text": self.text}

    def quantizable(self, path: str) -> bool:
        """Whether INT8 may quantize the linear layer at `path` ("visual.blocks.3.mlp.fc1"): the tower decides."""
        first, _, rest = path.partition(".")
        tower = self.towers().get(first)
        return tower is not None and tower.quantizable(rest)

    def set_pooled_only_last(self, enabled: bool = True) -> "ClipModel":
        self.visual.pooled_only_last = enabled
        self.text.pooled_only_last = enabled
        return self

    def init_random(self, seed: int = 0) -> "ClipModel":
        """CLIP-style random initialisation, deterministic for a seed."""
        g = torch.Generator().manual_seed(seed)

        def normal_(t, std):
            with torch.no_grad():
                t.copy_(torch.randn(t.shape, generator=g) * std)

        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                normal_(m.weight, 0.1)
                with torch.no_grad():
                    m.weight.add_(1.0)
                normal_(m.bias, 0.02)
            elif isinstance(m, (nn.Linear, nn.Conv2d)):
                normal_(m.weight, m.weight[0].numel() ** -0.5)
                if m.bias is not None:
                    normal_(m.bias, 0.02)
            elif isinstance(m, nn.Embedding):
                normal_(m.weight, 0.02)
        # embeddings and probes that are bare parameters (a tower without them has none to draw)
        pool = getattr(self.visual, "attn_pool", None)
        for p in (getattr(self.visual, "class_embedding", None), getattr(self.visual, "pos_embed", None),
                  getattr(self.text, "pos_embed", None), getattr(pool, "probe", None)):
            if p is not None:
                normal_(p, 0.02)
        for tower in self.towers().values():  # a tower kind's own (drawn after the shared ones: same ViT draws)
            for p in tower.random_parameters():
                normal_(p, 0.02)
        return self
