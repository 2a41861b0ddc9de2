"""Core ML target: `.mlpackage` image and text towers for iPhone, iPad and Mac (ML Program format).

Converted from our torch model through `torch.export` + coremltools (not from ONNX), FP16 by default.
Attention per deployment target: iOS 18+ gets Core ML's fused `scaled_dot_product_attention` (torch
SDPA traced with an implicit scale); older targets get the Neural Engine layout from
`kernels.ane` (channels-first (B, C, 1, S), 1x1 convolutions, per-head split einsum). Weight
compression: `w8` (int8 per channel), `palettize4` / `palettize6` (k-means look-up tables),
`int4-blockwise` (iOS 18+).

Core ML cannot run predictions on Linux, so the export validates what can be validated here, and
the manifest says which checks ran:
- numerically: the rewritten torch modules (ANE layout or SDPA; FP16 simulated by running them in
  float16; compressed variants with the weights decompressed from the converted program) against the
  float32 torch reference;
- structurally: the converted program's ops (fused attention or the ANE pattern), no float32
  compute left in FP16 mode, input/output names and shapes, compressed weight ops and types.
On macOS the converted packages are also run (`predict`) and compared.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import platform
import shutil
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..._files import size_text as _mb
from ..._lazy import require
from ...errors import EdgeClipError
from .. import register_target
from ..tolerance import Tolerance, compare
from ..target import ExportJob, Target

log = logging.getLogger(__name__)

IOS = (16, 17, 18)
COMPRESSIONS = {
    "w8": "int8 weights, linear symmetric per output channel (~0.5x of FP16)",
    "palettize6": "6-bit k-means palettization: a 64-entry look-up table per weight (~0.4x)",
    "palettize4": "4-bit k-means palettization: a 16-entry look-up table per weight (~0.25x)",
    "int4-blockwise": "int4 weights with a scale per block of 32 input channels (iOS 18+, ~0.3x)",
}
# cosine to the float32 reference, measured in torch with the weights decompressed from the program
COMPRESSED_MIN_COSINE = {"w8": 0.995, "palettize6": 0.99, "palettize4": 0.95, "int4-blockwise": 0.97}
COMPRESSED_OPS = ("constexpr_affine_dequantize", "constexpr_blockwise_shift_scale", "constexpr_lut_to_dense")


def compressions_help() -> str:
    return "; ".join(f"{k}: {v}" for k, v in COMPRESSIONS.items())


@register_target("coreml")
class CoreMLTarget(Target):
    precisions = ("fp16", "fp32")
    tolerances = {"fp32": Tolerance(max_abs=1e-4, min_cosine=0.99999),
                  "fp16": Tolerance(max_abs=1e-2, min_cosine=0.999)}
    backend = "coreml"
    graph_ext = ".mlpackage"
    options = ("min_ios", "compress")
    tools = ("torch", "coremltools")

    def check_options(self, opts) -> None:
        require("coremltools", "the Core ML target")
        _check_options(opts)

    def trims(self, opts, spec) -> bool:
        return False  # Core ML graphs take a fixed shape: the text is never trimmed

    def describe(self, opts) -> str:
        return opts.precision + (f"/{opts.compress}" if opts.compress else "")

    def text_manifest(self, job: ExportJob) -> dict:
        n = job.spec.text.context_length
        return {**super().text_manifest(job), "length": f"fixed {n} (pad with the tokenizer's padding)"}

    def write_graphs(self, job: ExportJob, w) -> tuple[dict, dict]:
        from ..graphs import reference_outputs

        opts, fused = job.opts, job.opts.min_ios >= 18
        import torch

        m = self.prepare(job, "sdpa" if fused else "ane", torch.float32)
        modules, examples, inputs = _graph_modules(job, m, fused)
        ref = reference_outputs(job.model, inputs, job.head, job.heads) if opts.validate else {}
        report = _report_header(opts, fused)
        cj = _Job(require("coremltools", "the Core ML target"), job.spec, opts, fused, inputs, ref,
                  self.tolerances[opts.precision])
        graphs, fidelity = {}, {}
        for name, module in modules.items():
            ml, report["graphs"][name] = _export_graph(cj, w, name, module, examples[name])
            graphs[name] = {"file": f"{name}.mlpackage", **_io(ml)}
            if opts.validate:
                fidelity.update(_fidelity(cj, name, module, ml))
        _finish_report(cj, report, w.staging, graphs)
        job.extra["coreml"] = report
        return graphs, fidelity

    @classmethod
    def inspect_lines(cls, manifest: dict) -> list[str]:
        c = manifest.get("coreml")
        if not c:
            return []
        lines = [f"coreml     {c['minimum_deployment_target']}, {c['compute_precision']}, attention: {c['attention']}"]
        if c.get("compression"):
            lines.append(f"compress   {c['compression']['recipe']}: {c['compression']['ratio_vs_fp16']:.2f}x of FP16 ("
                         + ", ".join(f"{g} {_mb(f['size']['fp16_bytes'])} -> {_mb(f['size']['bytes'])}"
                                     for g, f in c["graphs"].items()) + ")")
        lines.append(f"checked    {c['validations']['numerical']}; {c['validations']['structural']}; "
                     f"predict: {c['validations']['predict']}")
        return lines


@dataclass(frozen=True)
class _Job:
    """What the conversion, checks and report of every graph of one export share."""
    ct: object
    spec: object
    opts: object
    fused: bool
    inputs: dict
    ref: dict
    tol: Tolerance


def _check_options(opts) -> None:
    ios, compress = opts.min_ios, opts.compress
    if ios not in IOS:
        raise EdgeClipError(f"--min-ios must be one of {', '.join(map(str, IOS))}, got {ios}")
    if compress is not None and compress not in COMPRESSIONS:
        raise EdgeClipError(f"unknown Core ML compression '{compress}'; available: {', '.join(COMPRESSIONS)}")
    if compress == "int4-blockwise" and ios < 18:
        raise EdgeClipError("int4-blockwise weights need iOS 18 or later (--min-ios 18); for older targets "
                            "use palettize4 or w8")
    if compress and opts.precision != "fp16":
        raise EdgeClipError("Core ML weight compression applies to fp16 models (--precision fp16)")


def _graph_modules(job: ExportJob, m, fused: bool):
    """(torch modules to convert, their batch-1 examples, the reference inputs), on the export copy `m`."""
    import torch

    from ..graphs import ImageGraph, TextGraph, reference_inputs

    if not fused:
        from ...kernels.ane import rewrite_for_ane

        rewrite_for_ane(m)
    inputs = reference_inputs(job.spec)
    modules = {"image": ImageGraph(m, job.head, heads=job.heads).eval(), "text": TextGraph(m).eval()}
    examples = {"image": torch.from_numpy(inputs["pixel_values"][:1]),
                "text": torch.from_numpy(inputs["input_ids"][:1])}
    return modules, examples, inputs


def _report_header(opts, fused: bool) -> dict:
    # "compression" and "graphs" are filled in later but keep their place in the manifest's key order
    return {"minimum_deployment_target": f"iOS{opts.min_ios}",
            "attention": "scaled_dot_product_attention (fused, iOS 18+)" if fused else
                         "ANE layout: (B, C, 1, S), 1x1 convolutions, per-head split einsum",
            "compute_precision": opts.precision, "compression": None, "graphs": {}}


def _export_graph(job: _Job, w, name: str, module, example):
    """Convert, compress and save one graph; (the model as saved, its structural facts)."""
    compress, precision = job.opts.compress, job.opts.precision
    ml = convert(job.ct, module, example, name, job.opts.min_ios, precision)
    if compress:
        # the size of the uncompressed package is only known by saving it
        fp16_bytes = _package_bytes(ml, w.staging / f".{name}.fp16.mlpackage")
        ml = compress_weights(job.ct, ml, compress, job.opts.min_ios)
    ml.save(str(w.path(f"{name}.mlpackage")))
    nbytes = _dir_bytes(w.path(f"{name}.mlpackage"))
    layers, heads = (module.visual if name == "image" else module.text).attention_layout()
    facts = structure(ml, fused=job.fused, fp16=precision == "fp16", compress=compress, layers=layers, heads=heads,
                      other_softmax=len(module.mcm) if name == "image" else 0)
    if compress:
        facts["size"] = {"fp16_bytes": fp16_bytes, "bytes": nbytes, "ratio": nbytes / fp16_bytes}
    return ml, facts


def _fidelity(job: _Job, name: str, module, ml) -> dict:
    """The graph's outputs, simulated in torch, against the float32 reference."""
    compress = job.opts.compress
    got = _simulate(module, name, job.inputs, job.opts.precision, ml if compress else None)
    want = {k: v for k, v in job.ref.items() if k in got}
    t = job.tol if not compress else Tolerance(max_abs=0.5, min_cosine=COMPRESSED_MIN_COSINE[compress])
    return compare(got, want, t)


def _finish_report(job: _Job, report: dict, staging: Path, graphs: dict) -> None:
    """Add the compression totals and the account of which validations ran."""
    opts, compress = job.opts, job.opts.compress
    if compress:
        sizes = [g["size"] for g in report["graphs"].values()]
        report["compression"] = {
            "recipe": compress, "summary": COMPRESSIONS[compress],
            "ratio_vs_fp16": sum(s["bytes"] for s in sizes) / sum(s["fp16_bytes"] for s in sizes)}
    report["validations"] = {
        "numerical": _numerical_note(opts) if opts.validate else "skipped (validate=False)",
        "structural": "converted programs: attention ops, compute precision, I/O, weight types",
        "predict": _predict_check(staging, graphs, job.inputs, job.ref, job.tol if not compress else None)
        if opts.validate else "skipped (validate=False)",
    }


def _numerical_note(opts) -> str:
    compress = opts.compress
    return ("torch: the rewritten modules"
            + (" with the weights decompressed from the converted programs" if compress else "")
            + (" run in float16" if opts.precision == "fp16" and not compress else "")
            + ", vs the float32 reference")


# ----------------------------------------------------------------------------------- conversion

def convert(ct, module, example, name: str, ios: int, precision: str):
    """torch.export -> coremltools ML Program, batch 1, our input/output names."""
    import torch

    outputs = module.output_names if name == "image" else ["text_embeds"]
    if name == "image":
        inputs = [ct.TensorType(name="pixel_values", shape=tuple(example.shape), dtype=np.float32)]
    else:
        example = example.to(torch.int32)
        inputs = [ct.TensorType(name="input_ids", shape=tuple(example.shape), dtype=np.int32)]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(module, (example,)).run_decompositions({})
        return ct.convert(program, convert_to="mlprogram", inputs=inputs,
                          outputs=[ct.TensorType(name=o) for o in outputs],
                          minimum_deployment_target=getattr(ct.target, f"iOS{ios}"),
                          compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
                          skip_model_load=True)


def compress_weights(ct, ml, recipe: str, ios: int):
    import coremltools.optimize.coreml as cto

    if recipe == "w8":
        op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel")
        fn = cto.linear_quantize_weights
    elif recipe == "int4-blockwise":
        op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block",
                                         block_size=32)
        fn = cto.linear_quantize_weights
    else:
        # iOS 18 allows a look-up table per group of 16 output channels (more accurate); older, one per tensor
        grouped = {"granularity": "per_grouped_channel", "group_size": 16} if ios >= 18 else \
            {"granularity": "per_tensor"}
        op = cto.OpPalettizerConfig(mode="kmeans", nbits=int(recipe[-1]), **grouped)
        # the token embedding (a gather's table, 49408 rows) gets one table: per-group k-means there
        # would run thousands of clusterings for little gain
        per_tensor = cto.OpPalettizerConfig(mode="kmeans", nbits=int(recipe[-1]), granularity="per_tensor")
        config = cto.OptimizationConfig(global_config=op, op_type_configs={"gather": per_tensor})
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cto.palettize_weights(ml, config)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(ml, cto.OptimizationConfig(global_config=op))


def _package_bytes(ml, path: Path) -> int:
    ml.save(str(path))
    n = _dir_bytes(path)
    shutil.rmtree(path, ignore_errors=True)
    return n


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _io(ml) -> dict:
    """Declared inputs/outputs of a converted model, from its spec."""
    desc = ml.get_spec().description

    def feature(f):
        t = f.type.multiArrayType
        dtype = {65568: "float32", 65552: "float16", 131104: "int32"}.get(t.dataType, str(t.dataType))
        return {"dtype": dtype, "shape": [int(d) for d in t.shape]}

    return {"inputs": {f.name: feature(f) for f in desc.input}, "outputs": {f.name: feature(f) for f in desc.output}}


# ------------------------------------------------------------------------------------ checks

def program_ops(ml):
    return list(ml._mil_program.functions["main"].operations)


def _is_float(dtype) -> bool:
    from coremltools.converters.mil.mil import types

    return types.is_float(dtype)


def _dtype_name(dtype) -> str:
    from coremltools.converters.mil.mil import types

    return types.builtin_to_string(dtype)


def structure(ml, *, fused: bool, fp16: bool, compress: str | None, layers: int, heads,
              other_softmax: int = 0) -> dict:
    """Facts about a converted program; raises ValidationError when one the target promises is false.

    `layers`, `heads`: the tower's `attention_layout()` (heads: one count, or one per attention op);
    `other_softmax`: softmax ops outside attention (the adapter heads' MCM scores)."""
    from ...errors import ValidationError

    ops = program_ops(ml)
    counts = Counter(op.op_type for op in ops)
    problems = []
    if fused:
        if counts["scaled_dot_product_attention"] != layers or counts["softmax"] > other_softmax:
            problems.append(f"expected {layers} fused scaled_dot_product_attention ops and at most "
                            f"{other_softmax} softmax (outside attention), got "
                            f"{counts['scaled_dot_product_attention']} and {counts['softmax']}")
    else:
        # `heads`: per attention op, or one count for all of them (towers whose stages differ give a list)
        per_head = sum(heads) if isinstance(heads, (tuple, list)) else layers * heads
        if counts["scaled_dot_product_attention"] or counts["softmax"] < per_head:
            problems.append(f"expected the per-head ANE pattern ({per_head} softmax ops), got "
                            f"{counts['softmax']} softmax and {counts['scaled_dot_product_attention']} fused")
    float32_compute = []
    if fp16:
        for op in ops:
            if op.op_type == "const" or op.op_type.startswith("constexpr_"):
                continue
            for v in op.outputs:
                if _is_float(v.dtype) and _dtype_name(v.dtype) == "fp32" and op.op_type != "cast":
                    float32_compute.append(op.name)
        if float32_compute:
            problems.append(f"float32 compute left in an FP16 program: {float32_compute[:5]}")
    weights = Counter()
    if compress:
        for op in ops:
            if op.op_type in COMPRESSED_OPS:
                stored = op.inputs.get("indices", op.inputs.get("data", op.inputs.get("quantized_data")))
                weights[f"{op.op_type}:{_dtype_name(stored.dtype) if stored is not None else '?'}"] += 1
        if not weights:
            problems.append(f"no compressed weight ops ({', '.join(COMPRESSED_OPS)}) after {compress}")
    if problems:
        raise ValidationError("the converted Core ML program is not what the target promises: " + "; ".join(problems))
    return {"ops": dict(sorted(counts.items())),
            "fused_attention": counts["scaled_dot_product_attention"],
            "softmax": counts["softmax"], "conv": counts["conv"], "linear": counts["linear"],
            "float32_compute_ops": len(float32_compute), "compressed_weights": dict(weights)}


def _simulate(module, name: str, inputs: dict, precision: str, compressed_ml=None) -> dict:
    """What the converted graph computes, simulated in torch: the rewritten module in float16 (FP16),
    or in float32 with the weights decompressed from the compressed program."""
    import torch

    m = copy.deepcopy(module)
    if compressed_ml is not None:
        loaded = load_decompressed(m, compressed_ml)
        if not loaded:
            raise EdgeClipError("no compressed weight of the Core ML program maps back to the torch module")
    elif precision == "fp16":
        m = m.half()
        m.dtype = torch.float16  # the graph modules cast their input to this
    x = inputs["pixel_values"] if name == "image" else inputs["input_ids"]
    t = torch.from_numpy(x)
    if t.is_floating_point():
        t = t.to(next(m.parameters()).dtype)
    with torch.no_grad():
        out = m(t)
    outs = out if isinstance(out, tuple) else (out,)
    names = module.output_names if name == "image" else ["text_embeds"]
    return {n: o.float().numpy() for n, o in zip(names, outs)}


def load_decompressed(module, ml) -> int:
    """Put the compressed program's weights, decompressed, into the torch module; returns how many."""
    import torch

    by_name = {"p_" + k.replace(".", "_"): k for k, _ in module.named_parameters()}
    params = dict(module.named_parameters())
    n = 0
    for op in program_ops(ml):
        if op.op_type not in COMPRESSED_OPS:
            continue
        key = op.outputs[0].name
        for suffix in ("_palettized", "_quantized", "_to_fp16"):
            key = key.split(suffix)[0]
        target = by_name.get(key)
        if target is None:
            continue
        value = op.materialized_val_inference()  # the dense weight Core ML rebuilds at load
        value = torch.from_numpy(np.asarray(value, dtype=np.float32))
        p = params[target]
        if tuple(value.shape) != tuple(p.shape):
            continue
        with torch.no_grad():
            p.copy_(value)
        n += 1
    return n


def _predict_check(root: Path, graphs: dict, inputs: dict, ref: dict, tol) -> str:
    """On macOS, run the saved packages and compare; elsewhere say why not."""
    if platform.system() != "Darwin":
        return "not run: Core ML predictions need macOS"
    from ...runtime.backends.coreml import Backend

    got = {}
    for name, feed in (("image", {"pixel_values": inputs["pixel_values"]}), ("text", {"input_ids": inputs["input_ids"]})):
        got.update(Backend(root / graphs[name]["file"]).run(feed))
    report = compare(got, {k: v for k, v in ref.items() if k in got}, tol or Tolerance(max_abs=0.5, min_cosine=0.95))
    return "ran on macOS: " + ", ".join(f"{k} min cosine {v['min_cosine']:.5f}" for k, v in report.items())
