"""What a user would ship without edgeclip, built from the same model, for side-by-side figures.

- `plain-onnx-fp32`: `torch.onnx.export` of the unmodified towers (dynamo exporter, the model as
  loaded, no fusions, text fed at full context length), run with ONNX Runtime.
- `plain-onnx-int8-dynamic`: that export through ONNX Runtime's `quantize_dynamic` with its defaults.
- `plain-onnx-reparam-fp32`, `plain-onnx-reparam-int8-dynamic` (towers with train-time branches, e.g.
  MobileCLIP's MCi): the same after the reparameterization upstream's READMEs ask for (ml-mobileclip's
  and timm's `reparameterize_model`: every block's own `reparameterize()` on a deep copy). That folds
  the multi-branch blocks only: BatchNorms and layer scales that upstream leaves stay, unlike our
  export, whose tower-level rewrite also folds those. A tower whose blocks fold nothing (text towers,
  the conv-stem ViT) reuses the plain graph; the OpenVINO baselines then read the reparameterized one.
- `plain-openvino-fp32` (only when an OpenVINO artifact is compared): the plain export read by OpenVINO.
- `plain-openvino-nncf-int8` (when openvino and nncf import): the plain (reparameterized, when built)
  export read by OpenVINO,
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
from .sizes import TOWERS, baseline_sizes, graph_bytes, tower_weights
from .variants import Variant

STAMP = "baselines.json"
LAYOUT = 2  # what build() makes; part of the cache key, so caches of an older layout are rebuilt


def cache_key(source: str, pixels: np.ndarray, ids: np.ndarray, extra: dict) -> str:
    """Model, library versions and calibration inputs: a change to any of them rebuilds the baselines."""
    h = hashlib.sha256(json.dumps({"source": source, "versions": library_versions(), "layout": LAYOUT, **extra},
                                  sort_keys=True).encode())
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


def upstream_reparameterized(model):
    """(deep copy of `model` reparameterized as upstream's `reparameterize_model` does, graphs whose
    tower changed); (None, []) when no tower has train-time branches left to fold.

    Upstream calls `reparameterize()` on every module that has one; in our towers those are the
    blocks below the tower (MobileOne, large-kernel conv, RepMixer, conditional positional encoding).
    The tower's own `reparameterize()` (the export's) is skipped on purpose: it also folds the
    BatchNorms and layer scales upstream leaves, and the baseline is what users get, not what we do."""
    torch = require("torch", "building baselines (bench --baselines)")
    m, changed = None, []
    for graph in ("image", "text"):
        if not callable(getattr(getattr(model, TOWERS[graph]), "reparameterize", None)):
            continue
        m = m if m is not None else copy.deepcopy(model).eval()
        tower = getattr(m, TOWERS[graph])
        before = set(tower.state_dict())
        with torch.no_grad():
            for block in [b for b in tower.modules() if b is not tower]:
                if callable(getattr(block, "reparameterize", None)):
                    block.reparameterize()  # a block folded by its parent's call returns at once
        if set(tower.state_dict()) != before:  # folded blocks hold `reparam_conv` instead of branches
            changed.append(graph)
    return (m, changed) if changed else (None, [])



def _reuse(cache: Path, key: str, companion: str, inference_precision: str | None, log) -> list[Variant] | None:
    """The baselines saved in `cache` when they were built for `key` and every file is still there."""
    stamp = cache / STAMP
    if not stamp.is_file():
        return None
    saved = json.loads(stamp.read_text())
    if saved.get("key") != key or not all((cache / f).is_file() for v in saved["variants"] for f in v["graphs"].values()):
        return None
    if log:
        log(f"baselines reused from {cache}")
    return [Variant.from_dict({**v, "path": str(cache), "companion": companion,
                               "inference_precision": inference_precision if v["backend"] == "openvino"
                               else None}) for v in saved["variants"]]


def _onnx_files(model, cache: Path, log) -> dict:
    """{"plain": {graph: file}, "dynamic": ..., and, for towers with branches, "reparam",
    "reparam-dynamic"}: the ONNX baseline files, written to `cache`."""
    from onnxruntime.quantization import quantize_dynamic

    files = {"plain": {}, "dynamic": {}}
    for graph in ("image", "text"):
        if log:
            log(f"baseline: torch.onnx.export of the {graph} tower")
        files["plain"][graph] = f"plain-{graph}.onnx"
        plain_export(model, graph, cache / files["plain"][graph])
    folded, changed = upstream_reparameterized(model)
    if folded is not None:
        files["reparam"], files["reparam-dynamic"] = dict(files["plain"]), {}
        for graph in changed:
            if log:
                log(f"baseline: torch.onnx.export of the {graph} tower after upstream's reparameterize_model")
            files["reparam"][graph] = f"plain-reparam-{graph}.onnx"
            plain_export(folded, graph, cache / files["reparam"][graph])
    written = set()  # a graph shared by plain and reparam (a text tower without branches) is quantized once
    for plain, dynamic in (("plain", "dynamic"), ("reparam", "reparam-dynamic")):
        for graph, f in files.get(plain, {}).items():
            files[dynamic][graph] = f"dynamic-int8-{f[len('plain-'):]}"
            if files[dynamic][graph] not in written:
                with _quiet():
                    quantize_dynamic(str(cache / f), str(cache / files[dynamic][graph]))
                written.add(files[dynamic][graph])
    return files


def _onnx_variants(files: dict, common: dict) -> list[Variant]:
    plain = "torch.onnx.export (dynamo)"
    reparam = "upstream's reparameterize_model, then torch.onnx.export (dynamo)"
    dyn = " + onnxruntime quantize_dynamic (defaults)"
    rows = [("plain-onnx-fp32", "fp32", f"{plain}, ONNX Runtime", "plain"),
            ("plain-onnx-int8-dynamic", "int8", f"{plain}{dyn}, ONNX Runtime", "dynamic"),
            ("plain-onnx-reparam-fp32", "fp32", f"{reparam}, ONNX Runtime", "reparam"),
            ("plain-onnx-reparam-int8-dynamic", "int8", f"{reparam}{dyn}, ONNX Runtime", "reparam-dynamic")]
    return [Variant(name=name, kind="baseline", target="onnx", precision=precision, backend="ort",
                    description=what, graphs=files[which], **common)
            for name, precision, what, which in rows if which in files]


def build(model, cache: Path, companion: str, pixels: np.ndarray, ids: np.ndarray, *, openvino: bool,
          openvino_fp32: bool, inference_precision: str | None = None, key: str = "", log=None) -> list[Variant]:
    """Build (or reuse from `cache`) the baselines of `model`; return them as Variants.

    `pixels`, `ids`: calibration inputs for NNCF (preprocessed images, full-length token ids)."""
    cache.mkdir(parents=True, exist_ok=True)
    towers = tower_weights(model)
    saved = _reuse(cache, key, companion, inference_precision, log)
    if saved is not None:
        for v in saved:  # caches written before sizes existed have none
            v.sizes = baseline_sizes(cache, v.graphs, towers)
        return saved
    files = _onnx_files(model, cache, log)
    common = dict(path=str(cache), model=model.spec.name, source=getattr(model, "source", None),
                  companion=companion)
    variants = _onnx_variants(files, common)
    if openvino:
        if log:
            log("baseline: OpenVINO + NNCF defaults")
        # the export Apple's README asks for, where the towers have branches to fold
        source, what = (files["reparam"], "reparameterized, torch.onnx.export") if "reparam" in files \
            else (files["plain"], "torch.onnx.export")
        ov_files = _openvino_pair(source, cache, pixels, ids, want_fp32=openvino_fp32, want_nncf=True)
        if openvino_fp32:
            variants.append(Variant(name="plain-openvino-fp32", kind="baseline", target="openvino", precision="fp32",
                                    backend="openvino", description=f"{what}, read by OpenVINO",
                                    graphs=ov_files["fp32"], **common))
        variants.append(Variant(name="plain-openvino-nncf-int8", kind="baseline", target="openvino", precision="int8",
                                backend="openvino", graphs=ov_files["nncf"], **common,
                                description=f"{what}, OpenVINO + nncf.quantize(model_type=TRANSFORMER) "
                                            f"on {len(pixels)} images / {len(ids)} captions"))
    for v in variants:
        v.size_bytes = sum(graph_bytes(cache / f) for f in v.graphs.values())
        # the model's parameters as loaded, reparameterized baselines included: one denominator per model
        v.sizes = baseline_sizes(cache, v.graphs, towers)
    (cache / STAMP).write_text(json.dumps({"key": key, "variants": [v.to_dict() for v in variants]}, indent=2))
    for v in variants:
        if v.backend == "openvino":
            v.inference_precision = inference_precision
    return variants

