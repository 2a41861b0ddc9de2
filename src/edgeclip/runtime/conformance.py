"""Replay an artifact's conformance vectors (`conformance.npz`, written at export) through a Pipeline:
the tokenizer on the texts, the preprocessing on the source images, and both graphs on the stored
token ids and pixels, each compared with what the file expects.

    pipe, note = open_artifact("art")
    report = verify_vectors(pipe, run_graphs=not note or "replayed" in note)   # the artifact's own file
    report = verify_vectors(Pipeline.load("art"), "edited.npz")                # any file in that format

Raises ConformanceError naming the first check that differs (the tokenizer's ids, the pixels, or an
output); the file is untrusted input: read bounded, with allow_pickle=False, names checked.
"""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np

from ..errors import ArtifactError, ConformanceError, InputError
from .vectors import cosine

MAX_BYTES = 64 << 20
MAX_UNPACKED, MAX_MEMBERS = 256 << 20, 256
PIXEL_TOLERANCE = 1e-3  # preprocessed pixels (normalized units): resize implementations differ slightly


def read_vectors(pipe, path=None) -> dict:
    """The arrays of a conformance file: `path`, or the artifact's own (checked against its manifest)."""
    from .._files import read_regular
    from .manifest import read_verified

    if path is None:
        entry = pipe.manifest.get("conformance")
        if not entry:
            raise ArtifactError("this artifact carries no conformance vectors (exported before edgeclip wrote "
                                "them); re-export it, or pass a vectors file")
        data = read_verified(pipe.root, entry["file"], pipe.manifest)
    else:
        data = read_regular(path, InputError, "conformance vectors file", MAX_BYTES)
    try:
        import zipfile

        with zipfile.ZipFile(io.BytesIO(data)) as zf:  # bound what the members unpack to
            members = zf.infolist()
        if len(members) > MAX_MEMBERS or sum(m.file_size for m in members) > MAX_UNPACKED:
            raise ValueError(f"more than {MAX_MEMBERS} arrays or {MAX_UNPACKED >> 20} MiB unpacked")
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(str(arrays.pop("meta")))
    except Exception as e:  # numpy, zipfile and json raise many types for a damaged file
        raise ArtifactError(f"the conformance vectors file is not readable ({type(e).__name__}: {e})") from e
    for key in ("input_ids", "pixel_values"):
        if key not in arrays:
            raise ArtifactError(f"the conformance vectors file has no '{key}'")
    if not isinstance(meta, dict) or not isinstance(meta.get("outputs"), list):
        raise ArtifactError("the conformance vectors file has no list of outputs in its meta")
    return {"arrays": arrays, "meta": meta}


def _compare(got: np.ndarray, want: np.ndarray, tol: dict) -> dict:
    g, w = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if g.shape != w.shape:
        return {"ok": False, "why": f"shape {list(g.shape)}, expected {list(w.shape)}"}
    err = float(np.abs(g - w).max()) if g.size else 0.0
    bound = float(tol["max_abs"]) * max(1.0, float(np.abs(w).max()) if w.size else 1.0)
    cos = float(np.min(cosine(g.reshape(len(g), -1), w.reshape(len(w), -1)))) if g.ndim > 1 else 1.0
    ok = err <= bound and (g.ndim < 2 or cos >= float(tol["min_cosine"]))
    return {"ok": bool(ok), "max_abs": err, "max_abs_bound": bound, "min_cosine": cos,
            "min_cosine_bound": float(tol["min_cosine"])}


def open_artifact(path, backend: str = "auto", digest: str | None = None):
    """(Pipeline, note) to replay an artifact's vectors: its own backend; where that cannot run on this
    machine, another that runs its graphs (a TensorRT artifact's ONNX on ONNX Runtime); else a
    Pipeline for the tokenizer and preprocessing only (`note` says why its graphs are not run)."""
    from ..errors import ChecksumError, DigestError, ManifestError, MissingExtraError
    from .manifest import load_manifest
    from .pipeline import Pipeline
    from .registry import backends_for_target

    try:
        return Pipeline.load(path, backend=backend, digest=digest), None
    except (ChecksumError, DigestError, ManifestError):
        raise
    except (MissingExtraError, ArtifactError) as e:
        why = re.split(r" \(|; |\. ", str(e))[0]
    manifest, found = load_manifest(path, verify=True, digest=digest)
    own, *also = backends_for_target(manifest["target"])
    for other in also if backend == "auto" else ():
        try:
            return Pipeline.load(path, backend=other, digest=digest), f"graphs replayed on '{other}' ({why})"
        except (MissingExtraError, ArtifactError):
            continue
    return Pipeline(Path(path), manifest, "ort", None, digest=found), f"graphs not run: {why}"


def verify_vectors(pipe, path=None, run_graphs: bool = True) -> dict:
    """Replay the vectors; {"checks": {name: result}, "not_run": [...], "ok": True}. Raises
    ConformanceError at the first check outside its tolerance. `run_graphs=False`: the tokenizer
    and preprocessing only (the artifact's backend cannot run here)."""
    from .tokenizer import trim

    v = read_vectors(pipe, path)
    arrays, meta = v["arrays"], v["meta"]
    tol = meta.get("tolerance") or {"max_abs": 1e-2, "min_cosine": 0.999}
    checks, not_run = {}, []

    def check(name: str, result: dict, what: str) -> None:
        checks[name] = result
        if not result["ok"]:
            detail = result.get("why") or (f"max abs error {result['max_abs']:.3g} (bound {result['max_abs_bound']:.3g})"
                                           + (f", min cosine {result['min_cosine']:.6f} (bound "
                                              f"{result['min_cosine_bound']})" if "min_cosine" in result else ""))
            raise ConformanceError(f"conformance vectors: {what} '{name}' differs from the file: {detail}",
                                   output=name, report=checks)

    texts = arrays.get("texts")
    if texts is not None and texts.size and all(str(t) for t in texts) and pipe.manifest["tokenizer"].get("file"):
        ids = pipe.tokenize([str(t) for t in texts], truncate=True)
        same = ids.shape == arrays["input_ids"].shape and bool(np.array_equal(ids, arrays["input_ids"]))
        check("input_ids", {"ok": same, "why": None if same else "the tokenizer's ids are not the file's"},
              "the tokenizer's output")
    images = [arrays[k] for k in sorted(arrays) if k.startswith("image_")]
    if images:
        from PIL import Image

        pixels = pipe.preprocess([Image.fromarray(np.ascontiguousarray(a, dtype=np.uint8), "RGB") for a in images])
        check("pixel_values", _compare(pixels, arrays["pixel_values"], {"max_abs": PIXEL_TOLERANCE, "min_cosine": -1}),
              "the preprocessing's output")
    outs: dict = {}
    graph_outputs = meta.get("graphs") or {}
    for graph, key in (("image", "pixel_values"), ("text", "input_ids")):
        wanted = [n for n in meta["outputs"] if n in graph_outputs.get(graph, [])]
        if not wanted:
            continue
        if not run_graphs:
            not_run.append(graph)
            continue
        feed = arrays[key]
        if key == "input_ids" and pipe.manifest["text"].get("trim"):
            feed = trim(feed, pipe.manifest["text"]["eot_token_id"])
        outs.update(pipe._graph(graph).run({key: feed}))
    for name in meta["outputs"]:
        want = arrays.get(f"expected_{name}")
        if want is None:
            raise ArtifactError(f"the conformance vectors file lists output '{name}' without its values")
        if name in outs:
            check(name, _compare(outs[name], want, tol), "output")
    return {"checks": checks, "not_run": not_run, "expected_from": meta.get("expected_from"), "ok": True}
