"""A throwaway export target in one module, as docs/architecture.md says a target is added: ONNX
graphs without fused kernels, run by the ort backend. Importing this module registers it."""
from __future__ import annotations

from edgeclip.exporter import register_target
from edgeclip.exporter.formats.onnx import OnnxTarget


@register_target("toy-plain-onnx", backend="ort", suffixes=(".onnx",))
class ToyPlainOnnxTarget(OnnxTarget):
    precisions = ("fp32",)

    def export(self, model, spec, opts, out):
        opts.fuse = False  # what makes this target differ: standard ONNX ops only
        return super().export(model, spec, opts, out)
