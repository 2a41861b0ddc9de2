"""Export a ClipModel to a verified artifact folder for a target runtime.

    art = edgeclip.export(model, target="onnx", precision="fp32", labels=["cat", "dog"], out="cat-dog")

`edgeclip.export` is this package's `export`. Targets are registered classes (`exporter/formats/<name>.py`,
discovered; the steps they share are `exporter.target.Target`); `targets()` lists them.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field, fields
from typing import Callable

from ..errors import EdgeClipError, InputError
from .artifact import Artifact  # noqa: F401

_TARGETS: dict[str, type] = {}


def register_target(name: str, backend: str | None = None, suffixes: tuple | None = None) -> Callable[[type], type]:
    """Class decorator: a target named `name`. A target the runtime does not know yet names the
    `backend` that runs its artifacts and its graph files' `suffixes` (e.g. "ort", (".onnx",))."""
    def deco(cls: type) -> type:
        from ..runtime.registry import register_target as runtime_target, target_backends

        cls.name = name
        if backend is not None:
            runtime_target(name, backend, suffixes or ())
        elif name not in target_backends():
            raise EdgeClipError(f"target '{name}' needs backend= (and suffixes=): no runtime backend runs it yet")
        _TARGETS[name] = cls
        return cls

    return deco


def _discover() -> None:
    """Import every module of `exporter/formats/`, one per target family: each registers its targets
    (adding a target is one file there, or one anywhere that calls `register_target`)."""
    from . import formats

    for info in pkgutil.iter_modules(formats.__path__):
        importlib.import_module(f"{formats.__name__}.{info.name}")


def targets() -> list[str]:
    """Every registered target (the built-in modules are imported to find theirs)."""
    _discover()
    return sorted(_TARGETS)


def get_target(name: str):
    if name not in _TARGETS:
        _discover()
    if name not in _TARGETS:
        raise EdgeClipError(f"unknown export target '{name}'; available targets: {', '.join(sorted(_TARGETS))}")
    return _TARGETS[name]()


@dataclass
class ExportOptions:
    """What to export and which exact speed-ups to apply (all on by default)."""

    target: str = "onnx"
    precision: str = "fp32"
    labels: list = field(default_factory=list)   # bake a zero-shot head for these labels
    templates: list | None = None                # prompt templates, each with '{}'
    heads: list = field(default_factory=list)    # adapter heads: Head objects, .npz files or "NAME=FILE"
    min_head_agreement: float = 0.99  # INT8 guard: top-1 agreement of every head with FP32 on held-out images
    trim_text: bool = True        # runtime feeds tokens only up to the batch's last end token
    pooled_only_last: bool = True  # last block computes only the pooled token
    validate: bool = True         # compare with the torch reference; fail outside tolerance
    opset: int | None = None
    overwrite: bool = False
    attention: str | None = None  # attention implementation traced (None: the target's choice)
    fuse: bool = True             # fused attention ops for the target runtime (fp32/int8 on ORT)
    # INT8 (precision="int8"): recipe, calibration data and the accuracy guard
    recipe: str | None = None     # int8 (default) | int8-dynamic | int8-smoothquant | w8a16
    calib: str | None = None      # folder of calibration images (recursive)
    calib_captions: str | None = None  # .txt (one per line) or .jsonl captions for the text tower
    calib_size: int = 256         # at most this many images/captions, a seeded sample
    calib_seed: int = 0
    observer: str = "minmax"      # activation range: minmax | percentile | entropy | mse
    smoothquant_alpha: float = 0.5
    block_size: int = 32          # 4-bit recipes (w4a16, w4a8): input rows per weight scale, a power of two
    max_cosine_drop: float | None = None  # guard: 1 - min cosine to FP32 on held-out calibration samples
    #                                       (None: the recipe's default, `guard_bound`)
    # Core ML
    min_ios: int = 18             # deployment target: 18 (fused SDPA), 17 or 16 (ANE-layout attention)
    compress: str | None = None   # weight compression: w8 | palettize6 | palettize4 | int4-blockwise
    # TensorRT
    trt_version: str = "10.3"     # the TensorRT the graphs are made for (10.3: JetPack 6 on Jetson Orin)
    profiles: dict | None = None  # {"batch": (min, opt, max), "length": (min, opt, max)}
    # ORT format for phones
    mobile_shapes: str | None = None  # "BATCH[xLENGTH]": the graphs' fixed shapes (default 1 x context length)
    mobile_eps: str | None = None     # "nnapi,coreml,xnnpack": the EPs the graphs are made and checked for

    # numeric options: (low, high); out of range is an InputError before any work
    RANGES = {"calib_size": (1, 1_000_000), "calib_seed": (0, 2**32 - 1), "smoothquant_alpha": (0.0, 1.0),
              "max_cosine_drop": (0.0, 1.0), "min_head_agreement": (0.0, 1.0), "opset": (7, 30),
              "block_size": (16, 4096)}

    def __post_init__(self):
        import math

        for name, (lo, hi) in self.RANGES.items():
            v = getattr(self, name)
            if v is None and name in ("opset", "max_cosine_drop"):
                continue
            integral = isinstance(lo, int)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (not integral or isinstance(v, int))
            if not ok or not math.isfinite(v) or not lo <= v <= hi:
                raise InputError(f"export option {name}={v!r} must be {'an integer' if integral else 'a number'} "
                                 f"from {lo} to {hi}")
        if self.block_size & (self.block_size - 1):
            raise InputError(f"export option block_size={self.block_size} must be a power of two (16, 32, 64, ...)")

    def guard_bound(self) -> float:
        """The accuracy guard's bound: `max_cosine_drop` when given, else the recipe's default (0.005;
        0.01 for w4a16)."""
        if self.max_cosine_drop is not None:
            return self.max_cosine_drop
        from ..calibration.recipes import get_recipe

        return get_recipe(self.recipe).max_drop

    @classmethod
    def from_kwargs(cls, **kw) -> "ExportOptions":
        names = {f.name for f in fields(cls)}
        unknown = set(kw) - names
        if unknown:
            raise EdgeClipError(f"unknown export option(s): {', '.join(sorted(unknown))}; "
                                f"known: {', '.join(sorted(names))}")
        return cls(**kw)


def export(model, target: str = "onnx", precision: str | None = None, out=None, **options) -> Artifact:
    """Export `model` (a ClipModel or a model URI) into the folder `out`. Never mutates `model`.

    `precision`: fp32 | fp16 | int8, as the target supports; default the target's first (fp32 for
    ONNX and OpenVINO, fp16 for Core ML)."""
    from .._lazy import require

    require("torch", "exporting models")
    if out is None:
        raise EdgeClipError("export needs out=DIR, the artifact folder to write")
    from .artifact import check_out

    check_out(out, bool(options.get("overwrite", False)))  # before any work: a bad --out costs nothing
    if isinstance(model, str):
        from ..models.loaders import load_model

        model = load_model(model)
    tgt = get_target(target)
    precision = precision or tgt.precisions[0]
    opts = ExportOptions.from_kwargs(target=target, precision=precision, **options)
    from .target import TARGET_OPTIONS

    foreign = [k for k, default in TARGET_OPTIONS.items() if k not in tgt.options and getattr(opts, k) != default]
    if foreign:
        readers = sorted(n for n, cls in _TARGETS.items() if set(foreign) & set(getattr(cls, "options", ())))
        raise EdgeClipError(f"{' and '.join(foreign)} appl{'y' if len(foreign) > 1 else 'ies'} to target={' or '.join(repr(r) for r in readers)} only, "
                            f"not '{target}'")
    if precision not in tgt.precisions:
        raise EdgeClipError(f"target '{target}' supports precisions {', '.join(tgt.precisions)}, not '{precision}'")
    if precision != "int8":
        given = [k for k in ("recipe", "calib", "calib_captions") if getattr(opts, k) is not None]
        if given:
            raise EdgeClipError(f"{', '.join(given)} only apply to precision='int8' (got '{precision}')")
    if opts.block_size != ExportOptions.block_size:
        from ..calibration.recipes import get_recipe

        if get_recipe(opts.recipe).weight_bits >= 8:
            raise EdgeClipError(f"block_size applies to the 4-bit recipes (w4a16, w4a8) only, not "
                                f"'{opts.recipe or 'int8'}'")
    return tgt.export(model, model.spec, opts, out)
