"""Hostile inputs to the numpy runtime: image files and paths, pixel arrays, texts and token ids.

Every image case is a real file on disk (made with Pillow, then header-patched where a size is
forged) and asserts the typed error and the key part of its message, or the exact pixels of a
reference.  Text cases compare ids with a reference BPE written here (the classic CLIP loop) or
assert the typed error, and bound the time.  Nothing is mocked.
"""
from __future__ import annotations

import io
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from edgeclip.errors import ImageDecodeError, ImageSizeError, InputError, TextTooLongError
from edgeclip.runtime import tokenizer as T
from edgeclip.runtime.preprocess import MAX_ASPECT_RATIO, MAX_FILE_BYTES, Preprocessor, check_pixels, load_image
from edgeclip.runtime.tokenizer import ClipTokenizer, check_token_ids, tokenize
from edgeclip.specs import get_spec

CONFIG = get_spec("tiny").preprocess_config()  # 32 px, bicubic, shortest side + centre crop
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def prep() -> Preprocessor:
    return Preprocessor.from_config(CONFIG)


@pytest.fixture(scope="module")
def clip() -> ClipTokenizer:
    return ClipTokenizer()


def photo(w=40, h=30, mode="RGB", seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


# --------------------------------------------------------------------------- forged headers


def png_size(w, h) -> bytes:
    data = bytearray(encoded(photo(4, 4), "PNG"))
    data[16:24] = struct.pack(">II", w, h)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # the IHDR CRC Pillow checks
    return bytes(data)


def jpeg_size(w, h) -> bytes:
    data = bytearray(encoded(photo(16, 16), "JPEG"))
    at = data.index(b"\xff\xc0")  # baseline start-of-frame: length, precision, height, width
    data[at + 5 : at + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def gif_size(w, h) -> bytes:
    data = bytearray(encoded(photo(4, 4, "P"), "GIF"))
    data[6:10] = struct.pack("<HH", w, h)  # logical screen
    table = 3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0  # global colour table
    at = data.index(b",", 13 + table)  # first image descriptor
    data[at + 5 : at + 9] = struct.pack("<HH", w, h)
    return bytes(data)


def bmp_size(w, h) -> bytes:
    data = bytearray(encoded(photo(4, 4), "BMP"))
    data[18:26] = struct.pack("<ii", w, h)
    return bytes(data)


def tiff_size(w, h) -> bytes:
    data = bytearray(encoded(photo(4, 4), "TIFF"))
    assert data[:2] == b"II"
    ifd = struct.unpack_from("<I", data, 4)[0]
    for i in range(struct.unpack_from("<H", data, ifd)[0]):
        entry = ifd + 2 + 12 * i
        tag, typ = struct.unpack_from("<HH", data, entry)
        if tag in (256, 257):  # ImageWidth, ImageLength
            value = w if tag == 256 else h
            struct.pack_into("<HH" if typ == 3 else "<I", data, entry + 8, *((value, 0) if typ == 3 else (value,)))
    return bytes(data)


# (name, bytes maker, width, height, expected error, key part of its message)
FORGED = []
for _fmt, _make, _big in [("png", png_size, 1_000_000), ("jpeg", jpeg_size, 65_000), ("gif", gif_size, 65_535),
                          ("bmp", bmp_size, 1_000_000), ("tiff", tiff_size, 65_535)]:
    FORGED += [
        (f"{_fmt}-wide", _make, _big, 1, ImageSizeError, "aspect ratio"),
        (f"{_fmt}-tall", _make, 1, _big, ImageSizeError, "aspect ratio"),
        (f"{_fmt}-101to1", _make, 202, 2, ImageSizeError, f"more than {MAX_ASPECT_RATIO}:1"),
        (f"{_fmt}-bomb", _make, 60_000, 60_000, ImageSizeError, "too large"),
    ]
FORGED += [
    ("png-zero-width", png_size, 0, 10, ImageDecodeError, "png-zero-width"),  # Pillow refuses 0 in IHDR
    ("png-zero-both", png_size, 0, 0, ImageDecodeError, "png-zero-both"),
    ("gif-zero", gif_size, 0, 0, ImageDecodeError, "not in a format"),  # Pillow refuses 0 sizes itself
    ("bmp-zero-width", bmp_size, 0, 4, ImageDecodeError, "not in a format"),
    ("bmp-zero-height", bmp_size, 4, 0, ImageDecodeError, "bmp-zero-height"),
    ("tiff-zero", tiff_size, 0, 4, ImageDecodeError, "not in a format"),
    ("bmp-top-down-bomb", bmp_size, 50_000, -50_000, ImageSizeError, "too large"),
    ("png-at-pixel-limit", png_size, 10_000, 9_000, ImageSizeError, "MAX_IMAGE_PIXELS"),  # 90 M > 89.4 M
]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("name,make,w,h,error,key", FORGED, ids=[f[0] for f in FORGED])
def test_forged_dimensions_are_refused_from_the_header(tmp_path, prep, name, make, w, h, error, key):
    path = tmp_path / f"{name}.img"
    path.write_bytes(make(w, h))
    t0 = time.perf_counter()
    with pytest.raises(error) as info:
        prep(str(path))
    assert time.perf_counter() - t0 < 2.0  # nothing was decoded
    assert type(info.value) is error and key in str(info.value)
    with pytest.raises(error):
        load_image(path.read_bytes())  # the same bytes from memory


# --------------------------------------------------------------------------- broken files

TRUNCATABLE = {"png": "PNG", "jpeg": "JPEG", "gif": "GIF", "bmp": "BMP", "tiff": "TIFF", "webp": "WEBP"}


@pytest.mark.parametrize("cut", ["half", "header-only"])
@pytest.mark.parametrize("fmt", sorted(TRUNCATABLE))
def test_truncated_files_are_decode_errors(tmp_path, fmt, cut):
    data = encoded(photo(64, 48), TRUNCATABLE[fmt])
    path = tmp_path / f"cut.{fmt}"
    path.write_bytes(data[: len(data) // 2] if cut == "half" else data[:20])
    with pytest.raises(ImageDecodeError) as info:
        load_image(path)
    assert "cut." + fmt in str(info.value)
    assert "truncated or corrupt" in str(info.value) or "not in a format" in str(info.value)


@pytest.mark.parametrize("fmt,ext", [("PNG", "jpg"), ("JPEG", "png"), ("BMP", "gif"), ("GIF", "txt")])
def test_wrong_extension_reads_the_real_format(tmp_path, fmt, ext):
    img = photo(24, 18, "P" if fmt == "GIF" else "RGB")
    data = encoded(img, fmt)
    (tmp_path / f"right.{fmt.lower()}").write_bytes(data)
    (tmp_path / f"wrong.{ext}").write_bytes(data)
    want = np.asarray(load_image(tmp_path / f"right.{fmt.lower()}"))
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / f"wrong.{ext}")), want)
    assert want.shape == (18, 24, 3)


def _white_composite(rgba: np.ndarray) -> np.ndarray:
    white = Image.new("RGBA", (rgba.shape[1], rgba.shape[0]), (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, Image.fromarray(rgba, "RGBA")).convert("RGB"))


def _modes():
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    grey16 = rng.integers(0, 65536, (20, 30), dtype=np.uint16)
    rgba = np.dstack([rgb, rng.integers(0, 256, (20, 30), dtype=np.uint8)])
    bits = rng.integers(0, 2, (20, 30)).astype(bool)
    scaled = ((grey16.astype(np.uint32) * 2 + 257) // 514).astype(np.uint8)  # round(v / 257)
    pal = Image.fromarray(rgb).quantize(16)
    return {
        "png-16bit": (Image.fromarray(grey16), "PNG", np.repeat(scaled[..., None], 3, 2)),
        "tiff-16bit": (Image.fromarray(grey16), "TIFF", np.repeat(scaled[..., None], 3, 2)),
        "png-palette": (pal, "PNG", np.asarray(pal.convert("RGB"))),
        "gif-palette": (pal, "GIF", np.asarray(pal.convert("RGB"))),
        "png-rgba": (Image.fromarray(rgba, "RGBA"), "PNG", _white_composite(rgba)),
        "png-la": (Image.fromarray(rgba, "RGBA").convert("LA"), "PNG",
                   _white_composite(np.asarray(Image.fromarray(rgba, "RGBA").convert("LA").convert("RGBA")))),
        "png-1bit": (Image.fromarray(bits), "PNG", np.repeat(bits[..., None].astype(np.uint8) * 255, 3, 2)),
        "bmp-1bit": (Image.fromarray(bits), "BMP", np.repeat(bits[..., None].astype(np.uint8) * 255, 3, 2)),
        "tiff-cmyk": (Image.fromarray(rgb).convert("CMYK"), "TIFF", np.asarray(Image.fromarray(rgb).convert("CMYK").convert("RGB"))),
        "png-grey": (Image.fromarray(rgb[..., 0]), "PNG", np.repeat(rgb[..., :1], 3, 2)),
        "tiff-rgb": (Image.fromarray(rgb), "TIFF", rgb),
        "bmp-rgb": (Image.fromarray(rgb), "BMP", rgb),
    }


MODES = _modes()


@pytest.mark.parametrize("name", sorted(MODES))
def test_colour_modes_give_the_reference_pixels(tmp_path, name):
    img, fmt, want = MODES[name]
    path = tmp_path / f"{name}.{fmt.lower()}"
    img.save(path, fmt)
    got = np.asarray(load_image(path))
    assert got.dtype == np.uint8 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.fromarray(np.full((10, 12, 3), v, np.uint8)).convert("P") for v in (10, 200, 90)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(path) as check:
        assert check.n_frames == 3
    np.testing.assert_array_equal(np.asarray(load_image(path)), np.asarray(frames[0].convert("RGB")))


def test_cmyk_jpeg_matches_pillow_conversion(tmp_path):
    img = photo(20, 20, "CMYK")
    path = tmp_path / "cmyk.jpg"
    img.save(path, "JPEG", quality=95)
    with Image.open(path) as ref:
        want = np.asarray(ref.convert("RGB"))
    np.testing.assert_array_equal(np.asarray(load_image(path)), want)


# --------------------------------------------------------------------------- paths that are not files


@pytest.fixture()
def alarm():
    """Fail instead of hanging forever if a path blocks (the FIFO bug)."""
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("load_image blocked"))
    signal.alarm(10)
    yield
    signal.alarm(0)


def _special(tmp_path: Path, kind: str) -> str:
    good = tmp_path / "good.png"
    photo().save(good)
    if kind == "fifo":
        os.mkfifo(tmp_path / "pipe.png")
        return str(tmp_path / "pipe.png")
    if kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(tmp_path / "sock.png"))
        return str(tmp_path / "sock.png")
    links = {"link-to-zero": "/dev/zero", "link-to-dir": str(tmp_path), "link-to-fifo": None,
             "broken-link": str(tmp_path / "gone.png")}
    if kind in links:
        target = links[kind]
        if target is None:
            os.mkfifo(tmp_path / "p2")
            target = str(tmp_path / "p2")
        os.symlink(target, tmp_path / f"{kind}.png")
        return str(tmp_path / f"{kind}.png")
    return {"dir": str(tmp_path), "dev-zero": "/dev/zero", "dev-urandom": "/dev/urandom",
            "dev-null": "/dev/null"}[kind]


SPECIAL = [("fifo", "FIFO"), ("socket", "socket"), ("dir", "directory"), ("dev-zero", "character device"),
           ("dev-urandom", "character device"), ("dev-null", "character device"),
           ("link-to-zero", "character device"), ("link-to-dir", "directory"), ("link-to-fifo", "FIFO"),
           ("broken-link", "not found")]


@pytest.mark.parametrize("kind,key", SPECIAL, ids=[k for k, _ in SPECIAL])
def test_only_regular_files_are_read(tmp_path, alarm, prep, kind, key):
    path = _special(tmp_path, kind)
    with pytest.raises(ImageDecodeError) as info:
        load_image(path)
    assert key in str(info.value) and repr(path) in str(info.value)
    with pytest.raises(ImageDecodeError):
        prep([str(tmp_path / "good.png"), path])  # in a batch too


def test_symlink_to_a_regular_image_is_read(tmp_path):
    photo().save(tmp_path / "real.png")
    os.symlink(tmp_path / "real.png", tmp_path / "alias.png")
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "alias.png")), np.asarray(photo()))


def test_oversized_file_is_refused_before_reading(tmp_path):
    path = tmp_path / "huge.png"
    with open(path, "wb") as f:  # sparse: costs no disk
        f.write(encoded(photo(), "PNG"))
        f.truncate(MAX_FILE_BYTES + 1)
    with pytest.raises(ImageSizeError, match="larger than 256 MiB"):
        load_image(path)


@pytest.mark.parametrize("size", [(0, 0), (0, 5), (5, 0)])
def test_empty_pil_images_are_size_errors(prep, size):
    with pytest.raises(ImageSizeError, match="empty"):
        prep(Image.new("RGB", size))


def test_pil_image_is_checked_before_decoding(tmp_path):
    path = tmp_path / "wide.png"
    path.write_bytes(png_size(1_000_000, 1))
    lazy = Image.open(path)  # not decoded yet
    with pytest.raises(ImageSizeError, match="1000000x1"):
        load_image(lazy)
    lazy.close()


# --------------------------------------------------------------------------- bounded work

_BOUNDED = """
import resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
from edgeclip.errors import ImageSizeError
from edgeclip.runtime.preprocess import Preprocessor
from edgeclip.specs import get_spec
p = Preprocessor.from_config(get_spec("tiny").preprocess_config())
t = time.perf_counter()
try:
    p([sys.argv[1]])
except ImageSizeError as e:
    print("REFUSED", time.perf_counter() - t, e)
else:
    print("CLASSIFIED", time.perf_counter() - t)
"""


@pytest.mark.parametrize("w,h", [(1_000_000, 1), (100_000, 1), (1, 1_000_000)])
def test_thin_png_is_refused_fast_under_a_memory_cap(tmp_path, w, h):
    path = tmp_path / "thin.png"
    Image.new("L", (w, h)).save(path)  # real image data, about 1 kB
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    out = subprocess.run([sys.executable, "-c", _BOUNDED, str(path)], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    verdict, seconds, *rest = out.stdout.split(maxsplit=2)
    assert verdict == "REFUSED" and "aspect ratio" in rest[0]
    assert float(seconds) < 2.0


def _reference_crop(img: Image.Image, size: int, resample) -> np.ndarray:
    """The pre-window implementation: resize the whole image, then take transformers' centre."""
    w, h = img.size
    if w <= h:
        tw, th = size, int(size * h / w)
    else:
        tw, th = int(size * w / h), size
    arr = np.asarray(img.resize((tw, th), resample) if (tw, th) != (w, h) else img)
    top, left = (th - size) // 2, (tw - size) // 2
    return arr[top : top + size, left : left + size]


@pytest.mark.parametrize("interp", ["bicubic", "bilinear", "lanczos"])
def test_window_resize_gives_the_same_pixels_as_the_full_resize(interp):
    rng = np.random.default_rng(7)
    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "lanczos": Image.LANCZOS}[interp]
    for size in (32, 224):
        p = Preprocessor.from_config(dict(CONFIG, image_size=size, interpolation=interp))
        for _ in range(25):
            short = int(rng.integers(2, 120))
            long = int(short * rng.uniform(1.0, MAX_ASPECT_RATIO))
            w, h = (long, short) if rng.random() < 0.5 else (short, long)
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            np.testing.assert_array_equal(p.resize_and_crop(img), _reference_crop(img, size, resample),
                                          err_msg=f"{w}x{h} -> {size} {interp}")


# --------------------------------------------------------------------------- arrays


ARRAYS = [
    ("nan", np.full((8, 8, 3), np.nan, np.float32), InputError, "NaN"),
    ("inf", np.full((8, 8), np.inf), InputError, "NaN or infinity"),
    ("minus-inf", np.full((8, 8, 1), -np.inf, np.float16), InputError, "NaN or infinity"),
    ("object", np.full((8, 8, 3), None, object), InputError, "dtype object"),
    ("complex", np.zeros((8, 8, 3), np.complex64), InputError, "dtype complex64"),
    ("strings", np.full((8, 8), "x"), InputError, "dtype <U1"),
    ("negative-int", np.full((8, 8), -1, np.int64), InputError, "outside 0..255"),
    ("float-255", np.full((8, 8, 3), 255.0), InputError, "[0, 1]"),
    ("empty-rows", np.zeros((0, 8, 3), np.uint8), ImageSizeError, "empty"),
    ("empty-cols", np.zeros((8, 0), np.uint8), ImageSizeError, "empty"),
    ("strip", np.zeros((1, 500, 3), np.uint8), ImageSizeError, "aspect ratio"),
    ("channels-first", np.zeros((3, 16, 16), np.uint8), InputError, "transpose"),
    ("five-d", np.zeros((1, 1, 8, 8, 3), np.uint8), InputError, "5-D"),
    ("two-channels", np.zeros((8, 8, 2), np.uint8), InputError, "(H, W, 3)"),
]


@pytest.mark.parametrize("name,arr,error,key", ARRAYS, ids=[a[0] for a in ARRAYS])
def test_bad_image_arrays(prep, name, arr, error, key):
    with pytest.raises(error) as info:
        prep(arr)
    assert isinstance(info.value, error) and key in str(info.value)


GOOD_NCHW = np.zeros((2, 3, 32, 32), np.float32)


def _with(value, at=(1, 2, 5, 7)):
    a = GOOD_NCHW.copy()
    a[at] = value
    return a


PIXELS = [
    ("nan", _with(np.nan), "NaN", "[1, 2, 5, 7]"),
    ("inf", _with(np.inf), "inf", "[1, 2, 5, 7]"),
    ("minus-inf", _with(-np.inf, (0, 0, 0, 0)), "-inf", "[0, 0, 0, 0]"),
    ("float64", GOOD_NCHW.astype(np.float64), "float32", "float64"),
    ("float16", GOOD_NCHW.astype(np.float16), "float32", "float16"),
    ("uint8", GOOD_NCHW.astype(np.uint8), "float32", "uint8"),
    ("object", GOOD_NCHW.astype(object), "float32", "object"),
    ("list", GOOD_NCHW.tolist(), "numpy array", "list"),
    ("nhwc", GOOD_NCHW.transpose(0, 2, 3, 1).copy(), "(N, 3, 32, 32)", "(2, 32, 32, 3)"),
    ("three-d", GOOD_NCHW[0], "(N, 3, 32, 32)", "(3, 32, 32)"),
    ("five-d", GOOD_NCHW[None], "(N, 3, 32, 32)", "(1, 2, 3, 32, 32)"),
    ("wrong-size", np.zeros((1, 3, 31, 32), np.float32), "(N, 3, 32, 32)", "(1, 3, 31, 32)"),
    ("four-channels", np.zeros((1, 4, 32, 32), np.float32), "(N, 3, 32, 32)", "(1, 4, 32, 32)"),
    ("no-images", np.zeros((0, 3, 32, 32), np.float32), "no image", "(0, 3, 32, 32)"),
]


@pytest.mark.parametrize("name,pixels,key,detail", PIXELS, ids=[p[0] for p in PIXELS])
def test_check_pixels_refuses(name, pixels, key, detail):
    with pytest.raises(InputError) as info:
        check_pixels(pixels, ["batch", 3, 32, 32])
    assert key in str(info.value) and detail in str(info.value)


@pytest.mark.parametrize("shape", [(None, 3, 32, 32), ("N", 3, 32, 32), (2, 3, None, None)])
def test_check_pixels_accepts_good_input(prep, shape):
    pixels = prep([photo(), photo(seed=1)])
    assert check_pixels(pixels, shape) is pixels
    with pytest.raises(InputError, match="NaN"):
        check_pixels(np.where(pixels > 1, np.nan, pixels).astype(np.float32), shape)


# --------------------------------------------------------------------------- texts


def reference_bpe(tok: ClipTokenizer, word: str) -> tuple[int, ...]:
    """OpenAI CLIP's loop: merge every occurrence of the lowest-ranked pair, left to right."""
    symbols = list(T._byte_encode(word))
    symbols[-1] += "</w>"
    while len(symbols) > 1:
        pairs = set(zip(symbols, symbols[1:]))
        best = min(pairs, key=lambda p: tok.bpe_ranks.get(p, float("inf")))
        if best not in tok.bpe_ranks:
            break
        out, i = [], 0
        while i < len(symbols):
            if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                out.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                out.append(symbols[i])
                i += 1
        symbols = out
    return tuple(tok.encoder[s] for s in symbols)


def reference_encode(tok: ClipTokenizer, text: str) -> list[int]:
    return [i for w in tok._pattern.findall(T._clean(text)) for i in reference_bpe(tok, w)]


WORDS = st.text(alphabet=st.sampled_from("aabeilnorst'-é日ß😀\u0301"), min_size=1, max_size=40) | st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30)


@settings(max_examples=300, deadline=None)
@given(WORDS)
def test_heap_bpe_equals_the_reference_loop(word):
    tok = _CLIP
    assert tok._bpe(word) == reference_bpe(tok, word)


_CLIP = ClipTokenizer()

ADVERSARIAL_WORDS = ["a" * 500, "ab" * 300, "abc" * 200, "aab" * 150, "lol" * 200, "😀" * 100, "日本" * 150,
                     "é" * 300, "!?" * 200, "the" * 150, "ssss", "x"]


@pytest.mark.parametrize("word", ADVERSARIAL_WORDS, ids=[f"{w[:6]}x{len(w)}" for w in ADVERSARIAL_WORDS])
def test_heap_bpe_on_repetitive_words(clip, word):
    assert clip._bpe(word) == reference_bpe(clip, word)


ODD_TEXTS = {
    "nul": "a\x00photo of a cat",
    "lone-surrogate": "a photo\ud800 of a cat",
    "surrogate-pair": "cat \ud83d\ude00",
    "controls": "\x07\x1b[31mred\x1b[0m \x7f car",
    "rtl-marks": "\u202ea photo\u200f of\u061c a cat\u202c",
    "zero-width": "a\u200bphoto\ufeff of a cat",
    "combining-zalgo": "c" + "\u0301\u0316" * 40 + "at",
    "mixed-scripts": "фото кошки 猫の写真 صورة قطة",
    "amp-chain": "&" + "amp;" * 40 + "lt;b",
    "only-space": " \t\n\r ",
}


@pytest.mark.parametrize("name", sorted(ODD_TEXTS))
def test_odd_texts_tokenize_like_the_reference(clip, name):
    text = ODD_TEXTS[name]
    ids = reference_encode(clip, text)
    if len(ids) > 75:  # the Zalgo text: compare the truncated row
        ids = ids[:75]
        with pytest.warns(UserWarning, match="truncated"):
            row = clip([text], truncate=True)[0]
    else:
        row = clip([text])[0]
    assert row.tolist()[: len(ids) + 2] == [clip.sot_token_id, *ids, clip.eot_token_id]
    assert not row[len(ids) + 2 :].any()


def test_nested_entities_collapse_like_the_fixed_point(clip):
    for k in range(1, 12):
        assert clip.encode("x &" + "amp;" * k + "lt;") == clip.encode("x <")
        assert clip.encode("&" + "#38;" * k + "amp;gt;") == clip.encode(">")


BAD_TEXTS = [None, 3, 2.5, b"bytes", bytearray(b"x"), ["ok", None], ["ok", 3], ("a", b"b"), [["nested"]],
             {"a": 1}, {"set"}, np.array(["a", "b"])]


@pytest.mark.parametrize("bad", BAD_TEXTS, ids=[f"{type(b).__name__}{i}" for i, b in enumerate(BAD_TEXTS)])
def test_non_string_texts_are_input_errors(bad):
    with pytest.raises(InputError) as info:
        tokenize(bad)
    assert "str" in str(info.value)


def test_empty_list_and_lone_string():
    assert tokenize([]).shape == (0, 77)
    np.testing.assert_array_equal(tokenize("a cat"), tokenize(["a cat"]))


HUGE = {
    "100kB-word": "x" * 100_000,
    "1e6-combining": "a" + "\u0301" * 1_000_000,
    "400k-alternating-marks": "a" + "\u0301\u0316" * 200_000,
    "100kB-base64ish": "QUJD" * 25_000,
}


@pytest.mark.parametrize("truncate", [True, False])
@pytest.mark.parametrize("name", sorted(HUGE))
def test_huge_words_are_refused_fast(clip, name, truncate):
    t0 = time.perf_counter()
    with pytest.raises(TextTooLongError) as info:
        clip([HUGE[name]], truncate=truncate)
    assert time.perf_counter() - t0 < 5.0
    assert "texts[0]" in str(info.value) and f"{T.MAX_WORD_BYTES}-byte limit" in str(info.value)


def test_long_text_truncates_early_with_identical_ids(clip):
    words = "a photo of a big red cat on the mat ".split()
    text = " ".join(words * 12_000)  # ~400 kB
    t0 = time.perf_counter()
    with pytest.warns(UserWarning, match="truncated"):
        row = clip([text], truncate=True)
    assert time.perf_counter() - t0 < 5.0
    want = [clip.sot_token_id, *reference_encode(clip, " ".join(words * 10))[:75], clip.eot_token_id]
    assert row[0].tolist() == want
    with pytest.raises(TextTooLongError, match="more than"):
        clip([text])


def test_amp_chain_is_linear(clip):
    t0 = time.perf_counter()
    assert clip.encode("&" + "amp;" * 100_000) == clip.encode("&")
    assert time.perf_counter() - t0 < 5.0


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    tk = pytest.importorskip("tokenizers")
    from edgeclip.runtime.tokenizer import HFTokenizer

    tok = tk.Tokenizer(tk.models.WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "cat": 4}, unk_token="<unk>"))
    tok.pre_tokenizer = tk.pre_tokenizers.Whitespace()
    tok.post_processor = tk.processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tok.save(str(path))
    return HFTokenizer(path, context_length=8)


@pytest.mark.parametrize("text,truncate,want", [
    ("x" * 100_000, True, [2, 1, 0, 0, 0, 0, 0, 0]),
    ("x" * 100_000, False, [2, 1, 0, 0, 0, 0, 0, 0]),
    ("a cat " * 20_000, True, [3, 4, 3, 4, 3, 4, 3, 1]),
    ("a cat " * 20_000, False, TextTooLongError),
    ("a\ud800cat", False, InputError),
    ("a\x00 cat", False, [3, 2, 4, 1, 0, 0, 0, 0]),  # a, <unk> for the NUL, cat
])
def test_hf_tokenizer_hostile_texts(hf, text, truncate, want):
    t0 = time.perf_counter()
    if isinstance(want, type):
        with pytest.raises(want) as info:
            hf([text], truncate=truncate)
        assert "texts[0]" in str(info.value) or "truncate=True" in str(info.value)
    else:
        with pytest.warns(UserWarning) if truncate and want[-1] == 1 else _nothing():
            assert hf([text], truncate=truncate)[0].tolist() == want
    assert time.perf_counter() - t0 < 5.0


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------- token ids

IDS = [
    ("negative", np.array([[49406, -1, 49407]]), "token id -1 at [0, 1]"),
    ("vocab-size", np.array([[49406, 49408]]), "token id 49408 at [0, 1]"),
    ("huge-uint", np.array([[2**63]], np.uint64), "outside the vocabulary"),
    ("float", np.zeros((1, 5), np.float32), "integer dtype"),
    ("bool", np.zeros((1, 5), bool), "integer dtype"),
    ("object", np.zeros((1, 5), object), "integer dtype"),
    ("one-d", np.zeros(5, np.int64), "2-D"),
    ("three-d", np.zeros((1, 1, 5), np.int64), "2-D"),
    ("no-rows", np.zeros((0, 5), np.int64), "no rows"),
    ("no-columns", np.zeros((2, 0), np.int64), "0 positions"),
    ("too-long", np.zeros((1, 78), np.int64), "78 positions"),
    ("list", [[1, 2, 3]], "numpy integer array"),
]


@pytest.mark.parametrize("name,ids,key", IDS, ids=[i[0] for i in IDS])
def test_check_token_ids_refuses(name, ids, key):
    with pytest.raises(InputError) as info:
        check_token_ids(ids, 49408, 77)
    assert key in str(info.value)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint16])
def test_check_token_ids_accepts_tokenizer_output(dtype):
    ids = tokenize(["a photo of a cat", "dog"]).astype(dtype)
    out = check_token_ids(ids, 49408, 77)
    assert out.dtype == np.int64 and (out == ids).all()
