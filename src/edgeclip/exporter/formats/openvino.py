"""OpenVINO target: IR (`.xml` + `.bin`) for Intel CPUs, iGPUs and NPUs.

Converted from our torch model through `torch.export` (not from ONNX): attention is traced as
torch's scaled-dot-product attention, which OpenVINO keeps as one `ScaledDotProductAttention` op
and its CPU plugin compiles into a fused Snippets subgraph. FP16 stores compressed (fp16) weights;
INT8 goes through NNCF with edgeclip's calibration data, recipes and accuracy guard
(`calibration.openvino`); every INT8 recipe also stores the token embedding and the end projections
as int8 weights (`table_ops`), and w4a16 stores 4-bit weights per `--block-size` block. Validation
runs OpenVINO with the inference precision forced to f32; the manifest also records which precision
OpenVINO picks on the export machine by default. INT8 IRs also run in f32 by default
(`graphs.<name>.ov_config`), the precision they were validated at.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

from ..._lazy import require
from ...runtime.backends.openvino import Backend as OvBackend
from ...runtime.backends.openvino import default_precision
from .. import register_target
from ..target import ExportJob
from .onnx import OnnxFamilyTarget

log = logging.getLogger(__name__)


@register_target("openvino")
class OpenVinoTarget(OnnxFamilyTarget):
    """The ONNX family's steps (graphs, calibration, validation) with OpenVINO's converter, NNCF
    quantizer and runtime in place of the ONNX exporter, ORT fusions and ONNX Runtime."""

    precisions = ("fp32", "fp16", "int8")
    graph_ext = ".xml"
    backend = "openvino"
    tools = ("torch", "openvino", "nncf")
    attention = "sdpa"     # kept whole by convert_model; fused by the CPU plugin

    def trace_dtype(self, precision: str):
        import torch

        return torch.float32  # FP16 is stored compressed by save_model; INT8 quantized by NNCF

    def check_options(self, opts) -> None:
        require("openvino", "the OpenVINO target")

    def rewrite(self, m) -> None:
        """OpenVINO's CPU plugin runs the patch convolution well (no GEMM rewrite) but multiplier
        grouped convolutions slowly: those become depthwise ones where a tower has any."""
        for tower in m.towers().values():
            tower.prefer_depthwise()

    def graph_config(self, job: ExportJob, graphs: dict) -> None:
        for name, info in graphs.items():
            info["weights"] = info["file"][: -len(".xml")] + ".bin"
            q = job.quantization.get(name) if job.opts.precision == "int8" else None
            if q is not None and q.get("inference_precision", "f32") == "f32":
                # The guard measures INT8 IRs in f32; OpenVINO's bf16 default runs their float remainder
                # and requantization in bf16, which can break them (see calibration.openvino
                # default_precision_check): pin f32 unless the default was measured and kept the bound.
                info["ov_config"] = {"INFERENCE_PRECISION_HINT": "f32"}

    def open_graph(self, path: Path, info: dict):
        return OvBackend(path, inference_precision="f32")

    def manifest_extra(self, job: ExportJob) -> dict:
        ov, _ = _core()
        return {**super().manifest_extra(job), "openvino": {
            "version": ov.__version__,
            "validated_inference_precision": "f32",
            "default_inference_precision_here": default_precision(),
            "note": "OpenVINO runs float models in bf16 on CPUs with bf16 support unless the inference "
                    "precision is set; Pipeline.load(..., inference_precision='f32') forces float32",
        }}

    @classmethod
    def inspect_lines(cls, manifest: dict) -> list[str]:
        o = manifest.get("openvino") or {}
        lines = [f"openvino   {o['version']}; validated with inference precision {o['validated_inference_precision']}; "
                 f"default on the export machine: {o['default_inference_precision_here']} "
                 "(force with --inference-precision f32)"] if o else []
        return lines + super().inspect_lines(manifest)

    def build_graph(self, job: ExportJob, module, name, decl, w, dynamic_length: bool, path: Path) -> None:
        ov, _ = _core()
        opts = job.opts
        converted, layers, tables = to_openvino(module.eval(), name, decl, job.spec, dynamic_length,
                                                job.quantizable)
        job.fusions[name] = {"attention": sum(op.get_type_name() == "ScaledDotProductAttention"
                                              for op in converted.get_ordered_ops())}
        if opts.precision == "int8":
            from ...calibration.openvino import quantize_ir
            from ...calibration.recipes import get_recipe

            converted, job.quantization[name] = quantize_ir(
                converted, get_recipe(opts.recipe), job.calibration[name], layers, tables=tables,
                observer=opts.observer, alpha=opts.smoothquant_alpha, max_drop=opts.guard_bound(),
                block_size=opts.block_size)
        ov.save_model(converted, str(path), compress_to_fp16=opts.precision == "fp16")


def _core():
    ov = require("openvino", "the OpenVINO target")
    from ...runtime.backends.openvino import _core as runtime_core

    return runtime_core()


def to_openvino(module, name, decl, spec, dynamic_length: bool, quantizable=None):
    """(ov.Model with our input/output names and shapes, {MatMul friendly name: module path} for the
    linear layers INT8 may quantize: `quantizable(path)`, default the transformer blocks'; the same map
    for the tables and end layers every INT8 recipe stores as int8 weights: `table_ops`)."""
    import torch

    from ...models.inputs import reference_inputs

    ov, _ = _core()
    example = reference_inputs(spec, n=2, seed=7)
    auto = torch.export.Dim.AUTO
    if name == "image":
        args = (torch.from_numpy(example["pixel_values"]),)
        dynamic = {"pixel_values": {0: auto}}
    else:
        args = (torch.from_numpy(example["input_ids"]),)
        dynamic = {"input_ids": {0: auto, 1: auto} if dynamic_length else {0: auto}}
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(module, args, dynamic_shapes=dynamic)
        model = ov.convert_model(program)
    (input_name, _), = decl["inputs"].items()
    model.inputs[0].get_tensor().set_names({input_name})
    for port, out_name in zip(model.outputs, decl["outputs"]):
        port.get_tensor().set_names({out_name})
    if name == "image":
        s = spec.vision.image_size
        model.reshape({input_name: ov.PartialShape([-1, 3, s, s])})
    else:
        model.reshape({input_name: ov.PartialShape([-1, -1 if dynamic_length else spec.text.context_length])})
    layers = quantizable_ops(model, program, quantizable)
    return model, layers, table_ops(model, program, layers)


def quantizable_ops(model, program, quantizable=None) -> dict:
    """MatMuls, Convolutions and GroupConvolutions with constant weights that `quantizable(module
    path)` accepts (default: inside the transformer blocks), mapped to their module paths: the layers
    NNCF quantizes and the guard may return to float. Adapter heads stay float on OpenVINO.

    OpenVINO names a converted op after the torch.export node ("linear_3/aten.linear.default/MatMul",
    "convolution_5/aten.convolution.default/GroupConvolution"); the node's `nn_module_stack` says which
    module it came from (for convolutions, the node of the decomposed program convert_model read)."""
    from ...calibration.openvino import conv_module_paths, module_paths, weight_source

    convs = ("Convolution", "GroupConvolution")  # depthwise and grouped convs are GroupConvolution in the IR
    paths, conv_paths = module_paths(program), conv_module_paths(program)
    out = {}
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if kind not in ("MatMul",) + convs or weight_source(op) is None:
            continue
        path = (conv_paths if kind in convs else paths).get(op.get_friendly_name().split("/")[0], "")
        if not path.startswith("heads.") and (quantizable(path) if quantizable else ".blocks." in f".{path}"):
            out[op.get_friendly_name()] = path
    return out


def table_ops(model, program, layers: dict) -> dict:
    """The towers' tables and end layers, mapped to their module paths: the token embedding (a Gather
    of a 2-D constant table) and the MatMuls with constant weights inside a tower that are not among
    `layers` (the quantizable ones): final projections, a patch projection traced as a MatMul, an
    attention pool's. Not the baked zero-shot head (outside the towers), not adapter heads. Every INT8
    recipe stores them as int8 weights (NNCF weight compression) under the accuracy guard, as the ONNX
    target does (`calibration.qdq.table_targets`; positional tables, which NNCF does not compress,
    stay float here); smaller tables than `qdq.TABLE_MIN_ELEMENTS` entries stay float."""
    import numpy as np

    from ...calibration.openvino import module_paths, weight_source
    from ...calibration.qdq import TABLE_MIN_ELEMENTS, in_tower

    paths = module_paths(program)
    out = {}
    for op in model.get_ordered_ops():
        kind, name = op.get_type_name(), op.get_friendly_name()
        if kind not in ("MatMul", "Gather") or name in layers:
            continue
        w = weight_source(op)
        shape = list(w.get_output_shape(0)) if w is not None else []
        if len(shape) != 2 or int(np.prod(shape)) < TABLE_MIN_ELEMENTS:
            continue
        if kind == "Gather" and not _gathers_rows(op):
            continue
        path = paths.get(name.split("/")[0], "")
        if in_tower(path):
            out[name] = path
    return out


def _gathers_rows(op) -> bool:
    """A Gather of whole rows of its table (axis 0, batch dims 0): an embedding lookup."""
    axis = op.input_value(2).get_node()
    return axis.get_type_name() == "Constant" and int(axis.get_data().reshape(-1)[0]) == 0 and \
        int(op.get_attributes().get("batch_dims", 0)) == 0
