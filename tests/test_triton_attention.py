"""The Triton flash-attention kernel, checked on CPU with Triton's interpreter (in a subprocess:
TRITON_INTERPRET must be set before triton is imported) for every sequence length and dtype we
promise, against a float64 reference; and on an NVIDIA GPU when one is present."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
torch = pytest.importorskip("torch")

TOL = {"fp32": 2e-5, "fp16": 3e-3, "bf16": 2.5e-2}  # inputs ~N(0, 1); outputs in their own dtype
LENGTHS = (50, 77, 197, 248, 257, 577)


@pytest.fixture(scope="module")
def interpreted():
    script = Path(__file__).with_name("triton_cases.py")
    proc = subprocess.run([sys.executable, str(script), "all"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_every_length_and_dtype_matches_the_reference(interpreted):
    cases = [c for c in interpreted if "lq" in c and c["d"] == 64 and not c["mask"] and c["lq"] == c["lk"]]
    covered = {(c["lq"], c["dtype"]) for c in cases}
    assert covered >= {(n, dt) for n in LENGTHS for dt in TOL}
    for c in cases:
        assert c["out_dtype"] == {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[c["dtype"]]
        assert c["max_abs"] <= TOL[c["dtype"]], c
    assert any(c["causal"] for c in cases) and any(not c["causal"] for c in cases)


def test_head_dims_masks_and_offset_queries(interpreted):
    dims = {c["d"] for c in interpreted if "d" in c}
    assert dims >= {32, 64, 80, 96, 128}
    for c in interpreted:
        if "lq" in c:
            assert c["max_abs"] <= TOL[c["dtype"]], c
    assert any(c.get("mask") for c in interpreted)              # additive padding mask, pooled query
    assert any(c.get("lq", 0) < c.get("lk", 0) and c["causal"] for c in interpreted)  # last-positions queries


def test_model_with_triton_attention_matches_reference(interpreted):
    (m,) = [c for c in interpreted if "model" in c]
    assert m["max_abs"] <= 1e-4, m


def test_registry_refuses_without_gpu_or_interpreter(monkeypatch):
    from edgeclip.errors import EdgeClipError
    from edgeclip.kernels.attention import get_attention

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.zeros(1, 1, 4, 16)
    with pytest.raises(EdgeClipError, match="needs an NVIDIA GPU"):
        get_attention("triton")(q, q, q)


@pytest.mark.gpu
def test_gpu_matches_sdpa():
    if not torch.cuda.is_available():
        pytest.skip("no NVIDIA GPU")
    from edgeclip.kernels.triton_attention import flash_attention

    for n in LENGTHS:
        for dt in (torch.float16, torch.bfloat16, torch.float32):
            q, k, v = (torch.randn(4, 12, n, 64, device="cuda", dtype=dt) for _ in range(3))
            causal = n in (77, 248)
            ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
            got = flash_attention(q, k, v, causal=causal).float()
            assert (got - ref).abs().max().item() <= {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}[dt]


def test_tensorrt_plugin_names_its_missing_extra():
    import importlib.util

    from edgeclip.errors import MissingExtraError
    from edgeclip.kernels import trt_plugin

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    with pytest.raises(MissingExtraError, match="tensorrt"):
        trt_plugin.register()
    assert trt_plugin.PLUGIN_ID == "edgeclip::flash_attention"
