"""What a user would ship without edgeclip, built from the same model, for side-by-side figures.

- `plain-onnx-fp32`: `torch.onnx.export` of the unmodified towers (dynamo exporter, the model as
  loaded, no fusions, text fed at full context length), run with ONNX Runtime.
- `plain-onnx-int8-dynamic`: that export through ONNX Runtime's `quantize_dynamic` with its defaults.
- `plain-openvino-fp32` (only when an OpenVINO artifact is compared): the plain export read by OpenVINO.
- `plain-openvino-nncf-int8` (when openvino and nncf import): the plain export read by OpenVINO,
  `nncf.quantize(model, dataset, model_type=TRANSFORMER)` on the calibration images / captions.

Built once into a cache folder keyed by the model, the library versions and the calibration data;
torch is imported here only (bench without --baselines never needs it).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import warnings
from pathlib import Path

import numpy as np

from .._lazy import require
from .machine import library_versions
from .variants import Variant

STAMP = "baselines.json"


def cache_key(source: str, pixels: np.ndarray, ids: np.ndarray, extra: dict) -> str:
    """Model, library versions and calibration inputs: a change to any of them rebuilds the baselines."""
    h = hashlib.sha256(json.dumps({"source": source, "versions": library_versions(), **extra}, sort_keys=True).encode())
    h.update(np.ascontiguousarray(pixels).tobytes())
    h.update(np.ascontiguousarray(ids).tobytes())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _quiet():
    """The exporter and NNCF narrate on stdout (which may carry --json): swallow it."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "nncf", "")]  # "": quantize_dynamic's advice
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def plain_export(model, graph: str, path: Path) -> None:
    """`torch.onnx.export` of one tower as a user would write it: dynamic batch, nothing else."""
    torch = require("torch", "building baselines (bench --baselines)")
    from ..exporter.graphs import ImageGraph, TextGraph, reference_inputs

    m = copy.deepcopy(model).eval()
    example = reference_inputs(model.spec, n=2, seed=7)
    batch = torch.export.Dim("batch", min=1, max=4096)
    if graph == "image":
        module, name, out, x = ImageGraph(m), "pixel_values", "image_embeds", example["pixel_values"]
    else:
        module, name, out, x = TextGraph(m), "input_ids", "text_embeds", example["input_ids"]
    with _quiet():
        torch.onnx.export(module, (torch.from_numpy(x),), str(path), input_names=[name], output_names=[out],
                          dynamic_shapes={name: {0: batch}}, dynamo=True, external_data=False, optimize=True)


def _openvino_pair(plain: dict, out: Path, pixels: np.ndarray, ids: np.ndarray, want_fp32: bool,
                   want_nncf: bool) -> dict:
    """OpenVINO IR files: the plain export as is, and quantized with NNCF's defaults."""
    ov = require("openvino", "the OpenVINO baseline")
    core = ov.Core()
    files = {"fp32": {}, "nncf": {}}
    data = {"image": [pixels[i:i + 1] for i in range(len(pixels))], "text": [ids[i:i + 1] for i in range(len(ids))]}
    for graph, onnx_file in plain.items():
        model = core.read_model(str(out / onnx_file))
        if want_fp32:
            files["fp32"][graph] = f"ov-fp32-{graph}.xml"
            ov.save_model(model, str(out / files["fp32"][graph]), compress_to_fp16=False)
        if want_nncf:
            nncf = require("nncf", "the OpenVINO + NNCF baseline")
            nncf.set_log_level(logging.ERROR)
            with _quiet():
                q = nncf.quantize(model, nncf.Dataset(data[graph]), model_type=nncf.ModelType.TRANSFORMER,
                                  subset_size=len(data[graph]))
            files["nncf"][graph] = f"ov-nncf-int8-{graph}.xml"
            ov.save_model(q, str(out / files["nncf"][graph]), compress_to_fp16=False)
    return files


def openvino_available() -> bool:
    try:
        import nncf  # noqa: F401
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def build(model, cache: Path, companion: str, pixels: np.ndarray, ids: np.ndarray, *, openvino: bool,
          openvino_fp32: bool, inference_precision: str | None = None, key: str = "", log=None) -> list[Variant]:
    """Build (or reuse from `cache`) the baselines of `model`; return them as Variants.

    `pixels`, `ids`: calibration inputs for NNCF (preprocessed images, full-length token ids)."""
    cache.mkdir(parents=True, exist_ok=True)
    stamp = cache / STAMP
    if stamp.is_file():
        saved = json.loads(stamp.read_text())
        if saved.get("key") == key and all((cache / f).is_file() for v in saved["variants"] for f in v["graphs"].values()):
            if log:
                log(f"baselines reused from {cache}")
            return [Variant.from_dict({**v, "path": str(cache), "companion": companion,
                                       "inference_precision": inference_precision if v["backend"] == "openvino"
                                       else None}) for v in saved["variants"]]
    from onnxruntime.quantization import quantize_dynamic

    plain = {}
    for graph in ("image", "text"):
        if log:
            log(f"baseline: torch.onnx.export of the {graph} tower")
        plain[graph] = f"plain-{graph}.onnx"
        plain_export(model, graph, cache / plain[graph])
    dynamic = {}
    for graph, f in plain.items():
        dynamic[graph] = f"dynamic-int8-{graph}.onnx"
        with _quiet():
            quantize_dynamic(str(cache / f), str(cache / dynamic[graph]))
    common = dict(path=str(cache), model=model.spec.name, source=getattr(model, "source", None),
                  companion=companion)
    variants = [
        Variant(name="plain-onnx-fp32", kind="baseline", target="onnx", precision="fp32", backend="ort",
                description="torch.onnx.export (dynamo), ONNX Runtime", graphs=plain, **common),
        Variant(name="plain-onnx-int8-dynamic", kind="baseline", target="onnx", precision="int8", backend="ort",
                description="torch.onnx.export + onnxruntime quantize_dynamic (defaults), ONNX Runtime",
                graphs=dynamic, **common),
    ]
    if openvino:
        if log:
            log("baseline: OpenVINO + NNCF defaults")
        ov_files = _openvino_pair(plain, cache, pixels, ids, want_fp32=openvino_fp32, want_nncf=True)
        if openvino_fp32:
            variants.append(Variant(name="plain-openvino-fp32", kind="baseline", target="openvino", precision="fp32",
                                    backend="openvino", description="torch.onnx.export, read by OpenVINO",
                                    graphs=ov_files["fp32"], **common))
        variants.append(Variant(name="plain-openvino-nncf-int8", kind="baseline", target="openvino", precision="int8",
                                backend="openvino", graphs=ov_files["nncf"], **common,
                                description="torch.onnx.export, OpenVINO + nncf.quantize(model_type=TRANSFORMER) "
                                            f"on {len(pixels)} images / {len(ids)} captions"))
    for v in variants:
        v.size_bytes = sum(_graph_bytes(cache / f) for f in v.graphs.values())
    stamp.write_text(json.dumps({"key": key, "variants": [v.to_dict() for v in variants]}, indent=2))
    for v in variants:
        if v.backend == "openvino":
            v.inference_precision = inference_precision
    return variants


def _graph_bytes(path: Path) -> int:
    """A graph's size on disk: .xml with its .bin, .onnx with any external data beside it."""
    size = path.stat().st_size
    if path.suffix == ".xml" and path.with_suffix(".bin").is_file():
        size += path.with_suffix(".bin").stat().st_size
    return size
