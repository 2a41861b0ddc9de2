"""ONNX target (ONNX Runtime on CPU and servers), and the family of ONNX-traced targets that the
ORT-format phone target (`formats/ort_mobile.py`) and OpenVINO build on."""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

from ...runtime.backends.ort import Backend as OrtBackend
from ...runtime.tokenizer import trim as trim_ids
from .. import register_target
from ..target import ExportJob, Target, head_logit_outputs
from ..tolerance import Tolerance

log = logging.getLogger(__name__)


# 4-bit weights on the fixed synthetic inputs (random token ids, noise images): a sanity bound only
FOUR_BIT = Tolerance(max_abs=0.5, min_cosine=0.95)


class OnnxFamilyTarget(Target):
    """Graphs traced with torch's ONNX exporter, fused and quantized for ONNX Runtime (subclasses:
    other file formats of the same graphs, other runtimes that read ONNX)."""

    precisions = ("fp32", "fp16", "int8")
    # INT8 is guarded on held-out calibration samples (--max-cosine-drop); the fixed synthetic inputs
    # of this check are only a sanity bound.
    tolerances = {"fp32": Tolerance(max_abs=1e-4, min_cosine=0.99999),
                  "fp16": Tolerance(max_abs=1e-2, min_cosine=0.999),
                  "int8": Tolerance(max_abs=0.25, min_cosine=0.98)}
    graph_ext = ".onnx"
    default_opset = 18
    backend = "ort"
    tools = ("torch", "onnx", "onnxscript", "onnxruntime")
    attention = "reference"  # traced as plain ops, then fused into ORT's contrib op (kernels.onnx_fusions)
    lower_int8 = True  # MatMulIntegerToFloat with the bias inside; ORT-format files keep portable QDQ

    def trace_dtype(self, precision: str):
        """The torch dtype the graphs are traced in (INT8: a float graph, then quantized)."""
        from ..graphs import DTYPES

        return DTYPES[precision]

    def write_graphs(self, job: ExportJob, w) -> tuple[dict, dict]:
        from ..graphs import ImageGraph, TextGraph, io_spec

        opts, spec = job.opts, job.spec
        dtype = self.trace_dtype(opts.precision)
        m = self.prepare(job, self.attention, dtype)
        if opts.precision == "int8":
            self.calibrate(job, m)
        decl = self.declare(job, io_spec(m, len(job.labels), trim=job.trim, heads=job.heads))
        self.write_graph(job, ImageGraph(m, job.head, dtype, job.heads), "image", decl["image"], w, False)
        self.write_graph(job, TextGraph(m, dtype), "text", decl["text"], w, job.trim)
        graphs = {name: {"file": f"{name}{self.graph_ext}", **decl[name]} for name in ("image", "text")}
        self.graph_config(job, graphs)
        fidelity = validate(w.staging, graphs, job, self.tolerance(opts), self.open_graph)
        return graphs, fidelity

    def tolerance(self, opts) -> Tolerance:
        """The fixed-input sanity bound: the precision's, or the 4-bit recipes' looser one (their real
        bound is the accuracy guard's, on held-out calibration data)."""
        if opts.precision == "int8":
            from ...calibration.recipes import get_recipe

            if get_recipe(opts.recipe).weight_bits < 8:
                return self.tolerances.get("int4", FOUR_BIT)
        return self.tolerances[opts.precision]

    def calibrate(self, job: ExportJob, m) -> None:
        """Calibration and held-out data for both graphs; the layers INT8 may quantize, as the towers say."""
        from ...calibration.recipes import get_recipe
        from ...calibration.sets import calibration_sets

        opts = job.opts
        job.calibration = calibration_sets(job.model, job.spec, opts, get_recipe(opts.recipe), job.labels,
                                           job.templates, job.trim)
        job.calibration["image"].heads = head_logit_outputs(job.labels, job.heads)
        job.calibration["image"].min_agreement = opts.min_head_agreement
        job.quantizable = lambda path: path.startswith("heads.") or m.quantizable(path)

    def manifest_extra(self, job: ExportJob) -> dict:
        return {"fusions": job.fusions, "quantization": quantization_manifest(job.opts, job.quantization),
                **job.extra}

    # Per-target hooks
    def declare(self, job: ExportJob, decl: dict) -> dict:
        """The graphs' declared inputs and outputs (`graphs.io_spec`), as this target writes them."""
        return decl

    def rewrite(self, m) -> None:
        for tower in m.towers().values():
            tower.prefer_gemm()

    def graph_config(self, job: ExportJob, graphs: dict) -> None:
        for name, report in job.quantization.items():
            # weights-only recipes: fold the weight dequantization once, at load
            if report["activations"] == "float" or report.get("accuracy_level"):
                graphs[name]["session_config"] = {"session.disable_quant_qdq": "1"}

    def run_outputs(self, job: ExportJob, root: Path, graphs: dict, feeds: dict) -> dict | None:
        out = {}
        for name, key in (("image", "pixel_values"), ("text", "input_ids")):
            out.update(self.open_graph(root / graphs[name]["file"], graphs[name]).run({key: feeds[key]}))
        return out

    def open_graph(self, path: Path, info: dict):
        """The runtime backend for one written graph, as the validation runs it."""
        return OrtBackend(path, config=info.get("session_config"))

    def write_graph(self, job: ExportJob, module, name: str, decl: dict, w, dynamic_length: bool) -> None:
        self.build_graph(job, module, name, decl, w, dynamic_length, w.path(f"{name}{self.graph_ext}"))

    def build_graph(self, job: ExportJob, module, name, decl, w, dynamic_length: bool, path: Path) -> None:
        """Export the float graph, fuse it for ONNX Runtime, quantize it when asked; write `path`."""
        import onnx

        from ...calibration.recipes import get_recipe, quantize_graph
        from ...kernels.onnx_fusions import fuse
        from ...onnxgraph import strip_metadata

        opts = job.opts
        raw = w.staging / f".{name}.export.onnx"
        to_onnx(module.eval(), name, decl, job.spec, raw, opts.opset or self.default_opset, dynamic_length)
        fusing = opts.fuse and opts.precision in ("fp32", "int8")  # ORT's CPU MultiHeadAttention is float32
        graph = onnx.load(str(raw))
        raw.unlink()
        strip_metadata(graph)
        if fusing:
            job.fusions[name] = fuse(graph)
        if opts.precision == "int8":
            graph, job.quantization[name] = quantize_graph(
                graph, get_recipe(opts.recipe), job.calibration[name], observer=opts.observer,
                alpha=opts.smoothquant_alpha, max_drop=opts.guard_bound(), lower=self.lower_int8,
                quantizable=job.quantizable, block_size=opts.block_size)
        onnx.save(graph, str(path))


@register_target("onnx")
class OnnxTarget(OnnxFamilyTarget):
    """ONNX graphs for ONNX Runtime (CPU, servers, any execution provider)."""


def to_onnx(module, name, decl, spec, path, opset: int, dynamic_length: bool) -> None:
    import torch

    from ...models.inputs import reference_inputs

    example = reference_inputs(spec, n=2, seed=7)
    batch = torch.export.Dim("batch", min=1, max=4096)
    if name == "image":
        args = (torch.from_numpy(example["pixel_values"]),)
        dynamic = {"pixel_values": {0: batch}}
    else:
        # a fixed length or integer type the target declares (ort-mobile: int32, one length)
        ids_decl = decl["inputs"]["input_ids"]
        ids = example["input_ids"].astype(ids_decl["dtype"])
        if isinstance(ids_decl["shape"][1], int):
            ids = ids[:, :ids_decl["shape"][1]]
        args = (torch.from_numpy(ids),)
        axes = {0: batch}
        if dynamic_length:
            axes[1] = torch.export.Dim("length", min=2, max=spec.text.context_length)
        dynamic = {"input_ids": axes}
    # The exporter narrates every step on stdout and warns about optional packages: keep it quiet.
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(path), input_names=list(decl["inputs"]),
                              output_names=list(decl["outputs"]), dynamic_shapes=dynamic, dynamo=True,
                              external_data=False, optimize=True, opset_version=opset, verbose=False)
    finally:
        quiet.setLevel(level)


def validate(root: Path, graphs: dict, job: ExportJob, tol: Tolerance, open_graph) -> dict:
    """Run the written graphs with the runtime backend on fixed inputs; compare with the reference."""
    from ..graphs import compare, reference_inputs, reference_outputs

    spec = job.spec
    inputs = reference_inputs(spec)
    length = graphs["text"]["inputs"]["input_ids"]["shape"][1]
    if isinstance(length, int) and length < inputs["input_ids"].shape[1]:
        # a fixed shorter length (ort-mobile): rows cut to it, each ending with its end token
        ids = inputs["input_ids"][:, :length].copy()
        ids[:, -1] = spec.text.eot_token_id
        inputs = {**inputs, "input_ids": ids}
    ref = reference_outputs(job.model, inputs, job.head, job.heads)

    def backend(name):
        return open_graph(root / graphs[name]["file"], graphs[name])

    image = backend("image").run({"pixel_values": inputs["pixel_values"]})
    ids = trim_ids(inputs["input_ids"], spec.text.eot_token_id) if job.trim else inputs["input_ids"]
    text = backend("text").run({"input_ids": ids})
    return compare({**image, **text}, ref, tol)


def quantization_manifest(opts, reports: dict) -> dict | None:
    if not reports:
        return None
    first = next(iter(reports.values()))
    return {"recipe": first["recipe"], "max_cosine_drop": opts.guard_bound(), "graphs": reports}
