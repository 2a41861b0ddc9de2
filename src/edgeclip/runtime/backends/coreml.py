"""Core ML backend (macOS only: Core ML cannot run predictions on Linux or Windows).

The packages take batch 1 (the shape an app feeds on device); `run` loops over the batch's rows.
Token ids are fed as int32, Core ML's integer type."""
from __future__ import annotations

import platform
from pathlib import Path

import numpy as np

from ..._lazy import require
from ...errors import ArtifactError
from ..manifest import check_files, graph_files, safe_path


class Backend:
    name = "coreml"

    def __init__(self, path, threads: int | None = None, config: dict | None = None,
                 inference_precision: str | None = None, compute_units: str = "ALL"):
        if platform.system() != "Darwin":
            raise ArtifactError("Core ML artifacts run on Apple devices only (macOS here; iOS and iPadOS apps "
                                "load the .mlpackage with Core ML directly)")
        ct = require("coremltools", "running Core ML artifacts")
        try:
            self.model = ct.models.MLModel(str(Path(path)), compute_units=getattr(ct.ComputeUnit, compute_units))
        except Exception as e:
            raise ArtifactError(f"Core ML cannot load {path}: {e}") from e
        desc = self.model.get_spec().description
        self.input_names = [f.name for f in desc.input]
        self.output_names = [f.name for f in desc.output]
        self.info = {"backend": "coreml", "version": ct.__version__, "compute_units": compute_units,
                     "threads": threads, "inference_precision": inference_precision or "model"}

    @classmethod
    def open_verified(cls, root, info: dict, manifest: dict, **kw) -> "Backend":
        """A package folder loads from disk (Core ML reads no bytes): check its files right before."""
        check_files(root, graph_files(info, manifest["files"]), True)
        return cls(safe_path(root, info["file"]), **kw)

    def run(self, feeds: dict) -> dict:
        (name, x), = feeds.items()
        x = np.asarray(x)
        if x.dtype == np.int64:
            x = x.astype(np.int32)
        rows = [self.model.predict({name: x[i:i + 1]}) for i in range(x.shape[0])]
        return {o: np.concatenate([np.asarray(r[o], dtype=np.float32) for r in rows]) for o in self.output_names}
