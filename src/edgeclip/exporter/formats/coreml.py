"""Core ML target: `.mlpackage` image and text towers for iPhone, iPad and Mac (ML Program format).

Converted from our torch model through `torch.export` + coremltools (not from ONNX), FP16 by default.
Attention per deployment target: iOS 18+ gets Core ML's fused `scaled_dot_product_attention` (torch
SDPA traced with an implicit scale); older targets get the Neural Engine layout from
`kernels.ane` (channels-first (B, C, 1, S), 1x1 convolutions, per-head split einsum). Weight
compression: `w8` (int8 per channel), `palettize4` / `palettize6` (k-means look-up tables),
`int4-blockwise` (iOS 18+). The linear recipes (w8, int4-blockwise) compress every weight of the
towers with 1024 elements or more: the token embedding, the positional tables, the patch and final
projections included (coremltools' own threshold, 2048, would leave small positional tables FP16).
int4-blockwise runs under an accuracy guard: a tower whose simulated outputs miss the recipe's bound
has its most sensitive weights moved to int8, then FP16 (per-weight configs), and the manifest
records the width of every weight (`coreml.compression.bits`).

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
LINEAR_BITS = {"w8": 8, "int4-blockwise": 4}  # the linear-quantization recipes and their width
WEIGHT_MIN = 1024  # the linear recipes compress every weight (rank >= 2) of at least this many elements
BLOCK = 32         # int4-blockwise: input channels per scale
# weights read by these ops only are positional tables: int8 in every recipe (as on ONNX), never 4-bit
TABLE_USERS = frozenset({"add"})


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
        # the int4 guard measures against the reference even when the export is not validated
        guarded = opts.compress == "int4-blockwise"
        ref = reference_outputs(job.model, inputs, job.head, job.heads) if opts.validate or guarded else {}
        report = _report_header(opts, fused)
        cj = _Job(require("coremltools", "the Core ML target"), job.spec, opts, fused, inputs, ref,
                  self.tolerances[opts.precision])
        graphs, fidelity, compressed = {}, {}, {}
        for name, module in modules.items():
            ml, report["graphs"][name], compressed[name] = _export_graph(cj, w, name, module, examples[name])
            graphs[name] = {"file": f"{name}.mlpackage", **_io(ml)}
            if opts.validate:
                fidelity.update(_fidelity(cj, name, module, ml))
        _finish_report(cj, report, w.staging, graphs, compressed)
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
        for g, w in (c["compression"].get("bits") or {}).items():  # the weights by width, per tower
            widths = sorted(Counter(w.values()).items())
            lines.append(f"bits       {g}: " + ", ".join(
                f"{n} weight{'s' * (n != 1)} {'FP16' if b >= 16 else f'{b}-bit'}" for b, n in widths))
        for g, r in (c["compression"].get("guard") or {}).items():
            lines.append(f"guard      {g}: cosine drop {r['cosine_drop']:.4f} <= {r['max_cosine_drop']:.4f} "
                         f"(all 4-bit: {r['cosine_drop_all_4bit']:.4f}; moved: {len(r['moved'])})")
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
    """Convert, compress and save one graph; (the model as saved, its structural facts, its
    compression facts for the manifest's compression section: bits per weight, the guard)."""
    compress, precision = job.opts.compress, job.opts.precision
    ml = convert(job.ct, module, example, name, job.opts.min_ios, precision)
    extra, keep_fp16 = {}, ()
    if compress:
        # the size of the uncompressed package is only known by saving it
        fp16_bytes = _package_bytes(ml, w.staging / f".{name}.fp16.mlpackage")
        if compress == "int4-blockwise":
            ml, extra["guard"] = guarded_int4(job, name, module, ml)
            keep_fp16 = [k for k, b in extra["guard"]["planned"].items() if b >= 16]
        else:
            ml = compress_weights(job.ct, ml, compress, job.opts.min_ios)
    ml.save(str(w.path(f"{name}.mlpackage")))
    nbytes = _dir_bytes(w.path(f"{name}.mlpackage"))
    layers, heads = (module.visual if name == "image" else module.text).attention_layout()
    facts = structure(ml, fused=job.fused, fp16=precision == "fp16", compress=compress, layers=layers, heads=heads,
                      other_softmax=len(module.mcm) if name == "image" else 0, keep_fp16=keep_fp16)
    if compress:
        facts["size"] = {"fp16_bytes": fp16_bytes, "bytes": nbytes, "ratio": nbytes / fp16_bytes}
    if compress in LINEAR_BITS:
        extra["bits"] = facts.pop("bits")
    if "guard" in extra:
        extra["guard"].pop("planned")
    return ml, facts, extra


def _fidelity(job: _Job, name: str, module, ml) -> dict:
    """The graph's outputs, simulated in torch, against the float32 reference."""
    compress = job.opts.compress
    got = _simulate(module, name, job.inputs, job.opts.precision, ml if compress else None)
    want = {k: v for k, v in job.ref.items() if k in got}
    t = job.tol if not compress else Tolerance(max_abs=0.5, min_cosine=compressed_min_cosine(job.opts))
    return compare(got, want, t)


def compressed_min_cosine(opts) -> float:
    """The validation bound of a compressed export (cosine to FP32); int4-blockwise's guard meets it.
    A max_cosine_drop given for int4-blockwise replaces the recipe's bound (its default is the INT8
    guard's, far tighter than 4-bit weights need)."""
    from .. import ExportOptions

    if opts.compress == "int4-blockwise" and opts.max_cosine_drop != ExportOptions.max_cosine_drop:
        return 1.0 - opts.max_cosine_drop
    return COMPRESSED_MIN_COSINE[opts.compress]


def _finish_report(job: _Job, report: dict, staging: Path, graphs: dict, compressed: dict) -> None:
    """Add the compression totals (and, for the linear recipes, every weight's width: 4, 8, or 16 for
    one left FP16) and the account of which validations ran."""
    opts, compress = job.opts, job.opts.compress
    if compress:
        sizes = [g["size"] for g in report["graphs"].values()]
        report["compression"] = {
            "recipe": compress, "summary": COMPRESSIONS[compress],
            "ratio_vs_fp16": sum(s["bytes"] for s in sizes) / sum(s["fp16_bytes"] for s in sizes)}
        if compress in LINEAR_BITS:
            report["compression"].update(
                {"weights_from_elements": WEIGHT_MIN, **({"block_size": BLOCK} if compress == "int4-blockwise" else {}),
                 "bits": {g: c["bits"] for g, c in compressed.items()}})
        if compress == "int4-blockwise":
            report["compression"]["guard"] = {g: c["guard"] for g, c in compressed.items()}
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


def compress_weights(ct, ml, recipe: str, ios: int, bits: dict | None = None):
    """The compressed program. `bits` (linear recipes): {weight const: 4 | 8 | 16 (left FP16)}, one
    config per weight; without it every weight of `WEIGHT_MIN` elements or more at the recipe's width."""
    import coremltools.optimize.coreml as cto

    if recipe in LINEAR_BITS:
        if bits is None:
            config = cto.OptimizationConfig(global_config=_linear_config(cto, LINEAR_BITS[recipe]))
        else:  # weights not named keep no config: FP16
            config = cto.OptimizationConfig(op_name_configs={k: _linear_config(cto, b) for k, b in bits.items()
                                                             if b < 16})
        return _quiet(cto.linear_quantize_weights, ml, config)
    # iOS 18 allows a look-up table per group of 16 output channels (more accurate); older, one per tensor
    grouped = {"granularity": "per_grouped_channel", "group_size": 16} if ios >= 18 else \
        {"granularity": "per_tensor"}
    op = cto.OpPalettizerConfig(mode="kmeans", nbits=int(recipe[-1]), **grouped)
    # the token embedding (a gather's table, 49408 rows) gets one table: per-group k-means there
    # would run thousands of clusterings for little gain
    per_tensor = cto.OpPalettizerConfig(mode="kmeans", nbits=int(recipe[-1]), granularity="per_tensor")
    return _quiet(cto.palettize_weights, ml, cto.OptimizationConfig(global_config=op,
                                                                    op_type_configs={"gather": per_tensor}))


def _linear_config(cto, bits: int):
    # weight_threshold counts elements strictly above it
    if bits == 4:
        return cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block",
                                           block_size=BLOCK, weight_threshold=WEIGHT_MIN - 1)
    return cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                       weight_threshold=WEIGHT_MIN - 1)


def _quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args)


def weight_consts(ml) -> dict:
    """{const op name: the op types reading it} of the weights the linear recipes compress: finite
    float constants of rank >= 2 and `WEIGHT_MIN` elements or more, read by compute ops (not the data
    of a constexpr op). Rank-1 constants (biases, norms) stay FP16, as coremltools keeps them."""
    out = {}
    for op in program_ops(ml):
        if op.op_type != "const":
            continue
        v = op.outputs[0]
        val, users = v.val, {c.op_type for c in v.child_ops}
        if not isinstance(val, np.ndarray) or val.ndim < 2 or val.size < WEIGHT_MIN \
                or not np.issubdtype(val.dtype, np.floating) or not users \
                or any(u.startswith("constexpr_") for u in users):
            continue
        if np.isfinite(val).all():  # coremltools skips a constant holding inf (an additive mask)
            out[op.name] = sorted(users)
    return out


def _source(name: str) -> str:
    """The name of the FP16 constant a compressed op's output replaces."""
    for suffix in ("_palettized", "_quantized"):
        name = name.split(suffix)[0]
    return name


def _stored(op):
    return op.inputs.get("indices", op.inputs.get("data", op.inputs.get("quantized_data")))


def stored_bits(ml) -> dict:
    """{FP16 constant replaced: bits of its stored data} of a compressed program."""
    out = {}
    for op in program_ops(ml):
        if op.op_type in COMPRESSED_OPS and _stored(op) is not None:
            out[_source(op.outputs[0].name)] = int("".join(c for c in _dtype_name(_stored(op).dtype) if c.isdigit()))
    return out


def decompressed_weights(ml) -> dict:
    """{FP16 constant replaced: the dense float32 weight Core ML rebuilds at load} of a compressed program."""
    return {_source(op.outputs[0].name): np.asarray(op.materialized_val_inference(), dtype=np.float32)
            for op in program_ops(ml) if op.op_type in COMPRESSED_OPS}


# ---------------------------------------------------------------------- int4 accuracy guard

def guarded_int4(job: _Job, name: str, module, ml):
    """int4-blockwise under the accuracy guard: (compressed program, guard report).

    Every weight starts at 4 bits (per block of `BLOCK` input channels), except positional tables
    (`TABLE_USERS`) and weights whose input channels the block does not divide (the patch projection,
    3 colour channels): int8 per channel. The tower is simulated in torch with the weights Core ML
    rebuilds (`_Simulator`) and measured against the float32 reference; if it misses the bound, the
    weights with the most drop per element move to int8, then to FP16 (`calibration.guard.guard_chain`;
    widths are chosen on the simulation, then written once with a config per weight). The report's
    `planned` is {weight: 4 | 8 | 16} (16: FP16)."""
    from ...calibration.guard import guard_chain, min_cosine_drop
    from ...errors import ValidationError

    ct, ios = job.ct, job.opts.min_ios
    weights = weight_consts(ml)
    # the dense weights Core ML rebuilds from each width, every weight compressed once per width
    dense = {4: decompressed_weights(compress_weights(ct, ml, "int4-blockwise", ios, dict.fromkeys(weights, 4))),
             8: decompressed_weights(compress_weights(ct, ml, "int4-blockwise", ios, dict.fromkeys(weights, 8)))}
    floor = {k: 4 if k in dense[4] and not set(users) <= TABLE_USERS else 8 if k in dense[8] else 16
             for k, users in weights.items()}
    layers = [k for k, b in floor.items() if b < 16]
    sim = _Simulator(module, name, job.inputs)
    ref = {k: job.ref[k] for k in sim.names}
    bound = round(1.0 - compressed_min_cosine(job.opts), 9)

    def plan(bits: dict) -> dict:  # guard_chain's widths (32: float) -> this program's (16: FP16)
        return {k: 16 if bits.get(k, 32) >= 32 else max(bits[k], floor[k]) for k in weights}

    measured: dict = {}

    def drop(planned: dict) -> float:  # the guard asks again for some plans (a width's all-in start)
        key = tuple(sorted(planned.items()))
        if key not in measured:
            sim.load({k: dense[b][k] if b < 16 else None for k, b in planned.items()})
            got = sim.run()
            measured[key] = max(min_cosine_drop(got[k], ref[k]) for k in ref)
        return measured[key]

    all4 = drop(plan(dict.fromkeys(layers, 4)))
    try:
        # cost: a weight's elements, so the fallbacks buy the most accuracy for the fewest bytes
        _, g = guard_chain(ml, plan, layers, job.inputs, name, chain=(4, 8), max_drop=bound, drop_fn=drop,
                           cost={k: int(dense[8].get(k, dense[4].get(k)).size) for k in layers})
    except ValidationError as e:
        raise ValidationError(
            f"Core ML int4-blockwise: the {name} tower misses the bound (cosine drop <= {bound:.4g}) even with "
            f"every weight FP16 but one; export with --compress w8, or without compression", failures=e.failures,
        ) from e
    planned = plan(g.bits)
    out = compress_weights(ct, ml, "int4-blockwise", ios, planned)
    moved = {k: b for k, b in planned.items() if b != floor[k]}
    return out, {"max_cosine_drop": bound, "cosine_drop": g.drop, "cosine_drop_all_4bit": all4,
                 "moved": moved, "sensitivity": {k: round(v, 6) for k, v in g.sensitivity.items()},
                 "planned": planned}


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
              other_softmax: int = 0, keep_fp16=()) -> dict:
    """Facts about a converted program; raises ValidationError when one the target promises is false.

    `layers`, `heads`: the tower's `attention_layout()` (heads: one count, or one per attention op);
    `other_softmax`: softmax ops outside attention (the adapter heads' MCM scores); `keep_fp16`:
    weights a linear recipe leaves FP16 on purpose (the int4 guard's), every other weight of
    `WEIGHT_MIN` elements or more must be compressed."""
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
                stored = _stored(op)
                weights[f"{op.op_type}:{_dtype_name(stored.dtype) if stored is not None else '?'}"] += 1
        if not weights:
            problems.append(f"no compressed weight ops ({', '.join(COMPRESSED_OPS)}) after {compress}")
    bits = None
    if compress in LINEAR_BITS:
        left = sorted(set(weight_consts(ml)) - set(keep_fp16))
        if left:
            problems.append(f"weights of {WEIGHT_MIN}+ elements left FP16 after {compress}: {left[:5]}")
        bits = {**stored_bits(ml), **dict.fromkeys(keep_fp16, 16)}
    if problems:
        raise ValidationError("the converted Core ML program is not what the target promises: " + "; ".join(problems))
    return {"ops": dict(sorted(counts.items())),
            "fused_attention": counts["scaled_dot_product_attention"],
            "softmax": counts["softmax"], "conv": counts["conv"], "linear": counts["linear"],
            "float32_compute_ops": len(float32_compute), "compressed_weights": dict(weights),
            **({"bits": dict(sorted(bits.items()))} if bits is not None else {})}


def _simulate(module, name: str, inputs: dict, precision: str, compressed_ml=None) -> dict:
    """What the converted graph computes, simulated in torch: the rewritten module in float16 (FP16),
    or in float32 with the weights decompressed from the compressed program."""
    import torch

    if compressed_ml is not None:
        sim = _Simulator(module, name, inputs)
        if not sim.load(decompressed_weights(compressed_ml)):
            raise EdgeClipError("no compressed weight of the Core ML program maps back to the torch module")
        return sim.run()
    m = copy.deepcopy(module)
    if precision == "fp16":
        m = m.half()
        m.dtype = torch.float16  # the graph modules cast their input to this
    return _run(m, name, inputs, module.output_names if name == "image" else ["text_embeds"])


def _run(m, name: str, inputs: dict, names) -> dict:
    import torch

    x = inputs["pixel_values"] if name == "image" else inputs["input_ids"]
    t = torch.from_numpy(x)
    if t.is_floating_point():
        t = t.to(next(m.parameters()).dtype)
    with torch.no_grad():
        out = m(t)
    outs = out if isinstance(out, tuple) else (out,)
    return {n: o.float().numpy() for n, o in zip(names, outs)}


class _Simulator:
    """One float32 copy of a graph module whose weights can be swapped for the dense weights Core ML
    rebuilds from compressed ones (keyed by the program's FP16 constant names), and run on the
    reference inputs; weights not given keep their float values."""

    def __init__(self, module, name: str, inputs: dict):
        self.m, self.name, self.inputs = copy.deepcopy(module), name, inputs
        self.names = module.output_names if name == "image" else ["text_embeds"]
        self.tensors = _program_names(self.m)
        self.original: dict = {}

    def load(self, weights: dict) -> int:
        """Put `weights` ({constant: array, or None for float}) in; returns how many mapped."""
        import torch

        with torch.no_grad():
            for key, t in self.original.items():  # back to float first: a call sets every weight it names
                self.tensors[key].copy_(t)
            n = 0
            for const, value in weights.items():
                key = const.split("_to_fp16")[0]
                t = self.tensors.get(key)
                if t is None or value is None or tuple(value.shape) != tuple(t.shape):
                    continue
                self.original.setdefault(key, t.detach().clone())
                t.copy_(torch.from_numpy(value))
                n += 1
        return n

    def run(self) -> dict:
        return _run(self.m, self.name, self.inputs, self.names)


def _program_names(module) -> dict:
    """{name torch.export gives a parameter or buffer ("p_"/"b_" + path): tensor} of `module`."""
    out = {"p_" + k.replace(".", "_"): p for k, p in module.named_parameters()}
    out.update({"b_" + k.replace(".", "_"): b for k, b in module.named_buffers()})
    return out


def load_decompressed(module, ml) -> int:
    """Put the compressed program's weights, decompressed, into the torch module; returns how many."""
    import torch

    tensors, n = _program_names(module), 0
    with torch.no_grad():
        for const, value in decompressed_weights(ml).items():
            t = tensors.get(const.split("_to_fp16")[0])
            if t is not None and tuple(value.shape) == tuple(t.shape):
                t.copy_(torch.from_numpy(value))
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
