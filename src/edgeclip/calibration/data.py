"""Calibration data: image folders and caption files, preprocessed exactly as the runtime does.

Calibration folders and caption files are untrusted input (users download them), so the readers
bound what they read and never leave the folder they were given:

* **Image folders** are walked without following symbolic links.  A link named like an image, and a
  link to a folder (``a -> .``, ``a -> /etc``), is *skipped and counted* in
  ``CalibrationImages.skipped`` with the reason; calibration reads only files stored inside the
  folder (copy linked files in).  The folder given itself may be a link: the user named it.
  Entries with an image extension that are not regular files (FIFOs, sockets, devices) are skipped
  and counted too.  The walk visits at most ``MAX_WALK_ENTRIES`` directory entries and
  ``MAX_WALK_DEPTH`` levels of sub-folders; past either it raises ``CalibrationError``.  Each image
  is opened with ``O_NOFOLLOW | O_NONBLOCK`` and must still be the file (device, inode) the walk
  saw, so a link or FIFO swapped in after the walk is refused, not followed.  (Hard links are
  files of the folder's own file system and are read like any file.)
* **Images** that decode are used exactly as the runtime would use them (1-pixel images upsampled,
  animated files by their first frame, CMYK converted, 16-bit scaled by ``round(v / 257)``); what
  the runtime refuses (empty, thinner than 100:1, decompression bombs, corrupt files) is skipped
  and counted.  If nothing is left, the ``CalibrationError`` names the count and the first reason.
* **Caption files** must be regular files of at most ``MAX_CAPTION_FILE_BYTES``, in strict UTF-8
  (a leading BOM is allowed; an invalid byte or a NUL is an error naming the line, never replaced),
  at most ``MAX_CAPTIONS`` captions of at most ``MAX_CAPTION_CHARS`` characters each.  Lines end at
  ``\\n`` only (a JSON string may hold U+2028).  Blank lines, and JSONL captions that are empty
  strings, are skipped.  ``.jsonl``/``.ndjson`` lines must be strict JSON (no ``NaN``/``Infinity``,
  no repeated keys, no unpaired ``\\ud800`` escapes, nesting Python can parse) holding a string or
  an object with a string ``"caption"`` (or, without one, ``"text"``) field; anything else is an
  error naming the line.  A ``.json`` file is refused (one document, not one caption per line);
  any other suffix is read as text.

The bounds are module constants read at call time, so a caller with trusted, larger data can
raise them.
"""
from __future__ import annotations

import errno
import json
import numbers
import os
import random
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import CalibrationError, EdgeClipError, EvalDataError, ImageDecodeError, ImageSizeError
from ..runtime.labels import parse_labels

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
JSONL_EXTS = (".jsonl", ".ndjson")

# A real calibration set is a few hundred images a few folders deep; a million entries or 64
# levels is an archive built to exhaust the walk (or a mount of a whole disk).
MAX_WALK_ENTRIES = 1_000_000
MAX_WALK_DEPTH = 64
# Captions: COCO's 600k captions fit in 40 MiB; CLIP reads at most a few hundred characters.
MAX_CAPTION_FILE_BYTES = 64 * 1024 * 1024
MAX_CAPTIONS = 1_000_000
MAX_CAPTION_CHARS = 10_000

# O_NONBLOCK: a FIFO swapped in for a file opens at once (and fstat refuses it) instead of hanging
_O_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


@dataclass
class CalibrationImages:
    pixels: np.ndarray                      # (N, 3, H, W) float32, what the image graph receives
    files: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # (path, reason): links, non-regular and unreadable files

    def split(self, holdout: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(calibration, held-out) pixel arrays; held-out samples measure the accuracy guard."""
        if isinstance(holdout, bool) or not isinstance(holdout, numbers.Real) or not 0 <= holdout < 1:
            raise CalibrationError(f"held-out fraction must be a number in [0, 1), got {holdout!r}")
        seed = _check_seed(seed)
        if seed < 0:
            raise CalibrationError(f"calibration seed must be >= 0 to split, got {seed}")
        return _split(self.pixels, float(holdout), seed)


@dataclass
class ImageScan:
    """What the walk of a calibration folder found: images to read, and entries it skipped."""
    files: list                                      # sorted Paths (the seeded sample, if limited)
    skipped: list = field(default_factory=list)      # (path, reason)
    identity: dict = field(default_factory=dict)     # Path -> (st_dev, st_ino) seen by the walk


# ------------------------------------------------------------------------------------- arguments

def _check_limit(limit, what: str = "limit (the calibration sample size, --calib-size)"):
    """None (everything) or a whole number >= 1; a bool, float or 0 is a caller's mistake."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit < 1:
        raise CalibrationError(f"{what} must be a whole number >= 1, or None for all, got {limit!r}")
    return int(limit)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise CalibrationError(f"calibration seed must be a whole number, got {seed!r}")
    return int(seed)


def _sample(items: list, limit, seed: int) -> list:
    if limit is not None and len(items) > limit:
        return random.Random(seed).sample(items, limit)
    return items


def _kind(mode: int) -> str:
    return next((k for test, k in _KINDS if test(mode)), "not a regular file")


# ---------------------------------------------------------------------------------- image folders

def _calib_root(folder) -> Path:
    if not isinstance(folder, (str, os.PathLike)):
        raise CalibrationError(f"calibration folder must be a path, got a {type(folder).__name__}")
    root = Path(folder)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "not found"
        raise CalibrationError(f"calibration folder {what}: {root}; pass --calib DIR with a few hundred "
                               "representative images (jpg/png/webp/bmp)")
    return root


def _link_reason(entry: os.DirEntry, root: Path) -> str:
    try:
        target = os.readlink(entry.path)
    except OSError:
        target = "?"
    target = target if len(target) <= 200 else target[:200] + "..."
    what = "a linked folder" if entry.is_dir() else "a symbolic link"
    return (f"{entry.path!r} is {what} (-> {target!r}), not followed: calibration reads only files "
            f"stored inside {str(root)!r}; copy the file in instead of linking it")


def _classify(entry: os.DirEntry, root: Path, scan: ImageScan, subdirs: list) -> None:
    """One directory entry: an image to read, a sub-folder to walk, something skipped, or ignored."""
    is_image = os.path.splitext(entry.name)[1].lower() in IMAGE_EXTS
    try:
        if entry.is_symlink():
            if is_image or entry.is_dir():  # other links (a README link) are not images: ignored
                scan.skipped.append((entry.path, _link_reason(entry, root)))
        elif entry.is_dir(follow_symlinks=False):
            subdirs.append(entry.path)
        elif is_image:
            st = os.lstat(entry.path)  # not entry.stat(): on Windows its cached st_ino is 0
            if stat.S_ISREG(st.st_mode):
                scan.files.append(Path(entry.path))
                scan.identity[Path(entry.path)] = (st.st_dev, st.st_ino)
            else:
                scan.skipped.append((entry.path, f"{entry.path!r} is {_kind(st.st_mode)}, not an image "
                                                 "file (reading it could block or never end)"))
    except OSError as e:  # vanished or unreadable between listing and stat
        if is_image:
            scan.skipped.append((entry.path, f"{entry.path!r} cannot be inspected ({e.strerror or e})"))


def _walk(root: Path) -> ImageScan:
    """Iterative, link-free walk with a bound on entries and depth (a loop cannot recurse)."""
    scan, stack, visited = ImageScan([]), [(str(root), 0)], 0
    while stack:
        folder, depth = stack.pop()
        if depth > MAX_WALK_DEPTH:
            raise CalibrationError(f"calibration folder {root} nests sub-folders more than {MAX_WALK_DEPTH} "
                                   f"levels deep (at {folder!r}); flatten it to a few levels")
        subdirs: list = []
        try:
            with os.scandir(folder) as it:
                for entry in it:
                    visited += 1
                    if visited > MAX_WALK_ENTRIES:
                        raise CalibrationError(
                            f"calibration folder {root} holds more than {MAX_WALK_ENTRIES:,} entries; "
                            "point --calib at a folder of a few hundred representative images")
                    _classify(entry, root, scan, subdirs)
        except OSError as e:
            if depth == 0:
                raise CalibrationError(
                    f"calibration folder {root} cannot be listed ({e.strerror or e})") from e
            scan.skipped.append((folder, f"folder {folder!r} cannot be listed ({e.strerror or e}); skipped"))
        stack.extend((d, depth + 1) for d in sorted(subdirs, reverse=True))
    return scan


def _none_left(what: str, folder, skipped: list) -> CalibrationError:
    return CalibrationError(f"none of the {len(skipped)} {what} under {folder} could be read (first "
                            f"problem: {skipped[0][1]}); add readable {'/'.join(e[1:] for e in IMAGE_EXTS)} "
                            "files stored in the folder itself")


def scan_images(folder, limit: int | None = None, seed: int = 0) -> ImageScan:
    """Walk `folder` (see the module docstring for the rules) and sample at most `limit` images."""
    limit, seed = _check_limit(limit), _check_seed(seed)
    root = _calib_root(folder)
    scan = _walk(root)
    scan.skipped.sort()  # scandir order is arbitrary: keep "the first problem" the same on every run
    if not scan.files:
        if scan.skipped:
            raise _none_left("image entries", root, scan.skipped)
        raise CalibrationError(f"no images ({', '.join(IMAGE_EXTS)}) found under {root}")
    scan.files.sort()
    scan.files = sorted(_sample(scan.files, limit, seed))
    return scan


def list_images(folder, limit: int | None = None, seed: int = 0) -> list[Path]:
    """Image files under `folder` (recursive, links not followed), a seeded sample of at most `limit`,
    in stable order."""
    return scan_images(folder, limit, seed).files


def _open_image(path: Path, identity: tuple):
    """Read the file the walk saw, not whatever the path names now (a link or FIFO swapped in)."""
    from ..runtime import preprocess

    name = repr(str(path))
    try:
        f = open(str(path), "rb", opener=lambda p, fl: os.open(p, fl | _O_FLAGS | _O_NOFOLLOW))
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ImageDecodeError(f"image file {name} became a symbolic link after the folder was "
                                   "listed; not followed") from e
        raise ImageDecodeError(f"image file {name} cannot be opened ({e.strerror or e})") from e
    with f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ImageDecodeError(f"image file {name} is {_kind(st.st_mode)} now, not an image file")
        if (st.st_dev, st.st_ino) != identity:
            raise ImageDecodeError(f"image file {name} was replaced after the folder was listed; not read")
        if st.st_size > preprocess.MAX_FILE_BYTES:
            raise ImageSizeError(f"image {name} is {st.st_size:,} bytes, more than the "
                                 f"{preprocess.MAX_FILE_BYTES:,}-byte limit; downscale or recompress it")
        return preprocess.load_image(f)


def load_images(folder, preprocessor, limit: int | None = 512, seed: int = 0) -> CalibrationImages:
    """Decode and preprocess; links, non-regular and unreadable files are skipped and counted (with
    the reason), fatal only if none is left."""
    scan = scan_images(folder, limit, seed)
    arrays, kept, skipped = [], [], list(scan.skipped)
    for f in scan.files:
        try:
            arrays.append(preprocessor(_open_image(f, scan.identity[f])))
            kept.append(f)
        except EdgeClipError as e:
            skipped.append((str(f), str(e)))
    skipped.sort()  # scandir order is arbitrary: keep "the first problem" the same on every run
    if not arrays:
        raise _none_left("images", folder, skipped)
    return CalibrationImages(np.concatenate(arrays), kept, skipped)


# ----------------------------------------------------------------------------------- caption files

def _read_bounded(p: Path) -> bytes:
    """A regular file's bytes, at most MAX_CAPTION_FILE_BYTES; opened non-blocking so a FIFO
    cannot hang, and judged by fstat of what was opened."""
    try:
        fd = os.open(str(p), _O_FLAGS)
    except FileNotFoundError:
        raise CalibrationError(
            f"caption file not found: {p}; pass --calib-captions FILE (.txt or .jsonl)") from None
    except OSError as e:
        raise CalibrationError(f"caption file {p} cannot be opened ({e.strerror or e})") from e
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # before fdopen, which refuses a directory with its own error
        os.close(fd)
        raise CalibrationError(f"caption file {p} is {_kind(st.st_mode)}, not a regular file; pass "
                               "--calib-captions FILE (.txt or .jsonl)")
    with os.fdopen(fd, "rb") as f:
        cap = MAX_CAPTION_FILE_BYTES
        data = f.read(cap + 1) if st.st_size <= cap else b""
        if st.st_size > cap or len(data) > cap:  # also a file that grew while it was read
            raise CalibrationError(f"caption file {p} is larger than {cap:,} bytes; a calibration set "
                                   "needs a few hundred captions: pass a smaller file")
    return data


def _decode(p: Path, data: bytes) -> str:
    """Strict UTF-8, the line of the first bad byte named; a NUL means binary or UTF-16 data."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise CalibrationError(f"{p}:{line} is not valid UTF-8 (byte {data[e.start]:#04x}: {e.reason}); "
                               "save the file as UTF-8") from None
    nul = text.find("\x00")
    if nul >= 0:
        raise CalibrationError(f"{p}:{text.count(chr(10), 0, nul) + 1} holds a NUL character (a binary or "
                               "UTF-16 file?); save the captions as UTF-8 text")
    return text


class _StrictJSONError(ValueError):
    pass


def _no_constant(name: str):
    raise _StrictJSONError(f"the non-standard constant {name} (strict JSON has no NaN or Infinity)")


def _unique_keys(pairs: list) -> dict:
    obj = {}
    for k, v in pairs:
        if k in obj:
            raise _StrictJSONError(f"the key {k!r} twice (which one is meant?)")
        obj[k] = v
    return obj


def _json_caption(p: Path, i: int, line: str) -> str:
    try:
        obj = json.loads(line, parse_constant=_no_constant, object_pairs_hook=_unique_keys)
    except _StrictJSONError as e:
        raise CalibrationError(f"{p}:{i} uses {e}; write strict JSON") from None
    except RecursionError:
        raise CalibrationError(f"{p}:{i} nests JSON too deeply to parse; one object per line with a "
                               '"caption" string is all that is needed') from None
    except ValueError as e:  # JSONDecodeError, and ints past Python's digit limit
        raise CalibrationError(f"{p}:{i} is not valid JSON ({e})") from None
    if isinstance(obj, dict):
        key = next((k for k in ("caption", "text") if k in obj), None)
        if key is None:
            keys = ", ".join(repr(k[:40]) for k in list(obj)[:5]) or "none"
            raise CalibrationError(f'{p}:{i} has no "caption" or "text" field (keys: {keys})')
        if not isinstance(obj[key], str):
            raise CalibrationError(f'{p}:{i}: "{key}" is a JSON {_json_type(obj[key])}, expected a string')
        obj = obj[key]
    elif not isinstance(obj, str):
        raise CalibrationError(f"{p}:{i} is a JSON {_json_type(obj)}, not a caption; each line must be "
                               'a string or an object with a "caption" (or "text") string')
    try:
        obj.encode("utf-8")
    except UnicodeEncodeError:  # "\ud800" escapes decode to lone surrogates no tokenizer can encode
        raise CalibrationError(f"{p}:{i} holds an unpaired surrogate escape (\\ud800-\\udfff); "
                               "write the character itself or a valid pair") from None
    return obj


def _json_type(value) -> str:
    names = ((bool, "boolean"), (dict, "object"), (list, "array"), (str, "string"), (int, "number"),
             (float, "number"))
    return "null" if value is None else next(n for t, n in names if isinstance(value, t))


def _captions(p: Path, text: str, jsonl: bool) -> list[str]:
    caps = []
    # split on "\n" only: str.splitlines also breaks at U+2028, U+0085 ..., which JSON strings may hold
    for i, raw in enumerate(text.split("\n"), 1):
        line = raw.strip()
        if not line:
            continue
        cap = (_json_caption(p, i, line) if jsonl else line).strip()
        if not cap:
            continue  # an empty JSONL caption is a blank line
        if len(cap) > MAX_CAPTION_CHARS:
            raise CalibrationError(f"{p}:{i} is a caption of {len(cap):,} characters, more than "
                                   f"{MAX_CAPTION_CHARS:,}; shorten it (CLIP reads only the first few "
                                   "dozen words)")
        if len(caps) >= MAX_CAPTIONS:
            raise CalibrationError(f"{p} holds more than {MAX_CAPTIONS:,} captions; a calibration set needs "
                                   "a few hundred: pass a smaller file")
        caps.append(cap)
    return caps


def read_captions(path, limit: int | None = None, seed: int = 0) -> list[str]:
    """Captions from a .txt (one per line) or .jsonl file (a string, or an object with a "caption" or
    "text" string, per line), a seeded sample of at most `limit`."""
    limit, seed = _check_limit(limit), _check_seed(seed)
    if not isinstance(path, (str, os.PathLike)):
        raise CalibrationError(f"caption file must be a path, got a {type(path).__name__}")
    p = Path(path)
    if p.suffix.lower() == ".json":
        raise CalibrationError(f"{p} is a .json file (one document); captions come one per line: "
                               "convert it to .jsonl (one object per line) or .txt")
    caps = _captions(p, _decode(p, _read_bounded(p)), p.suffix.lower() in JSONL_EXTS)
    if not caps:
        raise CalibrationError(f"{p} holds no captions")
    return _sample(caps, limit, seed)


def _split(x: np.ndarray, holdout: float, seed: int):
    n = len(x)
    if n < 2:
        return x, x
    idx = np.random.default_rng(seed).permutation(n)
    k = min(n - 1, max(1, int(round(n * holdout))))
    return x[np.sort(idx[k:])], x[np.sort(idx[:k])]


# ------------------------------------------------------------------------ labelled folders (--eval, --train)

@dataclass
class EvalSet:
    """A labelled folder: `files[i]` belongs to class `targets[i]`; `classes` are the prompt words."""

    root: Path
    files: list
    targets: np.ndarray
    classes: list
    folders: list


def _folder_order(names: list[str]) -> list[str]:
    return sorted(names, key=int) if all(n.isdigit() for n in names) else sorted(names)


def read_eval(root, labels=None, limit: int | None = None, seed: int = 0, what: str = "--eval") -> EvalSet:
    """One sub-folder per class. `labels` (a list of strings) name the classes in folder order
    (numeric order when every folder name is a number); by default the folder names are the classes."""
    root = Path(root)
    if not root.is_dir():
        raise EvalDataError(f"{what} folder not found: {root}; pass a folder with one sub-folder of images per class")
    folders = _folder_order([d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")])
    per_class = {f: sorted(p for p in (root / f).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
                 for f in folders}
    folders = [f for f in folders if per_class[f]]
    if len(folders) < 2:
        loose = sum(1 for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
        hint = f" (it holds {loose} images directly: move them into class folders)" if loose else ""
        raise EvalDataError(f"{what} folder {root} has {len(folders)} class sub-folder(s) with images{hint}; "
                            f"it needs at least two, e.g. {root}/cat/*.jpg and {root}/dog/*.jpg")
    classes = parse_labels(labels) if labels is not None else list(folders)
    if len(classes) != len(folders):
        raise EvalDataError(f"{len(classes)} labels given for {len(folders)} class folders in {root} "
                            f"({', '.join(folders)}); give one label per folder, in that order")
    files, targets = [], []
    for i, f in enumerate(folders):
        files += per_class[f]
        targets += [i] * len(per_class[f])
    targets = np.asarray(targets)
    if limit and len(files) > limit:  # a seeded sample keeps long evals affordable
        keep = np.sort(np.random.default_rng(seed).choice(len(files), size=limit, replace=False))
        files, targets = [files[i] for i in keep], targets[keep]
    return EvalSet(root, files, targets, classes, folders)
