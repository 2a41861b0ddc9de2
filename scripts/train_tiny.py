#!/usr/bin/env python
"""Train edgeclip's built-in tiny CLIP (`builtin:tiny`) on scikit-learn's handwritten digits.

Deterministic for a seed. Writes into --out (default src/edgeclip/data/tiny):

  model.safetensors    the state dict (ClipModel.state_dict() names), stored float16
  heldout/<d>/<i>.png  every held-out image (8x8, 8-bit grayscale PNG), one folder per digit
  calib/<d>_<i>.png    10 training-split images per class: the built-in INT8 calibration set
  calib_captions.txt   one caption per calibration image, in sorted file-name order
  fewshot/<d>/<i>.png  32 training-split images per class, one folder per digit: the labelled
                       training folder for few-shot heads (`edgeclip heads fit --train`)
  labels.json          class words, zero-shot prompt templates, held-out top-1, seed, timing

Images go through the runtime's own Preprocessor (decoded from the same PNG bytes that are
shipped) and captions through the runtime tokenizer, so training and deployment see identical
inputs. The reported held-out top-1 is measured after reloading the float16 weights the way the
loader does (`edgeclip.load_model("builtin:tiny")` when --out is the package folder) on the PNG
files read back from disk.

    python scripts/train_tiny.py [--out DIR] [--epochs N] [--seed S]
    python scripts/train_tiny.py --fewshot-only     # (re)write fewshot/ alone, no training
"""
from __future__ import annotations

import argparse
import io
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

from edgeclip.models.clip import ClipModel  # noqa: E402
from edgeclip.models.loaders import builtin_dir, load_weights, read_state_dict  # noqa: E402
from edgeclip.runtime.preprocess import Preprocessor  # noqa: E402
from edgeclip.runtime.tokenizer import tokenize  # noqa: E402
from edgeclip.specs import get_spec  # noqa: E402

DEFAULT_OUT = REPO / "src" / "edgeclip" / "data" / "tiny"
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# Zero-shot evaluation prompts, filled with WORDS (stored in labels.json).
EVAL_TEMPLATES = [
    "a photo of the number {}.",
    "a handwritten digit {}.",
    "an image of a {}.",
    "a blurry photo of the number {}.",
    "a low resolution image of the digit {}.",
    "a drawing of the number {}.",
]
# Training captions: these templates (a superset of the evaluation ones) filled with the class
# word or the numeral ("seven" / "7").
TRAIN_TEMPLATES = EVAL_TEMPLATES + [
    "a photo of the number {}",
    "a handwritten digit {}",
    "an image of a {}",
    "the number {}.",
    "a {}.",
    "{}",
    "a picture of the digit {}.",
    "a pixelated photo of the number {}.",
    "a scan of a handwritten {}.",
    "a black and white photo of the number {}.",
    "a small image of the digit {}.",
    "a close-up photo of the number {}.",
    "a sketch of the digit {}.",
    "a written {}.",
]
CALIB_PER_CLASS = 10
FEWSHOT_PER_CLASS = 32
HELDOUT_FRACTION = 0.2
MAX_BYTES = 10 * 1024 * 1024


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--spec", default="tiny", help="model spec (default: %(default)s)")
    p.add_argument("--fewshot-only", action="store_true", help="write only the fewshot/ folder (no training)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------ data

def digit_png(img8: np.ndarray) -> bytes:
    """An 8x8 digit (0..16) as the bytes of an 8-bit grayscale PNG (0..255)."""
    u8 = np.round(img8.astype(np.float64) * 255.0 / 16.0).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, format="PNG", optimize=False)  # 2-D uint8 -> mode "L"
    return buf.getvalue()


def split(labels: np.ndarray, seed: int):
    """Stratified train / held-out split of the dataset indices."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    train, held = train_test_split(idx, test_size=HELDOUT_FRACTION, stratify=labels, random_state=seed)
    return np.sort(train), np.sort(held)


def pick_per_class(train: np.ndarray, labels: np.ndarray, pngs: list, held: np.ndarray, seed: int,
                   per_class: int) -> np.ndarray:
    """`per_class` training images per class (a seeded choice), none byte-identical to a held-out image."""
    held_bytes = {pngs[i] for i in held}
    rng = np.random.default_rng(seed)
    out = []
    for c in range(10):
        cand = [i for i in rng.permutation(train[labels[train] == c]) if pngs[i] not in held_bytes]
        out.extend(sorted(int(i) for i in cand[:per_class]))
    return np.array(out)


def write_fewshot(out: Path, idx: np.ndarray, labels: np.ndarray, pngs: list) -> None:
    shutil.rmtree(out / "fewshot", ignore_errors=True)
    for i in idx:
        d = out / "fewshot" / str(labels[i])
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:04d}.png").write_bytes(pngs[i])


def truncate_ids(ids: np.ndarray, eot: int) -> np.ndarray:
    """Drop the padding after the last end-of-text token of the batch.

    The text tower is causal and pools at the first EOT, so the pooled feature does not depend on
    later positions: the truncated ids give exactly the same features, at a fraction of the cost.
    """
    last = int((ids == eot).argmax(axis=1).max())
    return ids[:, : last + 1]


# ------------------------------------------------------------------------------------- training

def augment(x: torch.Tensor, background: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Small random affine (rotation, scale, shear, sub-pixel shift) of preprocessed images."""
    n = x.shape[0]
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=gen)  # noqa: E731
    ang = u(-12, 12) * math.pi / 180
    scale = u(0.9, 1.1)
    shear = u(-0.1, 0.1)
    tx, ty = u(-0.08, 0.08), u(-0.08, 0.08)
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([
        torch.stack([cos, -sin + shear, tx], 1),
        torch.stack([sin, cos, ty], 1),
    ], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    bg = background.view(1, 3, 1, 1)
    return F.grid_sample(x - bg, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + bg


def clip_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy of CLIP. A caption of the same digit is a true match too (with 10
    classes a batch is full of them), so each row's target spreads over its same-class pairs."""
    logits = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()
    pos = (labels[:, None] == labels[None, :]).float()
    target = pos / pos.sum(1, keepdim=True)
    l_i = -(target * F.log_softmax(logits, dim=1)).sum(1).mean()
    l_t = -(target * F.log_softmax(logits, dim=0)).sum(0).mean()  # pos is symmetric
    return 0.5 * (l_i + l_t)


@torch.no_grad()
def class_text_features(model: ClipModel, templates: list) -> torch.Tensor:
    """(10, D): per class, the mean of the normalized prompt embeddings, renormalized."""
    ids = tokenize([t.format(w) for w in WORDS for t in templates], context_length=model.spec.text.context_length)
    feats = F.normalize(model.encode_text(torch.from_numpy(np.asarray(ids, dtype=np.int64))), dim=-1)
    feats = feats.reshape(len(WORDS), len(templates), -1).mean(1)
    return F.normalize(feats, dim=-1)


@torch.no_grad()
def zero_shot_top1(model: ClipModel, pixels: torch.Tensor, labels: torch.Tensor, templates: list) -> float:
    model.eval()
    cls = class_text_features(model, templates)
    img = F.normalize(model.encode_image(pixels), dim=-1)
    return float(((img @ cls.t()).argmax(1) == labels).float().mean())


def param_groups(model: ClipModel, wd: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim >= 2 and "embed" not in name:
            decay.append(p)
        else:  # biases, norms, embeddings, class token, logit scale
            no_decay.append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


class CompactEmbedding(torch.nn.Module):
    """Training stand-in for the token embedding: only the rows of tokens the captions use.

    Rows that never receive a gradient stay exactly where they are under AdamW (its moments stay
    zero, embeddings get no weight decay), so training the used rows alone gives the same model as
    training the whole 49408-row table, without an optimizer update of 3 M unused values per step.
    """

    def __init__(self, full: torch.nn.Embedding, used: torch.Tensor):
        super().__init__()
        self.full = full
        self.register_buffer("used", used)
        lut = torch.zeros(full.num_embeddings, dtype=torch.long)
        lut[used] = torch.arange(len(used))
        self.register_buffer("lut", lut)
        self.weight = torch.nn.Parameter(full.weight.detach()[used].clone())
        full.weight.requires_grad_(False)

    def forward(self, ids):
        return F.embedding(self.lut[ids], self.weight)

    def write_back(self) -> torch.nn.Embedding:
        with torch.no_grad():
            self.full.weight[self.used] = self.weight
        self.full.weight.requires_grad_(True)
        return self.full


def train(model, pixels, labels, cap_ids, cap_label, args, background, eval_fn=None):
    compact = CompactEmbedding(model.text.token_embed, torch.unique(cap_ids))
    model.text.token_embed = compact
    try:
        return _train(model, pixels, labels, cap_ids, cap_label, args, background, eval_fn)
    finally:
        model.text.token_embed = compact.write_back()


def _train(model, pixels, labels, cap_ids, cap_label, args, background, eval_fn=None):
    n = pixels.shape[0]
    gen = torch.Generator().manual_seed(args.seed)
    steps_per_epoch = math.ceil(n / args.batch_size)
    total = steps_per_epoch * args.epochs
    warmup = min(100, total // 10)
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))
    )
    # captions of each class, as indices into cap_ids (every class has as many)
    by_class = torch.stack([torch.nonzero(cap_label == c).flatten() for c in range(10)])
    max_scale = math.log(100.0)
    step = 0
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        total_loss = 0.0
        for b in range(steps_per_epoch):
            idx = perm[b * args.batch_size:(b + 1) * args.batch_size]
            y = labels[idx]
            x = augment(pixels[idx], background, gen)
            pick = by_class[y, torch.randint(by_class.shape[1], (len(y),), generator=gen)]
            ids = torch.from_numpy(truncate_ids(cap_ids[pick].numpy(), model.spec.text.eot_token_id))
            loss = clip_loss(model.encode_image(x), model.encode_text(ids), model.logit_scale.exp(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, max_scale)
            total_loss += loss.item()
            step += 1
        if eval_fn is not None and ((epoch + 1) % 10 == 0 or epoch + 1 == args.epochs):
            print(f"epoch {epoch + 1:3d}/{args.epochs}  loss {total_loss / steps_per_epoch:.4f}  "
                  f"scale {model.logit_scale.exp().item():6.2f}  held-out top-1 {eval_fn(model):.4f}", flush=True)
    model.eval()
    return model


# --------------------------------------------------------------------------------------- outputs

OUTPUTS = ("model.safetensors", "heldout", "calib", "calib_captions.txt", "labels.json", "fewshot")


def clear_outputs(out: Path) -> None:
    for name in OUTPUTS:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def save_weights(model: ClipModel, path: Path) -> None:
    from safetensors.torch import save_file

    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    # one metadata key only: safetensors writes several in no fixed order, and the file should be
    # byte-identical from run to run
    save_file(sd, str(path), metadata={"format": "pt"})


def reload(out: Path, spec_name: str) -> ClipModel:
    """The saved weights loaded the way users get them (float16 file upcast to float32)."""
    if out.resolve() == builtin_dir("tiny").resolve() and spec_name == "tiny":
        import edgeclip

        return edgeclip.load_model("builtin:tiny")
    model = ClipModel(get_spec(spec_name))
    return load_weights(model, read_state_dict(out / "model.safetensors"), {}).float().eval()


def read_heldout(out: Path, pre: Preprocessor):
    files = sorted((out / "heldout").glob("*/*.png"))
    pixels = torch.from_numpy(pre([str(f) for f in files]))
    labels = torch.tensor([int(f.parent.name) for f in files])
    return pixels, labels


# ------------------------------------------------------------------------------------------ main

def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)

    from sklearn.datasets import load_digits

    spec = get_spec(args.spec)
    pre = Preprocessor.from_config(spec.preprocess_config())
    digits = load_digits()
    labels_np = digits.target.astype(np.int64)
    pngs = [digit_png(im) for im in digits.images]
    train_idx, held_idx = split(labels_np, args.seed)
    calib_idx = pick_per_class(train_idx, labels_np, pngs, held_idx, args.seed + 1, CALIB_PER_CLASS)
    fewshot_idx = pick_per_class(train_idx, labels_np, pngs, held_idx, args.seed + 3, FEWSHOT_PER_CLASS)

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.fewshot_only:
        write_fewshot(out, fewshot_idx, labels_np, pngs)
        print(f"wrote {len(fewshot_idx)} images under {out / 'fewshot'}")
        return 0
    clear_outputs(out)
    write_fewshot(out, fewshot_idx, labels_np, pngs)
    for i in held_idx:
        d = out / "heldout" / str(labels_np[i])
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:04d}.png").write_bytes(pngs[i])
    (out / "calib").mkdir()
    rng = np.random.default_rng(args.seed + 2)
    calib_names, captions = [], []
    for i in calib_idx:
        calib_names.append(f"{labels_np[i]}_{i:04d}.png")
        (out / "calib" / calib_names[-1]).write_bytes(pngs[i])
    for name in sorted(calib_names):
        c = int(name.split("_")[0])
        t = TRAIN_TEMPLATES[int(rng.integers(len(TRAIN_TEMPLATES)))]
        captions.append(t.format(WORDS[c] if rng.random() < 0.5 else str(c)))
    (out / "calib_captions.txt").write_text("\n".join(captions) + "\n")

    # Every image as the runtime sees it: decoded from its PNG bytes, then preprocessed.
    pixels = torch.from_numpy(pre([pngs[i] for i in range(len(pngs))]))
    labels = torch.from_numpy(labels_np)
    background = torch.from_numpy(pre(np.zeros((8, 8), np.uint8))[0, :, 0, 0].copy())

    cap_text, cap_label = [], []
    for c in range(10):
        for t in TRAIN_TEMPLATES:
            for name in (WORDS[c], str(c)):
                cap_text.append(t.format(name))
                cap_label.append(c)
    cap_ids = torch.from_numpy(np.asarray(tokenize(cap_text, context_length=spec.text.context_length), dtype=np.int64))
    cap_label = torch.tensor(cap_label)

    model = ClipModel(spec).init_random(args.seed)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1 / 0.07))
    tr, he = torch.from_numpy(train_idx), torch.from_numpy(held_idx)
    print(f"train {len(tr)} / held-out {len(he)} images, {len(cap_text)} captions, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters", flush=True)

    t_train = time.perf_counter()
    train(model, pixels[tr], labels[tr], cap_ids, cap_label, args, background,
          eval_fn=lambda m: zero_shot_top1(m, pixels[he], labels[he], EVAL_TEMPLATES))
    train_seconds = time.perf_counter() - t_train
    fp32_top1 = zero_shot_top1(model, pixels[he], labels[he], EVAL_TEMPLATES)

    save_weights(model, out / "model.safetensors")
    size = (out / "model.safetensors").stat().st_size
    reloaded = reload(out, args.spec)
    hp, hl = read_heldout(out, pre)
    top1 = zero_shot_top1(reloaded, hp, hl, EVAL_TEMPLATES)

    meta = {
        "classes": WORDS,
        "templates": EVAL_TEMPLATES,
        "train_templates": TRAIN_TEMPLATES,
        "heldout_top1": round(top1, 6),
        "heldout_images": int(len(he)),
        "train_images": int(len(tr)),
        "train_seconds": round(train_seconds, 1),
        "epochs": args.epochs,
        "seed": args.seed,
        "dataset": "sklearn.datasets.load_digits (8x8, 0..16 scaled to 0..255 as round(v*255/16))",
        "weights_dtype": "float16",
    }
    (out / "labels.json").write_text(json.dumps(meta, indent=2) + "\n")
    wall = time.perf_counter() - t0
    print(f"held-out zero-shot top-1: {top1:.4f} (float16 weights reloaded; {fp32_top1:.4f} before saving)")
    print(f"weights: {size / 1e6:.2f} MB ({size} bytes); training {train_seconds:.1f} s; wall time {wall:.1f} s")
    if size > MAX_BYTES:
        print(f"error: weights file is {size} bytes, over the {MAX_BYTES} byte limit", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
