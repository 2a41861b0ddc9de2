"""edgeclip.runtime.preprocess: loading, colour modes, geometry and parity with transformers.

The reference is transformers' PIL/numpy image processors (``CLIPImageProcessorPil`` /
``SiglipImageProcessorPil``; in transformers 4.x the plain ``CLIPImageProcessor`` is
that same PIL implementation).  The torchvision-backed processors of transformers 5
resize with torch, not Pillow, so they are not the bit-exact reference.

Both sides are fed the same file / PIL image.  Because edgeclip resizes with the same
Pillow call and normalises through a lookup table computed the way transformers
computes it, real photos agree to float32 rounding (observed: 0.0); the contract
with the runtime backends is 1e-2, and ``EXACT`` below is the tighter bound asserted.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from edgeclip.errors import ImageDecodeError, ImageSizeError, InputError, SpecError
from edgeclip.runtime.preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    Preprocessor,
    _center_crop,
    _shortest_edge_size,
    load_image,
    preprocess,
)

transformers = pytest.importorskip("transformers")
skimage = pytest.importorskip("skimage")

CONTRACT = 1e-2  # max abs error the spec allows against transformers
EXACT = 1e-5  # what we actually get when both sides see the same 8-bit RGB pixels

# Files scikit-image ships inside its wheel (the rest of skimage.data is downloaded
# on first use, which this offline test must not do).
SKIMAGE_DIR = os.path.join(os.path.dirname(skimage.__file__), "data")
BUNDLED = [
    "astronaut.png",  # RGB 512x512
    "coffee.png",  # RGB 600x400 landscape
    "chelsea.png",  # RGB 451x300
    "rocket.jpg",  # RGB JPEG 427x640 portrait
    "camera.png",  # L (grayscale)
    "coins.png",  # L, odd size 384x303
    "horse.png",  # RGBA (alpha)
    "logo.png",  # RGBA (alpha)
    "hubble_deep_field.jpg",  # large JPEG
    "motorcycle_left.png",
    "microaneurysms.png",  # L 102x102: smaller than the crop
    "color.png",
]
BUNDLED = [f for f in BUNDLED if os.path.exists(os.path.join(SKIMAGE_DIR, f))]


def _hf_classes():
    try:
        from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil
    except ImportError:  # transformers 4.x: the default processors are the PIL ones
        from transformers import CLIPImageProcessor as CLIPImageProcessorPil
        from transformers import SiglipImageProcessor as SiglipImageProcessorPil
    return CLIPImageProcessorPil, SiglipImageProcessorPil


CLIPPil, SiglipPil = _hf_classes()


def hf_clip(size=224, crop=None, resample=3):
    crop = crop or (size, size)
    return CLIPPil(
        size={"shortest_edge": size},
        crop_size={"height": crop[0], "width": crop[1]},
        resample=resample,
    )


def hf_run(processor, image) -> np.ndarray:
    out = processor(image, return_tensors="np")["pixel_values"]
    return np.asarray(out, dtype=np.float32)


def max_err(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def sk(name: str) -> str:
    return os.path.join(SKIMAGE_DIR, name)


def open_loaded(path) -> Image.Image:
    img = Image.open(path)
    img.load()
    return img


CLIP_224 = {"image_size": 224, "mean": list(OPENAI_CLIP_MEAN), "std": list(OPENAI_CLIP_STD),
            "resize": "shortest", "interpolation": "bicubic", "crop": "center"}
CLIP_336 = dict(CLIP_224, image_size=336)


@pytest.fixture(scope="module")
def clip224():
    return hf_clip(224)


@pytest.fixture(scope="module")
def clip336():
    return hf_clip(336)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return open_loaded(sk("chelsea.png"))


# --------------------------------------------------------------------- 1. real photos


def test_bundled_photos_exist():
    # the parity tests below are only meaningful if the photos are really there
    assert {"astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "camera.png"} <= set(BUNDLED)


@pytest.mark.parametrize("name", BUNDLED)
@pytest.mark.parametrize("size", [224, 336])
def test_clip_parity_bundled_photos(name, size, clip224, clip336):
    hf = clip224 if size == 224 else clip336
    cfg = CLIP_224 if size == 224 else CLIP_336
    ours = preprocess(sk(name), cfg)
    ref = hf_run(hf, open_loaded(sk(name)))
    assert ours.shape == (1, 3, size, size) and ours.dtype == np.float32
    assert ours.flags["C_CONTIGUOUS"]
    err = max_err(ours, ref)
    assert err <= EXACT, f"{name}@{size}: max abs err {err:.3g} vs CLIPImageProcessor"


def _crops():
    """Non-square, portrait and tiny variants cut from real photos."""
    astro = open_loaded(sk("astronaut.png"))
    coffee = open_loaded(sk("coffee.png"))
    camera = open_loaded(sk("camera.png"))
    return {
        "portrait_300x500": astro.crop((100, 0, 400, 500)),
        "tall_strip_41x512": astro.crop((200, 0, 241, 512)),
        "wide_strip_600x37": coffee.crop((0, 150, 600, 187)),
        "odd_333x225": coffee.crop((11, 13, 344, 238)),
        "gray_portrait_201x399": camera.crop((50, 60, 251, 459)),
        "tiny_97x61": coffee.crop((250, 150, 347, 211)),
        "tiny_5x3": astro.crop((250, 250, 255, 253)),
        "single_pixel": astro.crop((10, 10, 11, 11)),
        "exactly_224": astro.crop((0, 0, 224, 224)),
        "short_side_224": coffee.crop((0, 0, 300, 224)),
    }


@pytest.mark.parametrize("size", [224, 336])
def test_clip_parity_crops_and_tiny_images(size, clip224, clip336):
    hf = clip224 if size == 224 else clip336
    cfg = CLIP_224 if size == 224 else CLIP_336
    errs = {}
    for label, img in _crops().items():
        ours = preprocess(img, cfg)
        ref = hf_run(hf, img)
        errs[label] = max_err(ours, ref)
    assert max(errs.values()) <= EXACT, errs


def test_clip_parity_padding_when_crop_exceeds_resize(photo):
    # shortest edge 200 < crop 224: transformers pads with zeros (before normalising)
    cfg = dict(CLIP_224, resize_size=200)
    ours = preprocess(photo, cfg)
    ref = hf_run(hf_clip(200, crop=(224, 224)), photo)
    assert max_err(ours, ref) <= EXACT
    # the padded border really is "black" after normalisation: (0 - mean) / std
    border = ours[0, :, :, 0]  # chelsea is landscape -> 200 rows, so padding on top/bottom
    top_row = ours[0, :, 0, :]
    expected = (-np.asarray(OPENAI_CLIP_MEAN) / np.asarray(OPENAI_CLIP_STD)).astype(np.float32)
    np.testing.assert_allclose(top_row, np.broadcast_to(expected[:, None], top_row.shape), rtol=1e-6)
    assert not np.allclose(border, expected[:, None])  # the left column holds the photo


def test_clip_parity_non_square_crop(photo):
    p = Preprocessor.from_config(dict(CLIP_224, image_size=[224, 160]))
    assert p.shortest_edge == 224
    ours = p([photo, photo.transpose(Image.Transpose.TRANSPOSE)])
    assert ours.shape == (2, 3, 224, 160)
    for i, img in enumerate([photo, photo.transpose(Image.Transpose.TRANSPOSE)]):
        ref = hf_run(hf_clip(224, crop=(224, 160)), img)
        assert max_err(ours[i : i + 1], ref) <= EXACT


def test_clip_parity_bilinear(photo):
    ours = preprocess(photo, dict(CLIP_224, interpolation="bilinear"))
    ref = hf_run(hf_clip(224, resample=2), photo)
    assert max_err(ours, ref) <= EXACT
    # and the filter matters, so this comparison could fail
    assert max_err(preprocess(photo, CLIP_224), ref) > 1e-3


# --------------------------------------------------------------------- 2. colour modes


@pytest.fixture(scope="module")
def base_rgb() -> np.ndarray:
    """A 160x120 crop of a real photo with a smooth alpha ramp available."""
    return np.asarray(open_loaded(sk("astronaut.png")).crop((150, 40, 310, 160)))


def _alpha(shape) -> np.ndarray:
    h, w = shape[:2]
    ramp = np.linspace(0, 255, w, dtype=np.float64)[None, :].repeat(h, 0)
    ramp[: h // 4] = 0  # fully transparent band
    return ramp.astype(np.uint8)


def _make_mode_files(tmp_path, rgb: np.ndarray) -> dict[str, str]:
    rgb_img = Image.fromarray(rgb)
    files = {}

    def save(label, img, ext, **kw):
        path = str(tmp_path / f"{label}.{ext}")
        img.save(path, **kw)
        files[label] = path

    gray = rgb_img.convert("L")
    save("L_png", gray, "png")
    save("L_jpeg", gray, "jpg", quality=90)
    save("LA_png", Image.merge("LA", (gray, Image.fromarray(_alpha(rgb.shape)))), "png")
    pal = rgb_img.quantize(64)
    save("P_png", pal, "png")
    save("P_gif", pal, "gif")
    save("P_transparent_png", pal, "png", transparency=int(np.asarray(pal)[0, 0]))
    save("P_transparent_gif", pal, "gif", transparency=int(np.asarray(pal)[5, 5]))
    rgba = np.dstack([rgb, _alpha(rgb.shape)])
    save("RGBA_png", Image.fromarray(rgba), "png")
    save("RGBA_tiff", Image.fromarray(rgba), "tif")
    save("RGB_jpeg", rgb_img, "jpg", quality=90)
    save("CMYK_jpeg", rgb_img.convert("CMYK"), "jpg", quality=90)
    save("CMYK_tiff", rgb_img.convert("CMYK"), "tif")
    bw = gray.convert("1")
    save("1_png", bw, "png")
    save("1_tiff", bw, "tif")
    return files


MODE_LABELS = ["L_png", "L_jpeg", "LA_png", "P_png", "P_gif", "P_transparent_png",
               "P_transparent_gif", "RGBA_png", "RGBA_tiff", "RGB_jpeg", "CMYK_jpeg",
               "CMYK_tiff", "1_png", "1_tiff"]


def test_every_colour_mode_matches_clip_processor(tmp_path, base_rgb, clip224):
    files = _make_mode_files(tmp_path, base_rgb)
    assert sorted(files) == sorted(MODE_LABELS)
    seen_modes = set()
    errs = {}
    for label, path in files.items():
        ref_img = open_loaded(path)
        seen_modes.add(ref_img.mode)
        loaded = load_image(path)
        assert loaded.mode == "RGB" and loaded.size == ref_img.size, label
        errs[label] = max_err(preprocess(path, CLIP_224), hf_run(clip224, ref_img))
    assert {"L", "LA", "P", "RGBA", "RGB", "CMYK", "1"} <= seen_modes, seen_modes
    assert max(errs.values()) <= CONTRACT, errs
    assert max(errs.values()) <= EXACT, errs  # same Pillow conversions -> identical


def test_alpha_is_composited_on_white(tmp_path, base_rgb):
    files = _make_mode_files(tmp_path, base_rgb)
    h = base_rgb.shape[0]
    for label in ("RGBA_png", "LA_png"):
        arr = np.asarray(load_image(files[label]))
        assert (arr[: h // 4] == 255).all(), label  # fully transparent band -> white
        # opaque right edge keeps the photo's colours
        src = base_rgb if label == "RGBA_png" else np.asarray(Image.fromarray(base_rgb).convert("L").convert("RGB"))
        np.testing.assert_allclose(arr[h // 4 :, -1].astype(int), src[h // 4 :, -1].astype(int), atol=1)
    # palette transparency: every pixel using the transparent index turns white
    pal = open_loaded(files["P_transparent_png"])
    idx = pal.info["transparency"]
    mask = np.asarray(pal) == idx
    assert mask.any() and not mask.all()
    arr = np.asarray(load_image(files["P_transparent_png"]))
    assert (arr[mask] == 255).all()
    opaque_rgb = np.asarray(pal.convert("RGB"))
    assert (arr[~mask] == opaque_rgb[~mask]).all()


@pytest.mark.parametrize("ext", ["png", "tif"])
def test_sixteen_bit_is_scaled_not_clipped(tmp_path, base_rgb, clip224, ext):
    # 16-bit grey made from known 8-bit values v as v*257 plus sub-step noise, so the
    # correct 8-bit image is known exactly: round(x / 257) == v.
    gray8 = np.asarray(Image.fromarray(base_rgb).convert("L"))
    rng = np.random.default_rng(0)
    noise = rng.integers(-128, 129, size=gray8.shape)
    gray16 = np.clip(gray8.astype(np.int64) * 257 + noise, 0, 65535).astype(np.uint16)
    path = str(tmp_path / f"gray16.{ext}")
    Image.fromarray(gray16).save(path)
    raw = open_loaded(path)
    assert raw.mode.startswith("I;16") or raw.mode == "I"

    loaded = np.asarray(load_image(path))
    assert loaded.dtype == np.uint8 and loaded.shape == gray8.shape + (3,)
    np.testing.assert_array_equal(loaded[..., 0], gray8)
    np.testing.assert_array_equal(loaded[..., 2], gray8)

    # transformers hands I;16 to Pillow's convert("RGB"), which clips every value above
    # 255 to white; so the reference is transformers on the correctly scaled 8-bit image.
    ours = preprocess(path, CLIP_224)
    ref = hf_run(clip224, Image.fromarray(gray8))
    assert max_err(ours, ref) <= EXACT
    clipped = hf_run(clip224, raw)
    assert max_err(ours, clipped) > 1.0  # the clipping policy really differs

    # same answer for a 32-bit "I" image and a uint16 array
    np.testing.assert_array_equal(np.asarray(load_image(raw.convert("I"))), loaded)
    np.testing.assert_array_equal(np.asarray(load_image(gray16)), loaded)


def test_float_and_int32_modes():
    gray8 = np.arange(256, dtype=np.uint8).reshape(16, 16)
    f01 = Image.fromarray(gray8.astype(np.float32) / 255, mode="F")
    np.testing.assert_array_equal(np.asarray(load_image(f01))[..., 1], gray8)
    f255 = Image.fromarray(gray8.astype(np.float32), mode="F")
    np.testing.assert_array_equal(np.asarray(load_image(f255))[..., 1], gray8)
    i8 = Image.fromarray(gray8.astype(np.int32))
    assert i8.mode == "I"
    np.testing.assert_array_equal(np.asarray(load_image(i8))[..., 0], gray8)


# --------------------------------------------------------------------- 3. SigLIP


SIGLIP = {"image_size": 224, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
          "resize": "squash", "interpolation": "bicubic", "crop": "none"}


def test_siglip_default_filter_is_bicubic():
    from transformers.image_utils import PILImageResampling

    assert SiglipPil().resample == PILImageResampling.BICUBIC


@pytest.mark.parametrize("interp,resample", [("bicubic", 3), ("bilinear", 2)])
def test_siglip_parity_squash(interp, resample):
    hf = SiglipPil(resample=resample)
    cfg = dict(SIGLIP, interpolation=interp)
    errs = {}
    for name in ["coffee.png", "rocket.jpg", "camera.png", "logo.png"]:
        img = open_loaded(sk(name))
        ours = preprocess(img, cfg)
        assert ours.shape == (1, 3, 224, 224)
        errs[name] = max_err(ours, hf_run(hf, img))
    tiny = open_loaded(sk("coffee.png")).crop((0, 0, 31, 7))
    errs["tiny"] = max_err(preprocess(tiny, cfg), hf_run(hf, tiny))
    assert max(errs.values()) <= EXACT, errs


def test_squash_ignores_aspect_ratio_unlike_shortest():
    img = open_loaded(sk("coffee.png"))  # 600x400
    squash = preprocess(img, SIGLIP)
    shortest = preprocess(img, dict(SIGLIP, resize="shortest", crop="center"))
    assert squash.shape == shortest.shape == (1, 3, 224, 224)
    assert max_err(squash, shortest) > 0.5


# --------------------------------------------------------------------- 4. EXIF


def _two_tone(w=64, h=32) -> Image.Image:
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = (255, 0, 0)  # left: red
    arr[:, w // 2 :] = (0, 0, 255)  # right: blue
    return Image.fromarray(arr)


def test_exif_orientation_is_applied(tmp_path):
    img = _two_tone()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = str(tmp_path / "rotated.jpg")
    img.save(path, exif=exif.tobytes(), quality=95)
    assert open_loaded(path).size == (64, 32)  # stored landscape

    out = load_image(path)
    assert out.size == (32, 64)  # displayed portrait
    arr = np.asarray(out).astype(int)
    top, bottom = arr[:28], arr[36:]  # rotated CW: the stored left (red) is now on top
    assert top[..., 0].mean() > 200 and top[..., 2].mean() < 50
    assert bottom[..., 2].mean() > 200 and bottom[..., 0].mean() < 50

    # also for an already opened PIL image, and through the preprocessor
    assert load_image(Image.open(path)).size == (32, 64)
    x = preprocess(path, {"image_size": 16, "resize": "squash", "crop": "none",
                          "mean": [0, 0, 0], "std": [1, 1, 1]})
    assert x[0, 0, :6].mean() > 0.8 and x[0, 0, 10:].mean() < 0.2  # red channel: top only

    # without the tag nothing rotates
    plain = str(tmp_path / "plain.jpg")
    img.save(plain, quality=95)
    assert load_image(plain).size == (64, 32)


# --------------------------------------------------------------------- 5. bad input


@pytest.fixture()
def jpeg_bytes(photo) -> bytes:
    buf = io.BytesIO()
    photo.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_corrupt_files_raise_image_decode_error(tmp_path, jpeg_bytes, photo):
    buf = io.BytesIO()
    photo.save(buf, "PNG")
    cases = {
        "truncated.jpg": jpeg_bytes[: len(jpeg_bytes) // 2],
        "truncated.png": buf.getvalue()[: len(buf.getvalue()) // 2],
        "random.jpg": np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        "empty.png": b"",
        "text.png": b"this is not a png, just some text\n" * 10,
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ImageDecodeError) as info:
            load_image(str(path))
        assert name in str(info.value), (name, str(info.value))
        with pytest.raises(ImageDecodeError):
            preprocess(path, CLIP_224)  # os.PathLike too
    # the lazily raised truncation error is reported as truncated/corrupt
    with pytest.raises(ImageDecodeError, match="truncated or corrupt"):
        load_image(str(tmp_path / "truncated.jpg"))
    with pytest.raises(ImageDecodeError, match="not in a format"):
        load_image(str(tmp_path / "text.png"))


def test_missing_path_and_directory(tmp_path):
    missing = tmp_path / "no_such_photo.jpg"
    with pytest.raises(ImageDecodeError, match="not found.*no_such_photo.jpg"):
        load_image(missing)
    with pytest.raises(ImageDecodeError, match="directory"):
        load_image(str(tmp_path))


def test_corrupt_buffers_and_lazy_pil(tmp_path, jpeg_bytes):
    with pytest.raises(ImageDecodeError):
        load_image(b"\x00\x01garbage" * 50)
    with pytest.raises(ImageDecodeError):
        load_image(b"")
    with pytest.raises(ImageDecodeError):
        load_image(io.BytesIO(jpeg_bytes[:300]))
    # a PIL image opened lazily whose data is truncated fails on our forced load
    path = tmp_path / "cut.jpg"
    path.write_bytes(jpeg_bytes[: len(jpeg_bytes) // 2])
    lazy = Image.open(path)
    with pytest.raises(ImageDecodeError, match="cut.jpg"):
        load_image(lazy)
    lazy.close()


def test_decompression_bomb_is_a_size_error(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10_000 px > 2 * limit -> error
    with pytest.raises(ImageSizeError, match="too large"):
        load_image(path)


@pytest.mark.parametrize(
    "shape",
    [(4, 32, 32), (3, 32, 32), (32, 32, 2), (32, 32, 5), (32,), (1, 2, 32, 32, 3), (0, 32, 3)],
)
def test_wrong_shaped_arrays_raise_input_error(shape):
    arr = np.zeros(shape, np.uint8)
    with pytest.raises(InputError) as info:
        load_image(arr)
    assert not isinstance(info.value, ImageDecodeError)
    assert str(shape[0]) in str(info.value)
    with pytest.raises(InputError):
        preprocess(arr, CLIP_224)


def test_bad_array_values_and_types():
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        load_image(np.full((8, 8, 3), 200.0))
    with pytest.raises(InputError, match="NaN"):
        load_image(np.full((8, 8), np.nan))
    with pytest.raises(InputError, match="0..255"):
        load_image(np.full((8, 8), 300, np.int32))
    with pytest.raises(InputError, match="batch"):
        load_image(np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(InputError):
        preprocess(np.zeros((2, 3, 8, 8), np.uint8), CLIP_224)  # NCHW batch
    with pytest.raises(InputError):
        load_image(12345)
    with pytest.raises(InputError, match="empty"):
        preprocess([], CLIP_224)


def test_array_dtypes():
    v = np.arange(256, dtype=np.uint8).reshape(16, 16)
    np.testing.assert_array_equal(np.asarray(load_image(v))[..., 0], v)
    np.testing.assert_array_equal(np.asarray(load_image(v[..., None]))[..., 2], v)
    # float k/255 rounds back to k (transformers truncates, which loses some levels)
    f = v.astype(np.float32) / np.float32(255)
    np.testing.assert_array_equal(np.asarray(load_image(f))[..., 1], v)
    np.testing.assert_array_equal(np.asarray(load_image(v.astype(np.float64) / 255))[..., 1], v)
    # values between two levels round to the nearest one
    up = np.clip(v.astype(np.float64) + 0.6, 0, 255) / 255
    np.testing.assert_array_equal(np.asarray(load_image(up))[..., 1], np.minimum(v.astype(int) + 1, 255))
    down = (v.astype(np.float64) + 0.4) / 255
    np.testing.assert_array_equal(np.asarray(load_image(np.minimum(down, 1.0)))[..., 1], v)
    u16 = v.astype(np.uint16) * 257
    np.testing.assert_array_equal(np.asarray(load_image(u16))[..., 0], v)
    b = np.asarray(load_image(v > 127))[..., 0]
    assert set(np.unique(b)) == {0, 255}
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255
    out = np.asarray(load_image(rgba))
    assert (out[:2] == (200, 0, 0)).all() and (out[2:] == 255).all()


# --------------------------------------------------------------------- 6. batches


def test_mixed_batch_equals_stacked_singles(tmp_path, photo, jpeg_bytes):
    jpg = tmp_path / "x.jpg"
    jpg.write_bytes(jpeg_bytes)
    gray = open_loaded(sk("camera.png"))
    arr = np.asarray(open_loaded(sk("coffee.png")))
    items = [str(jpg), jpg, gray, arr, jpeg_bytes, io.BytesIO(jpeg_bytes), photo]
    p = Preprocessor.from_config(CLIP_224)
    batch = p(items)
    assert batch.shape == (len(items), 3, 224, 224)
    assert batch.dtype == np.float32 and batch.flags["C_CONTIGUOUS"]
    singles = np.concatenate([p(x if not isinstance(x, io.BytesIO) else io.BytesIO(jpeg_bytes))
                              for x in items])
    np.testing.assert_array_equal(batch, singles)
    np.testing.assert_array_equal(p(tuple(items[:3])), batch[:3])
    assert not np.array_equal(batch[2], batch[3])  # different images differ


def test_numpy_nhwc_batch():
    a = np.asarray(open_loaded(sk("astronaut.png")).crop((0, 0, 300, 200)))
    b = np.asarray(open_loaded(sk("coffee.png")).crop((0, 0, 300, 200)))
    batch = np.stack([a, b])
    out = preprocess(batch, CLIP_224)
    assert out.shape == (2, 3, 224, 224)
    np.testing.assert_array_equal(out[0], preprocess(a, CLIP_224)[0])
    np.testing.assert_array_equal(out[1], preprocess(b, CLIP_224)[0])
    gray_batch = batch[..., :1]
    assert preprocess(gray_batch, CLIP_224).shape == (2, 3, 224, 224)


def test_shortest_without_crop_keeps_aspect_and_refuses_ragged_batches(photo):
    cfg = dict(CLIP_224, crop="none")
    p = Preprocessor.from_config(cfg)
    assert p.output_size is None
    out = p(photo)  # 451x300 -> short side 224, long int(224*451/300) = 336
    assert out.shape == (1, 3, 224, 336)
    with pytest.raises(InputError, match="different sizes"):
        p([photo, open_loaded(sk("camera.png"))])


# --------------------------------------------------------------------- config


def test_config_round_trip():
    for cfg in [CLIP_224, CLIP_336, SIGLIP, dict(CLIP_224, image_size=[224, 160]),
                dict(CLIP_224, resize_size=256, interpolation="bilinear")]:
        p = Preprocessor.from_config(cfg)
        back = p.to_config()
        assert back == cfg
        assert json.loads(json.dumps(back)) == back
        assert Preprocessor.from_config(back) == p
    defaults = Preprocessor.from_config({"image_size": 224})
    assert defaults.to_config() == CLIP_224
    assert Preprocessor.from_config({"image_size": [336, 336]}).to_config()["image_size"] == 336


@pytest.mark.parametrize(
    "bad",
    [
        {},
        {"image_size": 0},
        {"image_size": True},
        {"image_size": [224]},
        {"image_size": 224, "mean": [0.5, 0.5]},
        {"image_size": 224, "std": [0.5, 0.0, 0.5]},
        {"image_size": 224, "resize": "crop"},
        {"image_size": 224, "interpolation": "cubic"},
        {"image_size": 224, "crop": "random"},
        {"image_size": 224, "imagesize": 224},
        {"image_size": 224, "resize": "squash", "resize_size": 256},
    ],
)
def test_bad_configs_raise_spec_error(bad):
    with pytest.raises(SpecError):
        Preprocessor.from_config(bad)


# --------------------------------------------------------------------- geometry helpers


def test_geometry_helpers_match_transformers():
    from transformers.image_transforms import center_crop, get_resize_output_image_size
    from transformers.image_utils import ChannelDimension

    rng = np.random.default_rng(2)
    for _ in range(300):
        h, w = (int(x) for x in rng.integers(1, 700, 2))
        s = int(rng.integers(1, 400))
        dummy = np.empty((h, w, 1), np.uint8)
        ref = get_resize_output_image_size(dummy, s, default_to_square=False,
                                           input_data_format=ChannelDimension.LAST)
        assert _shortest_edge_size(h, w, s) == tuple(ref), (h, w, s)
        ch, cw = (int(x) for x in rng.integers(1, 60, 2))
        small = rng.integers(0, 256, (int(rng.integers(1, 60)), int(rng.integers(1, 60)), 3),
                             dtype=np.uint8)
        ref_crop = center_crop(small, (ch, cw), input_data_format=ChannelDimension.LAST)
        np.testing.assert_array_equal(_center_crop(small, ch, cw), ref_crop)


# --------------------------------------------------------------------- 7. no torch


def test_works_with_torch_blocked(tmp_path, photo):
    path = tmp_path / "p.png"
    photo.save(path)
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # any "import torch" now raises ImportError
        import edgeclip.runtime.preprocess as pp
        x = pp.preprocess({str(path)!r}, {{"image_size": 224}})
        assert x.shape == (1, 3, 224, 224) and str(x.dtype) == "float32", x.shape
        assert sys.modules["torch"] is None
        print("OK", float(x.mean()))
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("OK")
    assert abs(float(res.stdout.split()[1]) - float(preprocess(path, {"image_size": 224}).mean())) < 1e-6
