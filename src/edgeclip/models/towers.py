"""The tower seam: an image or text tower is a registered class named by its spec's `kind`.

A spec's `vision.kind` ("vit", ...) and `text.kind` ("transformer", ...) pick the class that builds
the tower. Besides `forward`, a tower answers what the export targets need to know and applies the
rewrites they ask for, so no target reaches into one architecture's modules:

- `prepare_export(pooled_only_last)`: the exact rewrites every export copy gets;
- `prefer_gemm()`: runtimes whose GEMM beats their convolution (ONNX Runtime on CPU);
- `rewrite_for_ane()`: Apple's Neural Engine layout (Core ML before iOS 18);
- `quantizable(path)`: which linear layers INT8 may quantize (module path inside the tower);
- `attention_layout()`: (attention ops, heads each), which Core ML's structural check counts;
- `input_decl()`: the graph input's name, dtype and shape;
- `export_report()`: what the manifest records of the tower (kind, rewrites that ran).

A new tower kind is one module defining a `Tower` subclass decorated with `register_tower`.
"""
from __future__ import annotations

from typing import Callable, ClassVar

import torch.nn as nn

from ..errors import EdgeClipError, SpecError

ROLES = ("vision", "text")
_TOWERS: dict[tuple[str, str], type] = {}


class Tower(nn.Module):
    """Base of image and text towers: the hooks the export path calls (defaults: nothing to do)."""

    kind: ClassVar[str] = ""
    role: ClassVar[str] = ""

    def prepare_export(self, pooled_only_last: bool) -> None:
        """Exact rewrites for an export copy (in place)."""

    def prefer_gemm(self) -> None:
        """Run convolutions that are GEMMs in disguise as GEMMs (same sums), where the tower has any."""

    def prefer_depthwise(self) -> None:
        """Run grouped convolutions with several outputs per input channel as depthwise ones (same
        sums), where the tower has any and its export is folded."""

    def prefer_mask_pooling(self) -> None:
        """Pool by plain ops: a (B, L) one-hot of the pooled position multiplied in, instead of
        ArgMax/Gather over computed indices (mobile accelerators take neither). Text towers that pool
        one token override it; the default does nothing."""

    def rewrite_for_ane(self) -> None:
        raise EdgeClipError(f"the {self.kind} {self.role} tower has no Neural Engine layout; export Core ML "
                            "with --min-ios 18 (fused attention) instead")

    def quantizable(self, path: str) -> bool:
        """Whether INT8 may quantize the linear layer at module path `path` (inside this tower)."""
        return False

    def attention_layout(self) -> tuple[int, int]:
        """(attention ops in the traced graph, heads each)."""
        return 0, 0

    def input_decl(self, trim: bool = False) -> dict:
        raise NotImplementedError

    def random_parameters(self) -> list:
        """Bare parameters (no Linear/Conv/Norm/Embedding owns them) that `ClipModel.init_random` draws
        with std 0.02 besides the ones every tower kind shares (position tables, class tokens, probes)."""
        return []

    def export_report(self) -> dict:
        """What the manifest records of this tower: its kind and the rewrites that ran (a tower that
        folds branches sets `self.reparameterized` to a dict of counts)."""
        report = {"kind": self.kind}
        if getattr(self, "reparameterized", None):
            report["reparameterized"] = dict(self.reparameterized)
        return report


def register_tower(kind: str, role: str) -> Callable[[type], type]:
    """Class decorator: the tower class for specs whose `<role>.kind` is `kind`."""
    if role not in ROLES:
        raise EdgeClipError(f"tower role must be one of {', '.join(ROLES)}, got {role!r}")

    def deco(cls: type) -> type:
        cls.kind, cls.role = kind, role
        _TOWERS[(role, kind)] = cls
        return cls

    return deco


def tower_kinds(role: str) -> list[str]:
    return sorted(k for r, k in _TOWERS if r == role)


def build_tower(role: str, spec, embed_dim: int) -> Tower:
    cls = _TOWERS.get((role, spec.kind))
    if cls is None:
        raise SpecError(f"unknown {role} tower kind {spec.kind!r}; known: {', '.join(tower_kinds(role))}")
    return cls(spec, embed_dim)
