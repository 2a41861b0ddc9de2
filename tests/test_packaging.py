"""Packaging promises: light imports, extras named in errors, specs as valid data."""
from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from edgeclip.errors import EdgeClipError, SpecError, UnknownModelError
from edgeclip.specs import ModelSpec, get_spec, list_specs

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_import_edgeclip_and_runtime_load_no_torch():
    proc = _python("import sys, edgeclip, edgeclip.runtime, edgeclip.cli; "
                   "print(sorted(m for m in ('torch', 'onnx', 'transformers') if m in sys.modules))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("blocked,call,extra", [
    ("torch", "import edgeclip; edgeclip.load_model('random:tiny')", "export"),
    ("torch", "import edgeclip; edgeclip.export('random:tiny', out='x')", "export"),
    ("onnxruntime", "from edgeclip.runtime.backends import get_backend; get_backend('ort')('x.onnx')", "ort"),
])
def test_missing_extra_names_the_extra(blocked, call, extra):
    code = (f"import sys; sys.modules[{blocked!r}] = None\n"
            "from edgeclip.errors import MissingExtraError\n"
            f"try:\n    {call}\nexcept MissingExtraError as e:\n    print('MSG', e)\n")
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert f"pip install 'edgeclip[{extra}]'" in proc.stdout


def test_pyproject_pins_torch_and_avoids_cuda_pullers():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = meta["dependencies"] + [d for ds in meta["optional-dependencies"].values() for d in ds]
    names = {d.split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower() for d in deps}
    assert not names & {"open_clip_torch", "open-clip-torch", "timm", "torchvision"}
    assert "torch==2.13.0" in meta["optional-dependencies"]["export"]
    assert {d.split(">")[0] for d in meta["dependencies"]} == {"numpy", "pillow"}
    assert meta["scripts"]["edgeclip"] == "edgeclip.cli:main"


def test_specs_round_trip_and_cover_the_families():
    names = list_specs()
    for required in ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "Long-CLIP-B", "Long-CLIP-L",
                     "SigLIP-B-16", "tiny"):
        assert required in names
    for name in names:
        s = get_spec(name)
        assert ModelSpec.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert get_spec("Long-CLIP-L").text.context_length == 248
    sig = get_spec("vit-b-16-siglip")  # aliases, case-insensitive
    assert sig.name == "SigLIP-B-16" and sig.vision.pool == "map" and sig.text.pool == "last"
    assert sig.logit_bias is not None and sig.preprocess["resize"] == "squash"


def test_spec_errors_say_what_is_wrong(tmp_path):
    d = get_spec("ViT-B-32").to_dict()
    d["vision"]["widht"] = 3
    with pytest.raises(SpecError, match="widht"):
        ModelSpec.from_dict(d)
    d = get_spec("ViT-B-32").to_dict()
    d["vision"]["heads"] = 7
    with pytest.raises(SpecError, match="not divisible by heads=7"):
        ModelSpec.from_dict(d)
    d = get_spec("ViT-B-32").to_dict()
    d["text"]["act"] = "relu6"
    with pytest.raises(SpecError, match="quick_gelu"):
        ModelSpec.from_dict(d)
    f = tmp_path / "broken.json"
    f.write_text("{not json")
    with pytest.raises(SpecError, match="not valid JSON"):
        get_spec(str(f))
    with pytest.raises(UnknownModelError):
        get_spec("ViT-H-99")
    assert issubclass(SpecError, EdgeClipError)
