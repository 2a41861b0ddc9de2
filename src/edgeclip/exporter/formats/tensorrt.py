"""TensorRT target: TensorRT-ready ONNX per tower, for Jetson and NVIDIA GPUs (`--target tensorrt`).

An engine is specific to a GPU and a TensorRT version, so the artifact carries the ONNX and the
device builds the engine once, with a cache (`runtime/backends/tensorrt.py`, `edgeclip engine
build`). What is written here:

- standard ONNX ops only (TensorRT's parser has no `com.microsoft` ops): attention traced as plain
  MatMul-Softmax-MatMul with Q pre-scaled (the pattern TensorRT fuses), no ORT fusions, no ORT
  INT8 lowering; opset at most what the targeted TensorRT parses (10.3, JetPack 6: opset 20);
- fp16: a float16 graph with LayerNormalization, Softmax and the reductions kept in float32 (Cast
  around them) and float32 inputs/outputs, so flag-based TensorRT 10.x and strongly typed 11.x
  build the same precisions;
- int8: explicit quantization as TensorRT takes it: symmetric int8 Q/DQ (zero point 0) on the
  inputs of MatMul/Conv, per-channel int8 weights behind DequantizeLinear, bias, residual adds and
  normalization in float; ranges from our calibration and observers, under the same accuracy guard;
- optimization profiles (min/opt/max of the batch and text length) in the manifest, and the
  compatibility check (`exporter/trt_check.py`) run on every graph before it is written.

Numerics are verified with ONNX Runtime on CPU running the very file written (the manifest says so):
no engine is built at export.
"""
from __future__ import annotations

from pathlib import Path

from ...errors import CalibrationError, InputError
from .. import register_target
from ..target import ExportJob
from ..tolerance import Tolerance
from .onnx import OnnxFamilyTarget, to_onnx

TRT_VERSION = "10.3"      # JetPack 6.1/6.2 (Jetson Orin)
PROFILE_NAMES = ("batch", "length")
DEFAULT_BATCH = (1, 8, 64)
# ops computed in float32 inside an fp16 graph: normalization statistics and softmax overflow or lose
# too much in fp16; TensorRT also keeps them in fp32 when the graph says so (strong typing)
FP32_OPS = ["LayerNormalization", "Softmax", "ReduceMean", "ReduceSum", "ReduceL2", "Pow", "Sqrt"]
INT8_RECIPES = ("int8", "int8-smoothquant")  # static Q/DQ: the only INT8 form TensorRT builds


@register_target("tensorrt")
class TensorRtTarget(OnnxFamilyTarget):
    """The ONNX family's steps with TensorRT's graph rules in place of ONNX Runtime's fusions."""

    precisions = ("fp32", "fp16", "int8")
    tolerances = {"fp32": Tolerance(max_abs=1e-4, min_cosine=0.99999),
                  "fp16": Tolerance(max_abs=1e-2, min_cosine=0.999),
                  "int8": Tolerance(max_abs=0.25, min_cosine=0.98)}
    backend = "tensorrt"
    options = ("trt_version", "profiles")
    attention = "reference"  # plain ops, Q scaled before the first MatMul
    lower_int8 = False

    def check_options(self, opts) -> None:
        from ..trt_check import load_allowlist

        load_allowlist(opts.trt_version)  # UsageError naming the known versions
        if opts.precision == "int8" and (opts.recipe or "int8") not in INT8_RECIPES:
            raise CalibrationError(f"recipe '{opts.recipe}' has no TensorRT form (TensorRT builds explicit Q/DQ "
                                   f"only); use --recipe {' or '.join(INT8_RECIPES)}")
        profiles(opts, context=None)  # shape errors before any work

    def trace_dtype(self, precision: str):
        import torch

        return torch.float32  # fp16 is converted on the ONNX graph, with FP32_OPS kept in float32

    def rewrite(self, m) -> None:
        """TensorRT runs the patch convolution and grouped convs well: no rewrite."""

    def build_graph(self, job: ExportJob, module, name, decl, w, dynamic_length: bool, path: Path) -> None:
        import onnx

        from ...onnxgraph import strip_metadata
        from ..trt_check import check_graph, load_allowlist, profile_for

        opts = job.opts
        max_opset = load_allowlist(opts.trt_version)["max_opset"]
        opset = min(opts.opset or self.default_opset, max_opset)
        raw = w.staging / f".{name}.export.onnx"
        to_onnx(module.eval(), name, decl, job.spec, raw, opset, dynamic_length)
        graph = onnx.load(str(raw))
        raw.unlink()
        strip_metadata(graph)
        if opts.precision == "fp16":
            graph = to_fp16(graph)
        elif opts.precision == "int8":
            from ...calibration.recipes import get_recipe, quantize_graph

            graph, job.quantization[name] = quantize_graph(
                graph, get_recipe(opts.recipe), job.calibration[name], observer=opts.observer,
                alpha=opts.smoothquant_alpha, max_drop=opts.guard_bound(), lower=False,
                quantizable=job.quantizable, form="tensorrt")
        ranges = profiles(opts, job.spec.text.context_length)
        prof = profile_for(graph, batch=ranges["batch"], length=job.spec.text.context_length,
                           length_range=ranges["length"])
        job.extra.setdefault("tensorrt", {"version": opts.trt_version, "graphs": {}})["graphs"][name] = {
            "profiles": prof, "check": check_graph(graph, opts.trt_version, prof)}
        onnx.save(graph, str(path))

    def graph_config(self, job: ExportJob, graphs: dict) -> None:
        """Nothing beside the graphs: the ONNX family's only entry (ORT's session config for weights-only
        INT8) has no TensorRT recipe."""

    def manifest_extra(self, job: ExportJob) -> dict:
        extra = super().manifest_extra(job)
        trt = extra.setdefault("tensorrt", {"version": job.opts.trt_version, "graphs": {}})
        trt["precision"] = job.opts.precision
        trt["numerics"] = ("fidelity measured with ONNX Runtime (CPU) on these ONNX files, not with a "
                           "TensorRT engine; the engine is built on the device")
        return extra

    @classmethod
    def inspect_lines(cls, manifest: dict) -> list[str]:
        from ..trt_check import inspect_lines

        t = manifest.get("tensorrt") or {}
        lines = [f"tensorrt   for TensorRT {t.get('version')}, {t.get('precision')}; {t.get('numerics', '')}"]
        for name, g in (t.get("graphs") or {}).items():
            lines.append(f"  {name}:")
            lines += [f"    {line}" for line in inspect_lines(g.get("check") or {})]
        return lines + super().inspect_lines(manifest)


def to_fp16(model):
    """float16 weights and arithmetic, float32 inputs/outputs, FP32_OPS in float32 (Cast around them)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=True, op_block_list=FP32_OPS)


def profiles(opts, context: int | None) -> dict:
    """{"batch": (min, opt, max), "length": (min, opt, max)} from `opts.profiles` (None: defaults:
    batch 1/8/64, text length 1/context/context); a bad range is an InputError."""
    given = dict(opts.profiles or {})
    unknown = set(given) - set(PROFILE_NAMES)
    if unknown:
        raise InputError(f"unknown TensorRT profile(s) {', '.join(sorted(unknown))}; use "
                         f"{' and '.join(PROFILE_NAMES)} (e.g. batch=1,8,64)")
    out = {"batch": tuple(given.get("batch", DEFAULT_BATCH))}
    if context is not None:
        out["length"] = tuple(given.get("length", (1, context, context)))
    for key, r in out.items():
        ok = len(r) == 3 and all(isinstance(v, int) and not isinstance(v, bool) for v in r)
        if not ok or not 1 <= r[0] <= r[1] <= r[2] <= 1 << 16:
            raise InputError(f"TensorRT profile {key}={','.join(map(str, r))} must be three integers "
                             "1 <= min <= opt <= max")
        if key == "length" and r[2] > context:
            raise InputError(f"TensorRT profile length max {r[2]} exceeds the context length {context}")
    return out
