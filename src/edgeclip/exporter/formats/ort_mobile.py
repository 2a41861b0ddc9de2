"""ORT-format target for phones: graphs that Android's NNAPI and iOS's Core ML execution providers
of ONNX Runtime take whole, saved in ONNX Runtime's ORT format for its mobile packages.

What differs from the server `onnx` target's graphs:
- fixed shapes (`--mobile-shapes BATCH[xLENGTH]`, default 1 and the context length), int32 token ids;
- plain ops only: attention unfused, LayerNormalization, Erf, ReduceL2/ReduceSum, Neg and Gather of
  constant positions rewritten (`kernels.onnx_mobile`); text pooling by a one-hot product
  (`Tower.prefer_mask_pooling`) instead of ArgMax and a gather;
- INT8 as int8 weights and tables dequantized by Cast and Mul (the accelerators compute in float16
  or float32; Core ML's EP takes no DequantizeLinear); the default recipe is `w8a16`;
- ONNX Runtime's usability analysis of each graph recorded per EP (`--mobile-ep`), beside the
  contrib ops, the reduced-operator build config, and the conformance vectors.

`--mobile-ep cpu` is for apps that run the CPU EP alone: the server graphs' fused kernels
(MultiHeadAttention, LayerNormalization, Gelu) with the same fixed shapes, int32 ids, vectors and
build config, and no usability analysis (the CPU EP takes every op).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
from pathlib import Path

from .. import register_target
from ..target import ExportJob
from ..tolerance import Tolerance
from .onnx import OnnxFamilyTarget, to_onnx

REDUCED_CONFIG = "required_operators.config"


@register_target("ort-mobile")
class OrtMobileTarget(OnnxFamilyTarget):
    """Fixed-shape plain-op graphs in ORT format, checked with ONNX Runtime's mobile usability analysis."""

    precisions = ("fp32", "int8")
    # the Erf polynomial (3.7e-5) is the only inexact rewrite; INT8 is guarded on held-out data
    tolerances = {"fp32": Tolerance(max_abs=1e-3, min_cosine=0.99999),
                  "int8": Tolerance(max_abs=0.25, min_cosine=0.98)}
    graph_ext = ".ort"
    lower_int8 = False
    options = ("mobile_shapes", "mobile_eps")
    default_recipe = "w8a16"
    plain = True  # graphs for an accelerator EP (False: `--mobile-ep cpu`)

    def begin(self, model, spec, opts) -> ExportJob:
        from ..mobile import accelerated, parse_eps, parse_shapes

        shapes, eps = parse_shapes(opts.mobile_shapes, spec), parse_eps(opts.mobile_eps)
        self.plain = accelerated(eps)
        if opts.precision == "int8" and opts.recipe is None:
            opts = dataclasses.replace(opts, recipe=self.default_recipe)
        # attention stays plain ops: the mobile EPs take no MultiHeadAttention (the CPU EP alone does)
        job = super().begin(model, spec, dataclasses.replace(opts, fuse=False) if self.plain else opts)
        job.extra["ort-mobile"] = {"shapes": shapes, "eps": list(eps), "usability": {}, "rewrites": {},
                                   "contrib_ops": {}, "packages": MOBILE_PACKAGES}
        return job

    def trims(self, opts, spec) -> bool:
        return False  # one fixed length; the runtime cuts or pads the ids to it

    def rewrite(self, m) -> None:
        if not self.plain:
            return super().rewrite(m)
        # no prefer_gemm: a patch embedding as a GEMM needs a rank-6 transpose, past Core ML's rank 5
        for tower in m.towers().values():
            tower.prefer_mask_pooling()

    def declare(self, job: ExportJob, decl: dict) -> dict:
        shapes = job.extra["ort-mobile"]["shapes"]
        for graph in decl.values():
            for entry in list(graph["inputs"].values()) + list(graph["outputs"].values()):
                entry["shape"] = [shapes["batch"] if d == "batch" else d for d in entry["shape"]]
        ids = decl["text"]["inputs"]["input_ids"]
        ids["dtype"], ids["shape"] = "int32", [shapes["batch"], shapes["length"]]
        return decl

    def open_graph(self, path: Path, info: dict):
        from ...runtime.shapes import fit_shapes

        return fit_shapes(super().open_graph(path, info), info)

    def write_graph(self, job: ExportJob, module, name: str, decl: dict, w, dynamic_length: bool) -> None:
        import onnx

        from ...kernels.onnx_mobile import lower_for_mobile
        from ...onnxgraph import strip_metadata
        from ..mobile import supported_ops, usability

        opts, section = job.opts, job.extra["ort-mobile"]
        eps = tuple(section["eps"])
        supported = supported_ops(eps)
        raw = w.staging / f".{name}.export.onnx"
        to_onnx(module.eval(), name, decl, job.spec, raw, opts.opset or self.default_opset, False)
        graph = onnx.load(str(raw))
        raw.unlink()
        strip_metadata(graph)
        if self.plain:
            section["rewrites"][name] = lower_for_mobile(graph, supported)
        else:  # the CPU EP alone: its fused kernels, as the server graphs have them
            from ...kernels.onnx_fusions import fuse
            from ...kernels.onnx_mobile import REWRITES

            # only the constant attention masks' Where -> Add, the form the attention fusion takes
            section["rewrites"][name] = lower_for_mobile(graph, {f"ai.onnx:{op}" for op in REWRITES if op != "Where"})
            if opts.fuse:
                job.fusions[name] = fuse(graph)
        if opts.precision == "int8":
            graph = self.quantize(job, graph, name)
        onnx_path = w.staging / f".{name}.mobile.onnx"
        casts, late, final = finish_graph(graph, section["shapes"]["batch"], onnx_path, supported, self.plain)
        for op, n in late.items():
            section["rewrites"][name][op] = section["rewrites"][name].get(op, 0) + n
        section["usability"][name] = usability(onnx_path, eps)
        section["contrib_ops"][name] = sorted({n.op_type for n in final.graph.node if n.domain == "com.microsoft"})
        to_ort_format(onnx_path, w.path(f"{name}.ort"), keep_casts=casts, plain=self.plain,
                      disabled=() if self.plain else CPU_KEEP)
        onnx_path.unlink()

    def calibrate(self, job: ExportJob, m) -> None:
        """The parent's sets, with the text feeds as the fixed graph takes them (int32, its length)."""
        from ...runtime.shapes import fit_feed

        super().calibrate(job, m)
        shapes = job.extra["ort-mobile"]["shapes"]
        decl = {"dtype": "int32", "shape": [shapes["batch"], shapes["length"]]}
        text = job.calibration["text"]
        text.batches = [{"input_ids": fit_feed(decl, b["input_ids"])} for b in text.batches]
        text.held_out = {"input_ids": fit_feed(decl, text.held_out["input_ids"])}

    def quantize(self, job: ExportJob, graph, name: str):
        from ...calibration.recipes import get_recipe, quantize_graph

        opts = job.opts
        graph, job.quantization[name] = quantize_graph(
            graph, get_recipe(opts.recipe), job.calibration[name], observer=opts.observer,
            alpha=opts.smoothquant_alpha, max_drop=opts.guard_bound(), lower=False,
            quantizable=job.quantizable, block_size=opts.block_size)
        return graph

    def write_graphs(self, job: ExportJob, w) -> tuple[dict, dict]:
        graphs, fidelity = super().write_graphs(job, w)
        section = job.extra["ort-mobile"]
        section["reduced_build_config"] = write_reduced_build_config(
            [w.staging / graphs[g]["file"] for g in ("image", "text")], w.path(REDUCED_CONFIG))
        return graphs, fidelity

    @classmethod
    def inspect_lines(cls, manifest: dict) -> list[str]:
        from ..mobile import EP_NAMES, summary

        o = manifest.get("ort-mobile") or {}
        lines = []
        if o.get("shapes"):
            s = o["shapes"]
            lines.append(f"mobile     fixed shapes: batch {s['batch']}, text length {s['length']} (int32 ids); "
                         f"made for {', '.join(EP_NAMES.get(e, e) for e in o.get('eps', []))}")
        for g, report in (o.get("usability") or {}).items():
            if report:
                lines.append(f"mobile     {g}: {summary(report)} (ONNX Runtime's usability analysis)")
        if o.get("contrib_ops"):
            lines.append("mobile     contrib ops " + "; ".join(f"{g}: {', '.join(ops) or 'none'}"
                                                          for g, ops in o["contrib_ops"].items()))
        cfg = o.get("reduced_build_config")
        if cfg:
            lines.append(f"mobile     reduced build: {cfg['file']} ({cfg['operators']} operators; ONNX Runtime's "
                         "build.py --minimal_build --include_ops_by_config)")
        return lines + super().inspect_lines(manifest)


# ONNX Runtime's basic-level fusions that would put back ops the mobile EPs lack (LayerNormalization, Gelu)
KEEP_PLAIN = ["LayerNormFusionL1", "GeluFusionL1", "MatMulAddFusion"]
# the CPU EP's graphs keep the server graphs' MatMul + Add: with fixed shapes the fusion would turn each
# [B, N, C] layer into Reshape, Gemm, Reshape, no faster on the CPU EP
CPU_KEEP = ("MatMulAddFusion",)


def finish_graph(graph, batch: int, out: Path, supported: set, plain: bool = True) -> tuple[int, dict, object]:
    """Fix the batch, fold what became constant (ONNX Runtime's basic level, which keeps
    DequantizeLinear), rewrite what only now has static shapes (the normalization of a baked head;
    the patch embedding as one Gemm, the token streams as matrices with each float linear layer one
    Gemm, the residual stream kept centered so LayerNorms skip the mean, the attention and GELU
    scales folded into the layers beside them, Q, K and V cut into heads at once: `kernels.onnx_flat`),
    turn the integer weights' dequantization into Cast and Mul, and save `out` as the ORT-format
    conversion will leave it (so the analysis sees the saved graph). Returns (how many weights stay
    integer: the conversion must not fold those back, the rewrites, the saved model). `plain`: False for
    the CPU EP alone (its fused ops stay, ONNX Runtime's basic fusions but MatMulAddFusion run, and no
    plain-op rewrite does)."""
    import onnx
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_dim_param_fixed

    from ...kernels.onnx_flat import centered_stream, flatten_tokens, fold_scales, heads_at_once, patches_as_gemm
    from ...kernels.onnx_mobile import gathers_to_plain, lower_for_mobile, to_weight_casts

    make_dim_param_fixed(graph.graph, "batch", batch)
    fix_output_shapes(graph)
    if not plain:
        folded = _ort_pass(graph, list(CPU_KEEP))
        casts = to_weight_casts(folded)
        final = _ort_pass(folded, list(CPU_KEEP) + (["ConstantFolding"] if casts else []))
        onnx.save(final, str(out))
        return casts, {}, final
    folded = _ort_pass(graph, KEEP_PLAIN)
    rewrites = lower_for_mobile(folded, supported)
    rewrites["patches as Gemm"] = patches_as_gemm(folded)
    rewrites.update({f"flat {k}": v for k, v in flatten_tokens(folded).items()})
    rewrites["LayerNorm without mean"] = centered_stream(folded)
    rewrites.update({f"folded {k}": v for k, v in fold_scales(folded).items()})
    rewrites["heads at once"] = heads_at_once(folded)
    casts = gathers_to_plain(folded) + to_weight_casts(folded)
    final = _ort_pass(folded, KEEP_PLAIN + (["ConstantFolding"] if casts else []))
    onnx.save(final, str(out))
    return casts, {k: v for k, v in rewrites.items() if v}, final


def _ort_pass(graph, disabled: list):
    """`graph` through ONNX Runtime's basic-level optimizations (all but `disabled`), as a model."""
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save(graph, str(src))
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(dst)
        so.log_severity_level = 3
        ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
        return onnx.load(str(dst))


def to_ort_format(onnx_path: Path, ort_path: Path, keep_casts: bool = False, plain: bool = True,
                  disabled: tuple = ()) -> None:
    """Save `onnx_path` in ORT format. `plain`: without the basic-level fusions that would put back
    ops the mobile EPs lack (False: ONNX Runtime's defaults, how this target saved server graphs
    before it wrote phone graphs); `disabled`: other optimizers to leave out."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    # Basic (hardware-independent) optimizations only: the file must run on any phone's CPU.
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(ort_path)
    so.add_session_config_entry("session.save_model_format", "ORT")
    so.log_severity_level = 3
    # integer weights behind Cast stay integer in the file (folding would store them as float32)
    off = (KEEP_PLAIN if plain else []) + (["ConstantFolding"] if keep_casts else []) + list(disabled)
    ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"], disabled_optimizers=off)


def write_reduced_build_config(ort_files: list, out: Path) -> dict:
    """ONNX Runtime's reduced-operator build config for `ort_files` (the operators, and the types each
    one is used with, that the graphs need: `build.py --include_ops_by_config FILE
    --enable_reduced_operator_type_support`), written to `out` with the graphs named by file name only
    (no path of the exporting machine). Returns its manifest entry."""
    import tempfile

    from onnxruntime.tools.ort_format_model.utils import create_config_from_models

    quiet = logging.getLogger("ort_format_model.utils")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # it logs each config it writes, at INFO
    try:
        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / "ops.config"
            with contextlib.redirect_stdout(io.StringIO()):
                create_config_from_models([Path(f) for f in ort_files], raw, enable_type_reduction=True)
            lines = raw.read_text().splitlines()
    finally:
        quiet.setLevel(level)
    body = [line for line in lines if line and not line.startswith("#")]
    names = ", ".join(sorted(Path(f).name for f in ort_files))
    out.write_text(f"# ONNX Runtime reduced build config for {names} (edgeclip)\n" + "\n".join(body) + "\n")
    ops = [op.split("{")[0] for line in body for op in _config_ops(line)]
    return {"file": out.name, "operators": len(ops), "type_reduction": True}


def _config_ops(line: str) -> list[str]:
    """The operator entries of one `domain;opset;Op1{types},Op2` config line (commas inside braces
    belong to the type lists)."""
    entries, depth, cur = [], 0, ""
    for ch in line.split(";", 2)[2]:
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "," and depth == 0:
            entries.append(cur)
            cur = ""
        else:
            cur += ch
    return entries + ([cur] if cur else [])


# What the ORT-format files need from the app's ONNX Runtime (the contrib ops recorded per graph).
MOBILE_PACKAGES = ("onnxruntime-android (Maven), onnxruntime-c / onnxruntime-objc (CocoaPods) are full builds: "
                   "every ONNX and com.microsoft contrib operator and type, so they run these files. The files "
                   "were checked with the onnxruntime recorded under tools; GatherBlockQuantized over uint8 codes "
                   "and MatMulNBits (4-bit recipes) are recent: use that release or later in the app. "
                   "The discontinued onnxruntime-mobile packages (<= 1.18) had a reduced operator set without "
                   "them; a custom reduced build must list the contrib ops above in its operator config")
