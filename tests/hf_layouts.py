"""Test helpers: random transformers checkpoints and an independent HF -> OpenAI key mapping.

The mapping here is written from the OpenAI CLIP layout itself (not from edgeclip's converter), so a
test that loads its output through `openai:` checks edgeclip's converter against an independent one.
"""
from __future__ import annotations

import torch


def clip_config(text_width=64, vision_width=48, layers=2, act="quick_gelu", image=32, patch=8,
                context=77, proj=32, text_heads=4, vision_heads=3):
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(hidden_size=text_width, intermediate_size=2 * text_width, num_hidden_layers=layers,
                         num_attention_heads=text_heads, hidden_act=act, max_position_embeddings=context),
        vision_config=dict(hidden_size=vision_width, intermediate_size=3 * vision_width, num_hidden_layers=layers,
                           num_attention_heads=vision_heads, image_size=image, patch_size=patch, hidden_act=act),
        projection_dim=proj,
    )


def randomize_(model, seed=0):
    """transformers zero-inits biases and sets LayerNorms to identity: perturb everything so that
    a wrongly mapped bias or norm shows up in the features."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("logit_scale") or name.endswith("logit_bias"):
                continue
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def hf_to_openai(sd: dict) -> dict:
    """transformers CLIPModel state dict -> OpenAI CLIP state dict."""
    out = {}

    def blocks(src, dst, n):
        for i in range(n):
            s, d = f"{src}.{i}", f"{dst}.{i}"
            for kind in ("weight", "bias"):
                out[f"{d}.attn.in_proj_{kind}"] = torch.cat(
                    [sd[f"{s}.self_attn.{x}_proj.{kind}"] for x in "qkv"], 0)
                out[f"{d}.attn.out_proj.{kind}"] = sd[f"{s}.self_attn.out_proj.{kind}"]
                out[f"{d}.ln_1.{kind}"] = sd[f"{s}.layer_norm1.{kind}"]
                out[f"{d}.ln_2.{kind}"] = sd[f"{s}.layer_norm2.{kind}"]
                out[f"{d}.mlp.c_fc.{kind}"] = sd[f"{s}.mlp.fc1.{kind}"]
                out[f"{d}.mlp.c_proj.{kind}"] = sd[f"{s}.mlp.fc2.{kind}"]

    def n_layers(prefix):
        return len({k.split(".")[3] for k in sd if k.startswith(prefix)})

    v, t = "vision_model", "text_model"
    out["visual.class_embedding"] = sd[f"{v}.embeddings.class_embedding"]
    out["visual.conv1.weight"] = sd[f"{v}.embeddings.patch_embedding.weight"]
    out["visual.positional_embedding"] = sd[f"{v}.embeddings.position_embedding.weight"]
    for kind in ("weight", "bias"):
        out[f"visual.ln_pre.{kind}"] = sd[f"{v}.pre_layrnorm.{kind}"]
        out[f"visual.ln_post.{kind}"] = sd[f"{v}.post_layernorm.{kind}"]
        out[f"ln_final.{kind}"] = sd[f"{t}.final_layer_norm.{kind}"]
    out["visual.proj"] = sd["visual_projection.weight"].t().contiguous()
    blocks(f"{v}.encoder.layers", "visual.transformer.resblocks", n_layers(f"{v}.encoder.layers."))
    out["token_embedding.weight"] = sd[f"{t}.embeddings.token_embedding.weight"]
    out["positional_embedding"] = sd[f"{t}.embeddings.position_embedding.weight"]
    blocks(f"{t}.encoder.layers", "transformer.resblocks", n_layers(f"{t}.encoder.layers."))
    out["text_projection"] = sd["text_projection.weight"].t().contiguous()
    out["logit_scale"] = sd["logit_scale"].reshape(())
    return {k: v.clone() for k, v in out.items()}


def features(hf_model, pixels, ids):
    """transformers' own image and text features (handles v4 tensors and v5 output objects)."""
    with torch.no_grad():
        img = hf_model.get_image_features(pixel_values=pixels)
        txt = hf_model.get_text_features(input_ids=ids)
    img = getattr(img, "pooler_output", img)
    txt = getattr(txt, "pooler_output", txt)
    return img, txt


def clip_ids(n=3, context=77, seed=0, vocab=49408):
    """Token ids shaped like the CLIP tokenizer's: start, words, end, zero padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(n, context, dtype=torch.long)
    for i in range(n):
        length = int(torch.randint(1, context - 1, (1,), generator=g))
        ids[i, 0] = 49406
        ids[i, 1:length + 1] = torch.randint(1, vocab - 2, (length,), generator=g)
        ids[i, length + 1 if length + 1 < context else context - 1] = 49407
    return ids
