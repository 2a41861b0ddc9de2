"""Hostile inputs to the adapter heads: label lists, prompt templates, head files (.npz with JSON
metadata), imported torch / safetensors / scikit-learn files, and fitting arguments.

Every case is a real file on disk (or a real value) and asserts the typed error and the part of its
message that tells the user what is wrong, or the exact result of a valid input. No model is loaded:
the zero-shot cases use a deterministic numpy text tower, fitting runs on synthetic features.
"""
from __future__ import annotations

import json
import os
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeclip import heads as H
from edgeclip.errors import EdgeClipError, EvalDataError, HeadError, HeadShapeError, LabelError, TemplateError
from edgeclip.heads import base as B
from edgeclip.heads.fit import FitData, check_int, kind_name
from edgeclip.heads.importers import import_head, read_tensors
from edgeclip.heads.zero_shot import MAX_LABEL_CHARS, MAX_LABELS

E, C = 8, 3
CLASSES = ["cat", "dog", "red car"]


def unit(a):
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def arrays_for(kind: str, rng=None, dtype=np.float32) -> dict:
    """Valid arrays of every kind for C classes, embedding width E."""
    rng = rng or np.random.default_rng(0)
    text = unit(rng.normal(size=(C, E)))
    a = {
        "zero_shot": {"text_weights": text},
        "linear": {"weight": rng.normal(size=(C, E)), "bias": rng.normal(size=C)},
        "residual_adapter": {"w1": rng.normal(size=(4, E)), "w2": rng.normal(size=(E, 4)), "text_weights": text},
        "tip_adapter": {"keys": unit(rng.normal(size=(2 * C, E))), "values": np.eye(C)[[0, 0, 1, 1, 2, 2]],
                        "text_weights": text},
        "gda": {"means": rng.normal(size=(C, E)), "precision": np.eye(E), "priors": np.full(C, 1 / C),
                "text_weights": text},
    }[kind]
    return {k: v.astype(dtype) for k, v in a.items()}


def good_meta(**over) -> dict:
    meta = {"format": B.FORMAT, "format_version": B.FORMAT_VERSION, "kind": "linear", "name": "probe",
            "classes": list(CLASSES), "params": {"normalize": 1.0}, "info": {}}
    meta.update(over)
    return {k: v for k, v in meta.items() if v is not DROP}


DROP = object()


def write_head(path: Path, meta, arrays=None, raw_meta=None) -> Path:
    """An .npz the way Head.save writes it, with any metadata (or raw metadata array) and arrays."""
    arrays = arrays_for("linear") if arrays is None else arrays
    meta_arr = raw_meta if raw_meta is not None else np.array(json.dumps(meta, allow_nan=True))
    np.savez(path, __meta__=meta_arr, **arrays)
    return path


def npy_bytes(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array(buf, a, allow_pickle=True)
    return buf.getvalue()


def write_zip(path: Path, members: dict, compression=zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def meta_member(meta=None) -> bytes:
    return npy_bytes(np.array(json.dumps(meta or good_meta())))


# ======================================================================================= labels

BAD_LABEL_LISTS = [
    ("/proc/self/environ", "must be a list of strings, got a single str"),
    (Path("/etc/passwd"), "must be a list of strings"),
    (b"cat,dog", "must be a list of strings, got a single bytes"),
    ("cat,dog", "split_labels"),
    (None, "must be a list of strings, got NoneType"),
    (42, "must be a list of strings, got int"),
    ({"cat": 1}, "got dict"),
    ({"cat", "dog"}, "got set"),
    (iter(["cat"]), "got list_iterator"),
    (np.array(["cat", "dog"]), "got ndarray"),
    ([], "no labels given"),
    ((), "no labels given"),
    ([""], "label 0 is blank"),
    (["   ", "\t\n"], "label 0 is blank"),
    (["cat", ""], "label 1 is blank"),
    ([None], "label 0 is NoneType"),
    (["cat", 1], "label 1 is int"),
    (["cat", 1.5], "label 1 is float"),
    ([b"cat"], "label 0 is bytes"),
    ([["cat"]], "label 0 is list"),
    ([("cat",)], "label 0 is tuple"),
    ([True], "label 0 is bool"),
    (["cat", "cat"], "are the same"),
    (["x" * (MAX_LABEL_CHARS + 1)], f"at most {MAX_LABEL_CHARS}"),
    (["\ud800"], "U+D800"),
]


@pytest.mark.parametrize("labels,message", BAD_LABEL_LISTS, ids=[f"bad{i}" for i in range(len(BAD_LABEL_LISTS))])
def test_bad_label_lists(labels, message):
    with pytest.raises(LabelError, match=_re(message)):
        H.parse_labels(labels)


def _re(text: str) -> str:
    import re

    return re.escape(text)


# every transform a user would not notice: case, surrounding and internal whitespace
COLLISIONS = [(a, f(a)) for a in ("Cat", "ice cream", "New York") for f in (
    str.lower, str.upper, lambda s: s + " ", lambda s: "\t" + s, lambda s: s.replace(" ", "  "),
    lambda s: s.replace(" ", "\u00a0"), str.swapcase)] + [("ice  cream", "ice cream"), ("Straße", "STRASSE")]
COLLISIONS = [(a, b) for a, b in COLLISIONS if a != b]


@pytest.mark.parametrize("a,b", COLLISIONS, ids=[f"collide{i}" for i in range(len(COLLISIONS))])
def test_labels_differing_only_by_case_or_whitespace_collide(a, b):
    with pytest.raises(LabelError) as e:
        H.parse_labels(["zebra", a, b])
    msg = str(e.value)
    assert repr(a) in msg and repr(b) in msg and "(item 1)" in msg and "(item 2)" in msg


CONTROL = ["\x00", "\x07", "\x1b", "\x7f", "\x85", "\x9b", "\r", "\x0b"]


@pytest.mark.parametrize("ch", CONTROL, ids=[f"U+{ord(c):04X}" for c in CONTROL])
def test_control_characters_inside_a_label_are_refused(ch):
    with pytest.raises(LabelError, match=f"control character .*U\\+{ord(ch):04X}"):
        H.parse_labels(["cat", f"do{ch}g"])


def test_label_count_cap():
    ok = [f"c{i}" for i in range(MAX_LABELS)]
    assert H.parse_labels(ok)[-1] == f"c{MAX_LABELS - 1}"
    with pytest.raises(LabelError, match=f"at most {MAX_LABELS}"):
        H.parse_labels(ok + ["one more"])


def test_valid_labels_are_stripped_plain_strings_in_order():
    got = H.parse_labels((" cat", np.str_("dog"), "red  car\n", "Ünïcödé 猫", "{}"))
    assert got == ["cat", "dog", "red  car", "Ünïcödé 猫", "{}"]
    assert all(type(x) is str for x in got)


words = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x2FF, blacklist_categories=("Cc", "Cs", "Z")),
                min_size=1, max_size=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(words, min_size=1, max_size=20))
def test_hypothesis_label_lists_parse_or_name_the_collision(items):
    keys = [" ".join(s.split()).casefold() for s in items]
    if len(set(keys)) == len(keys):
        assert H.parse_labels(items) == [s.strip() for s in items]
    else:
        with pytest.raises(LabelError, match="are the same|differ only by case or whitespace"):
            H.parse_labels(items)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.none(), st.integers(), st.floats(), st.binary(), st.lists(st.text())),
                min_size=1, max_size=5), st.integers(0, 5))
def test_hypothesis_a_non_string_anywhere_is_named(junk, at):
    items = [f"label{i}" for i in range(6)]
    items.insert(at, junk[0])
    with pytest.raises(LabelError, match=f"label {at} is {type(junk[0]).__name__}"):
        H.parse_labels(items)


SPLITS = [("cat,dog", ["cat", "dog"]), (" cat , dog ,", ["cat", "dog"]), ("a,,b", ["a", "b"]),
          ("red car", ["red car"]), ("猫,犬", ["猫", "犬"])]


@pytest.mark.parametrize("text,want", SPLITS)
def test_split_labels(text, want):
    assert H.split_labels(text) == want


@pytest.mark.parametrize("text,message", [("", "no labels given"), (",, ,", "no labels given"),
                                          ("Cat,cat", "differ only by case"), (["a", "b"], "must be a string"),
                                          (None, "must be a string"), ("a,b\x00", "control character")])
def test_split_labels_errors(text, message):
    with pytest.raises(LabelError, match=message):
        H.split_labels(text)


# ---------------------------------------------------------------------------------- labels files

def test_labels_file_reads_lines_skipping_blanks_and_comments(tmp_path):
    f = tmp_path / "labels.txt"
    f.write_bytes("\ufeff# digits\r\ncat\r\n\r\n  red car  \n#dog\nice cream,with commas\n".encode("utf-8"))
    assert H.read_labels_file(f) == ["cat", "red car", "ice cream,with commas"]
    assert H.read_labels_file(str(f)) == H.read_labels_file(f)


def _fifo(tmp_path):
    p = tmp_path / "fifo"
    os.mkfifo(p)
    return p


LABEL_FILES = [
    ("missing", lambda d: d / "nope.txt", "labels file not found"),
    ("folder", lambda d: d, "is a folder"),
    ("fifo", _fifo, "not a regular file"),
    ("device", lambda d: Path("/dev/zero"), "not a regular file"),
    ("latin1", lambda d: _w(d, "caf\xe9\n".encode("latin-1")), "is not UTF-8 text"),
    ("binary", lambda d: _w(d, b"\xff\xfe\x00\x00"), "is not UTF-8 text"),
    ("empty", lambda d: _w(d, b""), "holds no labels"),
    ("comments", lambda d: _w(d, b"# a\n\n   \n#b\n"), "holds no labels"),
    ("nul", lambda d: _w(d, b"cat\ndo\x00g\n"), "control character"),
    ("dup", lambda d: _w(d, b"cat\nCat\n"), "differ only by case"),
    ("long line", lambda d: _w(d, b"x" * 1001 + b"\n"), "at most 1000"),
    ("too big", lambda d: _w(d, b"a\n" * (8 * 1024 * 1024 + 1)), "larger than 16 MiB"),
    ("environ", lambda d: Path("/proc/self/environ"), "labels file /proc/self/environ"),
    ("not a path", lambda d: 42, "must be a path"),
]


def _w(d: Path, data: bytes) -> Path:
    p = d / "labels.txt"
    p.write_bytes(data)
    return p


@pytest.mark.parametrize("make,message", [c[1:] for c in LABEL_FILES], ids=[c[0] for c in LABEL_FILES])
def test_bad_labels_files(tmp_path, make, message):
    with pytest.raises(LabelError, match=_re(message)):
        H.read_labels_file(make(tmp_path))


# ===================================================================================== templates

BAD_TEMPLATES = ["{} {0}", "{} {name}", "{", "}", "{}{}", "{:>10}", "{!r}", "{0}", "{name}", "{.__class__}",
                 "{[0]}", "no placeholder", "{{}}", "{{{}}}{}", "a {} }", "{ }", "{!s:}", "a\x00{}", "a\n{}"]


@pytest.mark.parametrize("t", BAD_TEMPLATES, ids=[f"tpl{i}" for i in range(len(BAD_TEMPLATES))])
def test_bad_template_strings(t):
    with pytest.raises(TemplateError, match=r"prompt template 1 .*(exactly one '\{\}'|control character)"):
        H.check_templates(["a photo of a {}.", t])


BAD_TEMPLATE_LISTS = [(None, "got None"), ([], "an empty list"), ((), "an empty list"),
                      ("a photo of a {}.", "got a single string"), (b"{}", "got a single string"),
                      ({"a {}"}, "got set"), (iter(["a {}"]), "got list_iterator"), ([None], "template 0 is NoneType"),
                      ([1], "template 0 is int"), ([["a {}"]], "template 0 is list"),
                      (["a {}", "a {}"], "given twice"), (["{}" + "x" * 1000], "at most 1000"),
                      ([f"{i} {{}}" for i in range(1001)], "at most 1000 are supported")]


@pytest.mark.parametrize("templates,message", BAD_TEMPLATE_LISTS,
                         ids=[f"tpls{i}" for i in range(len(BAD_TEMPLATE_LISTS))])
def test_bad_template_lists(templates, message):
    with pytest.raises(TemplateError, match=_re(message)):
        H.check_templates(templates)


def test_valid_templates_and_defaults():
    assert H.check_templates(("{{literal}} a {}", "{}")) == ["{{literal}} a {}", "{}"]
    assert "{{literal}} a {}".format("cat") == "{literal} a cat"
    assert H.resolve_templates(None) == list(H.DEFAULT_TEMPLATES)
    assert H.resolve_templates(None, ["x {}"]) == ["x {}"]
    with pytest.raises(TemplateError, match="empty list"):
        H.resolve_templates([])  # an empty list is not "the defaults"


class TextTower:
    """A deterministic stand-in text tower: prompt -> a fixed pseudo-random vector (counts its calls)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, prompts):
        self.calls += 1
        return np.stack([np.random.default_rng(zlib.crc32(p.encode())).normal(size=E) for p in prompts])


def test_zero_shot_head_is_the_mean_of_normalized_prompts():
    tower = TextTower()
    head = H.zero_shot_head(tower, ["cat", "dog"], ["a {}.", "the {}!"], 50.0)
    f = unit(tower(["a cat.", "the cat!", "a dog.", "the dog!"]).astype(np.float32))
    want = unit(f.reshape(2, 2, E).mean(1))
    assert np.abs(head.arrays["text_weights"] - want).max() < 1e-6
    assert H.zero_shot_head(TextTower(), ["cat", "dog"], None, 1.0).info["templates"] == list(H.DEFAULT_TEMPLATES)


@pytest.mark.parametrize("classes,templates,scale,error,message", [
    ("cat,dog", None, 1.0, LabelError, "got a single str"),
    (["cat", "Cat"], None, 1.0, LabelError, "differ only by case"),
    (["cat", "dog"], [], 1.0, TemplateError, "empty list"),
    (["cat", "dog"], ["{0}"], 1.0, TemplateError, "exactly one"),
    (["cat", "dog"], None, "100", HeadError, "parameter 'scale' must be a number"),
    (["cat", "dog"], None, float("nan"), HeadError, "must be a finite number"),
])
def test_zero_shot_head_checks_before_running_the_text_tower(classes, templates, scale, error, message):
    tower = TextTower()
    with pytest.raises(error, match=message):
        H.zero_shot_head(tower, classes, templates, scale)
    assert tower.calls == 0


# ================================================================================ head files

@pytest.mark.parametrize("kind", sorted(H.KINDS))
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_valid_heads_round_trip_exactly(tmp_path, kind, dtype):
    arrays = arrays_for(kind, np.random.default_rng(3), dtype)
    params = {"zero_shot": {"scale": 42.0, "sigmoid": True}, "linear": {"normalize": 0}}.get(kind, {})
    head = H.Head(kind, "h_1", ["Cat", "dog", "ice cream"], arrays, params, {"note": [1, "two"]})
    back = H.load_head(head.save(tmp_path / "h"))
    assert (back.kind, back.name, back.classes, back.params, back.info) == \
           (head.kind, head.name, head.classes, head.params, head.info)
    for k, a in arrays.items():   # float16/float64 inputs: exactly their float32 values
        assert back.arrays[k].dtype == np.float32 and np.array_equal(back.arrays[k], a.astype(np.float32))
    feats = np.random.default_rng(4).normal(size=(5, E))
    assert np.array_equal(back.logits(feats), head.logits(feats))


NAMES_BAD = [None, 5, "", "my head", "../x", "a/b", "abc\n", "x" * 65, "logits:evil", "1abc", "_x", "naïve",
             "a-b", "a.b", ["a"]]
CLASSES_BAD = [("abc", "got str"), (None, "got NoneType"), (5, "got int"), ({}, "got dict"),
               ([1, 2, 3], "class 0 is int"), (["a", "a", "b"], "are the same"), (["Cat", "cat", "b"], "differ only"),
               ([" ", "a", "b"], "class 0 is blank"), ([], "no classes given"), (["a\x00", "b", "c"], "control"),
               (["a", None, "c"], "class 1 is NoneType"), ([f"c{i}" for i in range(MAX_LABELS + 1)], "at most")]
PARAMS_BAD = [([], "field 'params' must be an object"), ("x", "field 'params' must be an object"),
              ({"normalize": "yes"}, "parameter 'normalize' must be a number"),
              ({"normalize": None}, "must be a number"), ({"normalize": [1]}, "must be a number"),
              ({"normalize": float("nan")}, "must be a finite number"),
              ({"normalize": float("inf")}, "must be a finite number"),
              ({"nope": 1}, "has no parameter(s) nope"), ({"normalize": {"a": 1}}, "must be a number")]
OTHER_BAD = [
    ({"kind": "svm"}, "unknown head kind 'svm'"), ({"kind": 5}, "field 'kind' must be a string"),
    ({"kind": None}, "field 'kind' must be a string"), ({"kind": ["linear"]}, "field 'kind' must be a string"),
    ({"kind": DROP}, "lacks the field 'kind'"), ({"name": DROP}, "lacks the field 'name'"),
    ({"classes": DROP}, "lacks the field 'classes'"),
    ({"info": []}, "field 'info' must be an object"), ({"info": "x"}, "field 'info' must be an object"),
    ({"format": DROP}, "not an edgeclip head file"), ({"format": "other"}, "not an edgeclip head file"),
    ({"format_version": "1"}, "'format_version' must be a positive integer"),
    ({"format_version": 0}, "positive integer"), ({"format_version": True}, "positive integer"),
    ({"format_version": 1.5}, "positive integer"), ({"format_version": None}, "positive integer"),
    ({"format_version": 2}, "upgrade edgeclip"), ({"extra": 1}, "unknown metadata field(s) 'extra'"),
]
META_CASES = ([({"name": v}, "name") for v in NAMES_BAD] + [({"classes": v}, m) for v, m in CLASSES_BAD]
              + [({"params": v}, m) for v, m in PARAMS_BAD] + OTHER_BAD)


@pytest.mark.parametrize("over,message", META_CASES, ids=[f"meta{i}" for i in range(len(META_CASES))])
def test_every_metadata_field_with_a_bad_value(tmp_path, over, message):
    f = write_head(tmp_path / "h.npz", good_meta(**over))
    with pytest.raises(HeadError, match=_re(message)) as e:
        H.load_head(f)
    assert str(f) in str(e.value)


RAW_META = [
    ("not json", np.array("{"), "not valid JSON"), ("empty", np.array(""), "not valid JSON"),
    ("deep", np.array("[" * 100_000 + "]" * 100_000), "not valid JSON"),
    ("huge int", np.array('{"format_version": ' + "1" * 5000 + "}"), "not valid JSON"),
    ("list", np.array("[1, 2]"), "must be a JSON object, got list"),
    ("string", np.array('"head"'), "must be a JSON object, got str"),
    ("number", np.array("3"), "must be a JSON object, got int"),
    ("float array", np.array([1.0, 2.0]), "array '__meta__' has dtype float64; expected text"),
    ("1-D text", np.array([json.dumps(good_meta())]), "one JSON string"),
    ("bytes", np.array(json.dumps(good_meta()).encode()), "expected text"),
]


@pytest.mark.parametrize("raw,message", [c[1:] for c in RAW_META], ids=[c[0] for c in RAW_META])
def test_metadata_that_is_not_a_json_object(tmp_path, raw, message):
    with pytest.raises(HeadError, match=_re(message)):
        H.load_head(write_head(tmp_path / "h.npz", None, raw_meta=raw))


BAD_DTYPES = [np.complex64, np.complex128, np.bool_, np.int32, np.int64, np.uint8, "datetime64[s]", "S4", "U4",
              [("a", "f4"), ("b", "f4")]]


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=[str(d) for d in BAD_DTYPES])
def test_head_arrays_of_a_wrong_dtype(tmp_path, dtype):
    arrays = arrays_for("linear")
    arrays["weight"] = np.zeros((C, E), dtype=dtype)
    with pytest.raises(HeadError, match=r"array 'weight' has dtype .*expected floating point"):
        H.load_head(write_head(tmp_path / "h.npz", good_meta(), arrays))


def test_object_arrays_are_never_unpickled(tmp_path):
    marker = tmp_path / "ran"
    arrays = arrays_for("linear")
    arrays["weight"] = np.array([Exploit(str(marker))], dtype=object)
    f = write_head(tmp_path / "h.npz", good_meta(), arrays)
    with pytest.raises(HeadError, match=r"array 'weight' is an object array \(pickled"):
        H.load_head(f)
    with pytest.raises(HeadError, match="object array"):
        import_head(f, classes=CLASSES)
    assert not marker.exists()


class Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


NONFINITE = [("nan", np.nan), ("inf", np.inf), ("-inf", -np.inf), ("f32 overflow", 1e300)]


@pytest.mark.parametrize("value", [v for _, v in NONFINITE], ids=[n for n, _ in NONFINITE])
@pytest.mark.parametrize("kind", ["linear", "gda"])
def test_non_finite_arrays(tmp_path, value, kind):
    arrays = {k: v.astype(np.float64) for k, v in arrays_for(kind).items()}
    first = next(iter(arrays))
    arrays[first].flat[3] = value
    meta = good_meta(kind=kind, params={})
    with pytest.raises(HeadError, match=f"tensor\\(s\\) {first} hold NaN or infinite"):
        H.load_head(write_head(tmp_path / "h.npz", meta, arrays))


SHAPES = [
    ("1-D weight", {"weight": np.zeros(E)}, HeadShapeError, "tensor 'weight' has shape (8,), expected 2-D"),
    ("3-D weight", {"weight": np.zeros((C, E, 1))}, HeadShapeError, "expected 2-D"),
    ("0-D bias", {"bias": np.float32(1.0)}, HeadShapeError, "tensor 'bias' has shape (), expected 1-D"),
    ("C mismatch", {"weight": np.zeros((C + 1, E))}, HeadShapeError, "C=4 disagrees with 3 classes"),
    ("bias mismatch", {"bias": np.zeros(C + 2)}, HeadShapeError, "C=5 disagrees with 3 classes"),
    ("empty E", {"weight": np.zeros((C, 0))}, HeadShapeError, "an empty dimension"),
    ("unknown array", {"evil": np.zeros(3)}, HeadError, "has no array(s) evil"),
    ("text of wrong E", {"text_weights": np.zeros((C, E + 1))}, HeadShapeError, "E=8 set by an earlier tensor"),
]


@pytest.mark.parametrize("over,error,message", [c[1:] for c in SHAPES], ids=[c[0] for c in SHAPES])
def test_wrong_shapes_and_names(tmp_path, over, error, message):
    arrays = {**arrays_for("linear"), **over}
    with pytest.raises(error, match=_re(message)):
        H.load_head(write_head(tmp_path / "h.npz", good_meta(), arrays))


def test_missing_array(tmp_path):
    with pytest.raises(HeadError, match=r"needs array\(s\) bias"):
        H.load_head(write_head(tmp_path / "h.npz", good_meta(), {"weight": np.zeros((C, E), np.float32)}))


def _npy_header_shape(data: bytes, shape: str) -> bytes:
    """A .npy whose header declares `shape` while its data stays the same (the header is re-padded)."""
    hlen = struct.unpack("<H", data[8:10])[0]
    header = data[10:10 + hlen].decode("latin1")
    import re

    header = re.sub(r"'shape': \([^)]*\)", f"'shape': {shape}", header).rstrip()
    header = header.ljust(hlen - 1) + "\n"
    assert len(header) == hlen
    return data[:10] + header.encode("latin1") + data[10 + hlen:]


W = npy_bytes(np.zeros((C, E), np.float32))
BI = npy_bytes(np.zeros(C, np.float32))
ZIPS = [
    ("outside name", {"__meta__.npy": meta_member(), "../weight.npy": W}, "is not an array name"),
    ("folder name", {"__meta__.npy": meta_member(), "sub/weight.npy": W}, "is not an array name"),
    ("not npy", {"__meta__.npy": meta_member(), "weight.txt": b"x"}, "is not an array name"),
    ("space in name", {"__meta__.npy": meta_member(), "weight.npy": W, "bias.npy": BI, "weight .npy": W},
     "is not an array name"),
    ("bad npy magic", {"__meta__.npy": meta_member(), "weight.npy": b"PK not npy", "bias.npy": BI},
     "array 'weight' is unreadable"),
    ("npy v3", {"__meta__.npy": meta_member(), "weight.npy": b"\x93NUMPY\x03\x00" + W[8:], "bias.npy": BI},
     "format (3, 0)"),
    ("shape lies big", {"__meta__.npy": meta_member(), "bias.npy": BI,
                        "weight.npy": _npy_header_shape(W, "(1000000000, 8)")},
     "declares shape (1000000000, 8)"),
    ("shape lies small", {"__meta__.npy": meta_member(), "bias.npy": BI, "weight.npy": _npy_header_shape(W, "(1, 8)")},
     "declares shape (1, 8)"),
    ("negative shape", {"__meta__.npy": meta_member(), "bias.npy": BI,
                        "weight.npy": _npy_header_shape(W, "(-3, -8)")}, "negative size"),
    ("empty zip", {}, "without edgeclip head metadata"),
    ("too many members", {**{f"a{i}.npy": BI for i in range(B.MAX_NPZ_MEMBERS + 1)}}, "arrays; at most 256"),
]


@pytest.mark.parametrize("members,message", [c[1:] for c in ZIPS], ids=[c[0] for c in ZIPS])
def test_hostile_zip_members(tmp_path, members, message):
    with pytest.raises(HeadError, match=_re(message)):
        H.load_head(write_zip(tmp_path / "h.npz", members))


def test_two_members_of_the_same_name(tmp_path):
    f = tmp_path / "h.npz"
    with zipfile.ZipFile(f, "w") as zf, pytest.warns(UserWarning, match="Duplicate name"):
        for name, data in (("__meta__.npy", meta_member()), ("weight.npy", W), ("bias.npy", BI), ("weight.npy", W)):
            zf.writestr(name, data)
    with pytest.raises(HeadError, match="array 'weight' is stored twice"):
        H.load_head(f)


def test_declared_uncompressed_size_bomb_is_refused_before_reading(tmp_path):
    """A central directory claiming a 4 GiB member (a zip bomb's signature): refused from the listing."""
    f = write_zip(tmp_path / "h.npz", {"__meta__.npy": meta_member(), "weight.npy": W, "bias.npy": BI})
    data = bytearray(f.read_bytes())
    at = data.rfind(b"PK\x01\x02")             # the last central directory entry
    struct.pack_into("<I", data, at + 24, 0xFFFFFFF0)   # its uncompressed size
    f.write_bytes(bytes(data))
    with pytest.raises(HeadError, match="MiB of arrays uncompressed; heads of more than 1024 MiB are refused"):
        H.load_head(f)


def test_deflate_bomb_reads_no_more_than_declared(tmp_path):
    """64 MiB of zeros that deflate to ~64 KiB, under a header declaring 8 floats: refused, bounded."""
    bomb = npy_bytes(np.zeros(C, np.float32)) + bytes(64 << 20)
    f = write_zip(tmp_path / "h.npz", {"__meta__.npy": meta_member(), "weight.npy": W, "bias.npy": bomb},
                  zipfile.ZIP_DEFLATED)
    assert f.stat().st_size < 1 << 20
    with pytest.raises(HeadError, match="array 'bias' declares shape"):
        H.load_head(f)


def test_files_that_are_not_zips_or_not_regular(tmp_path):
    (tmp_path / "c.npz").write_bytes(b"PK\x03\x04 not a zip")
    cases = [(tmp_path / "c.npz", "not a readable .npz"), (tmp_path / "none.npz", "head file not found"),
             (tmp_path, "not a regular file"), (_fifo(tmp_path), "not a regular file"),
             (Path("/dev/zero"), "not a regular file"), (42, "must be a path")]
    for f, message in cases:
        with pytest.raises(HeadError, match=message):
            H.load_head(f)


@pytest.mark.parametrize("suffix", [".npz", ".pt", ".safetensors"])
def test_oversized_files_are_refused_unread(tmp_path, suffix):
    f = tmp_path / f"big{suffix}"
    with open(f, "wb") as fh:          # sparse: no disk used
        fh.truncate(B.MAX_HEAD_FILE_BYTES + 1)
    with pytest.raises(HeadError, match="larger than 1024 MiB"):
        (H.load_head if suffix == ".npz" else read_tensors)(f)


# ---------------------------------------------------------------------------- names and resolve

@pytest.mark.parametrize("name", NAMES_BAD, ids=[f"name{i}" for i in range(len(NAMES_BAD))])
def test_head_names_must_be_identifiers(name):
    with pytest.raises(HeadError, match="must start with a letter"):
        H.Head("linear", name, CLASSES, arrays_for("linear"))


def test_name_rename_through_resolve(tmp_path):
    f = H.Head("linear", "probe", CLASSES, arrays_for("linear")).save(tmp_path / "p.npz")
    assert [h.name for h in B.resolve([f"digits={f}"], E)] == ["digits"]
    with pytest.raises(HeadError, match="head file not found"):
        B.resolve([f"bad name={f}"], E)   # not a valid name: read as one file name, which does not exist
    with pytest.raises(HeadError, match="a Head, a head file or NAME=FILE"):
        B.resolve([3.5], E)
    with pytest.raises(HeadShapeError, match="embedding width 16"):
        B.resolve([f], 16)


# ================================================================================= importers

torch = pytest.importorskip("torch")


def _deep(n):
    d = {"weight": torch.zeros(C, E)}
    for _ in range(n):
        d = {"a": d}
    return d


def _cyclic():
    d = {"weight": torch.zeros(C, E)}
    d["again"] = d
    return d


def _diamond(levels=30, leaf=0):
    node = [leaf]
    for _ in range(levels):
        node = [node, node]   # pickle memoizes: a tiny file, 2**30 paths
    return {"state": node}


def _quantized():
    return {"weight": torch.quantize_per_tensor(torch.zeros(C, E), 0.1, 0, torch.qint8)}


TORCH_FILES = [
    ("cycle", _cyclic, "field 'again' contains itself"),
    ("list cycle", lambda: (lambda x: (x.append(x), {"w": x})[1])([torch.zeros(1)]), "contains itself"),
    ("deep", lambda: _deep(40), "nested more than 32 levels deep"),
    ("diamond", _diamond, "shares containers many times over"),
    ("shared tensor", lambda: _diamond(leaf=torch.zeros(1)), "holds more than 100000 tensors"),
    ("string weight", lambda: {"weight": "abc", "bias": torch.zeros(C)}, "field 'weight' is a str, not a tensor"),
    ("list weight", lambda: {"fc.weight": [[1.0] * E] * C}, "field 'fc.weight' is a list, not a tensor"),
    ("none bias", lambda: {"weight": torch.zeros(C, E), "bias": None}, "field 'bias' is a NoneType"),
    ("int weight", lambda: {"weight": torch.zeros(C, E, dtype=torch.int64)}, "'weight' has dtype int64"),
    ("bool weight", lambda: {"weight": torch.zeros(C, E, dtype=torch.bool)}, "'weight' has dtype bool"),
    ("complex weight", lambda: {"weight": torch.zeros(C, E, dtype=torch.cfloat)}, "'weight' has dtype complex64"),
    ("nan weight", lambda: {"weight": torch.full((C, E), float("nan"))}, "'weight' holds NaN or infinite"),
    ("inf bias", lambda: {"weight": torch.zeros(C, E), "bias": torch.full((C,), float("inf"))}, "'bias' holds NaN"),
    ("sparse", lambda: {"weight": torch.zeros(C, E).to_sparse()}, "tensor 'weight' is sparse"),
    ("quantized", _quantized, "tensor 'weight' is quantized"),
    ("tuple key", lambda: {("a", 1): torch.zeros(C, E)}, "has a key of type tuple"),
    ("no tensors", lambda: {"epoch": 3, "name": "x"}, "holds no tensors"),
    ("big pickle", lambda: {"weight": torch.zeros(C, E), "notes": b"x" * (17 << 20)},
     "its object structure (data.pkl)"),
    ("1-D weight", lambda: {"weight": torch.zeros(E)}, "unknown head layout"),
    ("bad cache", lambda: {"cache_keys": torch.zeros(E, 6), "cache_values": torch.zeros(6)},
     "tensor 'cache_values' has shape (6,); cache values are (K, C)"),
]


@pytest.mark.parametrize("make,message", [c[1:] for c in TORCH_FILES], ids=[c[0] for c in TORCH_FILES])
def test_hostile_torch_files(tmp_path, make, message):
    import warnings

    f = tmp_path / "head.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensors are deprecated
        torch.save(make(), f)
    with pytest.raises(HeadError, match=_re(message)):
        import_head(f, classes=CLASSES, embed_dim=E)


def test_torch_code_in_a_head_file_never_runs(tmp_path):
    marker = tmp_path / "ran"
    f = tmp_path / "head.pt"
    torch.save({"weight": torch.zeros(C, E), "x": Exploit(str(marker))}, f)
    with pytest.raises(HeadError, match="could not be read as a weights-only torch file"):
        import_head(f, classes=CLASSES)
    assert not marker.exists()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_torch_float_dtypes_import_to_the_same_head(tmp_path, dtype):
    w = torch.randn(C, E, generator=torch.Generator().manual_seed(0)).to(dtype)
    torch.save({"model": {"head": {"weight": w, "bias": torch.zeros(C, dtype=dtype)}}, "epoch": 7}, tmp_path / "h.pt")
    head = import_head(tmp_path / "h.pt", classes=CLASSES, embed_dim=E)
    assert head.kind == "linear" and head.info["tensors"]["weight"] == "model.head.weight"
    assert np.array_equal(head.arrays["weight"], w.float().numpy())


def test_safetensors_files(tmp_path):
    from safetensors.numpy import save_file

    save_file({"weight": np.ones((C, E), np.float32), "bias": np.zeros(C, np.float32)},
              str(tmp_path / "ok.safetensors"))
    assert np.array_equal(import_head(tmp_path / "ok.safetensors", classes=CLASSES).arrays["weight"], np.ones((C, E)))
    save_file({"weight": np.ones((C, E), np.int32)}, str(tmp_path / "int.safetensors"))
    with pytest.raises(HeadError, match="tensor 'weight' has dtype int32"):
        import_head(tmp_path / "int.safetensors", classes=CLASSES)
    (tmp_path / "junk.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(HeadError, match="not a readable .safetensors file"):
        import_head(tmp_path / "junk.safetensors", classes=CLASSES)


SKLEARN = [
    ("complex coef", {"coef_": np.zeros((C, E), np.complex128)}, "has dtype complex128"),
    ("int coef", {"coef_": np.zeros((C, E), np.int64)}, "tensor 'coef_' has dtype int64"),
    ("nan intercept", {"coef_": np.zeros((C, E)), "intercept_": np.full(C, np.nan)}, "'intercept_' holds NaN"),
    ("classes as one string", {"coef_": np.zeros((C, E)), "classes_": np.array("abc")}, "class names are one list"),
    ("non-utf8 classes", {"coef_": np.zeros((C, E)), "classes_": np.array([b"\xff", b"b", b"c"])}, "not UTF-8"),
    ("duplicate classes", {"coef_": np.zeros((C, E)), "classes_": np.array(["a", "A", "b"])}, "differ only by case"),
]


@pytest.mark.parametrize("arrays,message", [c[1:] for c in SKLEARN], ids=[c[0] for c in SKLEARN])
def test_hostile_sklearn_npz(tmp_path, arrays, message):
    np.savez(tmp_path / "sk.npz", **arrays)
    with pytest.raises(HeadError, match=_re(message)):
        import_head(tmp_path / "sk.npz")


def test_sklearn_npz_with_byte_class_names_imports(tmp_path):
    np.savez(tmp_path / "sk.npz", coef_=np.eye(C, E), intercept_=np.arange(C, dtype=float),
             classes_=np.array([b"cat", b"dog", b"car"]))
    head = import_head(tmp_path / "sk.npz")
    assert head.classes == ["cat", "dog", "car"]
    x = np.random.default_rng(0).normal(size=(4, E))
    assert np.allclose(head.logits(x), unit(x) @ np.eye(C, E).T + np.arange(C), atol=1e-6)


@pytest.mark.parametrize("kwargs,message", [
    ({"kind": 5}, "kind must be a layout name"), ({"kind": "svm"}, "cannot import a 'svm' head"),
    ({"classes": "abc"}, "field 'classes' must be a list of strings, got a single string"),
    ({"classes": []}, "give the class names"), ({"name": "a b"}, "must start with a letter"),
    ({"params": [1]}, "params must be a dict"), ({"params": {"normalize": "no"}}, "must be a number"),
    ({"kind": "tip"}, "a Tip-Adapter cache needs cache_keys"),
])
def test_import_arguments(tmp_path, kwargs, message):
    torch.save({"weight": torch.zeros(C, E), "bias": torch.zeros(C)}, tmp_path / "h.pt")
    with pytest.raises(HeadError, match=_re(message)):
        import_head(tmp_path / "h.pt", **{"classes": CLASSES, **kwargs})


def test_native_head_import_checks_the_classes(tmp_path):
    f = H.Head("linear", "probe", CLASSES, arrays_for("linear")).save(tmp_path / "p.npz")
    assert import_head(f, classes=CLASSES).classes == CLASSES
    with pytest.raises(HeadShapeError, match="expected"):
        import_head(f, classes=["a", "b", "c"])


# ======================================================================================= fitting

def fit_data(n_per_class=4, views=2, classes=CLASSES, seed=0) -> FitData:
    """Well separated synthetic features: class c near axis c."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(classes)), n_per_class)
    feats = np.eye(E)[labels][:, None, :] + 0.05 * rng.normal(size=(len(labels), views, E))
    return FitData(unit(feats), labels, list(classes))


@pytest.mark.parametrize("kind", ["linear", "tip", "gda"])
def test_fit_on_separable_features_is_exact_and_deterministic(kind):
    data = fit_data()
    text = np.eye(E)[:C]
    a, b = H.fit(kind, data, text, 10.0), H.fit(kind, data, text, 10.0)
    test = unit(np.eye(E)[:C] + 0.01)
    assert list(a.logits(test).argmax(1)) == [0, 1, 2]
    assert all(np.array_equal(a.arrays[k], b.arrays[k]) for k in a.arrays)


FOLDER_ARGS = [({"shots": 0}, "shots (--shots) must be at least 1, got 0"), ({"shots": -3}, "at least 1"),
               ({"shots": 1.5}, "shots (--shots) must be an integer, got float"), ({"shots": "4"}, "got str"),
               ({"shots": True}, "got bool"), ({"seed": "abc"}, "seed (--seed) must be an integer"),
               ({"seed": 1.0}, "got float"), ({"seed": -1}, "at least 0"), ({"seed": None}, "got NoneType"),
               ({"augment": -1}, "augment (--augment) must be from 0 to 8"), ({"augment": 9}, "from 0 to 8"),
               ({"augment": "2"}, "must be an integer"), ({"labels": "a,b"}, "got a single str"),
               ({"labels": ["a", "A"]}, "differ only by case")]


@pytest.mark.parametrize("kwargs,message", FOLDER_ARGS, ids=[f"arg{i}" for i in range(len(FOLDER_ARGS))])
def test_encode_folder_arguments_fail_before_any_image_is_read(tmp_path, kwargs, message):
    calls = []
    with pytest.raises((HeadError, LabelError), match=_re(message)):
        H.encode_folder(lambda batch: calls.append(batch), tmp_path / "missing", **kwargs)
    assert calls == []


def test_empty_or_flat_train_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "flat").mkdir()
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "flat" / "a.png")
    (tmp_path / "empty_classes" / "cat").mkdir(parents=True)
    (tmp_path / "empty_classes" / "dog").mkdir()
    for d, message in (("empty", "0 class sub-folder"), ("flat", "holds 1 images directly"),
                       ("empty_classes", "0 class sub-folder"), ("missing", "folder not found")):
        with pytest.raises(EvalDataError, match=message):
            H.encode_folder(lambda b: np.zeros((len(b), E)), tmp_path / d)


def test_too_few_images_for_the_shots(tmp_path):
    from PIL import Image

    for c, n in (("cat", 3), ("dog", 1)):
        (tmp_path / c).mkdir()
        for i in range(n):
            Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(tmp_path / c / f"{i}.png")
    with pytest.raises(HeadError, match="class 'dog' has 1 image.*--shots 2 needs 2 per class"):
        H.encode_folder(lambda b: np.zeros((len(b), E)), tmp_path, shots=2)
    data = H.encode_folder(lambda b: np.stack([np.full(E, float(im[0, 0, 0] + 1)) for im in b]), tmp_path,
                           shots=1, seed=0, augment=2)
    assert data.feats.shape == (2, 3, E) and list(data.labels) == [0, 1]


def _with(data: FitData, **over) -> FitData:
    return FitData(**{"feats": data.feats, "labels": data.labels, "classes": data.classes, **over})


FIT_BAD = [
    (lambda d: None, "takes the FitData"), (lambda d: {"feats": 1}, "takes the FitData"),
    (lambda d: _with(d, feats=d.feats[:, 0]), "expected a float (N, views, E)"),
    (lambda d: _with(d, feats=d.feats[:0], labels=d.labels[:0]), "at least one image"),
    (lambda d: _with(d, feats=d.feats.astype(np.complex128)), "expected a float"),
    (lambda d: _with(d, labels=d.labels[:-1]), "fit data labels have shape"),
    (lambda d: _with(d, labels=d.labels.astype(float)), "integers"),
    (lambda d: _with(d, labels=np.where(d.labels == 2, 7, d.labels)), "must index 3 classes"),
    (lambda d: _with(d, labels=np.where(d.labels == 2, 0, d.labels)), "red car have no images"),
    (lambda d: _with(d, feats=np.where(d.feats > 0.9, np.nan, d.feats)), "NaN or infinite"),
    (lambda d: _with(d, classes=["only"], labels=np.zeros_like(d.labels)), "at least two"),
]


@pytest.mark.parametrize("make,message", FIT_BAD, ids=[f"fit{i}" for i in range(len(FIT_BAD))])
def test_fit_refuses_unusable_data(make, message):
    with pytest.raises(HeadError, match=_re(message)):
        H.fit("linear", make(fit_data()), np.eye(E)[:C], 10.0)


@pytest.mark.parametrize("text,scale,message", [
    (np.eye(E)[:2], 10.0, "zero-shot weights have shape (2, 8), expected (3, 8)"),
    ("weights", 10.0, "zero-shot weights must be a numeric"),
    (np.full((C, E), np.inf), 10.0, "zero-shot weights hold NaN"),
    (np.eye(E)[:C], 0.0, "must be positive"), (np.eye(E)[:C], -1.0, "must be positive"),
    (np.eye(E)[:C], "10", "parameter 'scale' must be a number"), (np.eye(E)[:C], float("nan"), "finite"),
])
def test_fit_refuses_bad_text_weights_and_scale(text, scale, message):
    with pytest.raises(HeadError, match=_re(message)):
        H.fit("tip", fit_data(), text, scale)


@pytest.mark.parametrize("kind", [None, 3, ["linear"], "svm", "residual_adapter", ""])
def test_fit_kinds(kind):
    with pytest.raises(HeadError, match="cannot fit a"):
        kind_name(kind)


def test_check_int_accepts_numpy_integers():
    assert check_int("shots", np.int64(3), 1) == 3
    with pytest.raises(EdgeClipError, match="at least 1"):
        check_int("shots", np.int32(0), 1)
