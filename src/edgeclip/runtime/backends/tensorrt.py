"""TensorRT backend, for the `.onnx` graphs of `tensorrt` artifacts (NVIDIA GPUs, Jetson).

An engine is specific to the GPU model, its compute capability and the exact TensorRT version, so
artifacts ship TensorRT-ready ONNX and the engine ("plan") is built on the device at first load, then
cached under a key over all of those plus the graph's sha256, the precision and the optimization
profiles (`cache_key`). Plans live in the artifact folder's `engines/` when it is writable, else in
the user cache (`$EDGECLIP_CACHE/engines` or `~/.cache/edgeclip/engines`; `plan_path`). The builder
timing cache lives in the user cache only.

A plan is native code and data TensorRT trusts completely, and an artifact folder comes from
whoever handed it over: a plan is only loaded back if it carries this user's HMAC (`<key>.plan.sig`,
keyed by a secret in the user cache), so a plan shipped inside a downloaded artifact is rebuilt, not
run. The plan file itself stays a raw TensorRT plan (`trtexec --loadEngine` reads it).

Builder settings follow the TensorRT version (`build_settings`): 10.x builds weakly typed networks
with the FP16 / INT8 builder flags from the artifact's precision; 11.x removed those flags, so it
builds strongly typed networks and the precision comes from the ONNX itself (fp16 tensors, Q/DQ).
What manifests carry for this backend (written by the tensorrt target):

    "tensorrt": {"version": "10.3",                # the oldest TensorRT the graphs were checked for
                 "precision": "fp16",
                 "graphs": {"image": {"profiles": {"pixel_values": {"min": [1, 3, 224, 224], "opt": [...],
                                                                    "max": [...]}}, "check": {...}},
                            "text": {"profiles": {"input_ids": {"min": [1, 1], "opt": [...], "max": [...]}}}}}

(the precision built is the manifest's top-level `precision`; `check` is the export's report, not read here)

Only the functions above the "needs TensorRT" line run without TensorRT; the rest imports `tensorrt`
and cuda-python (`cuda.bindings.runtime`, or `cuda.cudart` before cuda-python 12.6) lazily. Device
memory goes through cuda-python, not torch: the runtime never imports torch.
"""
from __future__ import annotations

import hashlib
import hmac
import importlib
import json
import logging
import os
import re
import secrets
import tempfile
import threading
from pathlib import Path

import numpy as np

from ...errors import ArtifactError, InputError, MissingExtraError, TensorRTCompatError
from ..manifest import read_bounded, read_manifest, read_verified, safe_path
from ..registry import backend_for_target

PLAN_FORMAT = "edgeclip-trt-plan/1"   # bump when what goes into a plan changes: old plans then miss
PRECISIONS = ("fp32", "fp16", "int8")
PROFILE_KEYS = ("min", "opt", "max")
DEFAULT_WORKSPACE_MB = 1024
MAX_DIM = 1 << 20
MAX_RANK = 8
MAX_PROFILE_INPUTS = 16
MAX_PLAN_BYTES = 8 << 30
MAX_ONNX_BYTES = 4 << 30
MAX_TIMING_BYTES = 256 << 20
HEX64 = re.compile(r"^[0-9a-f]{64}$")
_VERSION = re.compile(r"^(\d{1,3})(?:\.(\d{1,4}))?(?:\.\d{1,6}){0,2}$")
NVIDIA_HINT = ("TensorRT and cuda-python come from NVIDIA: on Jetson, TensorRT ships with JetPack and "
               "`pip install cuda-python` adds the rest; elsewhere `pip install --extra-index-url "
               "https://pypi.nvidia.com tensorrt cuda-python`")
# 10.x: precision from builder flags (the graph's fp16 tensors / Q/DQ are hints); 11.x: none exist
_FLAGS_10 = {"fp32": (), "fp16": ("FP16",), "int8": ("INT8",)}
_log = logging.getLogger("edgeclip.tensorrt")


def parse_trt_version(version) -> tuple[int, int]:
    """'10.3.0.26' -> (10, 3); '11' -> (11, 0)."""
    m = _VERSION.match(str(version).strip())
    if m is None:
        raise TensorRTCompatError(f"TensorRT version {version!r:.40} is not of the form MAJOR[.MINOR[.PATCH[.BUILD]]]",
                                  rule="version")
    return int(m.group(1)), int(m.group(2) or 0)


def _dims(value, where: str, node: str) -> list[int]:
    if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= MAX_RANK:
        raise TensorRTCompatError(f"{where} must be a list of 1 to {MAX_RANK} dimensions, got {value!r:.80}",
                                  node=node, rule="profile")
    for d in value:
        if not isinstance(d, int) or isinstance(d, bool) or not 1 <= d <= MAX_DIM:
            raise TensorRTCompatError(f"{where} holds {d!r:.20}; dimensions are whole numbers from 1 to {MAX_DIM}",
                                      node=node, rule="profile")
    return [int(d) for d in value]


def _profile(name: str, p, shape) -> dict:
    """One input's {min, opt, max}, checked: same rank, min <= opt <= max, static dims kept."""
    if not isinstance(p, dict) or set(p) != set(PROFILE_KEYS):
        raise TensorRTCompatError(f"the optimization profile of input '{name}' must hold exactly min, opt and max, "
                                  f"got {sorted(p) if isinstance(p, dict) else p!r:.80}", node=name, rule="profile")
    out = {k: _dims(p[k], f"profile {k} of input '{name}'", name) for k in PROFILE_KEYS}
    if len({len(v) for v in out.values()}) != 1:
        raise TensorRTCompatError(f"the profile of input '{name}' mixes ranks: {out}", node=name, rule="profile")
    for i, (lo, opt, hi) in enumerate(zip(out["min"], out["opt"], out["max"])):
        if not lo <= opt <= hi:
            raise TensorRTCompatError(f"profile of input '{name}', dimension {i}: needs min <= opt <= max, got "
                                      f"{lo}, {opt}, {hi}", node=name, rule="profile")
    if shape is not None:
        if len(shape) != len(out["min"]):
            raise TensorRTCompatError(f"input '{name}' has rank {len(shape)}, its profile rank {len(out['min'])}",
                                      node=name, rule="profile")
        for i, d in enumerate(shape):
            if _static(d) and any(out[k][i] != d for k in PROFILE_KEYS):
                raise TensorRTCompatError(f"input '{name}' dimension {i} is fixed at {d}; its profile says "
                                          f"{out['min'][i]}..{out['max'][i]}", node=name, rule="profile")
    return out


def _static(d) -> bool:
    return isinstance(d, int) and not isinstance(d, bool) and d >= 0


def check_profiles(profiles, inputs: dict | None = None) -> dict:
    """{input: {"min": [...], "opt": [...], "max": [...]}} checked and made canonical (lists of ints,
    inputs in name order). With `inputs` ({name: shape}, a shape entry that is not a whole number being
    dynamic), every input with a dynamic dimension must have a profile and every profile an input."""
    if not isinstance(profiles, dict) or len(profiles) > MAX_PROFILE_INPUTS:
        raise TensorRTCompatError(f"optimization profiles must be a mapping of at most {MAX_PROFILE_INPUTS} "
                                  f"inputs to {{min, opt, max}}, got {profiles!r:.80}", rule="profile")
    for name in profiles:
        if not isinstance(name, str) or not name or len(name) > 256:
            raise TensorRTCompatError(f"profile input name {name!r:.40} is not a name", rule="profile")
        if inputs is not None and name not in inputs:
            raise TensorRTCompatError(f"there is a profile for '{name}', which is not an input of the graph "
                                      f"(inputs: {', '.join(inputs)})", node=name, rule="profile")
    for name, shape in (inputs or {}).items():
        if name not in profiles and not all(_static(d) for d in shape):
            raise TensorRTCompatError(f"input '{name}' has dynamic dimensions {list(shape)} and no optimization "
                                      "profile (min/opt/max); re-export with a profile for it", node=name,
                                      rule="profile")
    return {n: _profile(n, profiles[n], (inputs or {}).get(n)) for n in sorted(profiles)}


def build_settings(trt_version: str, precision: str, profiles: dict, inputs: dict | None = None) -> dict:
    """How to build an engine with TensorRT `trt_version`: network and builder flags (names of
    `trt.NetworkDefinitionCreationFlag` / `trt.BuilderFlag` members), and the checked profiles."""
    major, minor = parse_trt_version(trt_version)
    if major < 10:
        raise TensorRTCompatError(f"TensorRT {trt_version} is older than 10.0, the oldest edgeclip builds engines "
                                  "with (JetPack 6 ships 10.3); upgrade TensorRT", rule="version")
    if precision not in PRECISIONS:
        raise TensorRTCompatError(f"precision {precision!r:.20} is not one of {', '.join(PRECISIONS)}",
                                  rule="precision")
    strongly_typed = major >= 11
    return {"trt_version": f"{major}.{minor}", "precision": precision, "strongly_typed": strongly_typed,
            "network_flags": ["STRONGLY_TYPED"] if strongly_typed else [],
            "builder_flags": [] if strongly_typed else list(_FLAGS_10[precision]),
            # fp32 artifacts were validated in fp32: TF32 matmuls (on by default) would change the figures
            "clear_flags": ["TF32"] if precision == "fp32" else [],
            "profiles": check_profiles(profiles, inputs)}


def _compute_capability(cc) -> str:
    if isinstance(cc, (tuple, list)) and len(cc) == 2 and all(isinstance(x, int) for x in cc):
        return f"{cc[0]}.{cc[1]}"
    if isinstance(cc, str) and re.fullmatch(r"\d{1,2}\.\d{1,2}", cc.strip()):
        return cc.strip()
    raise ArtifactError(f"compute capability {cc!r:.20} is neither (major, minor) nor 'MAJOR.MINOR'")


def _hex_digest(digest) -> str:
    d = str(digest).strip().lower()
    d = d[7:] if d.startswith("sha256:") else d
    if not HEX64.match(d):
        raise ArtifactError(f"artifact digest {digest!r:.80} is not a sha256 digest")
    return d


def cache_key(gpu_name: str, compute_capability, trt_version: str, artifact_digest: str, precision: str,
              profiles: dict) -> str:
    """sha256 hex over canonical JSON of everything an engine depends on: any change, another key.
    The backend passes the graph file's sha256 as `artifact_digest` (what the engine is built from)."""
    payload = {"format": PLAN_FORMAT, "gpu": str(gpu_name).strip(), "cc": _compute_capability(compute_capability),
               "trt": str(trt_version).strip(), "graph": _hex_digest(artifact_digest), "precision": str(precision),
               "profiles": check_profiles(profiles)}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def user_cache_dir() -> Path:
    """Where plans go when the artifact folder is read-only: $EDGECLIP_CACHE/engines, else
    ~/.cache/edgeclip/engines."""
    root = os.environ.get("EDGECLIP_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "edgeclip"
    return base.absolute() / "engines"


def plan_path(artifact_root, key: str) -> Path:
    """`<artifact>/engines/<key>.plan` when that folder is (or can be made) writable, else the same
    name in `user_cache_dir()`. `key` must be a cache_key (64 hex digits): it is the file name."""
    if not isinstance(key, str) or not HEX64.match(key):
        raise ArtifactError(f"engine cache key {key!r:.80} is not 64 hex digits (a cache_key)")
    root = Path(artifact_root)
    engines = root / "engines"
    if engines.is_symlink() or (engines.exists() and not engines.is_dir()):
        raise ArtifactError(f"{engines} is not a plain folder; an artifact holds plain files only (remove it)")
    here = engines if engines.is_dir() else root
    if root.is_dir() and os.access(here, os.W_OK | os.X_OK):
        return safe_path(root, f"engines/{key}.plan")
    return user_cache_dir() / f"{key}.plan"


def _secret(create: bool) -> bytes | None:
    """This user's plan-signing secret (32 random bytes in the user cache, mode 0600)."""
    path = user_cache_dir() / "signing.key"
    try:
        if not path.exists() and create:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
        data = read_bounded(path, 64, "plan signing key") if path.exists() else None
    except (OSError, ArtifactError) as e:  # FileExistsError: another process made it first
        if isinstance(e, FileExistsError):
            return _secret(False)
        _log.warning("no plan signing key (%s): TensorRT plans will not be cached", e)
        return None
    return data if data and len(data) == 32 else None


def _signature(secret: bytes, key: str, plan: bytes) -> str:
    return hmac.new(secret, key.encode() + hashlib.sha256(plan).digest(), hashlib.sha256).hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_plan(path: Path, key: str, plan: bytes) -> bool:
    """Write `plan` and its signature; False (with a warning) when it cannot be cached."""
    secret = _secret(create=True)
    if secret is None:
        return False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, plan)
        _write_atomic(path.with_name(path.name + ".sig"), _signature(secret, key, plan).encode())
    except OSError as e:
        _log.warning("cannot cache the TensorRT plan at %s (%s); it will be rebuilt next time", path, e)
        return False
    return True


def load_plan(path: Path, key: str) -> bytes | None:
    """The cached plan at `path` if this user signed it for `key`; None if absent, unsigned, signed by
    someone else or changed since (then it is rebuilt, never deserialized)."""
    sig_path = path.with_name(path.name + ".sig")
    if not path.is_file() or not sig_path.is_file():
        return None
    secret = _secret(create=False)
    if secret is None:
        return None
    plan = read_bounded(path, MAX_PLAN_BYTES, "TensorRT plan")
    sig = read_bounded(sig_path, 128, "TensorRT plan signature").decode("ascii", "replace").strip()
    if not hmac.compare_digest(sig, _signature(secret, key, plan)):
        _log.warning("%s is not a plan this user built (no valid signature); rebuilding it", path)
        return None
    return plan


def timing_cache_path(gpu_name: str, compute_capability, trt_version: str) -> Path:
    """The builder's timing cache: one per GPU model and TensorRT version, in the user cache only."""
    ident = json.dumps([str(gpu_name), _compute_capability(compute_capability), str(trt_version)])
    return user_cache_dir() / f"timing-{hashlib.sha256(ident.encode()).hexdigest()[:32]}.cache"


def graph_profiles(manifest: dict, info: dict) -> dict:
    """The optimization profiles the manifest's `tensorrt.graphs.<graph>.profiles` gives the graph
    `info` ({} if none: `check_profiles` then refuses any dynamic input). The manifest is untrusted:
    whatever is there goes through `check_profiles` before use."""
    name = next((n for n, g in manifest["graphs"].items() if g.get("file") == info["file"]), None)
    section = manifest.get("tensorrt")
    graphs = section.get("graphs") if isinstance(section, dict) else None
    entry = graphs.get(name) if isinstance(graphs, dict) else None
    if section is not None and not isinstance(entry, (dict, type(None))):
        raise TensorRTCompatError(f"manifest field 'tensorrt.graphs.{name}' is not a mapping", rule="profile")
    return (entry or {}).get("profiles") or {}


def check_aimed_version(manifest: dict, installed: str) -> None:
    """The graphs were checked against `tensorrt.version`'s parser: an older TensorRT may lack ops."""
    section = manifest.get("tensorrt")
    aimed = section.get("version") if isinstance(section, dict) else None
    if aimed is not None and parse_trt_version(installed) < parse_trt_version(aimed):
        raise TensorRTCompatError(f"this artifact was made for TensorRT {aimed} or newer; this machine has "
                                  f"{installed}: re-export it with --trt-version {installed}", rule="version")


def check_feed_shape(name: str, shape: tuple, profile: dict | None, fixed) -> None:
    """An input's shape fits the engine: inside its profile, or equal to its fixed shape."""
    if profile is None:
        if tuple(shape) != tuple(fixed):
            raise InputError(f"input '{name}' has shape {tuple(shape)}; this engine takes {tuple(fixed)}")
        return
    lo, hi = profile["min"], profile["max"]
    if len(shape) != len(lo) or any(not a <= d <= b for d, a, b in zip(shape, lo, hi)):
        raise InputError(f"input '{name}' has shape {tuple(shape)}; this engine's profile takes {tuple(lo)} up to "
                         f"{tuple(hi)} (split the batch, or re-export with a larger --profile)")


# ------------------------------------------------------------------------------- needs TensorRT


def _libraries():
    """(tensorrt, cuda runtime bindings), or MissingExtraError naming what to install."""
    purpose = f"building and running TensorRT engines; {NVIDIA_HINT}"
    try:
        trt = importlib.import_module("tensorrt")
    except (ImportError, OSError) as e:  # OSError: the bindings wheel without NVIDIA's libraries
        raise MissingExtraError("tensorrt", "tensorrt", purpose) from e
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return trt, importlib.import_module(name)
        except (ImportError, OSError):
            continue
    raise MissingExtraError("cuda-python", "tensorrt", purpose)


def _logger(trt):
    # TensorRT wants one logger per process
    if getattr(_logger, "value", None) is None:
        _logger.value = trt.Logger(trt.Logger.WARNING)
    return _logger.value


class _Cuda:
    """One device, one stream and grow-only device buffers per tensor name, through cuda-python."""

    def __init__(self, cudart, device: int):
        self.rt, self.device, self.buffers = cudart, int(device), {}
        self.call(cudart.cudaSetDevice(self.device))
        self.stream = self.call(cudart.cudaStreamCreate())

    def call(self, result):
        err, rest = result[0], result[1:]
        if int(getattr(err, "value", err)) != 0:
            name = self.rt.cudaGetErrorName(err)[1]
            raise ArtifactError(f"CUDA call failed: {name!r} on device {getattr(self, 'device', '?')}")
        return rest[0] if len(rest) == 1 else None

    def identity(self) -> tuple[str, str]:
        prop = self.call(self.rt.cudaGetDeviceProperties(self.device))
        name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
        return name.split("\x00")[0].strip(), f"{prop.major}.{prop.minor}"

    def buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self.buffers.get(name, (None, 0))
        if size < nbytes:
            if ptr is not None:
                self.call(self.rt.cudaFree(ptr))
                del self.buffers[name]
            ptr, size = self.call(self.rt.cudaMalloc(max(nbytes, 1))), max(nbytes, 1)
            self.buffers[name] = (ptr, size)
        return int(ptr)

    def copy(self, dst: int, src: int, nbytes: int, to_device: bool) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice if to_device else \
            self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self.call(self.rt.cudaMemcpyAsync(dst, src, nbytes, kind, self.stream))

    def close(self) -> None:
        for ptr, _ in self.buffers.values():
            self.rt.cudaFree(ptr)
        self.buffers = {}
        if self.stream is not None:
            self.rt.cudaStreamDestroy(self.stream)
            self.stream = None


def _parse_error(parser) -> TensorRTCompatError:
    errors = [parser.get_error(i) for i in range(parser.num_errors)]
    first = errors[0] if errors else None
    node = first.node_name() if first is not None and hasattr(first, "node_name") else None
    text = "; ".join(f"{e.desc()} (node {e.node_name() if hasattr(e, 'node_name') else e.node()})"
                     for e in errors[:5])
    return TensorRTCompatError(f"TensorRT's ONNX parser refused the graph: {text or 'no reason given'}. Re-export "
                               "with --target tensorrt (and --trt-version for this TensorRT)", node=node,
                               rule="parser")


def _network_inputs(network) -> dict:
    out = {}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        out[t.name] = [d if d >= 0 else None for d in t.shape]
    return out


def build_plan(trt, onnx: bytes, settings: dict, timing: bytes = b"",
               workspace_mb: int = DEFAULT_WORKSPACE_MB) -> tuple[bytes, bytes]:
    """(serialized engine, serialized timing cache) from ONNX bytes and `build_settings`."""
    logger = _logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    for f in settings["network_flags"]:
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, f))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx):
        raise _parse_error(parser)
    profiles = check_profiles(settings["profiles"], _network_inputs(network))  # the graph's own dims
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    for f in settings["builder_flags"]:
        config.set_flag(getattr(trt.BuilderFlag, f))
    for f in settings["clear_flags"]:
        if hasattr(trt.BuilderFlag, f):
            config.clear_flag(getattr(trt.BuilderFlag, f))
    if profiles:
        profile = builder.create_optimization_profile()
        for name, p in profiles.items():
            profile.set_shape(name, p["min"], p["opt"], p["max"])
        config.add_optimization_profile(profile)
    try:
        cache = config.create_timing_cache(timing or b"")
    except Exception:  # a corrupt cache file: TensorRT raises its own error types
        cache = None
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        # a timing cache from another TensorRT build or GPU: start a fresh one rather than mix timings
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ArtifactError("TensorRT could not build an engine from this graph (its log above says why); "
                            "try a larger workspace_mb or re-export with --target tensorrt")
    return bytes(memoryview(plan)), bytes(memoryview(config.get_timing_cache().serialize()))


def _build(trt, data: bytes, settings: dict, ident: tuple, workspace_mb: int, say) -> bytes:
    timing_file = timing_cache_path(*ident, trt.__version__)
    timing = read_bounded(timing_file, MAX_TIMING_BYTES, "timing cache") if timing_file.is_file() else b""
    say(f"building a TensorRT {trt.__version__} engine for {ident[0]} ({settings['precision']}, "
        f"{'strongly typed' if settings['strongly_typed'] else 'flags ' + ','.join(settings['builder_flags'])}); "
        "this takes minutes, once per device")
    plan, timing = build_plan(trt, data, settings, timing, workspace_mb)
    try:
        timing_file.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(timing_file, timing)
    except OSError as e:
        say(f"timing cache not saved ({e})")
    return plan


class Backend:
    name = "tensorrt"

    def __init__(self, path, threads: int | None = None, precision: str = "fp32", profiles: dict | None = None,
                 inputs: dict | None = None, digest: str | None = None, artifact_root=None,
                 workspace_mb: int = DEFAULT_WORKSPACE_MB, device: int = 0, rebuild: bool = False,
                 inference_precision: str | None = None, data: bytes | None = None, log=None):
        """`data`: the ONNX bytes, already verified (else read from `path`). `profiles`/`inputs`: the
        optimization profiles and the declared input shapes (a manifest's). `digest`: the graph's
        sha256 (else computed). `rebuild`: ignore a cached plan. `threads` is recorded only."""
        trt, cudart = _libraries()
        if inference_precision not in (None, "f32") or (inference_precision and precision != "fp32"):
            raise ArtifactError(f"a {precision} TensorRT engine runs at the artifact's precision; "
                                f"inference_precision={inference_precision!r} does not apply")
        path = Path(path)
        data = read_bounded(path, MAX_ONNX_BYTES, "ONNX graph") if data is None else data
        self._say = log or _log.info
        self._lock = threading.Lock()
        self._cuda = _Cuda(cudart, device)
        gpu, cc = self._cuda.identity()
        self.settings = build_settings(trt.__version__, precision, profiles or {}, inputs)
        key = cache_key(gpu, cc, trt.__version__, digest or hashlib.sha256(data).hexdigest(), precision,
                        self.settings["profiles"])
        self.plan_file = plan_path(artifact_root if artifact_root is not None else path.parent, key)
        built = self._open_engine(trt, data, key, (gpu, cc), workspace_mb, rebuild)
        self._describe(trt)
        self.info = {"backend": "tensorrt", "version": trt.__version__, "device": gpu, "compute_capability": cc,
                     "precision": precision, "strongly_typed": self.settings["strongly_typed"],
                     "builder_flags": self.settings["builder_flags"], "plan": str(self.plan_file), "built": built,
                     "threads": threads,
                     "inference_precision": {"fp32": "f32", "fp16": "f16"}.get(precision, precision)}

    def _open_engine(self, trt, data: bytes, key: str, ident: tuple, workspace_mb: int, rebuild: bool) -> bool:
        """Deserialize the signed cached plan, or build (and cache) one; True when built now."""
        self._runtime = trt.Runtime(_logger(trt))  # must outlive the engine
        plan = None if rebuild else load_plan(self.plan_file, key)
        self.engine = self._runtime.deserialize_cuda_engine(plan) if plan is not None else None
        built = self.engine is None
        if built:  # no plan, or one this TensorRT cannot read (a different build): make a new one
            plan = _build(trt, data, self.settings, ident, workspace_mb, self._say)
            if save_plan(self.plan_file, key, plan):
                self._say(f"TensorRT plan cached at {self.plan_file}")
            self.engine = self._runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise ArtifactError("TensorRT could not deserialize the engine it just built; see its log above")
        self.context = self.engine.create_execution_context()
        return built

    def _describe(self, trt) -> None:
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        self._dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self._fixed = {n: tuple(self.engine.get_tensor_shape(n)) for n in names}
        self.signature = {kind: {n: (self._dtypes[n].name, len(self._fixed[n])) for n in group}
                          for kind, group in (("inputs", self.input_names), ("outputs", self.output_names))}

    @classmethod
    def open_verified(cls, root, info: dict, manifest: dict, **kw) -> "Backend":
        """One graph of a tensorrt artifact, from the bytes checked against its manifest, with the
        manifest's precision and optimization profiles."""
        trt, _ = _libraries()  # before hashing a large graph for nothing
        check_aimed_version(manifest, trt.__version__)
        data = read_verified(root, info["file"], manifest)
        inputs = {n: t["shape"] for n, t in info["inputs"].items()}
        kw.setdefault("precision", manifest["precision"])
        return cls(safe_path(root, info["file"]), data=data, profiles=graph_profiles(manifest, info), inputs=inputs,
                   digest=manifest["files"][info["file"]]["sha256"], artifact_root=root, **kw)

    def run(self, feeds: dict) -> dict:
        # one execution context and one set of buffers: one call at a time
        with self._lock:
            self._cuda.call(self._cuda.rt.cudaSetDevice(self._cuda.device))  # this thread's current device
            host = {}
            for name in self.input_names:
                if name not in feeds:
                    raise InputError(f"missing input '{name}' (this engine takes {', '.join(self.input_names)})")
                arr = np.ascontiguousarray(feeds[name], dtype=self._dtypes[name])
                check_feed_shape(name, arr.shape, self.settings["profiles"].get(name), self._fixed[name])
                if not self.context.set_input_shape(name, arr.shape):
                    raise InputError(f"TensorRT refused shape {arr.shape} for input '{name}'")
                host[name] = arr
            for name in self.output_names:
                host[name] = np.empty(tuple(self.context.get_tensor_shape(name)), dtype=self._dtypes[name])
            ptrs = {n: self._cuda.buffer(n, a.nbytes) for n, a in host.items()}
            for name, ptr in ptrs.items():
                self.context.set_tensor_address(name, ptr)
            for name in self.input_names:
                self._cuda.copy(ptrs[name], host[name].ctypes.data, host[name].nbytes, to_device=True)
            if not self.context.execute_async_v3(int(self._cuda.stream)):
                raise ArtifactError("TensorRT failed to run the engine (its log above says why)")
            for name in self.output_names:
                self._cuda.copy(host[name].ctypes.data, ptrs[name], host[name].nbytes, to_device=False)
            self._cuda.call(self._cuda.rt.cudaStreamSynchronize(self._cuda.stream))
        return {n: host[n] for n in self.output_names}

    def close(self) -> None:
        """Free the device buffers and the stream (also done when the backend is garbage-collected)."""
        self.context = self.engine = None
        self._cuda.close()

    def __del__(self):
        if getattr(self, "_cuda", None) is not None:
            try:
                self._cuda.close()
            except Exception:  # interpreter shutdown: cuda-python may already be gone
                pass


def build_engine(artifact_root, *, workspace_mb: int = DEFAULT_WORKSPACE_MB, rebuild: bool = False,
                 device: int = 0, log=None) -> list[Path]:
    """Build (or find cached) the engine of every graph of a tensorrt artifact on this device: what
    `edgeclip engine build ART` runs, so that the first `Pipeline.load` on a device does not wait.
    `log(str)` hears progress; returns the plan files (in the artifact's `engines/`, or the user cache)."""
    root = Path(artifact_root)
    manifest = read_manifest(root, verify=True)
    if backend_for_target(manifest["target"]) != "tensorrt":
        raise ArtifactError(f"{root} is a {manifest['target']} artifact; TensorRT engines are built from tensorrt "
                            "artifacts (edgeclip export --target tensorrt)")
    paths = []
    for info in manifest["graphs"].values():
        backend = Backend.open_verified(root, info, manifest, workspace_mb=workspace_mb, rebuild=rebuild,
                                        device=device, log=log)
        paths.append(backend.plan_file)
        backend.close()
    return paths
