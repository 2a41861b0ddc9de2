"""Hostile artifacts: tampered manifests, swapped or linked files, forwarded runtime options, pinned digests.

Every case starts from a real exported artifact (builtin:tiny, ONNX and OpenVINO, shared with the
other suites), changes one thing as an attacker would, and asserts the typed error naming what is
wrong, or that the attack had no effect. Artifacts are cloned per case: files are hard-linked
(read-only use) and manifest.json is a fresh copy.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from edgeclip.builtin import digit_labels  # noqa: E402

from .conftest import TINY_ONNX  # noqa: E402
from edgeclip.errors import (ArtifactError, ChecksumError, DigestError, EdgeClipError,  # noqa: E402
                             InputError, ManifestError)
from edgeclip.runtime.manifest import artifact_digest, read_manifest, sha256_file  # noqa: E402
from edgeclip.runtime.pipeline import Pipeline  # noqa: E402

OPENVINO = {"model": "builtin:tiny", "labels": digit_labels(), "target": "openvino", "precision": "fp32"}
SHARED_EXPORTS = {"art": [TINY_ONNX], "ov_art": [OPENVINO]}


@pytest.fixture(scope="module")
def ov_art(shared_exports) -> Path:
    pytest.importorskip("openvino")
    return shared_exports.path(OPENVINO)


def clone(src: Path, dst: Path, manifest: dict | None = None, raw: bytes | None = None) -> Path:
    """A copy of artifact `src` at `dst` with its files hard-linked and its own manifest.json."""
    shutil.copytree(src, dst, copy_function=os.link, ignore=shutil.ignore_patterns("manifest.json"))
    if raw is not None:
        (dst / "manifest.json").write_bytes(raw)
    else:
        m = manifest if manifest is not None else json.loads((src / "manifest.json").read_text())
        (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def relist(root: Path, m: dict, rel: str) -> None:
    """Update the manifest's checksum of `rel` after a case rewrote that file on purpose."""
    m["files"][rel] = {"sha256": sha256_file(root / rel), "size": (root / rel).stat().st_size}
    (root / "manifest.json").write_text(json.dumps(m))


def _set(m: dict, dotted: str, value) -> dict:
    """`m` with the field at `dotted` (a.b.c) set to `value`; `DELETE` removes it."""
    *parents, last = dotted.split(".")
    node = m
    for k in parents:
        node = node[k]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return m


DELETE = object()

# ------------------------------------------------------------------------------- manifest fields
# (field, bad value, what the error must name). Every field the runtime acts on, with values of the
# wrong type, out of range, or pointing somewhere they must not.
REQUIRED = ["format", "format_version", "target", "precision", "model", "preprocess", "tokenizer", "text",
            "graphs", "logit_scale", "files"]
WRONG_TYPES = {
    "format_version": ["1", 1.0, True, None, 0, -1, 2, 10**12],
    "target": [1, None, "bogus", "", "ONNX", ["onnx"]],
    "precision": [32, None, "int4", "fp64", ""],
    "backend": ["openvino", "coreml", "tensorrt", "python", 1],
    "model": ["tiny", [], None],
    "model.embed_dim": [0, -64, 10**9, "64", 64.5, True, None],
    "model.name": [None, 5, "x" * 300, "bad\nname"],
    "model.spec.text.vocab_size": [0, -1, "49408", 10**12],
    "model.spec.vision.image_size": [0, 10**7, "32"],
    "preprocess": ["bicubic", None, []],
    "preprocess.image_size": [0, -32, 10**6, "32", 32.0, [32], [32, 32, 32], None, 64],
    "tokenizer.kind": ["evil", None, 3],
    "tokenizer.context_length": [0, -1, 10**9, "77", None, 76],
    "tokenizer.file": ["../../etc/passwd", "/etc/passwd", "tokenizer/other.txt.gz", 7, "tokenizer\\x.gz",
                       "tokenizer/../tokenizer/bpe_simple_vocab_16e6.txt.gz"],
    "text.trim": ["yes", 1, None],
    "text.context_length": [0, 10**9, "77", 78],
    "text.eot_token_id": [-1, "49407", 10**9, 1.5],
    "graphs": [[], "image.onnx", {}, None],
    "graphs.image.file": ["../image.onnx", "/tmp/image.onnx", "other.onnx", "image.xml", "", 3, "./image.onnx"],
    "graphs.text.file": ["../text.onnx", "missing.onnx"],
    "graphs.image.inputs": [{}, {"pixel_values": {"dtype": "float64", "shape": ["batch", 3, 32, 32]}},
                            {"pixel_values": {"dtype": "float32", "shape": ["batch", 3, 32]}},
                            {"input_ids": {"dtype": "int64", "shape": ["batch", "length"]}},
                            {"pixel_values": {"dtype": "float32", "shape": [0, 3, 32, 32]}},
                            {"pixel_values": {"dtype": "float32", "shape": "batch,3,32,32"}}],
    "graphs.image.outputs": [{}, {"logits": {"dtype": "float32", "shape": ["batch", 10]}}],
    "graphs.text.inputs": [{"input_ids": {"dtype": "float32", "shape": ["batch", "length"]}}],
    "graphs.image.session_config": [{"session.collect_node_memory_stats_to_file": "/tmp/x"},
                                    {"session.disable_quant_qdq": "2"}, {"session.disable_quant_qdq": 1},
                                    "session.disable_quant_qdq=1", {"session.use_env_allocators": "1"}],
    "graphs.image.ov_config": [{"CACHE_DIR": "/tmp/x"}],
    "graphs.image.weights": ["image.bin"],
    "head": ["zero,one", []],
    "head.labels": ["abc", [], [1, 2, 3], None, ["a\x00b"] * 10],
    "head.output": ["logits_other", "image_embeds", 3],
    "head.activation": ["relu", None],
    "head.kind": ["linear"],
    "heads": ["tip", [], {"bad name!": {}}],
    "logit_scale": [-1.0, 1e9, "13.5", None, True, [13.5]],
    "logit_bias": ["0", 1e9, [0.0]],
    "files": [[], {}, "image.onnx", None],
    "options": ["fp32", [1]],
    "fidelity": [[], "ok"],
}
FIELD_CASES = [(f, DELETE) for f in REQUIRED] + [(f, v) for f, vs in WRONG_TYPES.items() for v in vs]
FIELD_CASES += [("unknown_key", {"a": 1}), ("model.evil", 1), ("text.extra", True), ("tokenizer.path", "/etc"),
                ("graphs.extra", {"file": "image.onnx", "inputs": {}, "outputs": {}}),
                ("graphs.image.extra", 1), ("files.image\\.onnx", None)]


@pytest.mark.parametrize("field,value", FIELD_CASES, ids=[f"{f}={str(v)[:24]}" for f, v in FIELD_CASES])
def test_tampered_manifest_field_is_a_typed_error_naming_it(art, tmp_path, field, value):
    m = json.loads((art / "manifest.json").read_text())
    if field == "files.image\\.onnx":  # a listed file whose entry is not an object
        m["files"]["image.onnx"] = None
        field = "files"
    else:
        _set(m, field, value)
    root = clone(art, tmp_path / "a", m)
    with pytest.raises(ArtifactError) as e:
        Pipeline.load(root)
    top = field.split(".")[0]
    assert top in str(e.value) or (isinstance(e.value, ManifestError) and e.value.field.startswith(top)), e.value


HARMLESS = [("created", "yesterday"), ("options.extra", [1, {"a": None}]), ("fidelity.image_embeds.note", "x"),
            ("tools.extra", "1.0"), ("model.source", None), ("quantization", None)]


@pytest.mark.parametrize("field,value", HARMLESS)
def test_informational_fields_do_not_change_what_runs(art, tmp_path, field, value):
    m = _set(json.loads((art / "manifest.json").read_text()), field, value)
    ref = Pipeline.load(art).classify(np.full((32, 32, 3), 200, np.uint8))
    got = Pipeline.load(clone(art, tmp_path / "a", m)).classify(np.full((32, 32, 3), 200, np.uint8))
    assert got.label == ref.label and np.array_equal(got.scores, ref.scores)


RAW = {
    "not json": b"{not json",
    "NaN literal": b'{"format": "edgeclip-artifact", "logit_scale": NaN}',
    "Infinity literal": b'{"format": "edgeclip-artifact", "logit_scale": Infinity}',
    "a list": b"[1, 2, 3]",
    "a string": b'"edgeclip-artifact"',
    "utf-16": json.dumps({"format": "edgeclip-artifact"}).encode("utf-16"),
    "latin-1 bytes": b'{"format": "edgeclip-artifact\xff"}',
    "empty": b"",
    "deep nesting 100000": b'{"format": "edgeclip-artifact", "options": ' + b"[" * 100000 + b"]" * 100000 + b"}",
    "other format": b'{"format": "onnx-artifact"}',
}


@pytest.mark.parametrize("name", list(RAW))
def test_unparseable_manifest_is_an_artifact_error(art, tmp_path, name):
    root = clone(art, tmp_path / "a", raw=RAW[name])
    with pytest.raises(ArtifactError):
        read_manifest(root)


@pytest.mark.parametrize("depth", [30, 200])
def test_deeply_nested_informational_field_is_refused(art, tmp_path, depth):
    m = json.loads((art / "manifest.json").read_text())
    nested = {}
    for _ in range(depth):
        nested = {"a": nested}
    m["options"] = nested
    with pytest.raises(ManifestError, match="nested deeper"):
        read_manifest(clone(art, tmp_path / "a", m))


def test_huge_manifest_is_refused_before_parsing(art, tmp_path):
    root = clone(art, tmp_path / "a", raw=b'{"format": "edgeclip-artifact", "pad": "' + b"x" * (33 << 20) + b'"}')
    with pytest.raises(ArtifactError, match="larger than"):
        read_manifest(root)


@pytest.mark.parametrize("kind", ["symlink outside", "symlink inside", "fifo", "directory"])
def test_manifest_that_is_not_a_plain_file_is_refused(art, tmp_path, kind):
    root = clone(art, tmp_path / "a")
    mf = root / "manifest.json"
    outside = tmp_path / "elsewhere.json"
    shutil.copyfile(mf, outside)
    mf.unlink()
    if kind == "symlink outside":
        mf.symlink_to(outside)
    elif kind == "symlink inside":
        shutil.copyfile(outside, root / "real.json")
        mf.symlink_to("real.json")
    elif kind == "fifo":
        os.mkfifo(mf)
    else:
        mf.mkdir()
    with pytest.raises(ArtifactError):  # (a FIFO would hang a plain open(): it is opened non-blocking)
        Pipeline.load(root)


@pytest.mark.parametrize("rel", ["image.onnx", "text.onnx", "tokenizer/bpe_simple_vocab_16e6.txt.gz"])
def test_listed_file_that_is_a_link_is_refused_even_with_matching_bytes(art, tmp_path, rel):
    root = clone(art, tmp_path / "a")
    target = tmp_path / "outside.bin"
    shutil.copyfile(root / rel, target)
    (root / rel).unlink()
    (root / rel).symlink_to(target)
    with pytest.raises(ArtifactError, match="link|leaves the artifact"):
        read_manifest(root)


def test_linked_folder_inside_the_artifact_is_refused(art, tmp_path):
    root = clone(art, tmp_path / "a")
    shutil.move(root / "tokenizer", tmp_path / "tok")
    (root / "tokenizer").symlink_to(tmp_path / "tok")
    with pytest.raises(ArtifactError, match="link"):
        read_manifest(root)


@pytest.mark.parametrize("rel,change", [("image.onnx", "append"), ("text.onnx", "flip"),
                                        ("tokenizer/bpe_simple_vocab_16e6.txt.gz", "truncate"),
                                        ("image.onnx", "flip")])
def test_modified_file_is_a_checksum_error(art, tmp_path, rel, change):
    root = clone(art, tmp_path / "a")
    data = bytearray((root / rel).read_bytes())
    (root / rel).unlink()  # hard-linked: write a new file, never through the link
    if change == "append":
        data += b"\0"
    elif change == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[:-10]
    (root / rel).write_bytes(bytes(data))
    with pytest.raises(ChecksumError):
        read_manifest(root)


# ------------------------------------------------------------------------- options that write files

def test_ort_session_option_that_writes_a_file_is_not_forwarded(art, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's data")
    m = json.loads((art / "manifest.json").read_text())
    m["graphs"]["image"]["session_config"] = {"session.collect_node_memory_stats_to_file": str(victim)}
    with pytest.raises(ManifestError, match="collect_node_memory_stats_to_file"):
        Pipeline.load(clone(art, tmp_path / "a", m))
    assert victim.read_text() == "the user's data"


def test_backend_refuses_unlisted_options_itself(art):
    from edgeclip.runtime.backends.ort import Backend

    with pytest.raises(ArtifactError, match="not one edgeclip exports write"):
        Backend(art / "image.onnx", config={"session.collect_node_memory_stats_to_file": "/tmp/x"})


def test_openvino_cache_dir_from_the_manifest_writes_nothing(ov_art, tmp_path):
    cache = tmp_path / "cache"
    m = json.loads((ov_art / "manifest.json").read_text())
    m["graphs"]["image"]["ov_config"] = {"CACHE_DIR": str(cache)}
    with pytest.raises(ManifestError, match="CACHE_DIR"):
        Pipeline.load(clone(ov_art, tmp_path / "a", m))
    assert not cache.exists()


def test_manifest_cannot_switch_the_backend(art, tmp_path):
    m = json.loads((art / "manifest.json").read_text())
    m["backend"] = "openvino"
    with pytest.raises(ManifestError, match="backend"):
        Pipeline.load(clone(art, tmp_path / "a", m))
    with pytest.raises(ArtifactError, match="runs on the 'ort' backend"):
        Pipeline.load(art, backend="openvino")


# -------------------------------------------------------------------------- verify what you run

def test_graph_swapped_after_load_is_not_run(art, tmp_path):
    root = clone(art, tmp_path / "a")
    p = Pipeline.load(root)
    (root / "text.onnx").unlink()
    shutil.copyfile(root / "image.onnx", root / "text.onnx")
    with pytest.raises(ChecksumError, match="text.onnx"):
        p.encode_text(["a photo of the number one"])


def test_tokenizer_swapped_after_load_is_not_read(art, tmp_path):
    root = clone(art, tmp_path / "a")
    p = Pipeline.load(root)
    rel = "tokenizer/bpe_simple_vocab_16e6.txt.gz"
    (root / rel).unlink()
    (root / rel).write_bytes(b"\x1f\x8b not the vocabulary")
    with pytest.raises(ChecksumError):
        p.encode_text(["a photo of the number one"])


def test_swapped_graphs_with_rewritten_checksums_fail_the_signature_check(art, tmp_path):
    root = clone(art, tmp_path / "a")
    m = json.loads((root / "manifest.json").read_text())
    m["graphs"]["image"]["file"], m["graphs"]["text"]["file"] = "text.onnx", "image.onnx"
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="swapped"):
        Pipeline.load(root)


@pytest.mark.parametrize("output", ["logits", "image_embeds"])
def test_graph_missing_a_declared_output_fails_at_load(art, tmp_path, output):
    onnx = pytest.importorskip("onnx")
    root = clone(art, tmp_path / "a")
    model = onnx.load(str(root / "image.onnx"))
    keep = [o for o in model.graph.output if o.name != output]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    (root / "image.onnx").unlink()
    onnx.save(model, str(root / "image.onnx"))
    relist(root, json.loads((root / "manifest.json").read_text()), "image.onnx")
    with pytest.raises(ArtifactError, match="outputs"):
        Pipeline.load(root)


def test_unlisted_external_data_is_never_read(art, tmp_path, monkeypatch):
    onnx = pytest.importorskip("onnx")
    root = clone(art, tmp_path / "a")
    model = onnx.load(str(root / "image.onnx"))
    (root / "image.onnx").unlink()
    onnx.save(model, str(root / "image.onnx"), save_as_external_data=True, location="weights.bin",
              size_threshold=0)
    relist(root, json.loads((root / "manifest.json").read_text()), "image.onnx")
    monkeypatch.chdir(root)  # where ORT would look for external data of a graph loaded from memory
    with pytest.raises(ArtifactError, match="external data"):
        Pipeline.load(root)


# ----------------------------------------------------------------------------------------- digest

def test_digest_pins_the_artifact(art, tmp_path):
    d = artifact_digest(art)
    assert d.startswith("sha256:") and len(d) == 71
    assert Pipeline.load(art, digest=d).digest == d
    assert Pipeline.load(art, digest=d[7:].upper()).digest == d  # bare hex, any case
    m = json.loads((art / "manifest.json").read_text())
    m["created"] = "2000-01-01T00:00:00+00:00"  # a one-field change: a valid, different artifact
    other = clone(art, tmp_path / "a", m)
    Pipeline.load(other)
    with pytest.raises(DigestError, match="pinned"):
        Pipeline.load(other, digest=d)


@pytest.mark.parametrize("bad", ["", "sha256:", "md5:" + "0" * 32, "sha256:" + "g" * 64, "0" * 63, "sha256:" + "0" * 65])
def test_malformed_digest_is_a_typed_error(art, bad):
    with pytest.raises(DigestError):
        Pipeline.load(art, digest=bad)


# ----------------------------------------------------------------------------------- runtime state

def test_text_embedding_cache_is_bounded(art):
    p = Pipeline.load(art)
    p.TEXT_CACHE_SIZE = 4
    for i in range(12):
        p.class_embeddings([f"label {i}", f"other {i}"])
    assert len(p._text_cache) == 4
    assert (("label 11", "other 11"), tuple(p.head["templates"])) in p._text_cache


@pytest.mark.parametrize("threads", [0, -1, 10_000, 2.5, "2", True])
def test_threads_out_of_range_are_refused(art, threads):
    with pytest.raises(EdgeClipError, match="threads"):
        Pipeline.load(art, threads=threads)


def test_pipeline_is_identical_across_threads_after_hardening(art):
    p = Pipeline.load(art)
    img = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    ref = p.encode_image([img])
    out = [None] * 8

    def work(i):
        out[i] = p.encode_image([img])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(o, ref) for o in out)


def test_manifest_field_paths_are_listed_for_every_case():
    # the corpus covers every section the runtime acts on
    covered = {f.split(".")[0] for f, _ in FIELD_CASES}
    assert {"graphs", "files", "tokenizer", "text", "preprocess", "head", "heads", "model", "backend"} <= covered
    assert len(FIELD_CASES) >= 150, len(FIELD_CASES)


@pytest.mark.parametrize("call", ["encode_text", "encode_image", "classify", "similarity", "ids"])
def test_empty_batches_are_typed_errors(art, call):
    p = Pipeline.load(art)
    fn = {"encode_text": lambda: p.encode_text([]), "encode_image": lambda: p.encode_image([]),
          "classify": lambda: p.classify([], labels=["a", "b"]), "similarity": lambda: p.similarity([], ["a"]),
          "ids": lambda: p.encode_text(np.zeros((0, 5), np.int64))}[call]
    with pytest.raises(InputError, match="no texts|no images|no rows"):
        fn()
