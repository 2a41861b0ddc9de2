"""Exports stay numerically identical across refactors: today's builtin:tiny exports (ONNX and
OpenVINO FP32, digit head baked in) against the outputs saved in tests/data/golden_tiny.npz by
scripts/make_golden.py. A change meant to alter the numbers regenerates the file and says so."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from edgeclip.builtin import digit_labels  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
import make_golden  # noqa: E402

GOLDEN = Path(__file__).parent / "data" / "golden_tiny.npz"
SPECS = {name: {"model": "builtin:tiny", "labels": digit_labels(), **kw} for name, kw in make_golden.VARIANTS.items()}
SHARED_EXPORTS = {"exported": list(SPECS.values())}
# FP32 kernels of other CPUs may round differently in the last bits; a changed graph moves far more
ATOL = 2e-5


@pytest.fixture(scope="module")
def golden() -> dict:
    with np.load(GOLDEN, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def exported(shared_exports) -> dict:
    return {name: shared_exports.path(spec) for name, spec in SPECS.items()}


def test_golden_inputs_are_the_ones_the_script_makes(golden):
    x = make_golden.inputs()
    assert np.array_equal(golden["pixel_values"], x["pixel_values"]) and list(golden["texts"]) == list(x["texts"])


@pytest.mark.parametrize("variant", list(make_golden.VARIANTS))
def test_export_outputs_match_the_saved_ones(golden, exported, variant):
    if variant.startswith("openvino"):
        pytest.importorskip("openvino")
    got = make_golden.outputs(exported[variant], {"pixel_values": golden["pixel_values"], "texts": golden["texts"]})
    for name, value in got.items():
        ref = golden[f"{variant}/{name}"]
        assert value.shape == ref.shape, name
        np.testing.assert_allclose(value, ref, rtol=0, atol=ATOL * max(1.0, float(np.abs(ref).max())), err_msg=name)
