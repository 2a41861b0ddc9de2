"""Adding a target is one module: tests/toy_target.py registers one, and the built-in model exports
through the command line with it and runs in the runtime, which learned its backend from the
registration. Real export, real ONNX Runtime session."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from edgeclip.builtin import digit_labels, heldout_dir  # noqa: E402
from edgeclip.cli import main  # noqa: E402
from edgeclip.errors import EdgeClipError  # noqa: E402


def test_a_target_from_one_module_exports_through_the_cli(tmp_path, capsys):
    import toy_target  # noqa: F401  (registers "toy-plain-onnx")
    from edgeclip.exporter import targets
    from edgeclip.runtime import Pipeline

    assert "toy-plain-onnx" in targets()
    out = tmp_path / "toy"
    rc = main(["export", "builtin:tiny", "--target", "toy-plain-onnx", "--labels", ",".join(digit_labels()),
               "--out", str(out), "--json"])
    assert rc == 0, capsys.readouterr()
    summary = json.loads(capsys.readouterr().out)
    assert summary["target"] == "toy-plain-onnx" and summary["digest"].startswith("sha256:")
    p = Pipeline.load(out)
    assert p.backend_name == "ort" and p.manifest["fusions"] in ({}, None, {"image": {}, "text": {}})
    seven = sorted((heldout_dir() / "7").glob("*.png"))[:5]
    assert [pr.label for pr in p.classify(seven)].count("seven") >= 4
    assert np.allclose(np.linalg.norm(p.encode_text(["a photo of the number seven."]), axis=1), 1, atol=1e-5)


def test_a_target_the_runtime_cannot_run_is_refused_at_registration():
    from edgeclip.exporter import register_target

    with pytest.raises(EdgeClipError, match="needs backend="):
        register_target("no-backend-target")(type("T", (), {}))
    with pytest.raises(EdgeClipError, match="not registered"):
        register_target("bad-backend-target", backend="python", suffixes=(".py",))(type("T", (), {}))
