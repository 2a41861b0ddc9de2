"""What every target exports: the image and text graphs as torch modules, their declared I/O, the
fixed validation inputs, and the comparison against the torch reference."""
from __future__ import annotations

import copy
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .tolerance import Tolerance, compare, raise_if_failed  # noqa: F401  (what targets validate with)
from ..models.clip import ClipModel
from ..runtime.vectors import l2_normalize
from ..models.inputs import reference_inputs  # noqa: F401  (targets validate on these)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.float32}  # int8: float graph, then quantized


class ImageGraph(nn.Module):
    """pixel_values (N,3,H,W) float32 -> image_embeds (N,E) [+ logits (N,C) when a zero-shot head is
    baked] [+ per adapter head: logits_<name> (N,C_h) and, when it holds class text, mcm_<name> (N,)].

    Adapter heads run in float32 on the tower's features whatever the tower's precision: one graph
    call goes from pixels to every head's logits."""

    def __init__(self, model: ClipModel, head: np.ndarray | None = None, dtype=torch.float32, heads=()):
        super().__init__()
        self.visual, self.dtype = model.visual, dtype
        self.has_head = head is not None
        if self.has_head:
            self.register_buffer("class_embeds", torch.from_numpy(head).to(dtype))
            self.register_buffer("scale", model.logit_scale.detach().exp().to(dtype))
            bias = model.logit_bias.detach() if model.logit_bias is not None else torch.tensor(0.0)
            self.register_buffer("bias", bias.to(dtype))
        self.heads = nn.ModuleDict({h.name: h.module() for h in heads})
        # MCM needs the zero-shot cosines: taken from the head when it computes them anyway (Tip-Adapter),
        # else one more (C, E) product
        self.mcm = nn.ModuleDict({h.name: McmScore(h.arrays["text_weights"], reuse=getattr(
            self.heads[h.name], "shares_cosines", False)) for h in heads if h.has_text})
        for name, mcm in self.mcm.items():
            if mcm.reuse:
                self.heads[name].return_cosines = True
        self.output_names = ["image_embeds"] + (["logits"] if self.has_head else []) + \
            [n for h in heads for n in head_outputs(h).values() if n]

    def forward(self, pixel_values):
        feats = self.visual(pixel_values.to(self.dtype))
        outs = [feats.float()]
        if self.has_head:
            outs.append((self.scale * F.normalize(feats, dim=-1) @ self.class_embeds.t() + self.bias).float())
        for name, head in self.heads.items():
            x = feats.to(next(head.buffers()).dtype)  # float32, unless the whole graph was cast
            mcm = self.mcm[name] if name in self.mcm else None
            if mcm is not None and mcm.reuse:
                logits, cosines = head(x)
                outs += [logits.float(), mcm.from_cosines(cosines).float()]
                continue
            outs.append(head(x).float())
            if mcm is not None:
                outs.append(mcm(x).float())
        return outs[0] if len(outs) == 1 else tuple(outs)


class McmScore(nn.Module):
    """Maximum concept matching (out-of-distribution score): max softmax of zero-shot cosines / T."""

    def __init__(self, text_weights: np.ndarray, reuse: bool = False):
        super().__init__()
        from ..heads.base import MCM_TEMPERATURE

        self.reuse, self.temperature = reuse, MCM_TEMPERATURE
        if not reuse:
            t = l2_normalize(text_weights)
            self.register_buffer("classes", torch.from_numpy(np.ascontiguousarray(t.T, dtype=np.float32)))

    def forward(self, feats):
        return self.from_cosines(F.normalize(feats, dim=-1) @ self.classes)

    def from_cosines(self, cosines):
        return torch.softmax(cosines / self.temperature, dim=-1).amax(dim=-1)


def head_outputs(head) -> dict:
    """The image graph's outputs for one adapter head: {"logits": name, "mcm": name or None}."""
    return {"logits": f"logits_{head.name}", "mcm": f"mcm_{head.name}" if head.has_text else None}


class TextGraph(nn.Module):
    """input_ids (N,L) int64 -> text_embeds (N,E) float32."""

    def __init__(self, model: ClipModel, dtype=torch.float32):
        super().__init__()
        self.text, self.dtype = model.text, dtype

    def forward(self, input_ids):
        return self.text(input_ids).float()


def io_spec(model, head_classes: int = 0, trim: bool | None = None, heads=()) -> dict:
    """Declared inputs/outputs of both graphs (names, dtypes, shapes with symbolic axes); the towers
    declare their inputs.

    `trim`: whether the text graph takes a variable length (default: whenever the spec allows it)."""
    spec = model.spec
    image_out = {"image_embeds": {"dtype": "float32", "shape": ["batch", spec.embed_dim]}}
    if head_classes:
        image_out["logits"] = {"dtype": "float32", "shape": ["batch", head_classes]}
    for h in heads:
        out = head_outputs(h)
        image_out[out["logits"]] = {"dtype": "float32", "shape": ["batch", h.num_classes]}
        if out["mcm"]:
            image_out[out["mcm"]] = {"dtype": "float32", "shape": ["batch"]}
    trim = trim_supported(spec) if trim is None else (trim and trim_supported(spec))
    return {
        "image": {"inputs": model.visual.input_decl(), "outputs": image_out},
        "text": {"inputs": model.text.input_decl(trim),
                 "outputs": {"text_embeds": {"dtype": "float32", "shape": ["batch", spec.embed_dim]}}},
    }


def trim_supported(spec) -> bool:
    """Trimming after the last end token is exact only with a causal mask and end-token pooling."""
    return spec.text.causal and spec.text.pool == "eot"


def prepare(model: ClipModel, opts, attention: str = "reference", dtype=None) -> ClipModel:
    """A deep copy with the export rewrites applied; the caller's model is untouched.

    `attention`: the target's preferred implementation, used unless `opts.attention` names one."""
    m = copy.deepcopy(model).eval().float()
    m.set_attention(opts.attention or attention)
    for tower in m.towers().values():
        tower.prepare_export(opts.pooled_only_last)
    for p in m.parameters():
        p.requires_grad_(False)
    return m.to(dtype or DTYPES[opts.precision])


# ------------------------------------------------------------------------------------- validation

def reference_outputs(model: ClipModel, inputs: dict, head: np.ndarray | None, heads=()) -> dict:
    """The float32 torch reference, computed on the caller's (unmodified) model; adapter heads by
    their numpy reference on those features."""
    with torch.no_grad():
        img = model.encode_image(torch.from_numpy(inputs["pixel_values"]))
        txt = model.encode_text(torch.from_numpy(inputs["input_ids"]))
        out = {"image_embeds": img.float().numpy(), "text_embeds": txt.float().numpy()}
        if head is not None:
            scale = model.logit_scale.exp().item()
            bias = model.logit_bias.item() if model.logit_bias is not None else 0.0
            out["logits"] = (scale * F.normalize(img, dim=-1).numpy() @ head.T + bias).astype(np.float32)
    for h in heads:
        names = head_outputs(h)
        out[names["logits"]] = h.logits(out["image_embeds"])
        if names["mcm"]:
            out[names["mcm"]] = h.mcm(out["image_embeds"])
    return out
