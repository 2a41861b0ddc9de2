"""What every target exports: the image and text graphs as torch modules, their declared I/O, the
fixed validation inputs, and the comparison against the torch reference."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ValidationError
from ..models.clip import ClipModel

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
            t = text_weights / np.maximum(np.linalg.norm(text_weights, axis=-1, keepdims=True), 1e-12)
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


def io_spec(spec, head_classes: int = 0, trim: bool | None = None, heads=()) -> dict:
    """Declared inputs/outputs of both graphs (names, dtypes, shapes with symbolic axes).

    `trim`: whether the text graph takes a variable length (default: whenever the spec allows it)."""
    s = spec.vision.image_size
    image_out = {"image_embeds": {"dtype": "float32", "shape": ["batch", spec.embed_dim]}}
    if head_classes:
        image_out["logits"] = {"dtype": "float32", "shape": ["batch", head_classes]}
    for h in heads:
        out = head_outputs(h)
        image_out[out["logits"]] = {"dtype": "float32", "shape": ["batch", h.num_classes]}
        if out["mcm"]:
            image_out[out["mcm"]] = {"dtype": "float32", "shape": ["batch"]}
    trim = trim_supported(spec) if trim is None else (trim and trim_supported(spec))
    text_len = "length" if trim else spec.text.context_length
    return {
        "image": {"inputs": {"pixel_values": {"dtype": "float32", "shape": ["batch", 3, s, s]}},
                  "outputs": image_out},
        "text": {"inputs": {"input_ids": {"dtype": "int64", "shape": ["batch", text_len]}},
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
    m.set_pooled_only_last(opts.pooled_only_last)
    if opts.pooled_only_last:
        for blocks in (m.visual.blocks, m.text.blocks):
            blocks[-1].attn.split_qkv()
    if m.visual.attn_pool is not None:
        m.visual.attn_pool.attn.split_qkv()
    for p in m.parameters():
        p.requires_grad_(False)
    return m.to(dtype or DTYPES[opts.precision])


# ------------------------------------------------------------------------------------- validation

def reference_inputs(spec, n: int = 3, seed: int = 1234) -> dict:
    """Fixed inputs: smooth random images (like preprocessed photos) and tokenizer-shaped ids."""
    g = np.random.default_rng(seed)
    s = spec.vision.image_size
    coarse = g.normal(size=(n, 3, max(2, s // 8), max(2, s // 8))).astype(np.float32)
    pixels = F.interpolate(torch.from_numpy(coarse), size=(s, s), mode="bilinear", align_corners=False)
    pixels = (pixels + 0.1 * torch.from_numpy(g.normal(size=(n, 3, s, s)).astype(np.float32))).numpy()
    t = spec.text
    ids = np.zeros((n, t.context_length), dtype=np.int64)
    lengths = [3, min(12, t.context_length - 2), t.context_length - 2][:n]
    for i, length in enumerate(lengths):
        ids[i, : length + 2] = g.integers(1, min(t.vocab_size - 3, 49405), size=length + 2)
        if t.pool == "eot":
            ids[i, 0] = 49406 if t.vocab_size > 49406 else ids[i, 0]
            ids[i, length + 1] = t.eot_token_id if t.eot_token_id is not None else t.vocab_size - 1
    if t.pool == "last":  # SigLIP: padded to full length with its pad id, end token before the padding
        ids[ids == 0] = 1
    return {"pixel_values": pixels.astype(np.float32), "input_ids": ids}


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


@dataclass(frozen=True)
class Tolerance:
    max_abs: float      # relative to max(1, |reference|max): features of real checkpoints can be large
    min_cosine: float


def compare(got: dict, ref: dict, tol: Tolerance) -> dict:
    """Per output: max abs error, min cosine, pass/fail."""
    report = {}
    for name, r in ref.items():
        g = got[name].astype(np.float64)
        r = r.astype(np.float64)
        err = float(np.abs(g - r).max())
        cos = float(np.min((g * r).sum(-1) / (np.linalg.norm(g, axis=-1) * np.linalg.norm(r, axis=-1) + 1e-12)))
        bound = tol.max_abs * max(1.0, float(np.abs(r).max()))
        report[name] = {"max_abs": err, "min_cosine": cos, "max_abs_bound": bound, "min_cosine_bound": tol.min_cosine,
                        "ok": bool(err <= bound and cos >= tol.min_cosine)}
    return report


def raise_if_failed(report: dict, where: str) -> None:
    failures = [(name, r) for name, r in report.items() if not r["ok"]]
    if failures:
        lines = [f"  {name}: max abs {r['max_abs']:.3g} (bound {r['max_abs_bound']:.3g}), "
                 f"min cosine {r['min_cosine']:.6f} (bound {r['min_cosine_bound']})" for name, r in failures]
        raise ValidationError(
            f"{where} is outside its fidelity tolerance vs the torch reference:\n" + "\n".join(lines) +
            "\nTry a higher precision, or export with validate=False (CLI: --no-validate) to keep it anyway",
            failures=[{"output": n, **r} for n, r in failures],
        )
