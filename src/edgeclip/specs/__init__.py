"""Model specs as data: one JSON file per architecture.

A spec carries everything needed to build a model, preprocess its images and tokenize its text.
This module imports only the standard library so the runtime can read specs from manifests.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import SpecError, UnknownModelError

ACTIVATIONS = ("quick_gelu", "gelu", "gelu_tanh")
VISION_POOLS = ("cls", "map")
TEXT_POOLS = ("eot", "last")
LOGIT_ACTIVATIONS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class VisionSpec:
    image_size: int
    # ViT fields ("kind": "vit"); towers of other kinds may leave them out and read `config`
    patch_size: int | None = None
    width: int | None = None
    layers: int | None = None
    heads: int | None = None
    mlp_dim: int | None = None
    act: str = "quick_gelu"
    ln_eps: float = 1e-5
    class_token: bool = True
    pre_norm: bool = True
    pool: str = "cls"          # "cls": class token; "map": SigLIP attention-pooling head
    patch_bias: bool = False
    proj: bool = True          # False: features are the pooled width (SigLIP)
    kind: str = "vit"          # the image tower's class (models.towers registry)
    config: dict = field(default_factory=dict)  # kind-specific settings, checked by the tower class

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid**2 + int(self.class_token)


@dataclass(frozen=True)
class TextSpec:
    context_length: int
    vocab_size: int
    width: int
    layers: int | None = None
    heads: int | None = None
    mlp_dim: int | None = None
    act: str = "quick_gelu"
    ln_eps: float = 1e-5
    causal: bool = True
    pool: str = "eot"          # "eot": first end-of-text token; "last": last position (SigLIP)
    eot_token_id: int | None = 49407  # None: argmax of ids (OpenAI's rule)
    proj: bool = True
    proj_bias: bool = False
    kind: str = "transformer"  # the text tower's class (models.towers registry)
    config: dict = field(default_factory=dict)  # kind-specific settings, checked by the tower class


@dataclass(frozen=True)
class ModelSpec:
    name: str
    embed_dim: int
    vision: VisionSpec
    text: TextSpec
    preprocess: dict = field(default_factory=dict)
    tokenizer: dict = field(default_factory=dict)
    family: str = "clip"
    description: str = ""
    aliases: tuple = ()
    logit_scale: float = 4.605170249938965
    logit_bias: float | None = None
    logit_activation: str = "softmax"  # class scores: "softmax" (CLIP's contrastive loss) or "sigmoid" (SigLIP)
    templates: tuple = ()      # zero-shot prompt templates, each with one "{}"; () means the runtime's defaults

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        if not isinstance(d, dict):
            raise SpecError(f"a spec must be a JSON object, got {type(d).__name__}")
        d = copy.deepcopy(d)
        name = d.get("name", "<unnamed>")
        try:
            vision = _build(VisionSpec, d.pop("vision"), f"{name}.vision")
            text = _build(TextSpec, d.pop("text"), f"{name}.text")
        except KeyError as e:
            raise SpecError(f"spec '{name}' has no '{e.args[0]}' section") from None
        d["aliases"] = tuple(d.get("aliases", ()))
        d["templates"] = tuple(d.get("templates", ()))
        spec = _build(cls, {**d, "vision": vision, "text": text}, name)
        spec.validate()
        return spec

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["aliases"] = list(self.aliases)
        d["templates"] = list(self.templates)
        return d

    def replace(self, **changes: Any) -> "ModelSpec":
        """A copy with top-level fields or nested 'vision'/'text' dicts changed."""
        d = self.to_dict()
        for k, v in changes.items():
            if k in ("vision", "text", "preprocess", "tokenizer") and isinstance(v, dict):
                d[k] = {**d[k], **v}
            else:
                d[k] = v
        return ModelSpec.from_dict(d)

    def validate(self) -> None:
        v, t = self.vision, self.text
        problems = []
        for tower, s, pools, std in (("vision", v, VISION_POOLS, "vit"), ("text", t, TEXT_POOLS, "transformer")):
            if not isinstance(s.config, dict):
                problems.append(f"{tower}.config must be an object")
            if s.kind != std:
                continue  # the tower class checks its own fields when it is built
            if any(getattr(s, k) is None for k in ("width", "layers", "heads", "mlp_dim")):
                problems.append(f"{tower}: a {std} tower needs width, layers, heads and mlp_dim")
                continue
            if s.act not in ACTIVATIONS:
                problems.append(f"{tower}.act={s.act!r} (known: {', '.join(ACTIVATIONS)})")
            if s.pool not in pools:
                problems.append(f"{tower}.pool={s.pool!r} (known: {', '.join(pools)})")
            if s.width % s.heads:
                problems.append(f"{tower}.width={s.width} is not divisible by heads={s.heads}")
            for k in ("width", "layers", "heads", "mlp_dim"):
                if getattr(s, k) <= 0:
                    problems.append(f"{tower}.{k} must be positive")
        if self.logit_activation not in LOGIT_ACTIVATIONS:
            problems.append(f"logit_activation={self.logit_activation!r} (known: {', '.join(LOGIT_ACTIVATIONS)})")
        if not all(isinstance(t, str) and t.count("{}") == 1 for t in self.templates):
            problems.append("templates must be strings with exactly one '{}' each")
        for tower, s in (("vision", v), ("text", t)):
            if not isinstance(s.kind, str) or not s.kind:
                problems.append(f"{tower}.kind must name a tower class")
        if v.kind == "vit" and (v.patch_size is None or v.patch_size <= 0 or v.image_size % v.patch_size):
            problems.append(f"vision.image_size={v.image_size} is not a multiple of patch_size={v.patch_size}")
        if v.kind == "vit" and not v.proj and v.width != self.embed_dim:
            problems.append(f"vision.proj=false needs vision.width == embed_dim ({v.width} != {self.embed_dim})")
        if not t.proj and t.width != self.embed_dim:
            problems.append(f"text.proj=false needs text.width == embed_dim ({t.width} != {self.embed_dim})")
        if problems:
            raise SpecError(f"spec '{self.name}' is invalid: " + "; ".join(problems))

    def preprocess_config(self) -> dict:
        cfg = {"image_size": self.vision.image_size, "resize": "shortest", "interpolation": "bicubic",
               "crop": "center"}
        cfg.update(self.preprocess)
        return cfg

    def tokenizer_config(self) -> dict:
        cfg = {"kind": "clip_bpe", "context_length": self.text.context_length}
        cfg.update(self.tokenizer)
        return cfg


def _build(cls, d: dict, where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise SpecError(f"spec section '{where}' has unknown keys: {', '.join(sorted(unknown))}")
    try:
        return cls(**d)
    except TypeError as e:
        raise SpecError(f"spec section '{where}' is incomplete: {e}") from None


def _spec_dir():
    return resources.files(__package__)


def list_specs() -> list[str]:
    """Names of the specs shipped with edgeclip, sorted."""
    return list(_spec_names())


@functools.lru_cache(maxsize=1)
def _spec_names() -> tuple[str, ...]:
    return tuple(sorted(p.name[:-5] for p in _spec_dir().iterdir() if p.name.endswith(".json")))


@functools.lru_cache(maxsize=1)  # shipped specs do not change while running: read them once
def _alias_table() -> dict[str, str]:
    table = {}
    for name in list_specs():
        table[name.lower()] = name
        raw = json.loads((_spec_dir() / f"{name}.json").read_text())
        for a in raw.get("aliases", ()):
            table[a.lower()] = name
    return table


def get_spec(name_or_spec: "str | dict | ModelSpec | Path") -> ModelSpec:
    """A spec by name (or alias), from a JSON file path, a dict, or passed through."""
    if isinstance(name_or_spec, ModelSpec):
        return name_or_spec
    if isinstance(name_or_spec, dict):
        return ModelSpec.from_dict(name_or_spec)
    s = str(name_or_spec)
    if s.endswith(".json") and Path(s).is_file():
        try:
            return ModelSpec.from_dict(json.loads(Path(s).read_text()))
        except json.JSONDecodeError as e:
            raise SpecError(f"spec file {s} is not valid JSON: {e}") from e
    canon = _alias_table().get(s.lower().replace("/", "-"))
    if canon is None:
        raise UnknownModelError(
            f"unknown model spec '{s}'; known specs: {', '.join(list_specs())} "
            "(or pass a path to a spec .json file)"
        )
    return ModelSpec.from_dict(json.loads((_spec_dir() / f"{canon}.json").read_text()))
