"""Reading an artifact folder: manifest.json, its schema, checksums, safe paths, the digest. numpy/stdlib only.

The manifest is untrusted: it is read without following links, bounded in size, validated whole
against `schema.py`, and every file it lists is checked (inside the folder, a regular file, no link
on the way, the listed size and sha256). The artifact's **digest** is the sha256 of manifest.json's
bytes; since the manifest lists every file's sha256, it pins the whole artifact.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

from .._files import open_regular, read_regular
from ..errors import ArtifactError, ChecksumError, DigestError
from .schema import FORMAT, FORMAT_VERSION, validate_manifest  # noqa: F401  (FORMAT* re-exported)

MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 32 << 20


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def safe_path(root: Path, rel: str) -> Path:
    """`root / rel`, refusing absolute paths, anything that resolves outside `root`, and links on the way."""
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or "\\" in rel:
        raise ArtifactError(f"manifest path {rel!r} is not a relative path inside the artifact; "
                            "the manifest is corrupt or was tampered with")
    root_r = Path(root).resolve()
    p = (root_r / rel).resolve()
    if p != root_r and root_r not in p.parents:
        raise ArtifactError(f"manifest path {rel!r} leaves the artifact folder {root}; refusing to load it")
    if p != root_r / Path(rel):
        raise ArtifactError(f"artifact path {rel!r} goes through a symbolic link; an artifact holds plain files only")
    return p


def read_bounded(path: Path, limit: int, what: str) -> bytes:
    return read_regular(path, ArtifactError, what, limit, follow_links=False)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def normalize_digest(digest: str) -> str:
    d = str(digest).strip().lower()
    d = d if d.startswith("sha256:") else "sha256:" + d
    if len(d) != 71 or any(c not in "0123456789abcdef" for c in d[7:]):
        raise DigestError(f"digest {digest!r} is not a sha256 digest (sha256:<64 hex digits>, as `edgeclip "
                          "inspect` prints it)")
    return d


def _parse(data: bytes, mf: Path) -> dict:
    def no_constant(name):
        raise ArtifactError(f"{mf} holds {name}, which is not JSON; re-export the artifact")

    try:
        return json.loads(data.decode("utf-8"), parse_constant=no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mf} is not valid JSON ({e}); re-export the artifact") from e
    except RecursionError as e:
        raise ArtifactError(f"{mf} is nested too deeply to be an edgeclip manifest") from e


def check_files(root: Path, files: dict, verify: bool) -> None:
    for rel, meta in files.items():
        p = safe_path(root, rel)
        if not p.exists():
            raise ArtifactError(f"artifact file {rel} is missing from {root}; re-export or restore it")
        fd = open_regular(p, ArtifactError, "artifact file", follow_links=False)
        try:
            size = os.fstat(fd).st_size
            if size != meta["size"]:
                raise ChecksumError(f"artifact file {rel} has {size} bytes, the manifest lists {meta['size']}: "
                                    "it was modified or corrupted; re-export the artifact")
            if verify:
                h = hashlib.sha256()
                while block := os.read(fd, 1 << 20):
                    h.update(block)
                if h.hexdigest() != meta["sha256"]:
                    raise ChecksumError(
                        f"artifact file {rel} does not match its sha256 in the manifest (expected "
                        f"{meta['sha256'][:12]}…, got {h.hexdigest()[:12]}…): it was modified or corrupted; "
                        "re-export the artifact")
        finally:
            os.close(fd)


def load_manifest(root, verify: bool = True, digest: str | None = None) -> tuple[dict, str]:
    """(manifest, digest) of `root`: parsed, validated, every file checked (verify: their sha256 too).

    `digest`: the artifact an app pinned ('sha256:…'); any other manifest raises DigestError."""
    root = Path(root)
    if not root.is_dir():
        raise ArtifactError(f"artifact folder not found: {root}; export one with `edgeclip export`")
    mf = root / MANIFEST
    if not mf.exists() and not mf.is_symlink():
        raise ArtifactError(f"{root} has no {MANIFEST}; it is not an edgeclip artifact (export one with "
                            "`edgeclip export`)")
    data = read_bounded(mf, MAX_MANIFEST_BYTES, "manifest")
    found = _digest(data)
    if digest is not None and normalize_digest(digest) != found:
        raise DigestError(f"artifact {root} has digest {found}, not the pinned {normalize_digest(digest)}: it is "
                          "another artifact or was modified; ship the pinned artifact or update the pin")
    manifest = _parse(data, mf)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{mf} is not an edgeclip manifest (no 'format': '{FORMAT}')")
    validate_manifest(manifest)
    check_files(root, manifest["files"], verify)
    return manifest, found


def graph_files(info: dict, files: dict) -> dict:
    """The listed files one graph is made of: its file, an IR's weights, or a package folder's files."""
    rel = info["file"].rstrip("/")
    names = {rel, info.get("weights")}
    return {k: v for k, v in files.items() if k in names or k.startswith(rel + "/")}


def read_manifest(root, verify: bool = True, digest: str | None = None) -> dict:
    """Parse and check `root/manifest.json`; with verify, check every file's sha256."""
    return load_manifest(root, verify=verify, digest=digest)[0]


def artifact_digest(root) -> str:
    """The digest of an artifact folder: 'sha256:' + the sha256 of its manifest.json."""
    return _digest(read_bounded(Path(root) / MANIFEST, MAX_MANIFEST_BYTES, "manifest"))


def read_verified(root: Path, rel: str, manifest: dict) -> bytes:
    """The bytes of one listed file, checked against the manifest's sha256 as they are read: what the
    caller runs is what was verified, even if the file is swapped after the artifact was opened."""
    meta = manifest["files"].get(rel)
    if meta is None:
        raise ArtifactError(f"{rel} is not listed with a checksum in the manifest; refusing to open it")
    data = read_bounded(safe_path(root, rel), int(meta["size"]), "artifact file")
    if len(data) != meta["size"] or hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise ChecksumError(f"artifact file {rel} does not match its sha256 in the manifest (modified or "
                            "corrupted, possibly after the artifact was opened); re-export or restore the artifact")
    return data


def dumps(obj, fallback=None) -> str:
    """JSON for manifests and `--json` output: numpy values as plain ones, NaN/Infinity as null.
    `fallback(o)` renders any other object (default: refuse it)."""
    def default(o):
        try:
            return _json_default(o)
        except TypeError:
            if fallback is None:
                raise
            return fallback(o)

    return json.dumps(_finite(obj), indent=2, default=default, allow_nan=False)


def _finite(o):
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def _json_default(o):
    import numpy as np  # (the runtime has numpy; imported here to keep reading manifests light)

    if isinstance(o, (np.floating, np.integer, np.bool_)):
        return _finite(o.item())
    if isinstance(o, np.ndarray):
        return _finite(o.tolist())
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
