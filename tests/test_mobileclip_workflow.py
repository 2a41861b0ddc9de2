"""The built-in digits workflow with a MobileCLIP-shaped model, through the command line as a user
runs it: fit a few-shot head on `random:MobileCLIP-S1`, export with the digit words and that head,
classify with the artifact, and benchmark it."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")

from edgeclip.builtin import digit_labels, fewshot_dir, heldout_dir  # noqa: E402
from edgeclip.runtime import Pipeline  # noqa: E402


def cli(*args, timeout=900) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "edgeclip", *map(str, args)], capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.mark.slow
def test_mobileclip_s1_digits_workflow(tmp_path):
    model = "random:MobileCLIP-S1"
    labels = ",".join(digit_labels())  # the sub-folders "0".."9" in order
    cli("heads", "fit", model, "--kind", "linear", "--train", fewshot_dir(), "--shots", "8", "--augment", "0",
        "--labels", labels, "--out", tmp_path / "probe")
    assert (tmp_path / "probe.npz").is_file()
    cli("export", model, "--labels", labels, "--head", tmp_path / "probe", "--out", tmp_path / "art")
    pipe = Pipeline.load(tmp_path / "art")
    m = pipe.manifest
    assert m["model"]["name"] == "MobileCLIP-S1" and m["towers"]["image"]["kind"] == "mci"
    assert set(pipe.heads) == {"linear"} and pipe.labels == digit_labels()
    assert all(r["ok"] for r in m["fidelity"].values())
    images = sorted(p for p in heldout_dir().rglob("*.png"))[:4]
    preds = pipe.classify([str(p) for p in images])  # the baked zero-shot head (softmax over the digits)
    assert all(p.label in digit_labels() and np.isclose(p.scores.sum(), 1.0, atol=1e-4) for p in preds)
    probe = pipe.classify([str(p) for p in images], head="linear")
    assert all(p.head == "linear" and p.label in digit_labels() for p in probe)
    bench = json.loads(cli("bench", tmp_path / "art", "--batch", "1", "--threads", "2", "--seconds", "1",
                           "--json").stdout)
    (row,) = bench
    assert {g["graph"] for g in row["graphs"]} == {"image", "text"}
    assert all(g["p50_ms"] > 0 and g["items_per_s"] > 0 for g in row["graphs"]), row
