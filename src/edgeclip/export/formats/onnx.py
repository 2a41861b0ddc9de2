"""ONNX target (ONNX Runtime on CPU and servers) and ORT-format target (Android/iOS mobile builds)."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from ...heads.base import resolve as resolve_heads
from ...heads.zero_shot import DEFAULT_TEMPLATES, check_templates, class_embeddings, parse_labels, resolve_templates
from ...runtime.backends.ort import Backend as OrtBackend
from ...runtime.pipeline import trim
from ...runtime.tokenizer import load_tokenizer
from ...calibration.recipes import get_recipe, image_calibration, quantize_graph, text_calibration
from ...errors import CalibrationError, TokenizerError
from .. import register_target
from ..artifact import Artifact, ArtifactWriter, tool_versions
from ..graphs import (DTYPES, ImageGraph, TextGraph, Tolerance, compare, head_outputs, io_spec, prepare,
                      raise_if_failed, reference_inputs, reference_outputs, trim_supported)

log = logging.getLogger(__name__)
VOCAB = Path(__file__).resolve().parents[2] / "runtime" / "bpe_simple_vocab_16e6.txt.gz"


@register_target("onnx")
class OnnxTarget:
    precisions = ("fp32", "fp16", "int8")
    # INT8 is guarded on held-out calibration samples (--max-cosine-drop); the fixed synthetic inputs
    # of this check are only a sanity bound.
    tolerances = {"fp32": Tolerance(max_abs=1e-4, min_cosine=0.99999),
                  "fp16": Tolerance(max_abs=1e-2, min_cosine=0.999),
                  "int8": Tolerance(max_abs=0.25, min_cosine=0.98)}
    graph_ext = ".onnx"
    default_opset = 18
    backend = "ort"
    trace_dtype = DTYPES     # torch dtype the graphs are traced in, per precision
    attention = "reference"  # traced as plain ops, then fused into ORT's contrib op (kernels.onnx_fusions)
    lower_int8 = True  # MatMulIntegerToFloat with the bias inside; ORT-format files keep portable QDQ

    def export(self, model, spec, opts, out) -> Artifact:
        labels = parse_labels(opts.labels) if opts.labels else []
        templates = resolve_templates(opts.templates, default_templates(spec)) if labels else []
        head = zero_shot_head(model, spec, labels, templates) if labels else None
        heads = resolve_heads(opts.heads, spec.embed_dim, spec.name)
        dtype = self.trace_dtype[opts.precision]
        m = prepare(model, opts, attention=self.attention, dtype=dtype)
        self.rewrite(m)
        trim = opts.trim_text and trim_supported(spec)
        self.fusions, self.quantization, self.calibration = {}, {}, None
        if opts.precision == "int8":
            recipe = get_recipe(opts.recipe)
            self.calibration = calibration_sets(model, spec, opts, recipe, labels, templates, trim)
            self.calibration["image"].heads = head_logit_outputs(labels, heads)
            self.calibration["image"].min_agreement = opts.min_head_agreement
        with ArtifactWriter(out, overwrite=opts.overwrite) as w:
            decl = io_spec(spec, len(labels), trim=trim, heads=heads)
            self.write_graph(ImageGraph(m, head, dtype, heads), "image", decl["image"], spec, w, opts,
                             dynamic_length=False)
            self.write_graph(TextGraph(m, dtype), "text", decl["text"], spec, w, opts, dynamic_length=trim)
            graphs = {name: {"file": f"{name}{self.graph_ext}", **decl[name]} for name in ("image", "text")}
            self.graph_config(graphs)
            tokenizer = write_tokenizer(spec, w)
            fidelity = validate(w.staging, graphs, model, spec, head, trim, self.tolerances[opts.precision],
                                self.open_graph, heads)
            if opts.validate:
                raise_if_failed(fidelity, f"the {self.name} {opts.precision} export of '{spec.name}'")
            manifest = {
                "target": self.name, "precision": opts.precision, "backend": self.backend,
                "model": {"name": spec.name, "family": spec.family, "embed_dim": spec.embed_dim,
                          "spec": spec.to_dict(), "source": getattr(model, "source", None)},
                "preprocess": spec.preprocess_config(),
                "tokenizer": tokenizer,
                "text": {"trim": trim, "pool": spec.text.pool, "eot_token_id": spec.text.eot_token_id,
                         "context_length": spec.text.context_length},
                "graphs": graphs,
                "head": head_manifest(spec, labels, templates) if labels else None,
                "heads": heads_manifest(heads, fidelity, self.quantization.get("image")),
                "logit_scale": float(model.logit_scale.detach().exp()),
                "logit_bias": float(model.logit_bias.detach()) if model.logit_bias is not None else None,
                "options": {k: str(v) if isinstance(v, Path) else v
                            for k, v in dataclasses.asdict(opts).items() if k not in ("labels", "heads")},
                "fidelity": fidelity,
                "fusions": self.fusions,
                "quantization": quantization_manifest(opts, self.quantization),
                "tools": tool_versions(),
                **self.manifest_extra(),
            }
            return w.finish(manifest)

    # Per-target hooks (the OpenVINO target overrides them)
    def rewrite(self, m) -> None:
        m.visual.set_patch_as_matmul(True)  # ORT's CPU GEMM beats its convolution for stride-p patches

    def graph_config(self, graphs: dict) -> None:
        for name, report in self.quantization.items():
            if report["activations"] == "float":  # fold the weight dequantization once, at load
                graphs[name]["session_config"] = {"session.disable_quant_qdq": "1"}

    def open_graph(self, path: Path, info: dict):
        """The runtime backend for one written graph, as the validation runs it."""
        return OrtBackend(path, config=info.get("session_config"))

    def manifest_extra(self) -> dict:
        return {}

    def write_graph(self, module, name, decl, spec, w, opts, dynamic_length: bool) -> None:
        self.build_graph(module, name, decl, spec, w, opts, dynamic_length, w.path(f"{name}.onnx"))

    def build_graph(self, module, name, decl, spec, w, opts, dynamic_length: bool, path: Path) -> None:
        """Export the float graph, fuse it for ONNX Runtime, quantize it when asked; write `path`."""
        import onnx

        from ...kernels.onnx_fusions import fuse

        raw = w.staging / f".{name}.export.onnx"
        to_onnx(module.eval(), name, decl, spec, raw, opts.opset or self.default_opset, dynamic_length)
        fusing = opts.fuse and opts.precision in ("fp32", "int8")  # ORT's CPU MultiHeadAttention is float32
        if not fusing and opts.precision != "int8":
            raw.replace(path)
            return
        graph = onnx.load(str(raw))
        raw.unlink()
        if fusing:
            self.fusions[name] = fuse(graph)
        if opts.precision == "int8":
            graph, self.quantization[name] = quantize_graph(
                graph, get_recipe(opts.recipe), self.calibration[name], observer=opts.observer,
                alpha=opts.smoothquant_alpha, max_drop=opts.max_cosine_drop, lower=self.lower_int8)
        onnx.save(graph, str(path))


@register_target("ort-mobile")
class OrtMobileTarget(OnnxTarget):
    """The same graphs saved in ONNX Runtime's ORT format, for its mobile (Android/iOS) packages."""

    graph_ext = ".ort"
    lower_int8 = False

    def write_graph(self, module, name, decl, spec, w, opts, dynamic_length: bool) -> None:
        onnx_path = w.staging / f".{name}.tmp.onnx"
        self.build_graph(module, name, decl, spec, w, opts, dynamic_length, onnx_path)
        to_ort_format(onnx_path, w.path(f"{name}.ort"))
        onnx_path.unlink()


def to_onnx(module, name, decl, spec, path, opset: int, dynamic_length: bool) -> None:
    example = reference_inputs(spec, n=2, seed=7)
    batch = torch.export.Dim("batch", min=1, max=4096)
    if name == "image":
        args = (torch.from_numpy(example["pixel_values"]),)
        dynamic = {"pixel_values": {0: batch}}
    else:
        args = (torch.from_numpy(example["input_ids"]),)
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


def to_ort_format(onnx_path: Path, ort_path: Path) -> None:
    import onnxruntime as ort

    so = ort.SessionOptions()
    # Basic (hardware-independent) optimizations only: the file must run on any phone's CPU.
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(ort_path)
    so.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------- shared by all targets

def default_templates(spec) -> list[str]:
    if spec.name == "tiny":
        from ...builtin import prompt_templates

        return prompt_templates()
    return list(DEFAULT_TEMPLATES)


def model_tokenizer(spec):
    cfg = spec.tokenizer_config()
    if cfg["kind"] == "hf" and not cfg.get("path"):
        raise TokenizerError(f"model '{spec.name}' has no tokenizer.json (a random or spec-only SigLIP model); "
                             "load it from a folder with tokenizer.json to embed text")
    return load_tokenizer(cfg["kind"], cfg["context_length"], cfg.get("path"))


def zero_shot_head(model, spec, labels, templates) -> np.ndarray:
    """Class embeddings computed once with the float32 torch reference."""
    tok = model_tokenizer(spec)

    def encode(prompts):
        ids = torch.from_numpy(tok(prompts, truncate=True))
        with torch.no_grad():
            return model.encode_text(ids).float().numpy()

    return class_embeddings(encode, labels, templates)


def head_logit_outputs(labels, heads) -> list:
    """The image graph's class-score outputs: the INT8 guard keeps each one's top-1 agreement."""
    return (["logits"] if labels else []) + [head_outputs(h)["logits"] for h in heads]


def heads_manifest(heads, fidelity: dict, quantization: dict | None) -> dict:
    """Per adapter head: kind, classes, outputs, how it was fitted, and what the export measured."""
    out = {}
    agreement = (quantization or {}).get("head_agreement", {})
    for h in heads:
        names = head_outputs(h)
        entry = {**h.manifest(), "output": names["logits"], "mcm_output": names["mcm"],
                 "validation": fidelity.get(names["logits"])}
        if names["logits"] in agreement:
            entry["int8_top1_agreement"] = agreement[names["logits"]]
        out[h.name] = entry
    return out


def head_manifest(spec, labels, templates) -> dict:
    return {"kind": "zero_shot", "labels": labels, "templates": templates, "output": "logits",
            "activation": "sigmoid" if spec.family == "siglip" else "softmax"}


def write_tokenizer(spec, w) -> dict:
    cfg = spec.tokenizer_config()
    out = {"kind": cfg["kind"], "context_length": cfg["context_length"], "file": None}
    if cfg["kind"] == "clip_bpe":
        out["file"] = w.copy(VOCAB, f"tokenizer/{VOCAB.name}")
    elif cfg.get("path"):
        out["file"] = w.copy(cfg["path"], "tokenizer/tokenizer.json")
    return out


def validate(root: Path, graphs: dict, model, spec, head, trimmed: bool, tol: Tolerance, open_graph,
             heads=()) -> dict:
    """Run the written graphs with the runtime backend on fixed inputs; compare with the reference."""
    inputs = reference_inputs(spec)
    ref = reference_outputs(model, inputs, head, heads)

    def backend(name):
        return open_graph(root / graphs[name]["file"], graphs[name])

    image = backend("image").run({"pixel_values": inputs["pixel_values"]})
    ids = trim(inputs["input_ids"], spec.text.eot_token_id) if trimmed else inputs["input_ids"]
    text = backend("text").run({"input_ids": ids})
    got = {**image, **text}
    return compare(got, ref, tol)


# ------------------------------------------------------------------------------------- INT8

def calibration_sets(model, spec, opts, recipe, labels, templates, trim: bool) -> dict:
    """Calibration and held-out data for both towers, preprocessed exactly as the runtime does.

    Images: --calib DIR (the built-in model ships its own). Captions: --calib-captions FILE, else the
    built-in model's, else the zero-shot prompts when --labels is given. Recipes that need no
    calibration (int8-dynamic, w8a16) fall back to synthetic inputs for the accuracy guard."""
    from ...calibration.data import load_images, read_captions
    from ...runtime.preprocess import Preprocessor

    builtin = getattr(model, "source", None) == "builtin:tiny"
    if builtin:
        from ...builtin import calib_captions, calib_dir
    folder = opts.calib or (calib_dir() if builtin else None)
    if folder is not None:
        images = load_images(folder, Preprocessor.from_config(spec.preprocess_config()), limit=opts.calib_size,
                             seed=opts.calib_seed)
        image_info = {"source": "builtin" if not opts.calib else str(folder), "images": len(images.files),
                      "skipped": len(images.skipped), "skipped_files": [f for f, _ in images.skipped[:20]]}
        if images.skipped:
            log.warning("calibration: skipped %d file(s) under %s (links, non-regular or unreadable; first: %s)",
                        len(images.skipped), folder, images.skipped[0][1])
        pixels = images.pixels
    elif recipe.needs_calibration:
        raise CalibrationError(
            f"recipe '{recipe.name}' needs calibration images: pass --calib DIR (a few hundred images like "
            "the ones you will deploy on), or use --recipe int8-dynamic or w8a16, which need none")
    else:
        pixels, image_info = reference_inputs(spec, n=16)["pixel_values"], {"source": "synthetic"}
    if opts.calib_captions:
        captions, text_info = read_captions(opts.calib_captions, limit=opts.calib_size, seed=opts.calib_seed), \
            {"source": str(opts.calib_captions)}
    elif builtin:
        captions, text_info = calib_captions(), {"source": "builtin"}
    elif labels:
        captions, text_info = [t.format(label) for label in labels for t in templates], {"source": "prompts"}
    elif recipe.needs_calibration:
        raise CalibrationError(
            f"recipe '{recipe.name}' calibrates the text tower on captions: pass --calib-captions FILE "
            "(.txt, one per line, or .jsonl), or --labels to calibrate on the zero-shot prompts")
    else:
        captions, text_info = None, {"source": "synthetic"}
    if captions is not None:
        ids = model_tokenizer(spec)(captions, truncate=True)
        text_info["captions"] = len(captions)
    else:
        ids = reference_inputs(spec, n=3)["input_ids"]
    return {"image": image_calibration(pixels, image_info, seed=opts.calib_seed),
            "text": text_calibration(ids, spec.text.eot_token_id, trim, text_info, seed=opts.calib_seed)}


def quantization_manifest(opts, reports: dict) -> dict | None:
    if not reports:
        return None
    first = next(iter(reports.values()))
    return {"recipe": first["recipe"], "max_cosine_drop": opts.max_cosine_drop, "graphs": reports}
