"""ONNX Runtime backend (CPU), for `.onnx` and `.ort` graphs."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from ..._lazy import require
from ...errors import ArtifactError
from ..manifest import read_verified, safe_path
from ..schema import BACKEND_OPTIONS
from . import filtered_config

_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
           "tensor(int32)": "int32"}


class Backend:
    name = "ort"

    def __init__(self, path, threads: int | None = None, providers=None, config: dict | None = None,
                 inference_precision: str | None = None, data: bytes | None = None):
        """`config`: ONNX Runtime session config entries the artifact asks for (its manifest's
        `graphs.<name>.session_config`), e.g. folding weight-only dequantization at load.
        `data`: the graph's bytes, already verified; then `path` only names it in messages."""
        ort = require("onnxruntime", "running ONNX artifacts")
        if inference_precision not in (None, "f32"):
            raise ArtifactError(f"ONNX Runtime's CPU provider runs float32; inference_precision="
                                f"'{inference_precision}' is not available")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        for key, value in filtered_config(config, BACKEND_OPTIONS["session_config"], "ONNX Runtime").items():
            so.add_session_config_entry(key, value)
        if threads:
            so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = 1
        providers = providers or ["CPUExecutionProvider"]
        try:
            if data is None:
                self.session = ort.InferenceSession(str(Path(path)), so, providers=providers)
            else:
                self.session = _from_bytes(ort, data, so, providers)
        except Exception as e:  # ORT raises its own exception types for unreadable graphs
            hint = " (the graph references external data, which edgeclip artifacts never hold)" \
                if "xternal data" in str(e) else ""
            raise ArtifactError(f"ONNX Runtime cannot load {path}{hint}: {e}") from e
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.signature = {"inputs": _sig(self.session.get_inputs()), "outputs": _sig(self.session.get_outputs())}
        self.info = {"backend": "ort", "version": ort.__version__, "providers": self.session.get_providers(),
                     "threads": threads, "inference_precision": "f32"}

    @classmethod
    def open_verified(cls, root, info: dict, manifest: dict, **kw) -> "Backend":
        """One graph of an artifact, from the bytes that were checked against its manifest."""
        data = read_verified(root, info["file"], manifest)
        return cls(safe_path(root, info["file"]), data=data, **kw)

    def run(self, feeds: dict) -> dict:
        # InferenceSession.run is safe to call from several threads at once.
        outs = self.session.run(self.output_names, feeds)
        return {n: np.asarray(o) for n, o in zip(self.output_names, outs)}


def _from_bytes(ort, data: bytes, so, providers):
    # A graph from memory resolves external-data references against the working directory: point them
    # at an empty folder instead, so a graph can read no file that was not verified.
    with tempfile.TemporaryDirectory(prefix="edgeclip-noext-") as empty:
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", empty)
        return ort.InferenceSession(data, so, providers=providers)


def _sig(args) -> dict:
    return {a.name: (_DTYPES.get(a.type, a.type), len(a.shape) if isinstance(a.shape, list) else None)
            for a in args}
