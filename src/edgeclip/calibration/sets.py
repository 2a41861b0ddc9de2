"""Calibration and held-out data for an INT8 export, assembled from what the user passed.

Images: --calib DIR (the built-in model ships its own). Captions: --calib-captions FILE, else the
built-in model's, else the zero-shot prompts when --labels is given. Recipes that need no
calibration (int8-dynamic, w8a16) fall back to the fixed synthetic inputs for the accuracy guard.
Everything is preprocessed and tokenized exactly as the runtime does."""
from __future__ import annotations

import logging

from ..errors import CalibrationError
from .recipes import image_calibration, text_calibration

log = logging.getLogger(__name__)
BUILTIN = "builtin:tiny"


def calibration_sets(model, spec, opts, recipe, labels, templates, trim: bool) -> dict:
    """{"image": CalibrationSet, "text": CalibrationSet} for both towers."""
    builtin = getattr(model, "source", None) == BUILTIN
    pixels, image_info = _images(spec, opts, recipe, builtin)
    ids, text_info = _captions(spec, opts, recipe, labels, templates, builtin)
    return {"image": image_calibration(pixels, image_info, seed=opts.calib_seed),
            "text": text_calibration(ids, spec.text.eot_token_id, trim, text_info, seed=opts.calib_seed)}


def _images(spec, opts, recipe, builtin: bool):
    from ..models.inputs import reference_inputs
    from ..runtime.preprocess import Preprocessor
    from .data import load_images

    folder = opts.calib
    if folder is None and builtin:
        from ..builtin import calib_dir

        folder = calib_dir()
    if folder is not None:
        images = load_images(folder, Preprocessor.from_config(spec.preprocess_config()), limit=opts.calib_size,
                             seed=opts.calib_seed)
        info = {"source": "builtin" if not opts.calib else str(folder), "images": len(images.files),
                "skipped": len(images.skipped), "skipped_files": [f for f, _ in images.skipped[:20]]}
        if images.skipped:
            log.warning("calibration: skipped %d file(s) under %s (links, non-regular or unreadable; first: %s)",
                        len(images.skipped), folder, images.skipped[0][1])
        return images.pixels, info
    if recipe.needs_calibration:
        raise CalibrationError(
            f"recipe '{recipe.name}' needs calibration images: pass --calib DIR (a few hundred images like "
            "the ones you will deploy on), or use --recipe int8-dynamic or w8a16, which need none")
    return reference_inputs(spec, n=16)["pixel_values"], {"source": "synthetic"}


def _captions(spec, opts, recipe, labels, templates, builtin: bool):
    from ..models.inputs import model_tokenizer, reference_inputs
    from .data import read_captions

    if opts.calib_captions:
        captions = read_captions(opts.calib_captions, limit=opts.calib_size, seed=opts.calib_seed)
        info = {"source": str(opts.calib_captions)}
    elif builtin:
        from ..builtin import calib_captions

        captions, info = calib_captions(), {"source": "builtin"}
    elif labels:
        captions, info = [t.format(label) for label in labels for t in templates], {"source": "prompts"}
    elif recipe.needs_calibration:
        raise CalibrationError(
            f"recipe '{recipe.name}' calibrates the text tower on captions: pass --calib-captions FILE "
            "(.txt, one per line, or .jsonl), or --labels to calibrate on the zero-shot prompts")
    else:
        return reference_inputs(spec, n=3)["input_ids"], {"source": "synthetic"}
    info["captions"] = len(captions)
    return model_tokenizer(spec)(captions, truncate=True), info
