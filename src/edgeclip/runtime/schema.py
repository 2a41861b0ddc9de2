"""The manifest's schema: every field the runtime acts on, with its type, range and known keys.

A manifest is untrusted input (whoever hands over an artifact wrote it), so `validate_manifest`
checks it whole before anything reads it, and fails with a `ManifestError` that names the field.
Sections the runtime acts on (graphs, files, preprocessing, tokenizer, text, heads, scales) are
checked key by key; sections it only displays (fidelity, quantization, tools, options, target
reports) are checked as bounded JSON data. numpy/stdlib only.
"""
from __future__ import annotations

import math
import re
from typing import Any

from ..errors import ManifestError
from .registry import graph_suffixes, target_backends

FORMAT = "edgeclip-artifact"
FORMAT_VERSION = 1

PRECISIONS = ("fp32", "fp16", "int8")
# Runtime options an export may ask of its backend: only what exports write, with the values they write.
BACKEND_OPTIONS = {"session_config": {"session.disable_quant_qdq": ("0", "1")},
                   # INT8 IRs pin the precision they were validated at (see exporter/formats/openvino.py)
                   "ov_config": {"INFERENCE_PRECISION_HINT": ("f32",)}}
OPTION_BACKEND = {"session_config": "ort", "ov_config": "openvino"}
DTYPES = ("float32", "float16", "int64", "int32")
# graph -> its one input, the dtypes it may take (Core ML feeds int32 ids), its rank, its embedding output
GRAPH_IO = {"image": ("pixel_values", ("float32",), 4, "image_embeds"),
            "text": ("input_ids", ("int64", "int32"), 2, "text_embeds")}

MAX_DEPTH = 24           # nesting of any JSON value
MAX_FILES = 20_000
MAX_CLASSES = 100_000
MAX_LABEL = 1_000        # characters of one label or template
MAX_DIM = 1 << 20        # embedding widths, class counts, shape entries
MAX_CONTEXT = 4096
MAX_IMAGE = 4096
NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")
HEX64 = re.compile(r"^[0-9a-f]{64}$")

TOP_KEYS = {"format", "format_version", "created", "target", "precision", "backend", "model", "preprocess",
            "tokenizer", "text", "graphs", "head", "heads", "logit_scale", "logit_bias", "activation", "options",
            "fidelity", "fusions", "quantization", "tools", "files", "towers", "sizes", "conformance"}
ACTIVATIONS = ("softmax", "sigmoid")  # how class scores come from logits (specs' logit_activation)
REQUIRED = ("format", "format_version", "target", "precision", "model", "preprocess", "tokenizer", "text",
            "graphs", "logit_scale", "files")


def _fail(path: str, what: str) -> ManifestError:
    return ManifestError(f"manifest field '{path}' {what}; the manifest is corrupt or was tampered with: "
                         "re-export the artifact or get it again from its source", field=path)


def _need(d: dict, key: str, path: str) -> Any:
    if key not in d:
        raise _fail(f"{path}.{key}" if path else key, "is missing")
    return d[key]


def _dict(v, path: str, allowed=None, required=()) -> dict:
    if not isinstance(v, dict):
        raise _fail(path, f"must be an object, got {type(v).__name__}")
    if allowed is not None:
        unknown = sorted(set(v) - set(allowed))
        if unknown:
            raise _fail(f"{path}.{unknown[0]}" if path else unknown[0],
                        f"is not a known field (known: {', '.join(sorted(allowed))})")
    for k in required:
        _need(v, k, path)
    return v


def _int(v, path: str, lo: int = 0, hi: int = MAX_DIM) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise _fail(path, f"must be an integer, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise _fail(path, f"is {v}, outside [{lo}, {hi}]")
    return v


def _num(v, path: str, lo: float = -1e6, hi: float = 1e6) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise _fail(path, f"must be a finite number, got {v!r}")
    if not lo <= v <= hi:
        raise _fail(path, f"is {v}, outside [{lo}, {hi}]")
    return float(v)


def _str(v, path: str, choices=None, pattern: re.Pattern | None = None, max_len: int = MAX_LABEL) -> str:
    if not isinstance(v, str):
        raise _fail(path, f"must be a string, got {type(v).__name__}")
    if choices is not None and v not in choices:
        raise _fail(path, f"is {v!r}; known: {', '.join(choices)}")
    if len(v) > max_len or (pattern is not None and not pattern.match(v)):
        raise _fail(path, f"is not a valid value ({v[:60]!r})")
    if any(ord(c) < 32 for c in v):
        raise _fail(path, "holds control characters")
    return v


def _bool(v, path: str) -> bool:
    if not isinstance(v, bool):
        raise _fail(path, f"must be true or false, got {v!r}")
    return v


def _str_list(v, path: str, max_items: int = MAX_CLASSES, min_items: int = 1) -> list:
    if not isinstance(v, list) or not min_items <= len(v) <= max_items:
        raise _fail(path, f"must be a list of {min_items} to {max_items} strings")
    for i, s in enumerate(v):
        _str(s, f"{path}[{i}]")
    return v


def _rel_path(v, path: str) -> str:
    s = _str(v, path, max_len=512)
    parts = s.split("/")
    if not s or s.startswith("/") or "\\" in s or ":" in s or any(p in ("", ".", "..") for p in parts):
        raise _fail(path, f"is {s!r}, not a relative path inside the artifact")
    return s


def check_json_data(v, path: str = "manifest", depth: int = 0) -> None:
    """Plain JSON (no NaN/Infinity), nested at most MAX_DEPTH deep."""
    if depth > MAX_DEPTH:
        raise _fail(path, f"is nested deeper than {MAX_DEPTH} levels")
    if isinstance(v, dict):
        for k, x in v.items():
            check_json_data(x, f"{path}.{k}", depth + 1)
    elif isinstance(v, list):
        for i, x in enumerate(v):
            check_json_data(x, f"{path}[{i}]", depth + 1)
    elif isinstance(v, float) and not math.isfinite(v):
        raise _fail(path, "is not a finite number")
    elif not (v is None or isinstance(v, (str, int, float, bool))):
        raise _fail(path, f"is of type {type(v).__name__}")


# ------------------------------------------------------------------------------------------ sections

def _files(v) -> dict:
    _dict(v, "files")
    if not 1 <= len(v) <= MAX_FILES:
        raise _fail("files", f"must list 1 to {MAX_FILES} files")
    for rel, meta in v.items():
        _rel_path(rel, f"files[{rel!r}]")
        _dict(meta, f"files.{rel}", allowed={"sha256", "size"}, required=("sha256", "size"))
        _str(meta["sha256"], f"files.{rel}.sha256", pattern=HEX64)
        _int(meta["size"], f"files.{rel}.size", 0, 1 << 40)
    return v


def _is_listed(rel: str, files: dict) -> bool:
    return rel in files or any(f.startswith(rel + "/") for f in files)


def _io(v, path: str) -> dict:
    _dict(v, path)
    if not 1 <= len(v) <= 64:
        raise _fail(path, "must declare 1 to 64 tensors")
    for name, t in v.items():
        p = f"{path}.{name}"
        _str(name, p, pattern=NAME)
        _dict(t, p, allowed={"dtype", "shape"}, required=("dtype", "shape"))
        _str(t["dtype"], f"{p}.dtype", choices=DTYPES)
        shape = t["shape"]
        if not isinstance(shape, list) or not 1 <= len(shape) <= 8:
            raise _fail(f"{p}.shape", "must be a list of 1 to 8 dimensions")
        for i, d in enumerate(shape):
            if isinstance(d, str):
                _str(d, f"{p}.shape[{i}]", pattern=re.compile(r"^[a-z_]{1,32}$"))
            else:
                _int(d, f"{p}.shape[{i}]", 1, MAX_DIM)
    return v


def _graph(name: str, g, target: str, files: dict) -> None:
    path = f"graphs.{name}"
    _dict(g, path, allowed={"file", "inputs", "outputs", "weights", *BACKEND_OPTIONS},
          required=("file", "inputs", "outputs"))
    rel = _rel_path(g["file"], f"{path}.file")
    if not rel.endswith(graph_suffixes(target)):
        raise _fail(f"{path}.file", f"is {rel!r}; a {target} graph is a {' or '.join(graph_suffixes(target))} file")
    if not _is_listed(rel, files):
        raise _fail(f"{path}.file", f"names {rel!r}, which is not listed with a checksum in 'files'")
    if "weights" in g:
        if target_backends()[target] != "openvino" or g["weights"] != rel[:-4] + ".bin" or g["weights"] not in files:
            raise _fail(f"{path}.weights", f"must be the listed .bin beside {rel!r}")
    inputs, outputs = _io(g["inputs"], f"{path}.inputs"), _io(g["outputs"], f"{path}.outputs")
    if name in GRAPH_IO:
        inp, dtype, rank, out = GRAPH_IO[name]
        if list(inputs) != [inp] or inputs[inp]["dtype"] not in dtype or len(inputs[inp]["shape"]) != rank:
            raise _fail(f"{path}.inputs", f"must be one {' or '.join(dtype)} tensor '{inp}' of rank {rank}")
        if out not in outputs or len(outputs[out]["shape"]) != 2:
            raise _fail(f"{path}.outputs", f"must include '{out}' of shape (batch, embed_dim)")
    for key, allowed in BACKEND_OPTIONS.items():
        if key not in g:
            continue
        cfg = _dict(g[key], f"{path}.{key}", allowed=allowed)
        if OPTION_BACKEND[key] != target_backends()[target]:
            raise _fail(f"{path}.{key}", f"does not apply to target {target}")
        for k, val in cfg.items():
            _str(val, f"{path}.{key}.{k}", choices=allowed[k])


def _graphs(v, target: str, files: dict) -> dict:
    _dict(v, "graphs", allowed=set(GRAPH_IO), required=("image",))
    for name, g in v.items():
        _graph(name, g, target, files)
    return v


def _model(v) -> dict:
    _dict(v, "model", allowed={"name", "family", "embed_dim", "spec", "source"}, required=("name", "embed_dim"))
    _str(v["name"], "model.name", max_len=256)
    _str(v.get("family", "clip"), "model.family", pattern=re.compile(r"^[a-z0-9_\-]{1,32}$"))
    _int(v["embed_dim"], "model.embed_dim", 1, 65536)
    if v.get("source") is not None:
        _str(v["source"], "model.source", max_len=4096)
    spec = _dict(v.get("spec", {}), "model.spec")
    for tower, key, hi in (("vision", "image_size", MAX_IMAGE), ("vision", "patch_size", MAX_IMAGE),
                           ("text", "context_length", MAX_CONTEXT), ("text", "vocab_size", 1 << 24)):
        t = _dict(spec.get(tower, {}), f"model.spec.{tower}")
        if t.get(key) is not None:  # towers other than the ViT have no patch size
            _int(t[key], f"model.spec.{tower}.{key}", 1, hi)
    return v


def _preprocess(pre, graphs) -> None:
    """Sizes only: the Preprocessor checks the rest when it is built from this dict."""
    _dict(pre, "preprocess", required=("image_size",))
    size = pre["image_size"]
    hw = size if isinstance(size, list) and len(size) == 2 else [size, size]
    for i, d in enumerate(hw):
        _int(d, f"preprocess.image_size[{i}]" if isinstance(size, list) else "preprocess.image_size", 1, MAX_IMAGE)
    shape = graphs["image"]["inputs"]["pixel_values"]["shape"]
    if shape[2:] != hw:
        raise _fail("preprocess.image_size", f"is {size}, but the image graph takes {shape[2:]} pixels")


def _tokenizer_text(tok, text, files: dict) -> None:
    _dict(tok, "tokenizer", allowed={"kind", "context_length", "file"}, required=("kind", "context_length"))
    _str(tok["kind"], "tokenizer.kind", choices=("clip_bpe", "hf"))
    _int(tok["context_length"], "tokenizer.context_length", 1, MAX_CONTEXT)
    if tok.get("file") is not None:
        rel = _rel_path(tok["file"], "tokenizer.file")
        if rel not in files:
            raise _fail("tokenizer.file", f"names {rel!r}, which is not listed with a checksum in 'files'")
    _dict(text, "text", allowed={"trim", "pool", "eot_token_id", "context_length", "length", "trim_note"},
          required=("trim", "context_length"))
    _bool(text["trim"], "text.trim")
    _int(text["context_length"], "text.context_length", 1, MAX_CONTEXT)
    if text["context_length"] != tok["context_length"]:
        raise _fail("text.context_length", f"is {text['context_length']}, but tokenizer.context_length is "
                                           f"{tok['context_length']}")
    if text.get("eot_token_id") is not None:
        _int(text["eot_token_id"], "text.eot_token_id", 0, 1 << 24)
    for k in ("pool", "length"):
        if k in text:
            _str(text[k], f"text.{k}")


def _head(h, image_outputs: dict) -> None:
    if h is None:
        return
    _dict(h, "head", allowed={"kind", "labels", "templates", "output", "activation"},
          required=("labels", "output"))
    _str(h.get("kind", "zero_shot"), "head.kind", choices=("zero_shot",))
    _str_list(h["labels"], "head.labels")
    if h.get("templates") is not None:
        _str_list(h["templates"], "head.templates", max_items=1000)
    _str(h.get("activation", "softmax"), "head.activation", choices=ACTIVATIONS)
    _output(h["output"], "head.output", image_outputs, len(h["labels"]))


def _output(name, path: str, image_outputs: dict, classes: int | None) -> None:
    _str(name, path, pattern=NAME)
    if name not in image_outputs:
        raise _fail(path, f"names {name!r}, which the image graph does not output")
    shape = image_outputs[name]["shape"]
    if classes is not None and (len(shape) != 2 or shape[1] != classes):
        raise _fail(path, f"names {name!r} of shape {shape}, but the head has {classes} classes")


HEAD_KEYS = {"name", "kind", "classes", "params", "activation", "info", "mcm", "shapes", "output", "mcm_output",
             "validation", "int8_top1_agreement"}


def _heads(v, image_outputs: dict) -> None:
    if v is None:
        return
    _dict(v, "heads")
    if len(v) > 64:
        raise _fail("heads", "holds more than 64 heads")
    for name, h in v.items():
        p = f"heads.{name}"
        _str(name, p, pattern=re.compile(r"^[A-Za-z0-9_\-]{1,64}$"))
        _dict(h, p, allowed=HEAD_KEYS, required=("name", "kind", "classes", "output"))
        if h["name"] != name:
            raise _fail(f"{p}.name", f"is {h['name']!r}, not the key {name!r}")
        _str(h["kind"], f"{p}.kind", pattern=re.compile(r"^[a-z_]{1,32}$"))
        _str_list(h["classes"], f"{p}.classes")
        _str(h.get("activation", "softmax"), f"{p}.activation", choices=ACTIVATIONS)
        _output(h["output"], f"{p}.output", image_outputs, len(h["classes"]))
        if h.get("mcm_output") is not None:
            _output(h["mcm_output"], f"{p}.mcm_output", image_outputs, None)
        for k, x in _dict(h.get("params", {}), f"{p}.params").items():
            _num(x, f"{p}.params.{k}", -1e9, 1e9)


def _activation(m: dict) -> None:
    """The one class-score rule: top-level 'activation'. Exports that predate the field get it here,
    once, from what they did write (the zero-shot head's own, else the model family): the only place
    a model family decides anything."""
    head = m.get("head")
    if "activation" in m:
        _str(m["activation"], "activation", choices=ACTIVATIONS)
        if head is not None and head.get("activation", m["activation"]) != m["activation"]:
            raise _fail("activation", f"is {m['activation']!r}, but head.activation is {head['activation']!r}")
    elif head is not None and "activation" in head:
        m["activation"] = head["activation"]
    else:
        m["activation"] = "sigmoid" if m["model"].get("family") == "siglip" else "softmax"


def validate_manifest(m) -> dict:
    """`m` as parsed from manifest.json, checked whole; returns it, with the fields older exports
    lack filled in (`activation`), or raises ManifestError."""
    check_json_data(m)
    _dict(m, "", required=REQUIRED)
    if m["format"] != FORMAT:
        raise _fail("format", f"is {m['format']!r}, not {FORMAT!r}: this is not an edgeclip manifest")
    version = m["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        raise ManifestError(f"manifest field 'format_version' is {version!r}; this edgeclip reads versions 1 to "
                            f"{FORMAT_VERSION}. Upgrade edgeclip or re-export the artifact", field="format_version")
    backends = target_backends()
    target = _str(m["target"], "target", choices=tuple(sorted(backends)))
    allowed = TOP_KEYS | {"openvino" if target == "openvino" else target}
    _dict(m, "", allowed=allowed)
    _str(m["precision"], "precision", choices=PRECISIONS)
    if m.get("backend") is not None and m["backend"] != backends[target]:
        raise _fail("backend", f"is {m['backend']!r}, but {target} artifacts run on {backends[target]!r}")
    files = _files(m["files"])
    _model(m["model"])
    _tokenizer_text(m["tokenizer"], m["text"], files)
    graphs = _graphs(m["graphs"], target, files)
    _preprocess(m["preprocess"], graphs)
    image_outputs = graphs["image"]["outputs"]
    _head(m.get("head"), image_outputs)
    _heads(m.get("heads"), image_outputs)
    _num(m["logit_scale"], "logit_scale", 0.0, 1e4)
    if m.get("logit_bias") is not None:
        _num(m["logit_bias"], "logit_bias", -1e4, 1e4)
    _activation(m)
    for k in ("options", "fidelity", "fusions", "quantization", "tools", "openvino", "coreml"):
        if m.get(k) is not None:
            _dict(m[k], k)
    _sizes(m.get("sizes"), graphs)
    _conformance(m.get("conformance"), files)
    return m


def _conformance(c, files: dict) -> None:
    """`conformance`: the artifact's conformance vectors file (runtime.conformance reads it)."""
    if c is None:
        return
    _dict(c, "conformance", allowed={"file", "texts", "images", "expected_from", "tolerance"}, required=("file",))
    _str(c["file"], "conformance.file", pattern=NAME)
    if c["file"] not in files:
        raise _fail("conformance.file", "names a file the artifact does not list")
    for k in ("texts", "images"):
        if k in c:
            _int(c[k], f"conformance.{k}", 0, 64)
    if "tolerance" in c:
        tol = _dict(c["tolerance"], "conformance.tolerance", allowed={"max_abs", "min_cosine"},
                    required=("max_abs", "min_cosine"))
        _num(tol["max_abs"], "conformance.tolerance.max_abs", 0.0, 1e6)
        _num(tol["min_cosine"], "conformance.tolerance.min_cosine", -1.0, 1.0)


def _sizes(sizes, graphs: dict) -> None:
    """`sizes`: per graph of the artifact, {bytes, weights, bits_per_weight} (display only, but typed)."""
    if sizes is None:
        return
    for name, entry in _dict(sizes, "sizes", allowed=set(graphs)).items():
        path = f"sizes.{name}"
        _dict(entry, path, allowed={"bytes", "weights", "bits_per_weight"}, required=("bytes", "weights"))
        _int(entry["bytes"], f"{path}.bytes", 0, 1 << 44)
        _int(entry["weights"], f"{path}.weights", 0, 1 << 40)
        if entry.get("bits_per_weight") is not None:
            _num(entry["bits_per_weight"], f"{path}.bits_per_weight", 0.0, 1e6)
