"""The command line as a user runs it: a real subprocess, real files."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgeclip.builtin import digit_labels, heldout_dir
from edgeclip.specs import list_specs


def edgeclip(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "edgeclip.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"edgeclip {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


# `edgeclip export` itself, run in the background from the start of the session (conftest.py)
EXPORT = {"cli": ["export", "builtin:tiny", "--target", "onnx", "--labels", ",".join(digit_labels())]}
SHARED_EXPORTS = {"tiny_artifact": [EXPORT]}


@pytest.fixture(scope="module")
def tiny_artifact(shared_exports):
    """builtin:tiny exported by `edgeclip export ... --out DIR` (this module's own: one test tries to
    overwrite it)."""
    return shared_exports.path(EXPORT)


def test_models_lists_every_spec():
    out = edgeclip("models").stdout
    for name in list_specs():
        assert name in out
    rows = json.loads(edgeclip("models", "--json").stdout)
    by_name = {r["name"]: r for r in rows}
    assert by_name["Long-CLIP-B"]["context"] == 248
    assert by_name["SigLIP-B-16"]["tokenizer"] == "hf"


def test_export_then_run_prints_the_right_digit(tiny_artifact):
    labels = digit_labels()
    images = [sorted((heldout_dir() / str(d)).glob("*.png"))[0] for d in range(10)]
    proc = edgeclip("run", tiny_artifact, "--json", "--image", *images)
    results = json.loads(proc.stdout)["images"]
    predicted = [r["label"] for r in results]
    correct = sum(p == labels[d] for d, p in enumerate(predicted))
    assert correct >= 9, f"predicted {predicted}"
    # the human-readable form names the label after each file
    text = edgeclip("run", tiny_artifact, "--image", images[7]).stdout
    assert text.startswith(str(images[7])) and labels[7] in text


def test_run_with_other_labels_and_texts(tiny_artifact):
    img = sorted((heldout_dir() / "3").glob("*.png"))[0]
    out = json.loads(edgeclip("run", tiny_artifact, "--json", "--image", img, "--labels", "three,eight",
                              "--text", "a photo of the number three", "a photo of the number eight").stdout)
    assert {t["label"] for t in out["images"][0]["top"]} == {"three", "eight"}
    sims = out["similarity"][0]
    assert len(sims) == 2 and all(-1.0 <= s <= 1.0 for s in sims)


def test_inspect_shows_manifest(tiny_artifact):
    text = edgeclip("inspect", tiny_artifact).stdout
    assert "checksums ok" in text and "onnx fp32" in text and "zero-shot, 10 labels" in text
    m = json.loads(edgeclip("inspect", tiny_artifact, "--json").stdout)
    assert m["head"]["labels"] == digit_labels()
    assert all(r["ok"] for r in m["fidelity"].values())


def test_bench_reports_percentiles(tiny_artifact):
    rows = json.loads(edgeclip("bench", tiny_artifact, "--seconds", "0.2", "--batch", "1,4", "--json").stdout)
    assert [r["batch"] for r in rows] == [1, 4]
    for r in rows:
        for g in r["graphs"]:
            assert 0 < g["p50_ms"] <= g["p90_ms"] <= g["p99_ms"]


def test_errors_exit_2_with_a_message(tmp_path, tiny_artifact):
    proc = edgeclip("export", "ViT-Q-9", "--out", tmp_path / "x", check=False)
    assert proc.returncode == 2 and "known specs" in proc.stderr.lower() and "Traceback" not in proc.stderr
    proc = edgeclip("run", tmp_path / "nothing", "--image", "a.png", check=False)
    assert proc.returncode == 2 and "edgeclip export" in proc.stderr
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    proc = edgeclip("run", tiny_artifact, "--image", bad, check=False)
    assert proc.returncode == 2 and "bad.png" in proc.stderr
    proc = edgeclip("export", "builtin:tiny", "--out", tiny_artifact, check=False)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    assert Path(tiny_artifact, "manifest.json").is_file()  # the refused export left it intact
