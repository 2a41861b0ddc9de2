"""ONNX Runtime execution providers: `Pipeline.load(art, backend="ort", providers=[...])`.

Provider names and options are the caller's, checked before onnxruntime sees them (UsageError); a
known provider this onnxruntime build lacks falls back to CPU, and `info()` says so. Real sessions on
the shared builtin:tiny ONNX export (this machine's onnxruntime has the CPU provider only)."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edgeclip.errors import InputError, UsageError
from edgeclip.runtime import Pipeline
from edgeclip.runtime.backends import ort as ortb

ONNX_TINY = {"model": "builtin:tiny", "target": "onnx", "precision": "fp32"}
SHARED_EXPORTS = {"artifact": [ONNX_TINY]}
CPU = "CPUExecutionProvider"
KNOWN = ortb.KNOWN_PROVIDERS + tuple(ort.get_all_providers())
# a known provider this onnxruntime lacks (the CPU wheel has none of them; a GPU wheel lacks some)
ABSENT = next(p for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider", "CoreMLExecutionProvider",
                          "DmlExecutionProvider") if p not in ort.get_available_providers())


@pytest.fixture(scope="module")
def artifact(shared_exports) -> Path:
    return shared_exports.path(ONNX_TINY)


@pytest.fixture(scope="module")
def reference(artifact):
    p = Pipeline.load(artifact)
    return p.encode_image(_pixels(p)), p.encode_text(["a photo of a cat", "7"])


def _pixels(p) -> np.ndarray:
    size = p.manifest["graphs"]["image"]["inputs"]["pixel_values"]["shape"][2]
    return np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)


# ------------------------------------------------------------------------------------ the checks

def test_no_providers_is_cpu():
    assert ortb.check_providers(None, KNOWN) == [CPU]


def test_names_and_pairs_pass_through():
    opts = {"device_id": 0, "trt_fp16_enable": True, "gpu_mem_limit": 2.5, "arena_extend_strategy": "kSameAsRequested"}
    got = ortb.check_providers([("CUDAExecutionProvider", opts), CPU], KNOWN)
    assert got == [("CUDAExecutionProvider", opts), CPU]
    assert ortb.check_providers(("XnnpackExecutionProvider", ["NnapiExecutionProvider", {}]), KNOWN) == \
        ["XnnpackExecutionProvider", ("NnapiExecutionProvider", {})]


@pytest.mark.parametrize("bad", ["CudaExecutionProvider", "CUDA", "cuda", "", "TensorRT"])
def test_unknown_provider_lists_the_known_ones(bad):
    with pytest.raises(UsageError, match="unknown execution provider") as e:
        ortb.check_providers([bad, CPU], KNOWN)
    for name in ("CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider",
                 "OpenVINOExecutionProvider", "CoreMLExecutionProvider", "NnapiExecutionProvider",
                 "XnnpackExecutionProvider", "DmlExecutionProvider"):
        assert name in str(e.value)
    assert isinstance(e.value, InputError)


@pytest.mark.parametrize("providers,what", [
    ("CPUExecutionProvider", "must be a list"), ([], "must be a list"), ({CPU: {}}, "must be a list"),
    ([CPU] * 17, "must be a list"), ([CPU, CPU], "listed twice"), ([(CPU, {}), CPU], "listed twice"),
    ([(CPU,)], "neither a name"), ([(CPU, {}, {})], "neither a name"), ([3], "neither a name"),
    ([("CUDAExecutionProvider", [("device_id", 0)])], "neither a name")])
def test_malformed_provider_lists_are_refused(providers, what):
    with pytest.raises(UsageError, match=what):
        ortb.check_providers(providers, KNOWN)


@pytest.mark.parametrize("key,value", [("device_id", None), ("device_id", [0]), ("device_id", {"a": 1}),
                                       ("gpu_mem_limit", float("nan")), ("gpu_mem_limit", float("inf")),
                                       ("user_compute_stream", object()), ("x", b"bytes"), ("x", "a\0b"),
                                       ("x", "a" * 5000), (1, "1"), ("", "1")])
def test_option_values_must_be_plain(key, value):
    with pytest.raises(UsageError):
        ortb.check_providers([("CUDAExecutionProvider", {key: value}), CPU], KNOWN)


def test_engine_cache_path_must_be_an_existing_folder(tmp_path):
    trt = "TensorrtExecutionProvider"
    ok = ortb.check_providers([(trt, {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(tmp_path)})],
                              KNOWN)
    assert ok[0][1]["trt_engine_cache_path"] == str(tmp_path)
    (tmp_path / "file").write_text("x")
    for value in (str(tmp_path / "file"), str(tmp_path / "missing"), tmp_path, 1):
        with pytest.raises(UsageError, match="existing directory|must be a string"):
            ortb.check_providers([(trt, {"trt_engine_cache_path": value})], KNOWN)
    with pytest.raises(UsageError, match="existing directory"):
        ortb.check_providers([(trt, {"trt_timing_cache_path": str(tmp_path / "missing")})], KNOWN)


def test_unavailable_providers_fall_back_to_cpu():
    with pytest.warns(RuntimeWarning, match="no CUDAExecutionProvider"):
        assert ortb.available_providers(["CUDAExecutionProvider", CPU], [CPU]) == [CPU]
    with pytest.warns(RuntimeWarning):
        assert ortb.available_providers([("TensorrtExecutionProvider", {"trt_fp16_enable": 1})], [CPU]) == [CPU]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        both = ["CUDAExecutionProvider", (CPU, {})]
        assert ortb.available_providers(both, ["CUDAExecutionProvider", CPU]) == both
        assert ortb.available_providers(["CUDAExecutionProvider"], ["CUDAExecutionProvider", CPU]) == \
            ["CUDAExecutionProvider", CPU]  # CPU runs whatever the EP does not take


# --------------------------------------------------------------------------- real sessions

def test_gpu_providers_on_a_cpu_build_run_on_cpu_and_say_so(artifact, reference):
    with pytest.warns(RuntimeWarning, match=f"no {ABSENT}"):
        p = Pipeline.load(artifact, backend="ort", providers=[ABSENT, CPU])
        text = p.encode_text(["a photo of a cat", "7"])
    image = p.encode_image(_pixels(p))
    for graph in ("image", "text"):
        info = p.info()[graph]
        assert info["providers"] == [CPU]
        assert info["providers_requested"] == [ABSENT, CPU] and info["providers_unavailable"] == [ABSENT]
    np.testing.assert_array_equal(image, reference[0])
    np.testing.assert_array_equal(text, reference[1])


def test_cpu_with_options_runs_and_reports_nothing_missing(artifact, reference):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = Pipeline.load(artifact, providers=[(CPU, {"arena_extend_strategy": "kSameAsRequested"})], threads=1)
    info = p.info()["image"]
    assert info["providers"] == [CPU] and "providers_unavailable" not in info and info["threads"] == 1
    np.testing.assert_array_equal(p.encode_image(_pixels(p)), reference[0])


def test_tensorrt_ep_with_engine_cache_falls_back_here(artifact, tmp_path):
    providers = [("TensorrtExecutionProvider", {"trt_engine_cache_enable": True,
                                                "trt_engine_cache_path": str(tmp_path)}), CPU]
    if "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the TensorRT EP: it would build an engine")
    with pytest.warns(RuntimeWarning):
        p = Pipeline.load(artifact, providers=providers)
    assert p.info()["image"]["providers_unavailable"] == ["TensorrtExecutionProvider"]
    with pytest.raises(UsageError, match="existing directory"):
        Pipeline.load(artifact, providers=[("TensorrtExecutionProvider",
                                            {"trt_engine_cache_path": str(tmp_path / "nope")})])


def test_unknown_provider_is_refused_at_load(artifact):
    with pytest.raises(UsageError, match="unknown execution provider 'GpuExecutionProvider'.*CUDAExecutionProvider"):
        Pipeline.load(artifact, providers=["GpuExecutionProvider"])


def test_ort_backend_takes_providers_directly(artifact):
    with pytest.warns(RuntimeWarning):
        b = ortb.Backend(artifact / "image.onnx", providers=[ABSENT])
    assert b.info["providers"] == [CPU] and b.info["providers_unavailable"] == [ABSENT]
    with pytest.raises(UsageError):
        ortb.Backend(artifact / "image.onnx", providers=["NoSuchExecutionProvider"])


def test_providers_on_another_backend_are_refused(artifact, tmp_path):
    """providers= are onnxruntime's: an artifact for another backend (here a tensorrt one) refuses them."""
    art = tmp_path / "trt"
    shutil.copytree(artifact, art)
    m = json.loads((art / "manifest.json").read_text())
    m.update(target="tensorrt", backend="tensorrt")
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UsageError, match="'tensorrt' backend"):
        Pipeline.load(art, providers=[CPU])
