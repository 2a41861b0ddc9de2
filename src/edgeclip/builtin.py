"""Data shipped with the built-in tiny CLIP (`builtin:tiny`), for the CLI, the demo and tests.

The files live in `edgeclip/data/tiny/` and are written by `scripts/train_tiny.py`:
`heldout/<digit>/<index>.png` (labelled evaluation images, 8x8 grayscale), `calib/*.png`
(calibration images from the training split), `calib_captions.txt` and `labels.json` (class
words, zero-shot prompt templates, the measured held-out accuracy). Standard library only.
"""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

from .errors import CheckpointError

__all__ = [
    "tiny_dir",
    "heldout_dir",
    "calib_dir",
    "fewshot_dir",
    "calib_captions",
    "digit_labels",
    "prompt_templates",
    "prompts",
    "tiny_metadata",
]


def tiny_dir() -> Path:
    """The folder holding the built-in tiny model's files."""
    return Path(str(resources.files("edgeclip") / "data" / "tiny"))


def _existing(path: Path) -> Path:
    if not path.exists():
        raise CheckpointError(
            f"built-in data missing at {path}; rebuild it with `python scripts/train_tiny.py` "
            "or reinstall edgeclip"
        )
    return path


def heldout_dir() -> Path:
    """Held-out digits, one sub-folder per class named "0".."9" (a labelled eval folder)."""
    return _existing(tiny_dir() / "heldout")


def calib_dir() -> Path:
    """About 100 training-split digit images (flat folder of PNGs) for INT8 calibration."""
    return _existing(tiny_dir() / "calib")


def fewshot_dir() -> Path:
    """32 training-split digits per class, one sub-folder per class "0".."9": the labelled training
    folder for few-shot heads (`edgeclip heads fit builtin:tiny --train DIR`)."""
    return _existing(tiny_dir() / "fewshot")


def calib_captions() -> list[str]:
    """Calibration captions, one per calibration image (in sorted file-name order)."""
    text = _existing(tiny_dir() / "calib_captions.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


@lru_cache(maxsize=1)
def _metadata() -> dict:
    path = _existing(tiny_dir() / "labels.json")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); rebuild it with `python scripts/train_tiny.py`") from e


def tiny_metadata() -> dict:
    """A copy of labels.json: classes, templates, heldout_top1, seed, train_seconds, ..."""
    return json.loads(json.dumps(_metadata()))


def digit_labels() -> list[str]:
    """Class names in class order: index i is the digit i ("zero" .. "nine")."""
    return list(_metadata()["classes"])


def prompt_templates() -> list[str]:
    """The zero-shot prompt templates, each with one "{}" for the class name."""
    return list(_metadata()["templates"])


def prompts(template: str | None = None) -> list[str]:
    """One prompt per class, from `template` (default: the first stored template)."""
    t = template if template is not None else prompt_templates()[0]
    return [t.format(name) for name in digit_labels()]
