"""Writing artifacts: --out and --overwrite never destroy what is not an artifact, an interrupted export
leaves nothing behind for long, an overwrite is the old or the new artifact at every instant, and
folders follow the umask. Real folders, real exports of builtin:tiny where a whole artifact is needed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")

import edgeclip  # noqa: E402
from edgeclip.builtin import digit_labels  # noqa: E402

from .conftest import TINY_ONNX  # noqa: E402
from edgeclip.errors import InputError, OutputPathError  # noqa: E402
from edgeclip.exporter.artifact import STAGING_MARK, ArtifactWriter, check_out  # noqa: E402
from edgeclip.runtime.manifest import artifact_digest, read_manifest  # noqa: E402

SHARED_EXPORTS = {"art": [TINY_ONNX]}


def write_like(src: Path, out: Path, overwrite: bool = False, on_step=None, tag: str = ""):
    """A real artifact at `out`: the files and manifest of `src` written through ArtifactWriter
    (`tag` makes its manifest, and so its digest, differ from another one written in the same second)."""
    m = json.loads((src / "manifest.json").read_text())
    for k in ("format", "format_version", "created", "files"):
        m.pop(k)
    m["options"]["tag"] = tag
    with ArtifactWriter(out, overwrite=overwrite, on_step=on_step) as w:
        for rel in json.loads((src / "manifest.json").read_text())["files"]:
            w.copy(src / rel, rel)
        art = w.finish(m)
    return art


# ---------------------------------------------------------------------------------- --overwrite

def _victim(kind: str, path: Path) -> None:
    if kind == "documents folder":
        path.mkdir()
        (path / "thesis.txt").write_text("years of work")
    elif kind == "nested folder":
        (path / "sub").mkdir(parents=True)
        (path / "sub" / "a.txt").write_text("a")
    elif kind == "a file":
        path.write_text("not a folder")
    elif kind == "folder with a foreign manifest":
        path.mkdir()
        (path / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    elif kind == "folder with a broken manifest":
        path.mkdir()
        (path / "manifest.json").write_text("{")
    elif kind == "hidden files only":
        path.mkdir()
        (path / ".git").mkdir()
    elif kind == "link to a folder":
        (path.parent / "real").mkdir()
        (path.parent / "real" / "keep.txt").write_text("keep")
        path.symlink_to(path.parent / "real")


VICTIMS = ["documents folder", "nested folder", "a file", "folder with a foreign manifest",
           "folder with a broken manifest", "hidden files only", "link to a folder"]


def _snapshot(path: Path) -> dict:
    root = path.resolve() if path.is_symlink() else path
    if root.is_file():
        return {".": root.read_bytes()}
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None) for p in root.rglob("*")}


@pytest.mark.parametrize("kind", VICTIMS)
def test_overwrite_refuses_what_is_not_an_artifact_and_touches_nothing(tmp_path, kind):
    target = tmp_path / "out"
    _victim(kind, target)
    before = _snapshot(target)
    with pytest.raises(OutputPathError):
        # refused before the model is even loaded: an unknown model would be the other error
        edgeclip.export("random:no-such-spec", out=str(target), overwrite=True)
    assert _snapshot(target) == before


@pytest.mark.parametrize("kind", VICTIMS)
def test_cli_overwrite_refuses_what_is_not_an_artifact(tmp_path, kind, capsys):
    from edgeclip.cli import main

    target = tmp_path / "out"
    _victim(kind, target)
    before = _snapshot(target)
    assert main(["export", "builtin:tiny", "--out", str(target), "--overwrite", "--json"]) == 2
    err = json.loads(capsys.readouterr().out)["error"]
    assert err["type"] == "OutputPathError"
    assert _snapshot(target) == before


@pytest.mark.parametrize("out", [".", "..", "", "./", "../..", "/"])
def test_out_that_names_no_new_folder_is_refused_before_any_work(tmp_path, monkeypatch, out):
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    (tmp_path / "work" / "keep.txt").write_text("keep")
    with pytest.raises(OutputPathError):
        edgeclip.export("random:no-such-spec", out=out, overwrite=True)
    assert (tmp_path / "work" / "keep.txt").read_text() == "keep"


def test_out_that_is_the_working_directory_by_another_name_is_refused(tmp_path, monkeypatch):
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    for out in (str(tmp_path / "work"), str(tmp_path), "../work"):
        with pytest.raises(OutputPathError, match="working directory"):
            check_out(out, overwrite=True)


def test_overwrite_replaces_an_artifact_and_an_empty_folder(art, tmp_path):
    first = write_like(art, tmp_path / "a")
    second = write_like(art, tmp_path / "a", overwrite=True)
    assert read_manifest(second.path)["created"] and second.path == first.path
    (tmp_path / "empty").mkdir()
    write_like(art, tmp_path / "empty", overwrite=True)
    read_manifest(tmp_path / "empty")
    with pytest.raises(OutputPathError, match="already exists"):
        write_like(art, tmp_path / "a")


# ------------------------------------------------------------------------- interruption, atomicity

def test_every_step_of_an_overwrite_leaves_a_complete_artifact(art, tmp_path):
    out = tmp_path / "a"
    old = artifact_digest(write_like(art, out).path)
    seen = []

    def pause(step):  # the export pauses here; a reader looks at `out` meanwhile
        read_manifest(out)  # complete and verified at every step
        seen.append((step, artifact_digest(out)))

    new = write_like(art, out, overwrite=True, on_step=pause, tag="new")
    assert [s for s, _ in seen] == ["written", "placed"]
    assert seen[0][1] == old and seen[1][1] == artifact_digest(new.path) != old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no staging or .old folder left


KILLED = r"""
import os, sys
from edgeclip.exporter.artifact import ArtifactWriter
w = ArtifactWriter(sys.argv[1])
w.path("image.onnx").write_bytes(b"x" * 1_000_000)
print(w.staging, flush=True)
os._exit(9)  # killed mid-export: no cleanup runs
"""


def test_staging_left_by_a_killed_export_is_removed_by_the_next(art, tmp_path):
    out = tmp_path / "a"
    staging = Path(subprocess.run([sys.executable, "-c", KILLED, str(out)], capture_output=True, text=True).stdout.strip())
    assert staging.is_dir() and (staging / STAGING_MARK).is_file()
    live = tmp_path / ".a.live"  # a staging folder whose export is still running (this process)
    live.mkdir()
    (live / STAGING_MARK).write_text(str(os.getpid()))
    unrelated = tmp_path / ".a.notes"  # not a staging folder: no mark
    unrelated.mkdir()
    write_like(art, out)
    assert not staging.exists()
    assert live.is_dir() and unrelated.is_dir()
    read_manifest(out)


# ------------------------------------------------------------------------------------------ umask

@pytest.mark.parametrize("umask,mode", [(0o022, 0o755), (0o077, 0o700), (0o002, 0o775)])
def test_artifact_folder_follows_the_umask(art, tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        a = write_like(art, tmp_path / "a")
    finally:
        os.umask(old)
    assert a.path.stat().st_mode & 0o777 == mode


# --------------------------------------------------------------------------------- export options

@pytest.mark.parametrize("option,value", [("calib_size", 0), ("calib_size", -5), ("calib_size", 2.5),
                                          ("max_cosine_drop", float("nan")), ("max_cosine_drop", -0.1),
                                          ("max_cosine_drop", 2.0), ("smoothquant_alpha", float("inf")),
                                          ("min_head_agreement", 1.5), ("opset", 3), ("calib_seed", -1),
                                          ("calib_size", True)])
def test_out_of_range_export_option_is_refused_before_any_work(tmp_path, option, value):
    with pytest.raises(InputError, match=option):
        edgeclip.export("builtin:tiny", out=str(tmp_path / "a"), precision="fp32", **{option: value})
    assert not (tmp_path / "a").exists()
