"""runtime.vectors: the one L2-normalize and row-wise cosine every layer uses, and the token trim
that now lives in the tokenizer module. numpy only, no artifact."""
from __future__ import annotations

import numpy as np
import pytest

from edgeclip.errors import HeadError, InputError
from edgeclip.runtime.labels import class_embeddings
from edgeclip.runtime.vectors import cosine, l2_normalize

RNG = np.random.default_rng(0)


def test_rows_become_unit_vectors_in_their_own_dtype():
    for dtype in (np.float32, np.float64):
        x = RNG.normal(size=(5, 7)).astype(dtype)
        y = l2_normalize(x)
        assert y.dtype == dtype
        np.testing.assert_allclose(np.linalg.norm(y, axis=-1), 1.0, rtol=1e-6)
        np.testing.assert_allclose(y * np.linalg.norm(x, axis=-1, keepdims=True), x, rtol=1e-5)


def test_dtype_casts_first_as_the_runtime_does_for_fp16_graphs():
    x = RNG.normal(size=(3, 8)).astype(np.float16)
    y = l2_normalize(x, dtype=np.float32)
    assert y.dtype == np.float32
    x32 = x.astype(np.float32)  # the pipeline's former private copy, bit for bit
    assert np.array_equal(y, x32 / np.maximum(np.linalg.norm(x32, axis=-1, keepdims=True), 1e-12))


def test_zero_rows_stay_zero_not_nan():
    x = np.zeros((2, 4), np.float32)
    x[1] = [3, 0, 4, 0]
    y = l2_normalize(x)
    assert np.array_equal(y[0], np.zeros(4)) and np.allclose(y[1], [0.6, 0, 0.8, 0])


def test_eps_zero_divides_by_the_norm_itself():
    """Callers that check norms are positive (class_embeddings) keep their exact old arithmetic."""
    tiny = np.full((1, 4), 1e-14)
    assert np.allclose(l2_normalize(tiny, eps=0.0), 0.5)        # a unit vector, however small the input
    assert np.allclose(l2_normalize(tiny), 1e-2)  # the default floor: divided by 1e-12, not by its norm 2e-14
    with np.errstate(invalid="ignore"):
        assert np.isnan(l2_normalize(np.zeros((1, 3)), eps=0.0)).all()


def test_other_axes():
    x = RNG.normal(size=(4, 3, 6))
    np.testing.assert_allclose(np.linalg.norm(l2_normalize(x, axis=1), axis=1), 1.0)
    np.testing.assert_allclose(np.linalg.norm(l2_normalize(x, axis=0), axis=0), 1.0)


def test_heads_normalize_is_the_same_function():
    from edgeclip.heads.base import normalize

    assert normalize is l2_normalize


def test_cosine_edge_cases():
    a = RNG.normal(size=(6, 5))
    np.testing.assert_allclose(cosine(a, a), 1.0)
    np.testing.assert_allclose(cosine(a, -3 * a), -1.0)
    b = a.copy()
    b[2] = 0.0
    c = cosine(a, b)
    assert c[2] == 0.0 and np.isfinite(c).all()  # a zero row scores 0, never NaN
    want = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)
    assert np.array_equal(c, want)  # the formula bench and the INT8 guard used, bit for bit
    with pytest.raises(InputError, match="one shape"):
        cosine(a, a[:, :4])
    with pytest.raises(InputError, match="one shape"):
        cosine(a, a[:1])  # would broadcast silently


def test_class_embeddings_still_refuse_zero_features():
    def zeros(prompts):
        return np.zeros((len(prompts), 4), np.float32)

    with pytest.raises(HeadError, match="zero, NaN or infinite"):
        class_embeddings(zeros, ["a", "b"], ["x {}"])


def test_class_embeddings_are_the_mean_of_unit_prompts_renormalized():
    feats = RNG.normal(size=(6, 8)).astype(np.float32)
    got = class_embeddings(lambda prompts: feats[: len(prompts)], ["a", "b"], ["x {}", "y {}", "z {}"])
    unit = feats / np.linalg.norm(feats, axis=-1, keepdims=True)
    mean = unit.reshape(2, 3, 8).mean(axis=1)
    assert got.dtype == np.float32 and np.array_equal(got, mean / np.linalg.norm(mean, axis=-1, keepdims=True))


def test_trim_lives_in_the_tokenizer_and_stays_importable_from_the_pipeline():
    from edgeclip.runtime import pipeline, tokenizer

    assert pipeline.trim is tokenizer.trim
    ids = np.array([[49406, 5, 49407, 0, 0, 0], [49406, 5, 6, 7, 49407, 0]])
    assert tokenizer.trim(ids, 49407).shape == (2, 5)
    assert tokenizer.trim(ids, None).shape == (2, 5)      # argmax: OpenAI's rule (the end id is the largest)
    no_end = np.array([[1, 2, 3, 4]])
    assert tokenizer.trim(no_end, 49407).shape == (1, 4)  # no end token: the whole row is kept
