"""The shipped built-in tiny CLIP: its weights, its data and its zero-shot accuracy."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from edgeclip import builtin

MAX_WEIGHTS_BYTES = 10 * 1024 * 1024


def _heldout_files():
    return sorted(builtin.heldout_dir().glob("*/*.png"))


def test_weights_file_is_small():
    weights = builtin.tiny_dir() / "model.safetensors"
    assert weights.is_file()
    assert weights.stat().st_size <= MAX_WEIGHTS_BYTES


def test_heldout_has_ten_labelled_classes():
    d = builtin.heldout_dir()
    classes = sorted(p.name for p in d.iterdir() if p.is_dir())
    assert classes == [str(i) for i in range(10)]
    for c in classes:
        assert len(list((d / c).glob("*.png"))) >= 10
    assert builtin.digit_labels() == ["zero", "one", "two", "three", "four",
                                      "five", "six", "seven", "eight", "nine"]
    templates = builtin.prompt_templates()
    assert templates and all(t.count("{}") == 1 for t in templates)


def test_heldout_and_calib_are_disjoint():
    from PIL import Image

    calib = sorted(builtin.calib_dir().rglob("*.png"))
    assert 50 <= len(calib) <= 200
    assert len(builtin.calib_captions()) == len(calib)
    held = _heldout_files()
    calib_hashes = {hashlib.sha256(p.read_bytes()).hexdigest() for p in calib}
    assert not any(hashlib.sha256(p.read_bytes()).hexdigest() in calib_hashes for p in held)
    # not just different files: different pixels too
    calib_pixels = {np.asarray(Image.open(p)).tobytes() for p in calib}
    assert not any(np.asarray(Image.open(p)).tobytes() in calib_pixels for p in held)
    with Image.open(held[0]) as im:
        assert im.mode == "L" and im.size == (8, 8)


def test_zero_shot_heldout_accuracy():
    torch = pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    import edgeclip
    from edgeclip.runtime.preprocess import Preprocessor
    from edgeclip.runtime.tokenizer import tokenize

    model = edgeclip.load_model("builtin:tiny")
    pre = Preprocessor.from_config(model.spec.preprocess_config())
    files = _heldout_files()
    labels = np.array([int(p.parent.name) for p in files])
    pixels = pre([str(p) for p in files])

    names, templates = builtin.digit_labels(), builtin.prompt_templates()
    ids = tokenize([t.format(n) for n in names for t in templates], context_length=model.spec.text.context_length)
    with torch.no_grad():
        txt = torch.nn.functional.normalize(model.encode_text(torch.from_numpy(np.asarray(ids, dtype=np.int64))), dim=-1)
        cls = torch.nn.functional.normalize(txt.reshape(len(names), len(templates), -1).mean(1), dim=-1)
        img = torch.nn.functional.normalize(model.encode_image(torch.from_numpy(pixels)), dim=-1)
        pred = (img @ cls.t()).argmax(1).numpy()
    top1 = float((pred == labels).mean())
    assert top1 >= 0.90, f"zero-shot top-1 {top1:.4f} on {len(files)} held-out digits"
