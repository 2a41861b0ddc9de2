"""The tensorrt runtime backend: what runs without TensorRT is tested here (version parsing, builder
settings per TensorRT version, optimization profiles, the engine cache key, where plans go and which
cached plans are trusted, the registry row, the typed error when TensorRT is missing); building and
running an engine needs TensorRT and an NVIDIA GPU (`needs_tensorrt`: skipped where they are missing).

A "tensorrt artifact" here is the shared builtin:tiny ONNX export with its manifest turned into the
tensorrt target's (target, backend, a `tensorrt` section with profiles): the same standard-op ONNX graphs
the tensorrt target writes, and what the runtime reads of them."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgeclip.errors import ArtifactError, InputError, MissingExtraError, TensorRTCompatError
from edgeclip.runtime import Pipeline
from edgeclip.runtime.backends import get_backend
from edgeclip.runtime.backends import tensorrt as trtb
from edgeclip.runtime.registry import backend_for_target, graph_suffixes

ONNX_TINY = {"model": "builtin:tiny", "target": "onnx", "precision": "fp32"}
SHARED_EXPORTS = {"onnx_artifact": [ONNX_TINY]}



def _tensorrt_and_gpu() -> tuple[bool, bool]:
    """(TensorRT and cuda-python import, and a CUDA device is there)."""
    try:
        _, cudart = trtb._libraries()
    except MissingExtraError:
        return False, False
    err, count = cudart.cudaGetDeviceCount()
    return True, int(getattr(err, "value", err)) == 0 and count > 0


HAS_TENSORRT, HAS_GPU = _tensorrt_and_gpu()
needs_tensorrt = pytest.mark.skipif(not (HAS_TENSORRT and HAS_GPU),
                                    reason="needs TensorRT and cuda-python (NVIDIA's index) and an NVIDIA GPU")

PROFILE = {"pixel_values": {"min": [1, 3, 224, 224], "opt": [8, 3, 224, 224], "max": [32, 3, 224, 224]}}
DIGEST = "ab" * 32


@pytest.fixture(scope="module")
def onnx_artifact(shared_exports) -> Path:
    return shared_exports.path(ONNX_TINY)


def make_tensorrt_artifact(src: Path, dst: Path, precision: str = "fp16", section: dict | None = None) -> Path:
    """A copy of the ONNX artifact whose manifest is a tensorrt one (the graph files are unchanged)."""
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    ctx = m["text"]["context_length"]
    size = m["graphs"]["image"]["inputs"]["pixel_values"]["shape"][2]
    m.update(target="tensorrt", backend="tensorrt", precision=precision)
    # the section exporter/formats/tensorrt.py writes (its `check` reports are not read by the runtime)
    m["tensorrt"] = section if section is not None else {"version": "10.3", "precision": precision, "graphs": {
        "image": {"profiles": {"pixel_values": {"min": [1, 3, size, size], "opt": [4, 3, size, size],
                                                "max": [16, 3, size, size]}}},
        "text": {"profiles": {"input_ids": {"min": [1, 1], "opt": [4, ctx], "max": [16, ctx]}}}}}
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


# ------------------------------------------------------------------------------ versions and settings

@pytest.mark.parametrize("text,want", [("10.3.0.26", (10, 3)), ("10.14.1", (10, 14)), ("11", (11, 0)),
                                       ("11.0", (11, 0)), (" 10.3 ", (10, 3))])
def test_parse_trt_version(text, want):
    assert trtb.parse_trt_version(text) == want


@pytest.mark.parametrize("text", ["", "ten", "10.x", "10..3", "10.3.0.26.1", "-1.0", "1e3"])
def test_parse_trt_version_refuses_garbage(text):
    with pytest.raises(TensorRTCompatError) as e:
        trtb.parse_trt_version(text)
    assert e.value.rule == "version"


@pytest.mark.parametrize("version,precision,flags,network", [
    ("10.3.0.26", "fp32", [], []), ("10.3.0.26", "fp16", ["FP16"], []), ("10.3.0.26", "int8", ["INT8"], []),
    ("10.14", "fp16", ["FP16"], []),
    ("11.0.0", "fp32", [], ["STRONGLY_TYPED"]), ("11.0.0", "fp16", [], ["STRONGLY_TYPED"]),
    ("11.2", "int8", [], ["STRONGLY_TYPED"]), ("12.0", "fp16", [], ["STRONGLY_TYPED"])])
def test_build_settings_per_version(version, precision, flags, network):
    s = trtb.build_settings(version, precision, PROFILE)
    assert s["builder_flags"] == flags and s["network_flags"] == network
    assert s["strongly_typed"] is (network == ["STRONGLY_TYPED"])
    assert s["clear_flags"] == (["TF32"] if precision == "fp32" else [])
    assert s["profiles"] == PROFILE and s["precision"] == precision


@pytest.mark.parametrize("version,precision,rule", [("8.6.1", "fp16", "version"), ("9.3", "fp32", "version"),
                                                    ("10.3", "bf16", "precision"), ("10.3", "FP16", "precision")])
def test_build_settings_refuses(version, precision, rule):
    with pytest.raises(TensorRTCompatError) as e:
        trtb.build_settings(version, precision, PROFILE)
    assert e.value.rule == rule


# ------------------------------------------------------------------------------------------ profiles

def test_profiles_made_canonical():
    got = trtb.check_profiles({"b": {"max": (4, 7), "min": (1, 7), "opt": (2, 7)},
                               "a": {"min": [1], "opt": [1], "max": [1]}})
    assert list(got) == ["a", "b"] and got["b"] == {"min": [1, 7], "opt": [2, 7], "max": [4, 7]}


@pytest.mark.parametrize("profile,what", [
    ({"min": [2, 3], "opt": [1, 3], "max": [4, 3]}, "min <= opt <= max"),     # min > opt
    ({"min": [1, 3], "opt": [8, 3], "max": [4, 3]}, "min <= opt <= max"),     # opt > max
    ({"min": [4, 3], "opt": [2, 3], "max": [1, 3]}, "min <= opt <= max"),     # min > opt > max
    ({"min": [1, 3], "opt": [2, 3]}, "exactly min, opt and max"),             # no max
    ({"min": [1, 3], "opt": [2, 3], "max": [4, 3], "best": [2, 3]}, "exactly min, opt and max"),
    ({"min": [1, 3], "opt": [2, 3], "max": [4, 3, 1]}, "mixes ranks"),
    ({"min": [0, 3], "opt": [2, 3], "max": [4, 3]}, "whole numbers from 1"),
    ({"min": [True, 3], "opt": [2, 3], "max": [4, 3]}, "whole numbers from 1"),
    ({"min": [1.0, 3], "opt": [2, 3], "max": [4, 3]}, "whole numbers from 1"),
    ({"min": [1, 3], "opt": [2, 3], "max": [1 << 21, 3]}, "whole numbers from 1"),
    ({"min": [], "opt": [], "max": []}, "list of 1 to"),
    ({"min": "1,3", "opt": [2, 3], "max": [4, 3]}, "list of 1 to"),
    ([1, 2, 4], "exactly min, opt and max")])
def test_bad_profile_is_refused_naming_the_input(profile, what):
    with pytest.raises(TensorRTCompatError, match=what) as e:
        trtb.check_profiles({"input_ids": profile})
    assert e.value.node == "input_ids" and e.value.rule == "profile"


def test_dynamic_input_without_profile_is_refused():
    inputs = {"pixel_values": ["batch", 3, 224, 224], "mask": [1, 16]}  # mask is static: needs none
    with pytest.raises(TensorRTCompatError, match="no optimization profile") as e:
        trtb.build_settings("10.3", "fp16", {}, inputs)
    assert e.value.node == "pixel_values"
    assert trtb.build_settings("10.3", "fp16", PROFILE, inputs)["profiles"] == PROFILE


def test_profile_must_match_the_graph():
    with pytest.raises(TensorRTCompatError, match="not an input") as e:
        trtb.check_profiles({"pixels": PROFILE["pixel_values"]}, {"pixel_values": ["batch", 3, 224, 224]})
    assert e.value.node == "pixels"
    with pytest.raises(TensorRTCompatError, match="dimension 3 is fixed at 256"):
        trtb.check_profiles(PROFILE, {"pixel_values": ["batch", 3, 224, 256]})
    with pytest.raises(TensorRTCompatError, match="rank 3"):
        trtb.check_profiles(PROFILE, {"pixel_values": ["batch", 3, 224]})
    with pytest.raises(TensorRTCompatError):
        trtb.check_profiles("pixel_values:1x3x224x224")


def test_feed_shape_inside_the_profile():
    p = trtb.check_profiles(PROFILE)["pixel_values"]
    trtb.check_feed_shape("pixel_values", (1, 3, 224, 224), p, None)
    trtb.check_feed_shape("pixel_values", (32, 3, 224, 224), p, None)
    for shape in [(33, 3, 224, 224), (1, 3, 224, 225), (1, 3, 224)]:
        with pytest.raises(InputError, match="pixel_values"):
            trtb.check_feed_shape("pixel_values", shape, p, None)
    trtb.check_feed_shape("mask", (1, 16), None, (1, 16))
    with pytest.raises(InputError, match="takes"):
        trtb.check_feed_shape("mask", (2, 16), None, (1, 16))


# ----------------------------------------------------------------------------------------- cache key

BASE = dict(gpu_name="Orin", compute_capability=(8, 7), trt_version="10.3.0.30", artifact_digest=DIGEST,
            precision="fp16", profiles=PROFILE)


def test_cache_key_is_stable_hex():
    k = trtb.cache_key(**BASE)
    assert len(k) == 64 and int(k, 16) >= 0 and k == trtb.cache_key(**BASE)
    # the same values written differently are the same engine
    same = dict(BASE, compute_capability="8.7", artifact_digest="sha256:" + DIGEST.upper(),
                profiles={"pixel_values": {"max": (32, 3, 224, 224), "opt": (8, 3, 224, 224),
                                           "min": (1, 3, 224, 224)}})
    assert trtb.cache_key(**same) == k


@pytest.mark.parametrize("field,value", [
    ("gpu_name", "NVIDIA GeForce RTX 4090"), ("compute_capability", (8, 9)), ("compute_capability", "7.2"),
    ("trt_version", "10.3.0.26"), ("trt_version", "10.4.0.26"), ("artifact_digest", "ac" * 32),
    ("precision", "int8"), ("precision", "fp32"),
    ("profiles", {"pixel_values": {"min": [1, 3, 224, 224], "opt": [8, 3, 224, 224], "max": [64, 3, 224, 224]}}),
    ("profiles", {"pixel_values": {"min": [1, 3, 224, 224], "opt": [4, 3, 224, 224], "max": [32, 3, 224, 224]}}),
    ("profiles", {**PROFILE, "input_ids": {"min": [1, 1], "opt": [1, 77], "max": [1, 77]}})])
def test_any_field_change_changes_the_key(field, value):
    assert trtb.cache_key(**dict(BASE, **{field: value})) != trtb.cache_key(**BASE)


@pytest.mark.parametrize("field,value", [("artifact_digest", "abc"), ("artifact_digest", "../" + "a" * 61),
                                         ("compute_capability", "sm_87"), ("compute_capability", (8,))])
def test_cache_key_refuses_malformed_fields(field, value):
    with pytest.raises(ArtifactError):
        trtb.cache_key(**dict(BASE, **{field: value}))


# --------------------------------------------------------------------------------- where plans live

@pytest.fixture
def user_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("EDGECLIP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "engines"


def _read_only_dir(tmp_path: Path) -> Path:
    """A folder this process cannot write: a chmod 555 one, or (as root, who writes those anyway) a
    read-only mount."""
    d = tmp_path / "ro-artifact"
    d.mkdir()
    d.chmod(0o555)
    if not os.access(d, os.W_OK):
        return d
    if Path("/proc/sys").is_dir() and not os.access("/proc/sys", os.W_OK):
        return Path("/proc/sys")
    pytest.skip("no folder this process cannot write (root without a read-only mount)")


def test_plan_goes_into_a_writable_artifact(tmp_path, user_cache):
    key = trtb.cache_key(**BASE)
    assert trtb.plan_path(tmp_path, key) == tmp_path.resolve() / "engines" / f"{key}.plan"
    (tmp_path / "engines").mkdir()
    assert trtb.plan_path(tmp_path, key) == tmp_path.resolve() / "engines" / f"{key}.plan"


def test_plan_goes_to_the_user_cache_when_the_artifact_is_read_only(tmp_path, user_cache):
    key = trtb.cache_key(**BASE)
    assert trtb.plan_path(_read_only_dir(tmp_path), key) == user_cache.absolute() / f"{key}.plan"


def test_default_user_cache_is_under_home(tmp_path, monkeypatch):
    monkeypatch.delenv("EDGECLIP_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert trtb.user_cache_dir() == tmp_path / ".cache" / "edgeclip" / "engines"


@pytest.mark.parametrize("key", ["../../etc/passwd", "a" * 63, "A" * 64, "g" * 64, "a" * 64 + "/x", "", None])
def test_plan_path_refuses_keys_that_are_not_cache_keys(tmp_path, key):
    with pytest.raises(ArtifactError, match="64 hex"):
        trtb.plan_path(tmp_path, key)


def test_engines_link_in_an_artifact_is_refused(tmp_path, user_cache):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    art = tmp_path / "art"
    art.mkdir()
    (art / "engines").symlink_to(elsewhere)
    with pytest.raises(ArtifactError, match="plain folder"):
        trtb.plan_path(art, trtb.cache_key(**BASE))
    (art / "engines").unlink()
    (art / "engines").write_bytes(b"not a folder")
    with pytest.raises(ArtifactError, match="plain folder"):
        trtb.plan_path(art, trtb.cache_key(**BASE))


def test_plan_file_that_is_a_link_is_refused(tmp_path, user_cache):
    key = trtb.cache_key(**BASE)
    (tmp_path / "engines").mkdir()
    (tmp_path / "engines" / f"{key}.plan").symlink_to(tmp_path / "outside.plan")
    with pytest.raises(ArtifactError, match="symbolic link"):
        trtb.plan_path(tmp_path, key)


# ------------------------------------------------------------------------ which cached plans are run

def test_signed_plan_round_trip(tmp_path, user_cache):
    key = trtb.cache_key(**BASE)
    path = trtb.plan_path(tmp_path, key)
    plan = os.urandom(4096)
    assert trtb.load_plan(path, key) is None  # nothing cached yet
    assert trtb.save_plan(path, key, plan)
    assert path.read_bytes() == plan  # a raw plan: trtexec --loadEngine reads it
    assert trtb.load_plan(path, key) == plan
    secret = user_cache / "signing.key"
    assert secret.stat().st_mode & 0o777 == 0o600 and len(secret.read_bytes()) == 32


def test_plan_shipped_inside_an_artifact_is_not_trusted(tmp_path, user_cache):
    """Whoever made the artifact can compute the key and plant a plan (with a made-up signature)."""
    key = trtb.cache_key(**BASE)
    path = trtb.plan_path(tmp_path, key)
    path.parent.mkdir()
    path.write_bytes(b"planted engine")
    assert trtb.load_plan(path, key) is None
    path.with_name(path.name + ".sig").write_text("0" * 64)
    assert trtb.load_plan(path, key) is None


def test_plan_changed_after_signing_or_under_another_key_is_not_trusted(tmp_path, user_cache, monkeypatch):
    key = trtb.cache_key(**BASE)
    path = trtb.plan_path(tmp_path, key)
    assert trtb.save_plan(path, key, b"engine bytes")
    path.write_bytes(b"engine bytez")
    assert trtb.load_plan(path, key) is None
    assert trtb.save_plan(path, key, b"engine bytes")
    assert trtb.load_plan(path, trtb.cache_key(**dict(BASE, precision="int8"))) is None
    # signed by another user (another secret): rebuilt, not run
    monkeypatch.setenv("EDGECLIP_CACHE", str(tmp_path / "other-user"))
    assert trtb.load_plan(path, key) is None


def test_timing_cache_is_per_gpu_and_version_in_the_user_cache(user_cache):
    a = trtb.timing_cache_path("Orin", (8, 7), "10.3.0.30")
    assert a.parent == user_cache.absolute() and a == trtb.timing_cache_path("Orin", "8.7", "10.3.0.30")
    others = {trtb.timing_cache_path("Orin", (8, 7), "10.3.0.26"), trtb.timing_cache_path("Thor", (8, 7), "10.3.0.30"),
              trtb.timing_cache_path("Orin", (7, 2), "10.3.0.30")}
    assert len(others) == 3 and a not in others


# -------------------------------------------------------------------------------- manifest sections

def test_graph_profiles_and_aimed_version_from_the_manifest(onnx_artifact, tmp_path):
    art = make_tensorrt_artifact(onnx_artifact, tmp_path / "trt")
    m = json.loads((art / "manifest.json").read_text())
    image = trtb.graph_profiles(m, m["graphs"]["image"])
    assert list(image) == ["pixel_values"] and image["pixel_values"]["max"][0] == 16
    assert list(trtb.graph_profiles(m, m["graphs"]["text"])) == ["input_ids"]
    trtb.check_aimed_version(m, "10.3.0.26")
    trtb.check_aimed_version(m, "11.0")
    with pytest.raises(TensorRTCompatError, match="--trt-version 10.2"):
        trtb.check_aimed_version(m, "10.2.0.19")
    # the manifest's declared shapes and profiles agree
    inputs = {n: t["shape"] for n, t in m["graphs"]["text"]["inputs"].items()}
    trtb.build_settings("10.3", m["precision"], trtb.graph_profiles(m, m["graphs"]["text"]), inputs)
    with pytest.raises(TensorRTCompatError, match="input_ids"):
        trtb.build_settings("10.3", m["precision"], {}, inputs)


@pytest.mark.parametrize("section", [{}, {"graphs": {}}, {"graphs": {"image": {}}},
                                     {"graphs": {"text": {"profiles": {}}}}])
def test_missing_profiles_leave_dynamic_inputs_refused(section):
    m = {"graphs": {"image": {"file": "image.onnx"}}, "tensorrt": section}
    inputs = {"pixel_values": ["batch", 3, 32, 32]}
    with pytest.raises(TensorRTCompatError, match="no optimization profile"):
        trtb.build_settings("10.3", "fp16", trtb.graph_profiles(m, m["graphs"]["image"]), inputs)


@pytest.mark.parametrize("section", [{"graphs": {"image": "1x3x32x32"}},
                                     {"graphs": {"image": {"profiles": [1, 8, 64]}}},
                                     {"graphs": {"image": {"profiles": {"pixel_values": {"min": -1}}}}}])
def test_malformed_tensorrt_section_is_a_typed_error(section):
    m = {"graphs": {"image": {"file": "image.onnx"}}, "tensorrt": section}
    with pytest.raises(TensorRTCompatError):
        trtb.build_settings("10.3", "fp16", trtb.graph_profiles(m, m["graphs"]["image"]),
                            {"pixel_values": ["batch", 3, 32, 32]})


# --------------------------------------------------------------------------- registry and the extra

def test_registry_runs_tensorrt_artifacts_on_the_tensorrt_backend():
    assert backend_for_target("tensorrt") == "tensorrt" and graph_suffixes("tensorrt") == (".onnx",)
    assert get_backend("tensorrt") is trtb.Backend


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_missing_tensorrt_names_the_extra(onnx_artifact):
    with pytest.raises(MissingExtraError) as e:
        trtb.Backend(onnx_artifact / "image.onnx")
    assert e.value.extra == "tensorrt" and e.value.module == "tensorrt"
    assert "pip install 'edgeclip[tensorrt]'" in str(e.value) and "pypi.nvidia.com" in str(e.value)
    assert isinstance(e.value, ImportError)


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_tensorrt_artifact_loads_to_the_missing_extra(onnx_artifact, tmp_path):
    """The manifest passes the schema as a tensorrt artifact; the backend then names what to install."""
    art = make_tensorrt_artifact(onnx_artifact, tmp_path / "trt")
    with pytest.raises(MissingExtraError, match="edgeclip\\[tensorrt\\]"):
        Pipeline.load(art)
    with pytest.raises(MissingExtraError):
        trtb.build_engine(art)


def test_build_engine_refuses_other_targets(onnx_artifact):
    with pytest.raises(ArtifactError, match="onnx artifact"):
        trtb.build_engine(onnx_artifact)


# ------------------------------------------------------------------------ needs TensorRT and a GPU

@needs_tensorrt
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_matches_onnx_runtime_and_is_cached(onnx_artifact, tmp_path, user_cache, precision):
    art = make_tensorrt_artifact(onnx_artifact, tmp_path / "trt", precision=precision)
    ref = Pipeline.load(onnx_artifact)
    p = Pipeline.load(art)
    size = p.manifest["graphs"]["image"]["inputs"]["pixel_values"]["shape"][2]
    pixels = np.random.default_rng(0).standard_normal((3, 3, size, size)).astype(np.float32)
    cos = np.sum(p.encode_image(pixels) * ref.encode_image(pixels), axis=1)
    assert cos.min() >= (0.99999 if precision == "fp32" else 0.999)
    tcos = np.sum(p.encode_text(["a photo of a cat", "7"]) * ref.encode_text(["a photo of a cat", "7"]), axis=1)
    assert tcos.min() >= 0.999
    info = p.info()["image"]
    assert info["built"] and Path(info["plan"]).parent == art.resolve() / "engines"
    again = Pipeline.load(art).info()["image"]
    assert again["built"] is False and again["plan"] == info["plan"]
    assert trtb.build_engine(art) == [Path(info["plan"]), Path(p.info()["text"]["plan"])]


@needs_tensorrt
@pytest.mark.gpu
def test_engine_refuses_a_batch_outside_its_profile(onnx_artifact, tmp_path, user_cache):
    art = make_tensorrt_artifact(onnx_artifact, tmp_path / "trt")
    p = Pipeline.load(art)
    size = p.manifest["graphs"]["image"]["inputs"]["pixel_values"]["shape"][2]
    with pytest.raises(InputError, match="profile"):
        p.encode_image(np.zeros((17, 3, size, size), np.float32))
