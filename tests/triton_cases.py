"""Runs the Triton flash-attention kernel under Triton's CPU interpreter and prints one JSON line per
case: max abs error against a float64 reference. Executed by test_triton_attention.py in a
subprocess, because TRITON_INTERPRET must be set before triton is first imported."""
from __future__ import annotations

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from edgeclip.kernels.attention import reference_attention  # noqa: E402
from edgeclip.kernels.triton_attention import flash_attention  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def case(lq, lk, d, dtype, causal=False, mask=False, heads=2, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, lq, d, generator=g).to(DTYPES[dtype])
    k = torch.randn(batch, heads, lk, d, generator=g).to(DTYPES[dtype])
    v = torch.randn(batch, heads, lk, d, generator=g).to(DTYPES[dtype])
    bias = None
    if mask:  # padding-style additive mask: the first row may see only its first 5 keys
        bias = torch.zeros(batch, 1, 1, lk)
        bias[0, ..., 5:] = float("-inf")
    out = flash_attention(q, k, v, causal=causal, attn_mask=bias)
    ref = reference_attention(q.double(), k.double(), v.double(), causal=causal,
                              attn_mask=None if bias is None else bias.double())
    return {"lq": lq, "lk": lk, "d": d, "dtype": dtype, "causal": causal, "mask": mask,
            "out_dtype": str(out.dtype).replace("torch.", ""), "max_abs": float((out.double() - ref).abs().max())}


def model_case():
    """A whole tiny CLIP with attention='triton' against attention='reference'."""
    import edgeclip

    m = edgeclip.load_model("builtin:tiny")
    pixels = torch.randn(2, 3, m.spec.vision.image_size, m.spec.vision.image_size, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[49406, 320, 1125, 539, 49407, 0, 0], [49406, 320, 49407, 0, 0, 0, 0]])
    with torch.no_grad():
        ref = (m.encode_image(pixels), m.encode_text(ids))
        m.set_attention("triton")
        got = (m.encode_image(pixels), m.encode_text(ids))
    return {"model": "builtin:tiny", "max_abs": max(float((a - b).abs().max()) for a, b in zip(got, ref))}


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    cases = []
    if which in ("all", "lengths"):
        for length in (50, 77, 197, 248, 257, 577):
            for dtype in DTYPES:
                cases.append(dict(lq=length, lk=length, d=64, dtype=dtype, causal=length in (77, 248)))
        cases.append(dict(lq=248, lk=248, d=64, dtype="fp32", causal=False))
    if which in ("all", "shapes"):
        for d in (32, 80, 96, 128):
            cases.append(dict(lq=77, lk=77, d=d, dtype="fp16", causal=True))
        cases += [dict(lq=1, lk=77, d=64, dtype="fp32", mask=True, batch=2),  # pooled query, padding mask
                  dict(lq=3, lk=50, d=64, dtype="fp32", causal=True)]         # queries = the last 3 positions
    for c in cases:
        print(json.dumps(case(**c)), flush=True)
    if which in ("all", "model"):
        print(json.dumps(model_case()), flush=True)
