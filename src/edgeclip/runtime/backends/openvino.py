"""OpenVINO backend (CPU by default), for `.xml` + `.bin` IR graphs.

Compiled once per graph with the latency hint and the Pipeline's thread count. OpenVINO picks an
inference precision per device (bf16 on CPUs that have it, even for FP32 models); pass
`inference_precision="f32"` to force full precision (INT8 artifacts ask for f32 in their manifest;
an explicit `inference_precision` still wins). `.info["inference_precision"]` is read back
from the compiled model: what actually runs, not what was asked.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..._lazy import require
from ...errors import ArtifactError, EdgeClipError
from ..manifest import read_verified, safe_path
from ..schema import BACKEND_OPTIONS
from . import filtered_config

PRECISIONS = ("f32", "bf16", "f16")


def _core():
    ov = require("openvino", "running OpenVINO artifacts")
    core = getattr(_core, "core", None)
    if core is None:  # one Core per process: it caches plugins and device state
        core = _core.core = ov.Core()
    return ov, core


def precision_name(value) -> str:
    """OpenVINO's element type ('<Type: 'float32'>', 'f32', ...) as f32 | bf16 | f16."""
    s = str(value).lower()
    for name, keys in (("bf16", ("bf16", "bfloat16")), ("f16", ("f16", "float16")), ("f32", ("f32", "float32"))):
        if any(k in s for k in keys):
            return name
    return s


def default_precision(device: str = "CPU") -> str:
    """The inference precision OpenVINO picks on this machine when none is asked for."""
    _, core = _core()
    return precision_name(core.get_property(device, "INFERENCE_PRECISION_HINT"))


class Backend:
    name = "openvino"

    def __init__(self, path, threads: int | None = None, device: str = "CPU",
                 inference_precision: str | None = None, config: dict | None = None,
                 data: bytes | None = None, weights: bytes | None = None):
        """`inference_precision`: f32 | bf16 | f16, or None for the device's default.
        `config`: extra OpenVINO properties the artifact asks for (manifest `graphs.<name>.ov_config`;
        only those exports write pass). `data`/`weights`: the IR's .xml and .bin bytes, already verified."""
        ov, core = _core()
        path = Path(path)
        if inference_precision is not None and inference_precision not in PRECISIONS:
            raise EdgeClipError(f"unknown inference precision '{inference_precision}'; use one of "
                                f"{', '.join(PRECISIONS)}")
        props = {"PERFORMANCE_HINT": "LATENCY", **filtered_config(config, BACKEND_OPTIONS["ov_config"], "OpenVINO")}
        if threads:
            props["INFERENCE_NUM_THREADS"] = str(int(threads))
        if inference_precision:
            props["INFERENCE_PRECISION_HINT"] = inference_precision
        try:
            model = core.read_model(str(path)) if data is None else core.read_model(data, weights or b"")
            self.compiled = core.compile_model(model, device, props)
        except Exception as e:  # OpenVINO raises RuntimeError with its own message for bad IR
            raise ArtifactError(f"OpenVINO cannot load {path}: {e}") from e
        self.input_names = [_name(p) for p in self.compiled.inputs]
        self.output_names = [_name(p) for p in self.compiled.outputs]
        self.signature = {"inputs": _sig(self.compiled.inputs), "outputs": _sig(self.compiled.outputs)}
        self.info = {"backend": "openvino", "version": ov.__version__, "device": device,
                     "threads": int(self.compiled.get_property("INFERENCE_NUM_THREADS")),
                     "inference_precision": precision_name(self.compiled.get_property("INFERENCE_PRECISION_HINT"))}

    @classmethod
    def open_verified(cls, root, info: dict, manifest: dict, **kw) -> "Backend":
        """One IR of an artifact, from the .xml and .bin bytes that were checked against its manifest."""
        data = read_verified(root, info["file"], manifest)
        weights = read_verified(root, info["weights"], manifest) if info.get("weights") else None
        return cls(safe_path(root, info["file"]), data=data, weights=weights, **kw)

    def run(self, feeds: dict) -> dict:
        # A fresh infer request per call: requests are not thread-safe, compiled models are.
        req = self.compiled.create_infer_request()
        res = req.infer({n: np.ascontiguousarray(v) for n, v in feeds.items()})
        return {_name(port): np.array(value) for port, value in res.items()}


def _name(port) -> str:
    names = port.get_names()
    return port.get_any_name() if names else str(port.get_index())


_DTYPES = {"f32": "float32", "f16": "float16", "i64": "int64", "i32": "int32"}


def _sig(ports) -> dict:
    out = {}
    for p in ports:
        rank = p.get_partial_shape().rank
        t = p.get_element_type().get_type_name()
        out[_name(p)] = (_DTYPES.get(t, t), rank.get_length() if rank.is_static else None)
    return out
