"""ONNX Runtime backend (CPU), for `.onnx` and `.ort` graphs."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..._lazy import require
from ...errors import ArtifactError


class Backend:
    name = "ort"

    def __init__(self, path, threads: int | None = None, providers=None, config: dict | None = None,
                 inference_precision: str | None = None):
        """`config`: ONNX Runtime session config entries the artifact asks for (its manifest's
        `graphs.<name>.session_config`), e.g. folding weight-only dequantization at load."""
        ort = require("onnxruntime", "running ONNX artifacts")
        if inference_precision not in (None, "f32"):
            raise ArtifactError(f"ONNX Runtime's CPU provider runs float32; inference_precision="
                                f"'{inference_precision}' is not available")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        for key, value in (config or {}).items():
            so.add_session_config_entry(str(key), str(value))
        if threads:
            so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = 1
        providers = providers or ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(Path(path)), so, providers=providers)
        except Exception as e:  # ORT raises its own exception types for unreadable graphs
            raise ArtifactError(f"ONNX Runtime cannot load {path}: {e}") from e
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.info = {"backend": "ort", "version": ort.__version__, "providers": self.session.get_providers(),
                     "threads": threads, "inference_precision": "f32"}

    def run(self, feeds: dict) -> dict:
        # InferenceSession.run is safe to call from several threads at once.
        outs = self.session.run(self.output_names, feeds)
        return {n: np.asarray(o) for n, o in zip(self.output_names, outs)}
