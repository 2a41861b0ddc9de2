"""The Triton flash-attention kernel as a TensorRT plugin (TensorRT 10.7+ `tensorrt.plugin`, the
"quickly deployable plugin" API), for the TensorRT target.

    from edgeclip.kernels.trt_plugin import register, PLUGIN_ID
    register()        # once per process, before building or deserializing an engine that uses it

The plugin `edgeclip::flash_attention` takes q, k, v as (B, H, L, D) fp16/bf16/fp32 tensors and
attributes `causal` (int 0/1) and `scale` (float; 0 means 1/sqrt(D)); it returns a tensor like q.
This is the JIT form: TensorRT calls back into Python and the kernel runs on TensorRT's stream. An
engine that must run without Python needs the ahead-of-time form (`trtp.aot_impl`, PTX compiled by
triton at build time), which the TensorRT target will add.
"""
from __future__ import annotations

from .._lazy import require

PLUGIN_ID = "edgeclip::flash_attention"
_REGISTERED = False


def register() -> str:
    """Register the plugin with TensorRT's plugin registry (idempotent); returns its id."""
    global _REGISTERED
    if _REGISTERED:
        return PLUGIN_ID
    trtp = require("tensorrt.plugin", "the TensorRT flash-attention plugin")
    require("triton", "the TensorRT flash-attention plugin")
    torch = require("torch", "the TensorRT flash-attention plugin")

    from .triton_attention import flash_attention

    @trtp.register(PLUGIN_ID)
    def _describe(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, causal: int,
                  scale: float) -> trtp.TensorDesc:
        return q.like()

    @trtp.impl(PLUGIN_ID)
    def _run(q: trtp.Tensor, k: trtp.Tensor, v: trtp.Tensor, causal: int, scale: float,
             outputs, stream: int) -> None:
        tq, tk, tv = (torch.as_tensor(t, device="cuda") for t in (q, k, v))
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            out = flash_attention(tq, tk, tv, causal=bool(causal), scale=scale or None)
            torch.as_tensor(outputs[0], device="cuda").copy_(out)

    _REGISTERED = True
    return PLUGIN_ID
