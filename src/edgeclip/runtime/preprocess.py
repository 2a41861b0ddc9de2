"""Image loading and CLIP-style preprocessing with numpy and Pillow only (never torch).

Two entry points:

* :func:`load_image` turns a path, encoded bytes, a file object, a PIL image or a
  numpy array into an upright 8-bit RGB ``PIL.Image.Image``.
* :class:`Preprocessor` (and the :func:`preprocess` shortcut) turns one image or a
  batch into the float32 ``(N, 3, H, W)`` tensor a CLIP-family vision tower eats.

Its config dict is what model specs and artifact manifests carry::

    {"image_size": 224,                 # int, or [height, width]
     "mean": [0.481, 0.458, 0.408],     # per-channel, on the 0..1 scale
     "std": [0.269, 0.261, 0.276],
     "resize": "shortest",              # "shortest" (CLIP) | "squash" (SigLIP)
     "interpolation": "bicubic",        # "bicubic" | "bilinear" | "nearest" | "lanczos"
     "crop": "center",                  # "center" | "none"
     "resize_size": 224}                # optional: shortest-edge target, "shortest" only

Parity with Hugging Face ``transformers`` (checked by tests/test_preprocess.py):

* ``resize="shortest", crop="center"`` reproduces ``CLIPImageProcessor``: the short
  side goes to ``resize_size`` (default: the crop size; ``max(h, w)`` for a
  non-square crop) and the long side to ``int(resize_size * long / short)``
  (transformers' ``get_resize_output_image_size(default_to_square=False)``, the same
  rule as torchvision ``Resize(int)``), with a Pillow resize of the 8-bit RGB image;
  then the centre crop uses transformers' offsets, zero-padding (before
  normalisation, like transformers) when the resized image is smaller than the crop.
* ``resize="squash"`` reproduces ``SiglipImageProcessor``: a plain resize to
  exactly ``image_size`` (its default filter is bicubic).
* Normalisation is ``(uint8 / 255 - mean) / std`` done through a 256-entry lookup
  table computed exactly the way transformers computes it (float64 rescale, then
  float32 arithmetic), so the result matches bit for bit when the input matches.

Colour policy of :func:`load_image`:

* EXIF orientation is applied (``PIL.ImageOps.exif_transpose``); an unreadable EXIF
  block is ignored and the image kept as stored.
* Transparency (a mode with an alpha band - RGBA, LA, PA, premultiplied RGBa/La -
  or a palette / grey / RGB image with a ``transparency`` entry) is composited onto
  a **white** background, exactly like transformers' ``convert_to_rgb`` does for PIL
  images (``Image.alpha_composite`` over opaque white), so parity holds.  A 4-channel
  numpy array is taken as RGBA and composited the same way.
* 16-bit grey (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``) and ``uint16`` arrays are
  scaled to 8 bits with ``round(v / 257)`` (65535 -> 255, and ``v * 257`` -> ``v``
  exactly).  Pillow's own ``convert`` (which transformers uses) clips instead, which
  turns almost every real 16-bit image white.  32-bit ``I`` images are 8-bit data if
  all values are in 0..255 and 16-bit data (clipped to 0..65535, scaled as above)
  otherwise.
* ``F`` (float) images in [0, 1] are scaled by 255 and rounded; otherwise they are
  taken as 0..255 data, rounded and clipped (Pillow's own rule).
* Float numpy arrays must lie in [0, 1] (they are scaled by 255 and *rounded*;
  transformers truncates); ``bool`` arrays map to 0/255; other integer arrays must
  lie in 0..255.  Arrays are channels-last: ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)``
  or ``(H, W, 4)``.
* Multi-frame files (GIF, TIFF) give their first frame.

Errors: an unreadable file, buffer or PIL image raises
:class:`~edgeclip.errors.ImageDecodeError` naming the source and the problem (missing
path, directory, unknown format, truncated/corrupt data, decompression-bomb limit);
an input of the wrong type, shape or range raises :class:`~edgeclip.errors.InputError`;
a malformed config raises :class:`~edgeclip.errors.SpecError`.
"""
from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps

from .._files import open_regular
from ..errors import ImageDecodeError, ImageSizeError, InputError, SpecError

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "MAX_ASPECT_RATIO",
    "MAX_FILE_BYTES",
    "Preprocessor",
    "check_pixels",
    "load_image",
    "preprocess",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageLike = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, Image.Image, np.ndarray, Any]

_ORIENTATION_TAG = 0x0112
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}
_RESIZE_MODES = ("shortest", "squash")
_CROP_MODES = ("center", "none")
_CONFIG_KEYS = ("image_size", "mean", "std", "resize", "interpolation", "crop", "resize_size")

# Limits checked from the header, before any pixel is decoded (ImageSizeError):
# * a side longer than MAX_ASPECT_RATIO times the other: no camera or screenshot is that
#   thin, and a 1,000,000 x 1 PNG of 1 kB would otherwise decode and resize into gigabytes;
# * more pixels than PIL.Image.MAX_IMAGE_PIXELS (read at call time; Pillow's default is
#   89,478,485; set it to None to lift the limit for trusted images);
# * a side of 0 pixels.
MAX_ASPECT_RATIO = 100
# Image files larger than this are refused before reading (ImageSizeError): a 256 MiB
# photo would decode to far more than any CLIP input needs.
MAX_FILE_BYTES = 256 * 1024 * 1024


# --------------------------------------------------------------------------- loading


def load_image(src: ImageLike) -> Image.Image:
    """Load ``src`` as an upright 8-bit RGB ``PIL.Image.Image``.

    ``src`` may be a path (``str`` / ``os.PathLike``), encoded image bytes
    (``bytes`` / ``bytearray`` / ``memoryview``), a binary file object, a PIL image
    or a numpy array (``(H, W)`` or ``(H, W, C)`` with C in 1, 3, 4; ``uint8``,
    ``uint16`` (scaled to 8 bits), ``bool``, or float in [0, 1]).  See the module
    docstring for the transparency and bit-depth policy.  The result may be the input
    object itself when a PIL image needs no change.
    """
    if isinstance(src, Image.Image):
        name = _pil_name(src)
        _check_dimensions(src.size[0], src.size[1], name)  # before decoding a lazy image
        try:
            src.load()  # a lazily opened image may still fail to decode here
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 - Pillow raises many types on bad data
            raise _decode_error(name, e) from e
        return _to_rgb(_apply_exif_orientation(src))
    if isinstance(src, np.ndarray):
        return _array_to_image(src)
    if isinstance(src, (str, os.PathLike)):
        return _open_path(os.fspath(src))
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        if not data:
            raise ImageDecodeError("image buffer <0 bytes> is empty; nothing to decode")
        _check_file_size(len(data), f"<{len(data)} bytes>")
        return _open(io.BytesIO(data), f"<{len(data)} bytes>")
    if hasattr(src, "read"):
        name = getattr(src, "name", None)
        name = repr(name) if isinstance(name, (str, bytes)) else f"<{type(src).__name__}>"
        return _open(src, name)
    raise InputError(
        f"cannot load an image from a {type(src).__name__}; pass a file path, encoded "
        "image bytes, a binary file object, a PIL.Image.Image or a numpy array"
    )


def _check_dimensions(width: int, height: int, name: str) -> None:
    """Refuse empty, absurdly thin or absurdly large images (see MAX_ASPECT_RATIO)."""
    if width <= 0 or height <= 0:
        raise ImageSizeError(f"image {name} is empty ({width}x{height} pixels); pass a real image")
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageSizeError(
            f"image {name} is {width}x{height} pixels, an aspect ratio of {ratio:.0f}:1; edgeclip "
            f"refuses more than {MAX_ASPECT_RATIO}:1 (such an image is a strip, not a picture, and "
            "resizing it costs gigabytes); crop it to the part you want first"
        )
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise ImageSizeError(
            f"image {name} is {width}x{height} = {width * height:,} pixels, more than the "
            f"{int(limit):,} of PIL.Image.MAX_IMAGE_PIXELS (a decompression bomb guard); downscale "
            "it first, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust it"
        )


def _check_file_size(size: int, name: str) -> None:
    if size > MAX_FILE_BYTES:
        raise ImageSizeError(
            f"image {name} is {size:,} bytes, more than the {MAX_FILE_BYTES:,}-byte limit "
            "(edgeclip.runtime.preprocess.MAX_FILE_BYTES); downscale or recompress it first"
        )


def _open_path(path: str) -> Image.Image:
    """Open only regular files of bounded size (a FIFO would block, /dev/zero never ends)."""
    name = repr(path)
    fd = open_regular(path, ImageDecodeError, "image file", max_bytes=MAX_FILE_BYTES, size_error=ImageSizeError,
                      name=name)
    with os.fdopen(fd, "rb") as f:
        return _open(f, name)


def _pil_name(img: Image.Image) -> str:
    filename = getattr(img, "filename", "")
    return repr(filename) if filename else f"<PIL.Image {img.mode} {img.size[0]}x{img.size[1]}>"


def _decode_error(name: str, e: BaseException) -> InputError:
    # Pillow raises the error past 2x MAX_IMAGE_PIXELS inside Image.open; its warning (past
    # 1x) is an exception too when warnings are errors.  Either is a size refusal.
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return ImageSizeError(
            f"image {name} is too large to decode safely ({e}); downscale it first, or raise "
            "PIL.Image.MAX_IMAGE_PIXELS if you trust it"
        )
    if isinstance(e, Image.UnidentifiedImageError):
        return ImageDecodeError(
            f"image {name} is not in a format Pillow can read (empty, not an image, or an "
            "unsupported format)"
        )
    if isinstance(e, FileNotFoundError):
        return ImageDecodeError(f"image file {name} does not exist; check the path")
    if isinstance(e, PermissionError):
        return ImageDecodeError(f"image file {name} cannot be read: permission denied")
    return ImageDecodeError(
        f"image {name} could not be decoded; it is truncated or corrupt "
        f"({type(e).__name__}: {e})"
    )


def _open(fp: Any, name: str) -> Image.Image:
    try:
        with Image.open(fp) as img:  # reads the header only
            _check_dimensions(img.size[0], img.size[1], name)
            img.load()  # force decoding now: truncation errors are raised lazily
            out = _to_rgb(_apply_exif_orientation(img))
            if out is img:
                out = img.copy()
    except (InputError, KeyboardInterrupt):
        raise
    except MemoryError as e:  # within the limits above only a pathological file gets here
        raise ImageSizeError(f"image {name} needs more memory to decode than is available") from e
    except Exception as e:  # noqa: BLE001 - Pillow raises many types on bad data
        raise _decode_error(name, e) from e
    return out


def _apply_exif_orientation(img: Image.Image) -> Image.Image:
    try:
        orientation = img.getexif().get(_ORIENTATION_TAG, 1)
        if orientation in (2, 3, 4, 5, 6, 7, 8):
            return ImageOps.exif_transpose(img)
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception:  # noqa: BLE001 - a broken EXIF block must not reject the pixels
        pass
    return img


def _has_alpha(img: Image.Image) -> bool:
    bands = img.getbands()
    return "A" in bands or "a" in bands or img.info.get("transparency") is not None


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES:
        return Image.fromarray(_scale16(np.asarray(img))).convert("RGB")
    if mode == "I":
        a = np.asarray(img)
        if a.size and a.min() >= 0 and a.max() <= 255:
            g = a.astype(np.uint8)
        else:
            g = _scale16(np.clip(a, 0, 65535))
        return Image.fromarray(g).convert("RGB")
    if mode == "F":
        a = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0, posinf=255.0, neginf=0.0)
        if a.size and a.min() >= 0.0 and a.max() <= 1.0:
            a = a * 255.0
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8)).convert("RGB")
    if _has_alpha(img):
        try:
            rgba = img.convert("RGBA")
        except (ValueError, OSError) as e:
            raise InputError(f"cannot convert a {mode!r} image to RGBA: {e}") from e
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "RGB":
        return img
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise InputError(f"cannot convert a {mode!r} image to RGB: {e}") from e


def _scale16(a: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255 as round(v / 257), vectorised and exact."""
    a = a.astype(np.uint32)
    return ((a * 2 + 257) // 514).astype(np.uint8)


def _to_uint8(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * np.uint8(255)
    if a.dtype == np.uint16:
        return _scale16(a)
    if np.issubdtype(a.dtype, np.integer):
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 255:
            raise InputError(
                f"integer image array ({a.dtype}) has values in [{lo}, {hi}], outside 0..255; "
                "pass uint8 (0..255), uint16 (0..65535) or float in [0, 1]"
            )
        return a.astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise InputError("float image array contains NaN or infinity")
        lo, hi = float(a.min()), float(a.max())
        if lo < -1e-6 or hi > 1.0 + 1e-6:
            raise InputError(
                f"float image array has values in [{lo:g}, {hi:g}]; float images must be in "
                "[0, 1] (divide 0..255 data by 255, or pass it as uint8)"
            )
        return np.rint(np.clip(a.astype(np.float32), 0.0, 1.0) * np.float32(255.0)).astype(np.uint8)
    raise InputError(
        f"unsupported image array dtype {a.dtype}; use uint8, uint16, bool or float in [0, 1]"
    )


def _array_to_image(a: np.ndarray) -> Image.Image:
    expected = "expected a channels-last image array of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)"
    if a.ndim == 3 and a.shape[-1] not in (1, 3, 4):
        hint = ""
        if a.shape[0] in (1, 3, 4):
            hint = "; it looks channels-first, pass arr.transpose(1, 2, 0)"
        raise InputError(f"{expected}, got shape {a.shape}{hint}")
    if a.ndim == 4:
        raise InputError(
            f"{expected}, got the 4-D shape {a.shape}; a batch (N, H, W, C) goes to "
            "Preprocessor / preprocess, not load_image"
        )
    if a.ndim not in (2, 3):
        raise InputError(f"{expected}, got a {a.ndim}-D array of shape {a.shape}")
    _check_dimensions(a.shape[1], a.shape[0], f"array of shape {a.shape}")
    a = np.ascontiguousarray(_to_uint8(a))
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        return Image.fromarray(a).convert("RGB")
    if a.shape[-1] == 3:
        return Image.fromarray(a)
    rgba = Image.fromarray(a)  # mode RGBA
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


# --------------------------------------------------------------------------- preprocessing


def _center_crop(arr: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """transformers' ``image_transforms.center_crop`` on an (H, W, C) array, same offsets.

    Smaller images are zero-padded (before normalisation) to the crop size.
    """
    h, w = arr.shape[:2]
    top = (h - crop_h) // 2
    left = (w - crop_w) // 2
    bottom, right = top + crop_h, left + crop_w
    if top >= 0 and bottom <= h and left >= 0 and right <= w:
        return arr[top:bottom, left:right]
    new_h, new_w = max(crop_h, h), max(crop_w, w)
    padded = np.zeros((new_h, new_w) + arr.shape[2:], dtype=arr.dtype)
    top_pad = math.ceil((new_h - h) / 2)
    left_pad = math.ceil((new_w - w) / 2)
    padded[top_pad : top_pad + h, left_pad : left_pad + w] = arr
    top, bottom, left, right = top + top_pad, bottom + top_pad, left + left_pad, right + left_pad
    return padded[max(0, top) : min(new_h, bottom), max(0, left) : min(new_w, right)]


def _axis_window(src: int, dst: int, want: int) -> tuple[int, int, int]:
    """Output pixels [start, stop) of one axis of a ``dst``-long resize of ``src`` pixels that
    hold the ``want`` centre pixels (all of them when dst < want: zero-padded later), widened so
    that both ends map to source coordinates ``end * src / dst`` that are exact binary
    fractions.  Pillow takes a box in float32: an inexact box would move every filter tap a
    little and change some output pixels by one level.  Also returns the offset of the
    wanted pixels inside the window."""
    if dst <= want:
        return 0, dst, 0
    start = (dst - want) // 2
    q = dst // math.gcd(src, dst)
    unit = q // (q & -q)  # odd part of q: end * src / dst is a binary fraction iff unit | end
    lo = start // unit * unit
    hi = min(dst, -(-(start + want) // unit) * unit)
    return lo, hi, start - lo


def _crop_window(
    source: tuple[int, int], target: tuple[int, int], crop: tuple[int, int]
) -> list[tuple[int, int, int]]:
    """Per axis (h, w): the exact-box window of a ``target``-sized resize of ``source`` that
    holds what :func:`_center_crop` keeps for ``crop`` (see :func:`_axis_window`)."""
    return [_axis_window(src, dst, want) for src, dst, want in zip(source, target, crop)]


def _pillow_vertical_first(width: int, height: int, target: tuple[int, int]) -> bool:
    """Whether Pillow's own resize of the whole image to ``target`` (h, w) runs its vertical
    pass first.  Pillow >= 13 does when the height shrinks by more than twice the pixels the
    width does; older versions always start with the horizontal pass (their tall-image rule
    needs an aspect ratio past MAX_ASPECT_RATIO).  The order changes the 8-bit rounding
    between the passes, so :func:`_resize_window` must follow it to give the same pixels."""
    if _PILLOW_MAJOR < 13:
        return False
    dy, dx = height - target[0], width - target[1]
    return dy > 0 and dy > 2 * dx


_PILLOW_MAJOR = int(Image.__version__.split(".")[0])
_WINDOW_GAIN = 2  # resize only the crop window once the full resize is this many times bigger


def _resize_window(
    img: Image.Image, target: tuple[int, int], crop: tuple[int, int], resample: int
) -> Image.Image:
    """The part of ``img.resize(target)`` that a centre crop to ``crop`` keeps, computed by
    resizing only (a little more than) that window: two one-axis box resizes, in the order
    Pillow's full resize uses.  Pillow reads a box resize's filter taps from the whole source
    (clipped at the image edges, not at the box), so these are the same pixels; the cost
    follows the crop instead of the resized long side (a 100:1 strip resizes 100x less)."""
    width, height = img.size
    (y_lo, y_hi, y_off), (x_lo, x_hi, x_off) = _crop_window((height, width), target, crop)
    if target[0] * target[1] < _WINDOW_GAIN * (y_hi - y_lo) * (x_hi - x_lo):
        return img.resize((target[1], target[0]), resample=resample)  # little to save
    def horizontal(im: Image.Image) -> Image.Image:
        box = (x_lo * width / target[1], 0, x_hi * width / target[1], im.height)  # exact
        return im.resize((x_hi - x_lo, im.height), resample, box=box)

    def vertical(im: Image.Image) -> Image.Image:
        box = (0, y_lo * height / target[0], im.width, y_hi * height / target[0])
        return im.resize((im.width, y_hi - y_lo), resample, box=box)

    img = horizontal(vertical(img)) if _pillow_vertical_first(width, height, target) else vertical(horizontal(img))
    h, w = min(crop[0], y_hi - y_lo), min(crop[1], x_hi - x_lo)
    return img.crop((x_off, y_off, x_off + w, y_off + h))


def _shortest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    """transformers' ``get_resize_output_image_size(default_to_square=False)`` -> (h, w)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise SpecError(f"preprocess config: {what} must be a positive integer, got {value!r}")
    return int(value)


def _triple(value: Any, what: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool):
        value = [value] * 3
    if not isinstance(value, (list, tuple, np.ndarray)) or len(value) != 3:
        raise SpecError(f"preprocess config: {what} must be 3 numbers (R, G, B), got {value!r}")
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError) as e:
        raise SpecError(f"preprocess config: {what} must be 3 numbers, got {value!r}") from e
    if not all(math.isfinite(v) for v in out):
        raise SpecError(f"preprocess config: {what} must be finite, got {value!r}")
    return out  # type: ignore[return-value]


def _choice(value: Any, options: Sequence[str], what: str) -> str:
    if value not in options:
        raise SpecError(f"preprocess config: {what} must be one of {list(options)}, got {value!r}")
    return str(value)


class Preprocessor:
    """Resize, crop and normalise images into a float32 NCHW batch.

    Build it from the config dict a spec or manifest carries with
    :meth:`from_config`; :meth:`to_config` gives that dict back.  Calling it on one
    image, a list/tuple of images (anything :func:`load_image` takes) or an
    ``(N, H, W, C)`` numpy batch returns a C-contiguous float32 ``(N, 3, H, W)`` array.
    """

    def __init__(
        self,
        image_size: int | Sequence[int] = 224,
        mean: Sequence[float] | float = OPENAI_CLIP_MEAN,
        std: Sequence[float] | float = OPENAI_CLIP_STD,
        resize: str = "shortest",
        interpolation: str = "bicubic",
        crop: str = "center",
        resize_size: int | None = None,
    ):
        if isinstance(image_size, (list, tuple)):
            if len(image_size) != 2:
                raise SpecError(
                    f"preprocess config: image_size must be an int or [height, width], got {image_size!r}"
                )
            self.image_size = (
                _positive_int(image_size[0], "image_size height"),
                _positive_int(image_size[1], "image_size width"),
            )
        else:
            s = _positive_int(image_size, "image_size")
            self.image_size = (s, s)
        self.mean = _triple(mean, "mean")
        self.std = _triple(std, "std")
        if not all(v > 0 for v in self.std):
            raise SpecError(f"preprocess config: std must be > 0, got {list(self.std)}")
        self.resize = _choice(resize, _RESIZE_MODES, "resize")
        self.interpolation = _choice(interpolation, tuple(_RESAMPLE), "interpolation")
        self.crop = _choice(crop, _CROP_MODES, "crop")
        if resize_size is not None:
            resize_size = _positive_int(resize_size, "resize_size")
            if self.resize != "shortest":
                raise SpecError('preprocess config: resize_size applies only to resize="shortest"')
        self.resize_size = resize_size
        self._resample = _RESAMPLE[self.interpolation]
        # Lookup table uint8 -> normalised float32, per channel, computed the way
        # transformers does it: float64 rescale by 1/255, cast to float32, then
        # (x - mean) / std in float32.  Bit-exact with CLIPImageProcessor.
        levels = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
        mean32 = np.asarray(self.mean, dtype=np.float32)[:, None]
        std32 = np.asarray(self.std, dtype=np.float32)[:, None]
        self._lut = np.ascontiguousarray((levels[None, :] - mean32) / std32, dtype=np.float32)

    # ---- config

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "Preprocessor":
        """Build from a spec/manifest dict; unknown keys raise :class:`SpecError`."""
        if isinstance(config, Preprocessor):
            return config
        if not isinstance(config, Mapping):
            raise SpecError(f"preprocess config must be a dict, got {type(config).__name__}")
        unknown = sorted(set(config) - set(_CONFIG_KEYS))
        if unknown:
            raise SpecError(
                f"preprocess config has unknown keys {unknown}; allowed: {list(_CONFIG_KEYS)}"
            )
        if "image_size" not in config:
            raise SpecError("preprocess config needs 'image_size' (an int or [height, width])")
        return cls(**dict(config))

    def to_config(self) -> dict[str, Any]:
        """The JSON-ready config dict; ``from_config(p.to_config()) == p``."""
        h, w = self.image_size
        config: dict[str, Any] = {
            "image_size": h if h == w else [h, w],
            "mean": list(self.mean),
            "std": list(self.std),
            "resize": self.resize,
            "interpolation": self.interpolation,
            "crop": self.crop,
        }
        if self.resize_size is not None:
            config["resize_size"] = self.resize_size
        return config

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Preprocessor) and self.to_config() == other.to_config()

    def __hash__(self) -> int:
        return hash(repr(self))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_config().items())
        return f"Preprocessor({args})"

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every output image, or None when it depends on the input
        (``resize="shortest"`` with ``crop="none"``)."""
        if self.resize == "shortest" and self.crop == "none":
            return None
        return self.image_size

    @property
    def shortest_edge(self) -> int:
        """Target of the short side for ``resize="shortest"``."""
        if self.resize_size is not None:
            return self.resize_size
        return max(self.image_size)

    # ---- processing

    def resize_and_crop(self, image: ImageLike) -> np.ndarray:
        """Geometry only: the resized, cropped ``(H, W, 3)`` uint8 array of one image."""
        img = load_image(image)
        width, height = img.size
        if self.resize == "squash":
            target = self.image_size
        else:
            target = _shortest_edge_size(height, width, self.shortest_edge)
        if target != (height, width):
            if self.crop == "center" and self._resample != Image.Resampling.NEAREST:
                img = _resize_window(img, target, self.image_size, self._resample)
            else:  # NEAREST samples by float stepping that a box would shift; it is cheap anyway
                img = img.resize((target[1], target[0]), resample=self._resample)
        arr = np.asarray(img)
        if self.crop == "center":
            arr = _center_crop(arr, *self.image_size)
        return arr

    def normalize(self, arr: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``(H, W, 3)`` uint8 -> normalised ``(3, H, W)`` float32 (into ``out`` if given)."""
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise InputError(f"normalize expects an (H, W, 3) uint8 array, got {arr.dtype} {arr.shape}")
        if out is None:
            out = np.empty((3,) + arr.shape[:2], dtype=np.float32)
        for c in range(3):
            np.take(self._lut[c], arr[:, :, c], out=out[c], mode="clip")
        return out

    def __call__(self, images: ImageLike | Sequence[ImageLike]) -> np.ndarray:
        items = _as_items(images)
        size = self.output_size
        if size is not None:
            out = np.empty((len(items), 3) + tuple(size), dtype=np.float32)
            for i, item in enumerate(items):
                self.normalize(self.resize_and_crop(item), out=out[i])
            return out
        arrays = [self.resize_and_crop(item) for item in items]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise InputError(
                'with resize="shortest" and crop="none" the output size follows each image\'s '
                f"aspect ratio; these images give different sizes {sorted(shapes)}, so they cannot "
                "be batched; process them one at a time or use crop=\"center\""
            )
        out = np.empty((len(arrays), 3) + arrays[0].shape[:2], dtype=np.float32)
        for i, a in enumerate(arrays):
            self.normalize(a, out=out[i])
        return out


def _as_items(images: Any) -> list:
    if isinstance(images, np.ndarray) and images.ndim == 4:
        if images.shape[-1] not in (1, 3, 4):
            raise InputError(
                f"a numpy batch must be channels-last (N, H, W, C) with C in 1, 3, 4; got shape "
                f"{images.shape}"
            )
        items = list(images)
    elif isinstance(images, np.ndarray) and images.ndim > 4:
        raise InputError(
            f"expected an image (H, W[, C]) or a batch (N, H, W, C); got a {images.ndim}-D array "
            f"of shape {images.shape}"
        )
    elif isinstance(images, (list, tuple)):
        items = list(images)
    else:
        items = [images]
    if not items:
        raise InputError("no images given: the batch is empty")
    return items


def check_pixels(pixels: Any, shape: Sequence[Any]) -> np.ndarray:
    """Check pre-made pixels before they reach an image graph; return them unchanged.

    ``shape`` is the graph's declared ``(N, 3, H, W)``, with None (or any non-int, such as
    a symbolic name) for a dynamic dimension.  ``pixels`` must be a float32 numpy array of
    that shape, N >= 1, every value finite: a NaN or infinity would run through the model
    and come out as NaN features without any error.  Anything else raises InputError
    saying what was wrong and how to make proper input.
    """
    fix = "pass the images themselves (paths, PIL images, uint8 arrays) or use preprocess(images)"
    want = tuple(d if isinstance(d, int) and not isinstance(d, bool) else None for d in shape)
    text = "(" + ", ".join("N" if i == 0 and d is None else str(d) for i, d in enumerate(want)) + ")"
    if not isinstance(pixels, np.ndarray):
        raise InputError(f"preprocessed pixels must be a float32 numpy array {text}, got a "
                         f"{type(pixels).__name__}; {fix}")
    if pixels.dtype != np.float32:
        raise InputError(f"preprocessed pixels must be float32, got {pixels.dtype} of shape "
                         f"{pixels.shape}; {fix}")
    if pixels.ndim != len(want) or any(w is not None and w != g for w, g in zip(want, pixels.shape)):
        raise InputError(f"preprocessed pixels must have shape {text} for this model, got "
                         f"{pixels.shape}; {fix}")
    if pixels.shape[0] < 1:
        raise InputError(f"preprocessed pixels hold no image (shape {pixels.shape}); pass at least one")
    finite = np.isfinite(pixels)
    if not finite.all():
        where = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise InputError(
            f"preprocessed pixels hold {int(finite.size - finite.sum())} NaN/infinite value(s), "
            f"the first {pixels[where]} at index {list(where)}; the model would return NaN "
            f"features. Fix the array, or {fix}"
        )
    return pixels


def preprocess(
    images: ImageLike | Sequence[ImageLike], config: Mapping[str, Any] | Preprocessor
) -> np.ndarray:
    """``Preprocessor.from_config(config)(images)``: float32 ``(N, 3, H, W)``."""
    return Preprocessor.from_config(config)(images)
