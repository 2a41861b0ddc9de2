"""Writing an artifact folder atomically: build in a temporary sibling folder, then rename."""
from __future__ import annotations

import ctypes
import errno
import json
import math
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..errors import OutputPathError
from ..runtime.manifest import (FORMAT, FORMAT_VERSION, MANIFEST, _json_default, artifact_digest,  # noqa: F401
                                dumps, read_manifest, sha256_file)


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

    @property
    def digest(self) -> str:
        """'sha256:…' of manifest.json, which lists every file's sha256: pins this exact artifact."""
        return artifact_digest(self.path)

    def size_bytes(self) -> int:
        return sum(m["size"] for m in self.manifest["files"].values())


STAGING_MARK = ".edgeclip-staging"  # inside a staging folder: the pid that writes it
STALE_AFTER_S = 24 * 3600           # a staging folder whose writer is gone, or this old, is removed


def check_out(out, overwrite: bool = False) -> Path:
    """Where an export may write: refuse, before any work, what it must not create or replace.

    `--overwrite` replaces only an existing edgeclip artifact or an empty folder; never another
    folder, a file, a link, the working directory or one of its parents."""
    out = Path(out)
    if str(out).strip() == "" or out.name in ("", ".", ".."):
        raise OutputPathError(f"--out {str(out)!r} names no new folder; give the artifact its own folder, "
                              "e.g. --out my-artifact")
    resolved, cwd = out.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents or resolved == Path(resolved.anchor):
        raise OutputPathError(f"--out {out} is the working directory or one of its parents; pick a new folder")
    if out.is_symlink():
        raise OutputPathError(f"--out {out} is a symbolic link; edgeclip replaces only real artifact folders")
    if not out.exists():
        return out
    if not overwrite:
        raise OutputPathError(f"{out} already exists; pass overwrite=True (CLI: --overwrite) to replace an "
                              "edgeclip artifact there, or pick another --out")
    if not out.is_dir():
        raise OutputPathError(f"{out} is a file, not an artifact folder; --overwrite replaces artifacts only")
    if any(out.iterdir()) and not _is_artifact(out):
        raise OutputPathError(f"{out} is a folder that is not an edgeclip artifact (no edgeclip manifest.json); "
                              "--overwrite replaces only artifacts and empty folders, so nothing was touched")
    return out


def _is_artifact(folder: Path) -> bool:
    mf = folder / MANIFEST
    if mf.is_symlink() or not mf.is_file() or mf.stat().st_size > (32 << 20):
        return False
    try:
        return json.loads(mf.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would race with other threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def clean_stale_staging(parent: Path, name: str) -> list[Path]:
    """Remove `.NAME.*` staging folders that a killed export left beside `parent/NAME`."""
    removed = []
    for p in parent.glob(f".{name}.*"):
        mark = p / STAGING_MARK
        if not p.is_dir() or p.is_symlink() or not mark.is_file():
            continue
        try:
            pid = int(mark.read_text().strip() or 0)
            age = time.time() - mark.stat().st_mtime
        except (OSError, ValueError):
            continue
        if age > STALE_AFTER_S or not _alive(pid):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the OS has no such call."""
    if platform.system() != "Linux":
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # old kernel or a file system without it
        return False
    raise OSError(err, os.strerror(err), str(b))


class ArtifactWriter:
    """Context manager: write files into a hidden staging folder, then `finish()` puts it at `out`.

    At every instant `out` is the old complete artifact or the new one: an overwrite swaps the two
    folders in one rename where the OS allows. A killed export leaves a staging folder marked with
    its pid; the next export beside it removes it."""

    def __init__(self, out, overwrite: bool = False, on_step=None):
        self.out = check_out(out, overwrite)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_staging(self.out.parent, self.out.name)
        self.staging = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", dir=self.out.parent))
        os.chmod(self.staging, 0o777 & ~_umask())  # mkdtemp makes 0700; an artifact follows the umask
        (self.staging / STAGING_MARK).write_text(str(os.getpid()))
        self._done = False
        self._on_step = on_step or (lambda step: None)

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
        (self.staging / STAGING_MARK).unlink()
        files = {}
        for p in sorted(self.staging.rglob("*")):
            if p.is_file():
                rel = p.relative_to(self.staging).as_posix()
                files[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION,
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    **manifest, "files": files}
        (self.staging / MANIFEST).write_text(dumps(manifest) + "\n")
        self._on_step("written")
        self._place()
        self._done = True
        return Artifact(self.out, manifest)

    def _place(self) -> None:
        if not self.out.exists():
            os.replace(self.staging, self.out)
            self._on_step("placed")
            return
        check_out(self.out, overwrite=True)  # still an artifact (or empty) now that the export is done
        if exchange(self.staging, self.out):  # staging now holds the old artifact
            self._on_step("placed")
            shutil.rmtree(self.staging, ignore_errors=True)
            return
        old = self.out.with_name(f".{self.out.name}.old")  # no atomic swap here: two renames
        shutil.rmtree(old, ignore_errors=True)
        os.replace(self.out, old)
        os.replace(self.staging, self.out)
        self._on_step("placed")
        shutil.rmtree(old, ignore_errors=True)


ALL_TOOLS = ("edgeclip", "torch", "onnx", "onnxscript", "onnxruntime", "numpy", "openvino", "nncf", "coremltools")


def tool_versions(names: tuple = ALL_TOOLS) -> dict:
    """{package: installed version} for `names` (those installed), after the Python version."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out
