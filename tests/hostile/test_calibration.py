"""Hostile calibration data: folder layouts x bad entries, images that decode but are odd, caption
files x bad contents, sample sizes x bad values.

Every case builds real files on disk (links, FIFOs, sockets, sparse files, forged headers) and asserts
the typed error and the key part of its message, or exactly which files were kept / skipped and which
captions were read.  Images go through the real tiny-spec Preprocessor; nothing is mocked (bounds that
would need a million files are lowered through their module constants).
"""
from __future__ import annotations

import io
import json
import os
import random
import re
import socket
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from edgeclip.calibration import data as D
from edgeclip.calibration.data import list_images, load_images, read_captions, scan_images
from edgeclip.errors import CalibrationError
from edgeclip.runtime.preprocess import Preprocessor, load_image
from edgeclip.specs import get_spec


@pytest.fixture(scope="module")
def prep() -> Preprocessor:
    return Preprocessor.from_config(get_spec("tiny").preprocess_config())


def photo(w=20, h=16, seed=0, mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def forged_png(w: int, h: int) -> bytes:
    """A 4x4 PNG whose header claims w x h (CRC fixed, so Pillow reads the header)."""
    data = bytearray(png_bytes(photo(4, 4)))
    data[16:24] = struct.pack(">II", w, h)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


# ------------------------------------------------------------------ folder layouts x bad entries
# Each bad entry: a function (folder, outside, root) -> (entry name, expectation); expectation is
# ("skip", key part of the reason), ("keep",) or ("ignore",) (not an image: neither kept nor skipped).

def _link(target):
    def make(folder: Path, outside: Path, root: Path, name: str):
        os.symlink(target(folder, outside, root) if callable(target) else target, folder / name)
    return make


def _write(data):
    def make(folder, outside, root, name):
        (folder / name).write_bytes(data() if callable(data) else data)
    return make


def _fifo(folder, outside, root, name):
    os.mkfifo(folder / name)


def _socket(folder, outside, root, name):
    here = os.getcwd()
    os.chdir(folder)  # AF_UNIX paths are limited to ~108 bytes: bind a relative name
    try:
        s = socket.socket(socket.AF_UNIX)
        s.bind(name)
        s.close()
    finally:
        os.chdir(here)


def _dir_named_png(folder, outside, root, name):
    (folder / name).mkdir()
    (folder / name / "inner.png").write_bytes(png_bytes(photo(seed=7)))


def _linked_outside_dir(folder, outside, root, name):
    os.symlink(outside, folder / name, target_is_directory=True)


LINK = "symbolic link"
LINKED_DIR = "linked folder"
BAD_ENTRIES = {
    "link-to-outside-image": ("out.png", _link(lambda f, o, r: o / "secret.png"), ("skip", LINK)),
    "link-to-inside-image": ("dup.png", _link(lambda f, o, r: r / "good0.png"), ("skip", LINK)),
    "relative-link-escaping": ("rel.png", _link("../../../../outside/secret.png"), ("skip", LINK)),
    "dangling-link": ("gone.png", _link("/nonexistent/edgeclip/gone.png"), ("skip", LINK)),
    "link-to-dev-zero": ("zero.png", _link("/dev/zero"), ("skip", LINK)),
    "self-loop-link": ("self.png", _link("self.png"), ("skip", LINK)),
    "linked-folder-outside": ("elsewhere", _linked_outside_dir, ("skip", LINKED_DIR)),
    "loop-dot": ("a", _link("."), ("skip", LINKED_DIR)),
    "loop-parent": ("up", _link(".."), ("skip", LINKED_DIR)),
    "link-to-root": ("root", _link("/"), ("skip", LINKED_DIR)),
    "fifo": ("pipe.png", _fifo, ("skip", "FIFO")),
    "socket": ("sock.jpg", _socket, ("skip", "socket")),
    "empty-file": ("empty.png", _write(b""), ("skip", "not in a format Pillow can read")),
    "text-as-jpeg": ("text.jpg", _write(b"just some words\n"), ("skip", "not in a format Pillow can read")),
    "truncated-png": ("cut.png", _write(lambda: png_bytes(photo())[:60]), ("skip", "truncated or corrupt")),
    "zero-by-zero": ("zero_size.png", _write(lambda: forged_png(0, 0)), ("skip", "not in a format Pillow can read")),
    "zero-width": ("zero_w.png", _write(lambda: forged_png(0, 16)), ("skip", "not in a format Pillow can read")),
    "strip-1000x1": ("strip.png", _write(lambda: png_bytes(photo(1000, 1))), ("skip", "aspect ratio")),
    "bomb-header": ("bomb.png", _write(lambda: forged_png(40000, 40000)), ("skip", "MAX_IMAGE_PIXELS")),
    "appledouble": ("._good0.png", _write(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X"),
                    ("skip", "not in a format Pillow can read")),
    "dir-named-png": ("dir.png", _dir_named_png, ("keep",)),
    "upper-case-ext": ("SHOUT.PNG", _write(lambda: png_bytes(photo(seed=3))), ("keep",)),
    "non-utf8-name": (os.fsdecode(b"caf\xe9.png"), _write(lambda: png_bytes(photo(seed=4))), ("keep",)),
    "non-image-link": ("README", _link("/etc/passwd"), ("ignore",)),
}
LAYOUTS = {"flat": (), "nested": ("sub", "deeper")}


def _expected_path(folder: Path, name: str) -> Path:
    return folder / name / "inner.png" if name == "dir.png" else folder / name


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("entry", list(BAD_ENTRIES))
def test_folder_entries(tmp_path, prep, layout, entry):
    root, outside = tmp_path / "calib", tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(png_bytes(photo(seed=9)))
    folder = root.joinpath(*LAYOUTS[layout])
    folder.mkdir(parents=True)
    good = [root / f"good{i}.png" for i in range(2)]
    for i, g in enumerate(good):
        g.write_bytes(png_bytes(photo(seed=i)))
    name, make, expect = BAD_ENTRIES[entry]
    make(folder, outside, root, name)

    data = load_images(root, prep, limit=None)
    target = _expected_path(folder, name)
    want_kept = sorted(good + [target]) if expect[0] == "keep" else sorted(good)
    assert data.files == want_kept
    np.testing.assert_array_equal(data.pixels, prep([load_image(f) for f in want_kept]))
    if expect[0] == "skip":
        assert [p for p, _ in data.skipped] == [str(target)]
        assert expect[1] in data.skipped[0][1] and name in data.skipped[0][1]
    else:
        assert data.skipped == []
    assert all("secret" not in str(f) for f in data.files)  # nothing outside the folder is read


@pytest.mark.parametrize("entry", [e for e, (_, _, x) in BAD_ENTRIES.items() if x[0] == "skip"])
def test_folder_of_only_bad_entries_names_count_and_first_reason(tmp_path, prep, entry):
    root, outside = tmp_path / "calib", tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(png_bytes(photo(seed=9)))
    (root / "s").mkdir(parents=True)
    (root / "good0.png").write_bytes(png_bytes(photo()))  # a link target; removed below
    name, make, expect = BAD_ENTRIES[entry]
    make(root / "s", outside, root, name)
    (root / "s" / "zz_junk.png").write_bytes(b"junk")  # sorts after every bad entry
    (root / "good0.png").unlink()
    with pytest.raises(CalibrationError) as e:
        load_images(root, prep)
    msg = str(e.value)
    assert "none of the 2 " in msg and "first problem: " in msg and expect[1] in msg


# ------------------------------------------------------------------------------ walk bounds

def test_depth_past_the_bound_is_refused(tmp_path):
    deep = tmp_path.joinpath(*["d"] * (D.MAX_WALK_DEPTH + 1))
    deep.mkdir(parents=True)
    (deep / "x.png").write_bytes(png_bytes(photo()))
    with pytest.raises(CalibrationError, match=f"more than {D.MAX_WALK_DEPTH} levels deep"):
        list_images(tmp_path)
    (deep / "x.png").rename(deep.parent / "x.png")  # exactly at the bound: read
    deep.rmdir()
    assert list_images(tmp_path) == [deep.parent / "x.png"]


def test_entry_count_past_the_bound_is_refused(tmp_path, monkeypatch):
    for i in range(12):
        (tmp_path / f"{i:02d}.png").write_bytes(b"x")
    monkeypatch.setattr(D, "MAX_WALK_ENTRIES", 12)
    assert len(list_images(tmp_path)) == 12
    (tmp_path / "sub").mkdir()
    with pytest.raises(CalibrationError, match="more than 12 entries"):
        list_images(tmp_path)


def test_link_loops_terminate_and_are_counted(tmp_path, prep):
    (tmp_path / "good.png").write_bytes(png_bytes(photo()))
    for n in range(5):  # five loops at two levels; following any would recurse forever
        os.symlink(".", tmp_path / f"loop{n}")
    (tmp_path / "sub").mkdir()
    os.symlink("..", tmp_path / "sub" / "back")
    scan = scan_images(tmp_path)
    assert scan.files == [tmp_path / "good.png"]
    assert [Path(p).name for p, _ in scan.skipped] == ["loop0", "loop1", "loop2", "loop3", "loop4", "back"]


def test_the_named_folder_may_itself_be_a_link(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "a.png").write_bytes(png_bytes(photo()))
    os.symlink(tmp_path / "real", tmp_path / "alias")
    assert list_images(tmp_path / "alias") == [tmp_path / "alias" / "a.png"]


@pytest.mark.parametrize("folder, match", [
    ("missing", "calibration folder not found"),
    ("file.png", "is not a folder"),
    (42, "must be a path"),
])
def test_unusable_folder_arguments(tmp_path, folder, match):
    (tmp_path / "file.png").write_bytes(png_bytes(photo()))
    with pytest.raises(CalibrationError, match=match):
        list_images(tmp_path / folder if isinstance(folder, str) else folder)


def test_a_file_swapped_after_the_walk_is_not_followed(tmp_path, prep, monkeypatch):
    (tmp_path / "secret.png").write_bytes(png_bytes(photo(seed=9)))
    root = tmp_path / "calib"
    root.mkdir()
    for n in ("a.png", "b.png", "c.png"):
        (root / n).write_bytes(png_bytes(photo()))
    real_walk = D._walk

    def walk_then_swap(r):  # the real walk; the attacker's move lands between listing and reading
        scan = real_walk(r)
        (root / "a.png").unlink()
        os.symlink(tmp_path / "secret.png", root / "a.png")
        (root / "b.png").unlink()
        os.mkfifo(root / "b.png")  # opening it must not block
        return scan

    monkeypatch.setattr(D, "_walk", walk_then_swap)
    data = load_images(root, prep)
    assert data.files == [root / "c.png"]
    assert [(Path(p).name, r.split("' ", 1)[1]) for p, r in data.skipped] == [
        ("a.png", "became a symbolic link after the folder was listed; not followed"),
        ("b.png", "is a FIFO (named pipe) now, not an image file")]


# ------------------------------------------------------- images that decode but are odd: used as the runtime


def _gif_two_frames(path: Path):
    frames = [photo(seed=1).convert("P"), photo(seed=2).convert("P")]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
    return Image.open(path).convert("RGB")  # the first frame


def _cmyk(path: Path):
    photo(seed=3).convert("CMYK").save(path, "JPEG", quality=95)
    return Image.open(path).convert("RGB")


def _grey16(path: Path):
    v = np.random.default_rng(5).integers(0, 65536, (16, 20)).astype(np.uint16)
    Image.fromarray(v).save(path)  # a 16-bit PNG
    assert Image.open(path).mode.startswith("I")
    eight = ((v.astype(np.uint32) * 2 + 257) // 514).astype(np.uint8)  # round(v / 257)
    return Image.fromarray(eight).convert("RGB")


def _one_pixel(path: Path):
    Image.new("RGB", (1, 1), (200, 10, 30)).save(path)
    return Image.new("RGB", (32, 32), (200, 10, 30))  # a constant image at any size


def _ratio_100(path: Path):
    photo(300, 3).save(path)  # exactly the runtime's 100:1 limit: allowed
    return photo(300, 3)


def _transparent(path: Path):
    rgba = np.zeros((16, 20, 4), np.uint8)
    rgba[..., 0] = 255  # red, fully transparent: white on composite
    Image.fromarray(rgba).save(path)
    return Image.new("RGB", (20, 16), (255, 255, 255))


ODD = {"animated-apng": ("anim.png", _gif_two_frames), "cmyk.jpg": ("cmyk.jpg", _cmyk),
       "grey16.png": ("g16.png", _grey16), "one-pixel.png": ("one.png", _one_pixel),
       "ratio-100.png": ("thin.png", _ratio_100), "transparent.png": ("clear.png", _transparent)}


@pytest.mark.parametrize("case", list(ODD))
def test_odd_but_valid_images_are_used_like_the_runtime(tmp_path, prep, case):
    name, make = ODD[case]
    reference = make(tmp_path / name)
    data = load_images(tmp_path, prep)
    assert data.files == [tmp_path / name] and data.skipped == []
    np.testing.assert_array_equal(data.pixels, prep(reference))


# ----------------------------------------------------------------------- sample sizes x bad values

BAD_LIMITS = [0, -1, -512, True, False, 2.0, 1.5, float("nan"), float("inf"), "3", b"3", [3]]
READERS = {
    "list_images": lambda root, prep, limit: list_images(root / "imgs", limit=limit),
    "load_images": lambda root, prep, limit: load_images(root / "imgs", prep, limit=limit),
    "read_captions": lambda root, prep, limit: read_captions(root / "caps.txt", limit=limit),
}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    (root / "imgs").mkdir()
    for i in range(4):
        (root / "imgs" / f"{i}.png").write_bytes(png_bytes(photo(seed=i)))
    (root / "caps.txt").write_text("\n".join(f"caption {i}" for i in range(6)))
    return root


@pytest.mark.parametrize("limit", BAD_LIMITS, ids=repr)
@pytest.mark.parametrize("reader", list(READERS))
def test_bad_limits(small_set, prep, reader, limit):
    with pytest.raises(CalibrationError, match="whole number >= 1") as e:
        READERS[reader](small_set, prep, limit)
    assert repr(limit)[:6] in str(e.value)


@pytest.mark.parametrize("limit", [1, 3, np.int64(2), 10**9, None], ids=repr)
def test_good_limits_sample_exactly(small_set, prep, limit):
    files = sorted((small_set / "imgs").glob("*.png"))
    n = len(files) if limit is None else min(int(limit), len(files))
    want = files if n == len(files) else sorted(random.Random(0).sample(files, n))
    assert list_images(small_set / "imgs", limit=limit) == want
    assert load_images(small_set / "imgs", prep, limit=limit).files == want
    caps = [f"caption {i}" for i in range(6)]
    k = 6 if limit is None else min(int(limit), 6)
    assert read_captions(small_set / "caps.txt", limit=limit) == (caps if k == 6 else random.Random(0).sample(caps, k))


@pytest.mark.parametrize("seed", [1.0, "0", None, True], ids=repr)
def test_bad_seeds(small_set, seed):
    with pytest.raises(CalibrationError, match="seed must be a whole number"):
        list_images(small_set / "imgs", limit=2, seed=seed)
    with pytest.raises(CalibrationError, match="seed must be a whole number"):
        read_captions(small_set / "caps.txt", limit=2, seed=seed)


# --------------------------------------------------------------------- caption files x bad contents

def _deep(opening: str, closing: str, n: int = 100_000) -> bytes:
    return (opening * n + closing * n).encode()


BAD_CAPTIONS = {
    # name: (file name, bytes, key part of the message)
    "latin1": ("c.txt", "ok\ncafé au lait\n".encode("latin-1"), "c.txt:2 is not valid UTF-8"),
    "invalid-byte-line-3": ("c.txt", b"one\ntwo\nth\xffree\n", "c.txt:3 is not valid UTF-8 (byte 0xff"),
    "utf16-bom": ("c.txt", "a cat\n".encode("utf-16"), "c.txt:1 is not valid UTF-8"),
    "utf16-no-bom": ("c.txt", "a cat\na dog\n".encode("utf-16-le"), "holds a NUL character"),
    "nul-line-4": ("c.txt", b"a\nb\nc\nd\x00e\n", "c.txt:4 holds a NUL character"),
    "png-as-captions": ("c.txt", png_bytes(photo()), "is not valid UTF-8"),
    "long-caption-txt": ("c.txt", b"short\n" + b"x" * 10_001 + b"\n", "c.txt:2 is a caption of 10,001 characters"),
    "long-caption-jsonl": ("c.jsonl", b'"a"\n{"caption": "' + b"y" * 20_000 + b'"}\n',
                           "c.jsonl:2 is a caption of 20,000 characters"),
    "jsonl-number": ("c.jsonl", b'"a"\n42\n', "c.jsonl:2 is a JSON number, not a caption"),
    "jsonl-array": ("c.jsonl", b'["a", "b"]\n', "c.jsonl:1 is a JSON array"),
    "jsonl-null": ("c.jsonl", b"null\n", "c.jsonl:1 is a JSON null"),
    "jsonl-bool": ("c.jsonl", b"true\n", "c.jsonl:1 is a JSON boolean"),
    "jsonl-no-field": ("c.jsonl", b'{"url": "x.jpg", "label": 3}\n', 'no "caption" or "text" field (keys: \'url\''),
    "jsonl-caption-number": ("c.jsonl", b'{"caption": 7}\n', '"caption" is a JSON number, expected a string'),
    "jsonl-caption-null": ("c.jsonl", b'{"caption": null, "text": "t"}\n', '"caption" is a JSON null'),
    "jsonl-caption-object": ("c.jsonl", b'{"text": {"en": "a cat"}}\n', '"text" is a JSON object'),
    "jsonl-nan": ("c.jsonl", b'{"caption": "a", "score": NaN}\n', "c.jsonl:1 uses the non-standard constant NaN"),
    "jsonl-infinity": ("c.jsonl", b'"ok"\n{"caption": "a", "w": Infinity}\n', "c.jsonl:2 uses the non-standard constant Infinity"),
    "jsonl-neg-infinity": ("c.jsonl", b'{"caption": "a", "w": [-Infinity]}\n', "constant -Infinity"),
    "jsonl-duplicate-key": ("c.jsonl", b'{"caption": "a", "caption": "b"}\n', "uses the key 'caption' twice"),
    "jsonl-nested-duplicate": ("c.jsonl", b'{"caption": "a", "m": {"k": 1, "k": 2}}\n', "the key 'k' twice"),
    "jsonl-deep-arrays": ("c.jsonl", _deep("[", "]"), "c.jsonl:1 nests JSON too deeply"),
    "jsonl-deep-objects": ("c.jsonl", _deep('{"a":', "}"), "c.jsonl:1 nests JSON too deeply"),
    "jsonl-huge-int": ("c.jsonl", b'{"caption": "a", "n": ' + b"9" * 5000 + b"}\n", "c.jsonl:1 is not valid JSON"),
    "jsonl-broken": ("c.jsonl", b'{"caption": "a"}\n{"caption": \n', "c.jsonl:2 is not valid JSON"),
    "jsonl-trailing-garbage": ("c.jsonl", b'{"caption": "a"} extra\n', "c.jsonl:1 is not valid JSON"),
    "jsonl-lone-surrogate": ("c.jsonl", b'"ok"\n"bad \\ud800 here"\n', "c.jsonl:2 holds an unpaired surrogate"),
    "blank-only": ("c.txt", b"\n  \n\r\n\t\n", "holds no captions"),
    "jsonl-empty-strings": ("c.jsonl", b'""\n{"caption": "   "}\n', "holds no captions"),
    "json-document": ("c.json", b'["a", "b"]', "convert it to .jsonl"),
}


@pytest.mark.parametrize("case", list(BAD_CAPTIONS))
def test_bad_caption_contents(tmp_path, case):
    name, content, match = BAD_CAPTIONS[case]
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CalibrationError) as e:
        read_captions(tmp_path / name)
    assert match in str(e.value)


GOOD_CAPTIONS = {
    "crlf": ("c.txt", b"a cat\r\n\r\n a dog \r\n", ["a cat", "a dog"]),
    "utf8-bom": ("c.txt", "\ufeffcafé\nnaïve\n".encode(), ["café", "naïve"]),
    "line-separator-inside-txt": ("c.txt", "a\u2028b\nc\x85d\n".encode(), ["a\u2028b", "c\x85d"]),
    "line-separator-inside-jsonl": ("c.jsonl", '"a\u2028b"\n{"caption": "c\u2029d"}\n'.encode(),
                                    ["a\u2028b", "c\u2029d"]),
    "jsonl-mixed": ("c.jsonl", b'{"caption": " a "}\n{"text": "b"}\n"c"\n\n{"caption": ""}\n'
                               b'{"caption": "d", "text": "ignored"}\n', ["a", "b", "c", "d"]),
    "ndjson": ("c.ndjson", b'{"caption": "x"}\n', ["x"]),
    "surrogate-pair": ("c.jsonl", b'"\\ud83d\\ude00 smile"\n', ["\U0001F600 smile"]),
    "at-the-length-bound": ("c.txt", b"z" * 10_000 + b"\n", ["z" * 10_000]),
    "no-trailing-newline": ("c.txt", b"one\ntwo", ["one", "two"]),
    "unknown-suffix-is-text": ("captions", b'{"caption": "x"}\n', ['{"caption": "x"}']),
}


@pytest.mark.parametrize("case", list(GOOD_CAPTIONS))
def test_good_caption_contents(tmp_path, case):
    name, content, want = GOOD_CAPTIONS[case]
    (tmp_path / name).write_bytes(content)
    assert read_captions(tmp_path / name) == want


def _caption_path(kind: str, tmp: Path) -> Path:
    if kind == "fifo":
        os.mkfifo(tmp / "c.txt")
    elif kind == "link-to-fifo":
        os.mkfifo(tmp / "pipe")
        os.symlink(tmp / "pipe", tmp / "c.txt")
    elif kind == "directory":
        (tmp / "c.txt").mkdir()
    elif kind == "sparse-65MiB":
        with open(tmp / "c.txt", "wb") as f:
            f.truncate(D.MAX_CAPTION_FILE_BYTES + 1)  # sparse: no disk, a real size
    elif kind == "dangling-link":
        os.symlink(tmp / "nowhere.txt", tmp / "c.txt")
    elif kind == "dev-null":
        return Path("/dev/null")
    return tmp / "c.txt"


CAPTION_PATHS = {"fifo": "is a FIFO (named pipe), not a regular file",
                 "link-to-fifo": "is a FIFO (named pipe), not a regular file",
                 "directory": "is a directory, not a regular file",
                 "dev-null": "is a character device, not a regular file",
                 "sparse-65MiB": "is larger than 67,108,864 bytes",
                 "missing": "caption file not found",
                 "dangling-link": "caption file not found"}


@pytest.mark.parametrize("kind", list(CAPTION_PATHS))
def test_caption_paths_that_are_not_files(tmp_path, kind):
    with pytest.raises(CalibrationError, match=re.escape(CAPTION_PATHS[kind])):
        read_captions(_caption_path(kind, tmp_path))  # a FIFO must not block: nobody writes to it


def test_caption_count_bound(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "MAX_CAPTIONS", 5)
    (tmp_path / "c.txt").write_text("\n".join("abcde"))
    assert read_captions(tmp_path / "c.txt") == list("abcde")
    (tmp_path / "c.txt").write_text("\n".join("abcdef"))
    with pytest.raises(CalibrationError, match="more than 5 captions"):
        read_captions(tmp_path / "c.txt")


def test_caption_path_argument_type():
    with pytest.raises(CalibrationError, match="caption file must be a path"):
        read_captions(["a cat", "a dog"])


def test_split_arguments(tmp_path, prep):
    for i in range(5):
        (tmp_path / f"{i}.png").write_bytes(png_bytes(photo(seed=i)))
    data = load_images(tmp_path, prep)
    for bad in (1.0, -0.1, float("nan"), "0.2", True):
        with pytest.raises(CalibrationError, match=r"held-out fraction must be a number in \[0, 1\)"):
            data.split(bad)
    with pytest.raises(CalibrationError, match="must be >= 0 to split"):
        data.split(0.2, seed=-1)
    cal, held = data.split(0.4, seed=0)
    assert len(cal) == 3 and len(held) == 2
    assert json.dumps(sorted(map(float, np.concatenate([cal, held]).sum((1, 2, 3))))) == \
        json.dumps(sorted(map(float, data.pixels.sum((1, 2, 3)))))  # a partition of the same images


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.binary(max_size=200),
                 st.lists(st.text(max_size=20), max_size=8).map(lambda ls: "\n".join(ls).encode("utf-8", "surrogatepass"))))
def test_any_txt_bytes_give_the_reference_captions_or_a_typed_error(tmp_path, content):
    path = tmp_path / "fuzz.txt"
    path.write_bytes(content)
    try:
        text = content.decode("utf-8-sig")
        ok = "\x00" not in text
    except UnicodeDecodeError:
        ok = False
    want = [ln.strip() for ln in text.split("\n") if ln.strip()] if ok else []
    if want:
        assert read_captions(path) == want
    else:
        with pytest.raises(CalibrationError, match="UTF-8|NUL|no captions"):
            read_captions(path)
