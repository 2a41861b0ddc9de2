"""Map checkpoint state dicts (OpenAI / open_clip / transformers) onto our parameter names.

Each layout is a list of regex rules `(source pattern, our name)`. Split Q/K/V projections are first
packed into one tensor, Long-CLIP's two positional tables are folded into one, and projection
matrices stored as `x @ P` are transposed into `nn.Linear` weights. Every converted tensor remembers
its source key so shape errors can name the key the user has in their file.
"""
from __future__ import annotations

import re

import torch

from ..errors import CheckpointError

_BLOCK = [
    (r"ln_1\.", "ln_1."), (r"ln_2\.", "ln_2."),
    (r"attn\.in_proj_(weight|bias)", r"attn.qkv.\1"), (r"attn\.out_proj\.", "attn.out."),
    (r"mlp\.c_fc\.", "mlp.fc1."), (r"mlp\.c_proj\.", "mlp.fc2."),
]
_HF_BLOCK = [
    (r"layer_norm1\.", "ln_1."), (r"layer_norm2\.", "ln_2."),
    (r"self_attn\.qkv_proj\.", "attn.qkv."), (r"self_attn\.out_proj\.", "attn.out."),
    (r"mlp\.fc1\.", "mlp.fc1."), (r"mlp\.fc2\.", "mlp.fc2."),
]


def _block_rules(src_prefix: str, dst_prefix: str, inner):
    return [(src_prefix + r"(\d+)\." + pat, dst_prefix + r"\1." + rep.replace(r"\1", r"\2")) for pat, rep in inner]


OPENAI_RULES = [
    (r"visual\.conv1\.weight", "visual.patch_embed.weight"),
    (r"visual\.class_embedding", "visual.class_embedding"),
    (r"visual\.positional_embedding", "visual.pos_embed"),
    (r"visual\.ln_pre\.", "visual.ln_pre."),
    (r"visual\.ln_post\.", "visual.ln_post."),
    (r"visual\.proj", "visual.proj.weight"),
    *_block_rules(r"visual\.transformer\.resblocks\.", "visual.blocks.", _BLOCK),
    (r"token_embedding\.weight", "text.token_embed.weight"),
    (r"positional_embedding", "text.pos_embed"),
    *_block_rules(r"transformer\.resblocks\.", "text.blocks.", _BLOCK),
    (r"ln_final\.", "text.ln_final."),
    (r"text_projection", "text.proj.weight"),
    (r"logit_scale", "logit_scale"),
    (r"logit_bias", "logit_bias"),
]
# Entries of OpenAI/open_clip files that are not weights (TorchScript attributes, buffers).
OPENAI_IGNORED = re.compile(
    r"(input_resolution|context_length|vocab_size|attn_mask|mask1|mask2|positional_embedding_res)$"
)
OPENAI_TRANSPOSED = {"visual.proj.weight", "text.proj.weight"}

HF_RULES = [
    (r"vision_model\.embeddings\.class_embedding", "visual.class_embedding"),
    (r"vision_model\.embeddings\.patch_embedding\.", "visual.patch_embed."),
    (r"vision_model\.embeddings\.position_embedding\.weight", "visual.pos_embed"),
    (r"vision_model\.pre_layrnorm\.", "visual.ln_pre."),
    (r"vision_model\.post_layernorm\.", "visual.ln_post."),
    *_block_rules(r"vision_model\.encoder\.layers\.", "visual.blocks.", _HF_BLOCK),
    (r"vision_model\.head\.probe", "visual.attn_pool.probe"),
    (r"vision_model\.head\.attention\.in_proj_(weight|bias)", r"visual.attn_pool.attn.qkv.\1"),
    (r"vision_model\.head\.attention\.out_proj\.", "visual.attn_pool.attn.out."),
    (r"vision_model\.head\.layernorm\.", "visual.attn_pool.ln."),
    (r"vision_model\.head\.mlp\.", "visual.attn_pool.mlp."),
    (r"visual_projection\.weight", "visual.proj.weight"),
    (r"text_model\.embeddings\.token_embedding\.weight", "text.token_embed.weight"),
    (r"text_model\.embeddings\.position_embedding\.weight", "text.pos_embed"),
    *_block_rules(r"text_model\.encoder\.layers\.", "text.blocks.", _HF_BLOCK),
    (r"text_model\.final_layer_norm\.", "text.ln_final."),
    (r"text_model\.head\.", "text.proj."),
    (r"text_projection\.weight", "text.proj.weight"),
    (r"logit_scale", "logit_scale"),
    (r"logit_bias", "logit_bias"),
]
HF_IGNORED = re.compile(r"(position_ids)$")

LONG_CLIP_KEEP = 20  # Long-CLIP keeps CLIP's first 20 positions and learns the rest in a residual table


def unwrap_state_dict(obj, source=None) -> dict:
    """Accept {'state_dict': ...}, {'model': ...}, DDP 'module.' prefixes; anything else but a flat
    dict of str -> tensor raises CheckpointError naming the first offending entry."""
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    where = f"{source}: " if source is not None else ""
    fix = "save one with torch.save(model.state_dict(), path)"
    if not isinstance(obj, dict):
        raise CheckpointError(f"{where}the checkpoint holds a {type(obj).__name__}, not a state dict of tensors; {fix}")
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CheckpointError(
                f"{where}the checkpoint does not hold a state dict of tensors: entry {str(k)[:80]!r} is a "
                f"{type(v).__name__}{'' if isinstance(k, str) else ' under a ' + type(k).__name__ + ' key'}; {fix}")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _rename(sd: dict, rules, ignored) -> tuple[dict, dict]:
    compiled = [(re.compile(p + r"$" if not p.endswith(".") else p + r"(.*)$"), r) for p, r in rules]
    out, origin, unknown = {}, {}, []
    for key, value in sd.items():
        for pat, rep in compiled:
            m = pat.fullmatch(key)
            if m:
                new = m.expand(rep + (r"\g<%d>" % pat.groups if rep.endswith(".") else ""))
                out[new], origin[new] = value, key
                break
        else:
            if not ignored.search(key):
                unknown.append(key)
    if unknown:
        raise CheckpointError(
            f"{len(unknown)} checkpoint entries have no place in the model, e.g. {', '.join(unknown[:5])}; "
            "is this the right loader (hf:/openai:/open_clip:) for this file?"
        )
    return out, origin


def from_openai(sd: dict) -> tuple[dict, dict]:
    """OpenAI CLIP / open_clip CLIP / Long-CLIP layout -> (our state dict, our key -> source key)."""
    sd = dict(sd)
    if "positional_embedding_res" in sd:
        pos, res = sd["positional_embedding"], sd["positional_embedding_res"]
        folded = res.clone()
        folded[:LONG_CLIP_KEEP] = pos[:LONG_CLIP_KEEP]
        sd["positional_embedding"] = folded
    out, origin = _rename(sd, OPENAI_RULES, OPENAI_IGNORED)
    for k in OPENAI_TRANSPOSED & out.keys():
        out[k] = out[k].t().contiguous()
    return out, origin


TEXT_RULES = [r for r in OPENAI_RULES if not r[0].startswith(r"visual\.")]
APPLE_PREFIXES = ("image_encoder.", "text_encoder.")


def from_open_clip_timm(sd: dict, arch: str = "") -> tuple[dict, dict]:
    """open_clip CLIP with a timm image trunk (MobileCLIP, MobileCLIP2) -> (our state dict, origins).

    The trunk's keys are timm's (`visual.trunk.<key>`), which our towers of those kinds reproduce:
    they become `visual.<key>`. The text tower is open_clip's, in OpenAI layout, at the top level
    (CLIP) or under `text.` (CustomTextCLIP, what the MobileCLIP configs build)."""
    apple = next((k for k in sd if k.startswith(APPLE_PREFIXES)), None)
    if apple is not None:
        raise CheckpointError(
            f"checkpoint key '{apple}' is Apple's ml-mobileclip layout, not open_clip's (visual.trunk.*); "
            f"load it with apple:{arch or 'ARCH'} and checkpoint=FILE")
    if not any(k.startswith("visual.trunk.") for k in sd):
        found = next((k for k in sd if k.startswith("visual.")), next(iter(sd), "<empty>"))
        raise CheckpointError(
            f"open_clip:{arch} expects a timm image trunk (visual.trunk.* keys), but the checkpoint has "
            f"'{found}'; is this the checkpoint of another architecture (a ViT CLIP: open_clip:ViT-B-32)?")
    out, origin, text = {}, {}, {}
    text_origin = {}
    for key, value in sd.items():
        if key.startswith("visual.trunk."):
            ours = "visual." + key[len("visual.trunk."):]
            out[ours], origin[ours] = value, key
        elif key.startswith("visual."):
            raise CheckpointError(f"checkpoint key '{key}' has no place in the model: open_clip:{arch} uses the "
                                  "trunk's own head as projection (timm_proj null); check the architecture name")
        else:
            bare = key[len("text."):] if key.startswith("text.") else key
            text[bare], text_origin[bare] = value, key
    renamed, names = _rename(text, TEXT_RULES, OPENAI_IGNORED)
    for k in OPENAI_TRANSPOSED & renamed.keys():
        renamed[k] = renamed[k].t().contiguous()
    out.update(renamed)
    origin.update({k: text_origin[v] for k, v in names.items()})
    return out, origin


# Apple's FastViT names -> timm's (which our MCi tower reproduces): plain renames, then the flat
# `network.I` list (stages, downsamplings, position encodings in turn) regrouped into stages.
APPLE_RENAMES = [("patch_embed", "stem"), ("rbr_conv", "conv_kxk"), ("rbr_scale", "conv_scale"),
                 ("rbr_skip", "identity"), ("conv_exp", "final_conv"), ("lkb_origin", "large_conv"),
                 ("lkb_reparam", "reparam_conv"), ("convffn", "mlp"), ("se.reduce", "se.fc1"),
                 ("se.expand", "se.fc2")]


def _apple_image_key(key: str, stage_ends: list) -> str:
    import bisect

    for old, new in APPLE_RENAMES:
        key = key.replace(old, new)
    key = re.sub(r"(layer_scale(_\d)?)$", r"\1.gamma", key)
    m = re.match(r"network\.(\d+)\.(.*)$", key)
    if m is None:
        return key
    i, rest = int(m.group(1)), m.group(2)
    stage = bisect.bisect_right(stage_ends, i)  # downsamplings at or before entry i
    if rest.startswith("proj."):
        return f"stages.{stage}.downsample.{rest}"
    if rest.startswith("pe."):
        return f"stages.{stage}.pos_emb.pos_enc.{rest[3:]}"
    if rest.startswith("reparam_conv."):  # a folded position encoding: blocks are network.I.J.*
        return f"stages.{stage}.pos_emb.{rest}"
    return f"stages.{stage}.blocks.{rest}"


def from_apple_mobileclip(sd: dict) -> tuple[dict, dict]:
    """Apple's ml-mobileclip layout (`image_encoder.model.*` FastViT-MCi, `text_encoder.*`) -> ours.

    The image projection is Apple's `head.proj` (x @ P after mean pooling): our head is a Linear,
    so it is transposed and gets a zero bias."""
    if not any(k.startswith("image_encoder.model.") for k in sd):
        found = next(iter(sd), "<empty>")
        raise CheckpointError(f"not an Apple ml-mobileclip MCi checkpoint: no image_encoder.model.* keys (first key "
                              f"'{found}'); open_clip checkpoints load with open_clip:ARCH")
    img = {k[len("image_encoder.model."):]: k for k in sd if k.startswith("image_encoder.model.")}
    stage_ends = sorted({int(m.group(1)) for k in img if (m := re.match(r"network\.(\d+)\.proj\.", k))})
    out, origin, unknown = {}, {}, []
    for bare, key in img.items():
        ours = "visual." + _apple_image_key(bare, stage_ends)
        value = sd[key]
        if bare == "head.proj":
            ours, value = "visual.head.fc.weight", value.t().contiguous()
            out["visual.head.fc.bias"], origin["visual.head.fc.bias"] = torch.zeros(value.shape[0]), key
        out[ours], origin[ours] = value, key
    for key, value in sd.items():
        if key.startswith("text_encoder."):
            ours = "text." + key[len("text_encoder."):]
        elif key in ("logit_scale", "logit_bias"):
            ours = key
        elif key.startswith("image_encoder.model."):
            continue
        else:
            unknown.append(key)
            continue
        out[ours], origin[ours] = value, key
    if unknown:
        raise CheckpointError(f"{len(unknown)} checkpoint entries have no place in an Apple MobileCLIP model, e.g. "
                              f"{', '.join(unknown[:5])}")
    return out, origin


def from_hf(sd: dict) -> tuple[dict, dict]:
    """transformers CLIPModel / SiglipModel layout -> (our state dict, our key -> source key)."""
    sd = dict(sd)
    origin_qkv = {}
    for key in [k for k in sd if ".self_attn.q_proj." in k]:
        parts = [sd.pop(key.replace(".q_proj.", f".{n}_proj.")) for n in "qkv"]
        fused = key.replace(".q_proj.", ".qkv_proj.")
        sd[fused] = torch.cat(parts, dim=0)
        origin_qkv[fused] = key.replace(".q_proj.", ".{q,k,v}_proj.")
    out, origin = _rename(sd, HF_RULES, HF_IGNORED)
    origin = {k: origin_qkv.get(v, v) for k, v in origin.items()}
    return out, origin
