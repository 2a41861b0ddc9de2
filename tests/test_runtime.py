"""The runtime (`Pipeline`) on a real exported artifact: torch-free use, unsafe or broken
artifacts, bad inputs, threads and batch semantics. Real ONNX Runtime sessions, real files."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from edgeclip.builtin import digit_labels, heldout_dir  # noqa: E402
from edgeclip.errors import (ArtifactError, ChecksumError, ImageDecodeError, InputError,  # noqa: E402
                             TextTooLongError)
from edgeclip.runtime.manifest import sha256_file  # noqa: E402
from edgeclip.runtime.pipeline import Pipeline, Prediction  # noqa: E402


# builtin:tiny exported to ONNX with the ten digit words baked in as a zero-shot head: the same
# artifact the INT8, OpenVINO, fusion and export tests read, exported once per session (conftest.py)
TINY_DIGITS = {"model": "builtin:tiny", "target": "onnx", "precision": "fp32", "labels": digit_labels()}
SHARED_EXPORTS = {"artifact": [TINY_DIGITS]}


@pytest.fixture(scope="module")
def artifact(shared_exports) -> Path:
    """builtin:tiny exported to ONNX with the ten digit words baked in as a zero-shot head (shared:
    tests copy it before changing anything)."""
    return shared_exports.path(TINY_DIGITS)


@pytest.fixture(scope="module")
def pipe(artifact) -> Pipeline:
    return Pipeline.load(artifact)


def heldout(per_digit: int = 1) -> list[tuple[int, Path]]:
    """(digit, png) pairs: the first `per_digit` held-out images of every digit."""
    out = []
    for d in range(10):
        files = sorted((heldout_dir() / str(d)).glob("*.png"))
        assert files, f"no held-out images for {d}"
        out += [(d, f) for f in files[:per_digit]]
    return out


def copy_of(artifact: Path, dest: Path) -> Path:
    shutil.copytree(artifact, dest)
    return dest


# ---------------------------------------------------------------------------------- no torch

NO_TORCH = r"""
import json, sys
for name in ("torch", "transformers"):
    sys.modules[name] = None  # any `import torch` now raises ImportError
try:
    import torch  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("torch was importable")
import edgeclip
from edgeclip.runtime.pipeline import Pipeline

p = Pipeline.load(sys.argv[1])
preds = p.classify(sys.argv[2:])
head_only = "text" not in p._graphs
text = p.encode_text(["a photo of the number seven."])
print(json.dumps({
    "labels": [x.label for x in preds], "scores": [x.scores.tolist() for x in preds],
    "head_only": head_only, "text_shape": list(text.shape),
    "loaded": sorted(m for m in ("torch", "transformers") if sys.modules.get(m) is not None),
}))
"""


def test_runtime_classifies_without_torch(artifact, pipe, tmp_path):
    images = heldout(per_digit=1)
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, str(artifact), *[str(p) for _, p in images]],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["loaded"] == []
    assert got["head_only"] is True
    assert got["text_shape"] == [1, pipe.embed_dim]
    labels = digit_labels()
    truth = [labels[d] for d, _ in images]
    correct = [g == t for g, t in zip(got["labels"], truth)]
    assert sum(correct) >= 9, list(zip(truth, got["labels"]))  # held-out digits, one per class
    # ... and exactly what the same artifact gives in this (torch-importing) process
    here = pipe.classify([str(p) for _, p in images])
    assert [x.label for x in here] == got["labels"]
    assert np.abs(np.array([x.scores for x in here]) - np.array(got["scores"])).max() <= 1e-6


# ------------------------------------------------------------------------------ broken artifacts

def test_tampered_file_raises_checksum_error(artifact, tmp_path):
    art = copy_of(artifact, tmp_path / "art")
    f = art / "image.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(ChecksumError) as info:
        Pipeline.load(art)
    assert "image.onnx" in str(info.value) and "re-export" in str(info.value)


def test_missing_file_raises_artifact_error(artifact, tmp_path):
    art = copy_of(artifact, tmp_path / "art")
    (art / "text.onnx").unlink()
    with pytest.raises(ArtifactError) as info:
        Pipeline.load(art)
    assert not isinstance(info.value, ChecksumError)
    msg = str(info.value)
    assert "text.onnx" in msg and "missing" in msg and "re-export" in msg


class OpenRecorder:
    """Every file path Python opens while active (an audit hook: observes, changes nothing)."""

    active: list | None = None
    installed = False

    def __enter__(self):
        if not OpenRecorder.installed:
            def hook(event, args):
                if event == "open" and OpenRecorder.active is not None and isinstance(args[0], (str, bytes)):
                    OpenRecorder.active.append(os.fsdecode(args[0]))
            sys.addaudithook(hook)
            OpenRecorder.installed = True
        OpenRecorder.active = self.paths = []
        return self

    def __exit__(self, *exc):
        OpenRecorder.active = None

    def under(self, folder: Path) -> list[str]:
        root = folder.resolve()
        return [p for p in self.paths if Path(p).resolve() == root or root in Path(p).resolve().parents]


@pytest.mark.parametrize("form", ["dotdot", "absolute"])
@pytest.mark.parametrize("verify", [True, False])
def test_manifest_path_outside_the_folder_is_refused(artifact, tmp_path, form, verify):
    art = copy_of(artifact, tmp_path / "art")
    outside = tmp_path / "outside"
    outside.mkdir()
    # a perfectly valid graph, with the right checksum: only the path is wrong
    shutil.copyfile(art / "image.onnx", outside / "image.onnx")
    rel = "../outside/image.onnx" if form == "dotdot" else str((outside / "image.onnx").resolve())
    m = json.loads((art / "manifest.json").read_text())
    m["files"][rel] = m["files"].pop("image.onnx")
    m["graphs"]["image"]["file"] = rel
    (art / "manifest.json").write_text(json.dumps(m))
    (art / "image.onnx").unlink()
    with OpenRecorder() as rec, pytest.raises(ArtifactError) as info:
        Pipeline.load(art, verify=verify)
    msg = str(info.value)
    assert rel in msg
    assert "not a relative path inside the artifact" in msg  # both forms: refused by the schema
    assert "refusing" in msg or "tampered" in msg
    assert rec.under(outside) == []  # nothing outside the folder was opened
    assert rec.under(art)  # (the recorder does see the reads inside it)


def test_tokenizer_path_outside_the_folder_is_refused(artifact, tmp_path):
    art = copy_of(artifact, tmp_path / "art")
    outside = tmp_path / "outside"
    outside.mkdir()
    vocab = next((art / "tokenizer").iterdir())
    shutil.copyfile(vocab, outside / vocab.name)
    m = json.loads((art / "manifest.json").read_text())
    rel = f"../outside/{vocab.name}"
    m["tokenizer"]["file"] = rel
    (art / "manifest.json").write_text(json.dumps(m))
    with OpenRecorder() as rec, pytest.raises(ArtifactError, match="re-export"):
        Pipeline.load(art).encode_text(["a photo of the number one."])
    assert rec.under(outside) == []
    # listed in `files` too (with its real checksum): the path check itself refuses it
    m["files"][rel] = {"sha256": sha256_file(vocab), "size": vocab.stat().st_size}
    (art / "manifest.json").write_text(json.dumps(m))
    with OpenRecorder() as rec, pytest.raises(ArtifactError, match="not a relative path inside the artifact"):
        Pipeline.load(art).encode_text(["a photo of the number one."])
    assert rec.under(outside) == []


def test_not_an_artifact_folder(tmp_path):
    (tmp_path / "photo.png").write_bytes(b"not an artifact")
    with pytest.raises(ArtifactError) as info:
        Pipeline.load(tmp_path)
    assert "not an edgeclip artifact" in str(info.value) and "edgeclip export" in str(info.value)
    with pytest.raises(ArtifactError) as info:
        Pipeline.load(tmp_path / "nowhere")
    assert "not found" in str(info.value) and "edgeclip export" in str(info.value)
    (tmp_path / "manifest.json").write_text('{"format": "something-else"}')
    with pytest.raises(ArtifactError, match="not an edgeclip manifest"):
        Pipeline.load(tmp_path)


# ---------------------------------------------------------------------------------- bad inputs

def test_corrupt_image_raises_image_decode_error(pipe, tmp_path):
    png = heldout(per_digit=1)[3][1].read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(png[: len(png) // 2])  # a real PNG, truncated
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is a text file, not an image\n" * 4)
    for path, why in [(cut, "truncated or corrupt"), (junk, "not in a format Pillow can read"),
                      (tmp_path / "missing.png", "not found")]:
        with pytest.raises(ImageDecodeError) as info:
            pipe.encode_image(str(path))
        assert path.name in str(info.value) and why in str(info.value)
    with pytest.raises(ImageDecodeError, match="cut.png"):  # in a batch, the bad one is named
        pipe.classify([str(heldout(per_digit=1)[0][1]), str(cut)])


def test_text_longer_than_the_context(pipe):
    text = "one two three " * 40  # > 77 tokens
    with pytest.raises(TextTooLongError) as info:
        pipe.encode_text([text])
    msg = str(info.value)
    assert "77" in msg and "truncate=True" in msg
    with pytest.warns(UserWarning, match="truncated"):
        got = pipe.encode_text([text], truncate=True)
    assert got.shape == (1, pipe.embed_dim) and np.isfinite(got).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = pipe.tokenize([text], truncate=True)
    assert ids.shape == (1, 77) and ids[0, -1] == 49407
    assert np.abs(got - pipe.encode_text(ids)).max() <= 1e-6
    with pytest.raises(InputError, match="truncate=True"):  # too many id columns
        pipe.encode_text(np.zeros((1, 80), dtype=np.int64))


@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (1, 3, 32, 31), (3, 32, 32), (4,)])
def test_wrong_shaped_pixels_raise_input_error(pipe, shape):
    with pytest.raises(InputError) as info:
        pipe.encode_image(np.zeros(shape, dtype=np.float32))
    msg = str(info.value)
    assert str(tuple(shape)) in msg  # says what it got ...
    assert any(w in msg for w in ("pass the images", "transpose", "expected a channels-last"))  # ... and what to do
    with pytest.raises(InputError):
        pipe.classify(np.zeros(shape, dtype=np.float32))


# ------------------------------------------------------------------------------------- threads

def test_threads_share_one_pipeline(artifact):
    images = [str(p) for _, p in heldout(per_digit=1)][:6]
    texts = ["a photo of the number three.", "a handwritten digit eight.", "nine", "a drawing of the number one."]
    tasks = []
    for i, img in enumerate(images):
        tasks += [("encode_image", (img,), {}), ("classify", (img,), {}),
                  ("classify", ([img, images[-1 - i]],), {"labels": ["zero", "one", "eight"]}),
                  ("encode_text", ([texts[i % len(texts)]],), {})]
    tasks.append(("encode_text", (texts,), {}))

    def result(pipeline, name, args, kwargs):
        r = getattr(pipeline, name)(*args, **kwargs)
        if isinstance(r, Prediction):
            return ("pred", r.label, r.scores.copy())
        if isinstance(r, list):
            return [("pred", x.label, x.scores.copy()) for x in r]
        return r

    single = Pipeline.load(artifact)
    expected = [result(single, *t) for t in tasks]

    shared = Pipeline.load(artifact)  # fresh: text graph, tokenizer and text cache are created under contention
    n = 8
    start = threading.Barrier(n)

    def worker(k):
        start.wait()
        order = np.random.default_rng(k).permutation(len(tasks))
        return {int(i): result(shared, *tasks[i]) for i in np.concatenate([order, order[::-1]])}

    with ThreadPoolExecutor(n) as ex:
        outs = list(ex.map(worker, range(n)))

    def same(a, b):
        if isinstance(a, list):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        if isinstance(a, tuple):
            return a[1] == b[1] and np.array_equal(a[2], b[2])
        return a.shape == b.shape and np.array_equal(a, b)

    for k, out in enumerate(outs):
        for i, exp in enumerate(expected):
            assert same(out[i], exp), f"thread {k}, task {tasks[i][0]} #{i} differs from the single-thread run"
    assert len(shared._graphs) == 2


# -------------------------------------------------------------------------------------- batches

def test_batch_semantics(pipe):
    imgs = [str(p) for _, p in heldout(per_digit=1)][:3]
    one = pipe.classify(imgs[0])
    assert isinstance(one, Prediction)
    assert one.labels == tuple(digit_labels()) and one.label == one.labels[one.index]
    assert abs(float(one.scores.sum()) - 1.0) <= 1e-5 and one.score == pytest.approx(float(one.scores.max()))
    listed = pipe.classify([imgs[0]])
    assert isinstance(listed, list) and len(listed) == 1 and listed[0].label == one.label
    many = pipe.classify(imgs)
    assert isinstance(many, list) and len(many) == 3 and all(isinstance(p, Prediction) for p in many)
    for img, p in zip(imgs, many):
        assert np.abs(pipe.classify(img).scores - p.scores).max() <= 1e-5

    single = [pipe.encode_image(img) for img in imgs]
    assert all(s.shape == (1, pipe.embed_dim) for s in single)
    batch = pipe.encode_image(imgs)
    assert batch.shape == (3, pipe.embed_dim)
    assert np.abs(batch - np.vstack(single)).max() <= 1e-5
    pixels = pipe.preprocess(imgs)
    assert np.abs(pipe.encode_image(pixels) - batch).max() <= 1e-6  # preprocessed arrays go straight in

    texts = ["seven", "a photo of the number four.", "a low resolution image of the digit two."]
    tb = pipe.encode_text(texts)  # the batch is trimmed to its longest prompt, singles to their own
    assert tb.shape == (3, pipe.embed_dim) and pipe.encode_text(texts[0]).shape == (1, pipe.embed_dim)
    assert np.abs(tb - np.vstack([pipe.encode_text(t) for t in texts])).max() <= 1e-5
    sim = pipe.similarity(imgs, texts)
    assert sim.shape == (3, 3) and np.abs(sim - batch @ tb.T).max() <= 1e-5
