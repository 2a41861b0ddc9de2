"""ONNX Runtime backend (CPU by default), for `.onnx` and `.ort` graphs.

Execution providers are the caller's choice (`Pipeline.load(art, providers=[...])`), never the
manifest's: names or (name, options) pairs as onnxruntime takes them. An unknown name is a UsageError
listing the known ones; a known provider this onnxruntime build lacks (onnxruntime-gpu's CUDA and
TensorRT EPs on a CPU wheel) is dropped with a RuntimeWarning and the graph runs on the providers that
remain, CPU last: an app written for a Jetson still starts on a laptop. `.info["providers"]` is what
the session really runs on (ORT also falls back by itself when an EP fails to start), and
`.info["providers_unavailable"]` names what was asked for and is not running.
"""
from __future__ import annotations

import math
import tempfile
import warnings
from pathlib import Path

import numpy as np

from ..._lazy import require
from ...errors import ArtifactError, UsageError
from ..manifest import read_verified, safe_path
from ..schema import BACKEND_OPTIONS
from . import filtered_config

_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
           "tensor(int32)": "int32"}

# Every execution provider onnxruntime has shipped (onnxruntime.get_all_providers() adds newer ones).
KNOWN_PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider",
                   "OpenVINOExecutionProvider", "CoreMLExecutionProvider", "NnapiExecutionProvider",
                   "XnnpackExecutionProvider", "DmlExecutionProvider", "ROCMExecutionProvider",
                   "MIGraphXExecutionProvider", "DnnlExecutionProvider", "QNNExecutionProvider",
                   "ArmNNExecutionProvider", "ACLExecutionProvider", "RknpuExecutionProvider",
                   "VitisAIExecutionProvider", "CANNExecutionProvider", "WebGpuExecutionProvider",
                   "AzureExecutionProvider")
# Options that name a folder the provider writes caches into: it must be an existing directory.
DIR_OPTIONS = ("trt_engine_cache_path", "trt_timing_cache_path", "cache_dir")
MAX_PROVIDERS, MAX_OPTIONS, MAX_OPTION_CHARS = 16, 64, 4096


class Backend:
    name = "ort"

    def __init__(self, path, threads: int | None = None, providers=None, config: dict | None = None,
                 inference_precision: str | None = None, data: bytes | None = None):
        """`config`: ONNX Runtime session config entries the artifact asks for (its manifest's
        `graphs.<name>.session_config`), e.g. folding weight-only dequantization at load.
        `data`: the graph's bytes, already verified; then `path` only names it in messages."""
        ort = require("onnxruntime", "running ONNX artifacts")
        if inference_precision not in (None, "f32"):
            raise ArtifactError(f"ONNX Runtime's CPU provider runs float32; inference_precision="
                                f"'{inference_precision}' is not available")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        for key, value in filtered_config(config, BACKEND_OPTIONS["session_config"], "ONNX Runtime").items():
            so.add_session_config_entry(key, value)
        if threads:
            so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = 1
        requested = check_providers(providers, KNOWN_PROVIDERS + tuple(ort.get_all_providers()))
        providers = available_providers(requested, ort.get_available_providers())
        try:
            if data is None:
                self.session = ort.InferenceSession(str(Path(path)), so, providers=providers)
            else:
                self.session = _from_bytes(ort, data, so, providers)
        except Exception as e:  # ORT raises its own exception types for unreadable graphs
            hint = " (the graph references external data, which edgeclip artifacts never hold)" \
                if "xternal data" in str(e) else ""
            raise ArtifactError(f"ONNX Runtime cannot load {path}{hint}: {e}") from e
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.signature = {"inputs": _sig(self.session.get_inputs()), "outputs": _sig(self.session.get_outputs())}
        running = self.session.get_providers()
        self.info = {"backend": "ort", "version": ort.__version__, "providers": running,
                     "threads": threads, "inference_precision": "f32"}
        missing = [_name(p) for p in requested if _name(p) not in running]
        if missing:
            self.info["providers_requested"] = [_name(p) for p in requested]
            self.info["providers_unavailable"] = missing

    @classmethod
    def open_verified(cls, root, info: dict, manifest: dict, **kw) -> "Backend":
        """One graph of an artifact, from the bytes that were checked against its manifest."""
        data = read_verified(root, info["file"], manifest)
        return cls(safe_path(root, info["file"]), data=data, **kw)

    def run(self, feeds: dict) -> dict:
        # InferenceSession.run is safe to call from several threads at once.
        outs = self.session.run(self.output_names, feeds)
        return {n: np.asarray(o) for n, o in zip(self.output_names, outs)}


def _from_bytes(ort, data: bytes, so, providers):
    # A graph from memory resolves external-data references against the working directory: point them
    # at an empty folder instead, so a graph can read no file that was not verified.
    with tempfile.TemporaryDirectory(prefix="edgeclip-noext-") as empty:
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", empty)
        return ort.InferenceSession(data, so, providers=providers)


def _sig(args) -> dict:
    return {a.name: (_DTYPES.get(a.type, a.type), len(a.shape) if isinstance(a.shape, list) else None)
            for a in args}


def _name(provider) -> str:
    return provider if isinstance(provider, str) else provider[0]


def check_providers(providers, known) -> list:
    """The caller's provider list, checked: names or (name, {option: str|int|float|bool}) pairs, known
    names only, each once. None -> CPU only. Raises UsageError saying what is wrong."""
    if providers is None:
        return ["CPUExecutionProvider"]
    if isinstance(providers, (str, bytes)) or not isinstance(providers, (list, tuple)) or not providers \
            or len(providers) > MAX_PROVIDERS:
        raise UsageError(f"providers must be a list of 1 to {MAX_PROVIDERS} execution provider names or "
                         f"(name, options) pairs, e.g. ['CUDAExecutionProvider', 'CPUExecutionProvider']; "
                         f"got {providers!r:.200}")
    out, seen = [], set()
    for p in providers:
        if isinstance(p, (tuple, list)) and len(p) == 2 and isinstance(p[1], dict):
            name, options = p[0], _check_options(p[0], p[1])
        elif isinstance(p, str):
            name, options = p, None
        else:
            raise UsageError(f"execution provider {p!r:.200} is neither a name nor a (name, options dict) pair")
        if name not in known:
            raise UsageError(f"unknown execution provider {name!r:.100}; known providers: "
                             f"{', '.join(sorted(set(known)))}")
        if name in seen:
            raise UsageError(f"execution provider {name} is listed twice; list each provider once")
        seen.add(name)
        out.append(name if options is None else (name, options))
    return out


def _check_options(name, options: dict) -> dict:
    """Plain option values only (onnxruntime turns each into a string), and cache folders that exist."""
    if len(options) > MAX_OPTIONS:
        raise UsageError(f"{name!r:.100} has {len(options)} options; at most {MAX_OPTIONS}")
    for key, value in options.items():
        if not isinstance(key, str) or not key or len(key) > 128:
            raise UsageError(f"{name!r:.100} option names must be non-empty strings, got {key!r:.100}")
        plain = isinstance(value, (str, int, float, bool)) and not (isinstance(value, float) and
                                                                    not math.isfinite(value))
        if not plain or len(str(value)) > MAX_OPTION_CHARS or "\0" in str(value):
            raise UsageError(f"{name} option {key}={value!r:.100} must be a string, integer, finite number "
                             "or boolean (under 4096 characters)")
        if key in DIR_OPTIONS and (not isinstance(value, str) or not Path(value).is_dir()):
            raise UsageError(f"{name} option {key}={value!r:.200} must name an existing directory (the "
                             "provider writes its cache files there): create it first")
    return dict(options)


def available_providers(requested: list, available) -> list:
    """`requested` less the providers this onnxruntime build lacks (warned about), CPU last if absent."""
    kept = [p for p in requested if _name(p) in available]
    dropped = [_name(p) for p in requested if _name(p) not in available]
    if "CPUExecutionProvider" not in [_name(p) for p in kept]:
        kept.append("CPUExecutionProvider")
    if dropped:
        warnings.warn(f"this onnxruntime build has no {', '.join(dropped)} (available: {', '.join(available)}); "
                      f"running on {', '.join(_name(p) for p in kept)}. Install the onnxruntime package "
                      "built for that hardware (onnxruntime-gpu, or NVIDIA's Jetson wheel) to use it",
                      RuntimeWarning, stacklevel=4)
    return kept
