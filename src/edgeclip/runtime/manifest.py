"""Reading an artifact folder: manifest.json, checksums, safe paths. numpy/stdlib only."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import ArtifactError, ChecksumError

FORMAT = "edgeclip-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def safe_path(root: Path, rel: str) -> Path:
    """`root / rel`, refusing absolute paths and anything that resolves outside `root`."""
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or "\\" in rel:
        raise ArtifactError(f"manifest path {rel!r} is not a relative path inside the artifact; "
                            "the manifest is corrupt or was tampered with")
    root_r = root.resolve()
    p = (root_r / rel).resolve()
    if p != root_r and root_r not in p.parents:
        raise ArtifactError(f"manifest path {rel!r} leaves the artifact folder {root}; refusing to load it")
    return p


def read_manifest(root, verify: bool = True) -> dict:
    """Parse and check `root/manifest.json`; with verify, check every file's sha256."""
    root = Path(root)
    mf = root / MANIFEST
    if not root.is_dir():
        raise ArtifactError(f"artifact folder not found: {root}; export one with `edgeclip export`")
    if not mf.is_file():
        raise ArtifactError(f"{root} has no {MANIFEST}; it is not an edgeclip artifact (export one with `edgeclip export`)")
    try:
        manifest = json.loads(mf.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mf} is not valid JSON ({e}); re-export the artifact") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{mf} is not an edgeclip manifest (no 'format': '{FORMAT}')")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtifactError(f"{mf} has format_version {version!r}; this edgeclip reads up to {FORMAT_VERSION}. "
                            "Upgrade edgeclip or re-export the artifact")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"{mf} lists no files")
    for rel, meta in files.items():
        p = safe_path(root, rel)
        if not p.is_file():
            raise ArtifactError(f"artifact file {rel} is missing from {root}; re-export or restore it")
        if verify:
            digest = sha256_file(p)
            if digest != meta.get("sha256"):
                raise ChecksumError(
                    f"artifact file {rel} does not match its sha256 in the manifest "
                    f"(expected {str(meta.get('sha256'))[:12]}…, got {digest[:12]}…): it was modified or corrupted; "
                    "re-export the artifact"
                )
    # every path the manifest points at must be a listed file
    for graph in manifest.get("graphs", {}).values():
        rel = graph.get("file")
        # a graph is a file (.onnx, .xml) or a package folder (.mlpackage) whose files are all listed
        listed = rel in files or (isinstance(rel, str) and any(f.startswith(rel.rstrip("/") + "/") for f in files))
        if not listed:
            raise ArtifactError(f"graph file {rel!r} is not listed with a checksum in the manifest")
    tok = manifest.get("tokenizer") or {}
    if tok.get("file") is not None and (not isinstance(tok["file"], str) or tok["file"] not in files):
        raise ArtifactError(f"tokenizer file {tok['file']!r} is not listed with a checksum in the manifest; "
                            "the manifest is corrupt or was tampered with, re-export the artifact")
    return manifest
