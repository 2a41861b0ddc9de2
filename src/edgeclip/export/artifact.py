"""Writing an artifact folder atomically: build in a temporary sibling folder, then rename."""
from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..errors import ArtifactError
from ..runtime.manifest import FORMAT, FORMAT_VERSION, MANIFEST, read_manifest, sha256_file


@dataclass
class Artifact:
    """An exported artifact folder and its manifest."""

    path: Path
    manifest: dict = field(repr=False)

    @classmethod
    def open(cls, path, verify: bool = True) -> "Artifact":
        return cls(Path(path), read_manifest(path, verify=verify))

    @property
    def target(self) -> str:
        return self.manifest["target"]

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    @property
    def fidelity(self) -> dict:
        return self.manifest.get("fidelity", {})

    def size_bytes(self) -> int:
        return sum(m["size"] for m in self.manifest["files"].values())


class ArtifactWriter:
    """Context manager: write files into `.staging`, then `finish()` renames it to `out`."""

    def __init__(self, out, overwrite: bool = False):
        self.out = Path(out)
        if self.out.exists() and not overwrite:
            raise ArtifactError(f"{self.out} already exists; pass overwrite=True (CLI: --overwrite) or pick another --out")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", dir=self.out.parent))
        self._done = False

    def __enter__(self) -> "ArtifactWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._done:
            shutil.rmtree(self.staging, ignore_errors=True)

    def path(self, rel: str) -> Path:
        p = self.staging / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def copy(self, src, rel: str) -> str:
        shutil.copyfile(src, self.path(rel))
        return rel

    def finish(self, manifest: dict) -> Artifact:
        files = {}
        for p in sorted(self.staging.rglob("*")):
            if p.is_file():
                rel = p.relative_to(self.staging).as_posix()
                files[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION,
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    **manifest, "files": files}
        (self.staging / MANIFEST).write_text(json.dumps(manifest, indent=2, default=_json_default) + "\n")
        if self.out.exists():  # overwrite: move the old one aside first so a failure loses nothing
            old = self.out.with_name(f".{self.out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.out, old)
            os.replace(self.staging, self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.staging, self.out)
        self._done = True
        return Artifact(self.out, manifest)


def _json_default(o):
    import numpy as np

    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def tool_versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("edgeclip", "torch", "onnx", "onnxscript", "onnxruntime", "numpy", "openvino", "nncf", "coremltools"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out
