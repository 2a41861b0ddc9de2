"""Bytes and bits per weight per graph (image, text), for every bench variant.

Each variant's `sizes` has the shape of the manifest's own section: {graph: {"bytes", "weights",
"bits_per_weight"}}. Artifacts carry it in their manifest (exporter `graph_sizes`); for older
artifacts and for the baselines it is worked out here from the graph files and the model's
parameter count. `weights` counts the model as loaded (before any folding), as the exporter does,
so bits per weight of every variant of one model share one denominator; `None` where the variant
does not know its model.
"""
from __future__ import annotations

from pathlib import Path

from ..exporter.target import TOWERS, path_bytes, size_entry as entry, tower_weights  # noqa: F401  (the exporter's rule)
from ..runtime.manifest import graph_files


def graph_bytes(path: Path) -> int:
    """A graph's size on disk: .xml with its .bin, a package folder's regular files, else the file."""
    size = path_bytes(path)
    if path.suffix == ".xml" and path.with_suffix(".bin").is_file():
        size += path.with_suffix(".bin").stat().st_size
    return size


def _head_weights(manifest: dict) -> int | None:
    """Weights the export adds to the image graph beyond the tower: the zero-shot class embeddings
    (classes x embedding width). None with adapter heads: an older manifest does not say their sizes."""
    if manifest.get("heads"):
        return None
    head = manifest.get("head") or {}
    return len(head.get("labels") or ()) * int(manifest["model"].get("embed_dim") or 0)


def artifact_sizes(manifest: dict, towers: dict | None = None) -> dict:
    """An artifact's sizes: the manifest's section where it has a graph's entry; otherwise the bytes of
    the graph's listed files, and weights from `towers` ({graph: parameter count}) when given."""
    recorded = manifest.get("sizes") or {}
    out = {}
    for g, info in manifest["graphs"].items():
        if g in recorded:
            out[g] = dict(recorded[g])
            continue
        size = sum(int(f["size"]) for f in graph_files(info, manifest["files"]).values())
        w = (towers or {}).get(g)
        if w is not None and g == "image":
            extra = _head_weights(manifest)
            w = None if extra is None else w + extra
        out[g] = entry(size, w)
    return out


def baseline_sizes(root: Path, graphs: dict, towers: dict) -> dict:
    """A baseline's sizes: its graph files on disk over the towers' parameter counts."""
    return {g: entry(graph_bytes(root / f), towers.get(g)) for g, f in graphs.items()}


def overall_bits(sizes: dict) -> float | None:
    """Bits per weight over both graphs; None unless every graph knows its weights."""
    if not known_weights(sizes):
        return None
    return round(sum(s["bytes"] for s in sizes.values()) * 8 / sum(s["weights"] for s in sizes.values()), 3)


def known_weights(sizes: dict) -> bool:
    """Every graph's weights are known (so bits per weight are too)."""
    return bool(sizes) and all(s.get("weights") for s in sizes.values())
