"""The relation detectors on arrays (Hypothesis): each transform of a random tensor is
recognized from its values alone, with the transform's parameters; dtype rounding (even with
outliers) is never a defect; block-wise statistics equal whole-array ones."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apr import names
from apr.dtypes import dtype_by_name, encode
from apr.layout import adjacent_to_halves, halves_to_adjacent
from apr.model import TensorRef
from diff import report as R
from diff.detectors import Pair, classify
from diff.values import Moments, pair_stats, pair_tolerance

SETTINGS = settings(max_examples=100, deadline=None, derandomize=True, database=None)


def ref(arr: np.ndarray, dtype: str = "F32", rotary_heads: int | None = None) -> TensorRef:
    """A TensorRef over an in-memory array (encoded to `dtype`)."""
    dt = dtype_by_name(dtype)
    values = np.ascontiguousarray(arr, np.float32)
    raw = values if dtype == "F32" else encode(values, dt)
    return TensorRef(name="t", dtype=dt, shape=tuple(arr.shape), layout=names.LAYOUT_ROW_MAJOR,
                     source_name="t", nbytes=raw.nbytes, _raw=lambda: raw, rotary_heads=rotary_heads)


def relate(a: np.ndarray, b: np.ndarray, dtype_b: str = "F32", heads=(), b_rotary=None):
    ra, rb = ref(a), ref(b, dtype_b, b_rotary)
    stats = pair_stats(ra.numpy(order="hf"), rb.numpy(order="hf")) if a.shape == b.shape else None
    return classify(Pair("t", ra, rb, pair_tolerance("F32", dtype_b), stats, head_counts=tuple(heads)))


@st.composite
def matrices(draw, even_rows: bool = False, square: bool | None = None):
    rows = draw(st.integers(2, 48)) * (2 if even_rows else 1)
    cols = rows if square else draw(st.integers(2, 64).filter(lambda c: c != rows or square is None))
    seed = draw(st.integers(0, 2**32 - 1))
    return (np.random.default_rng(seed).standard_normal((rows, cols)) * 0.02).astype(np.float32)


@given(matrices())
@SETTINGS
def test_identical(a):
    assert relate(a, a.copy()).relation == R.IDENTICAL


@given(matrices(), st.sampled_from(["F16", "BF16", "APR_Q8", "APR_Q4"]), st.floats(1, 200))
@SETTINGS
def test_rounding_is_not_a_defect_even_with_an_outlier(a, dtype, outlier):
    """One value `outlier` times the typical size stretches a per-tensor scale; the error is
    still half a step at most, so it is rounding."""
    a = a.copy()
    a.flat[0] = 0.02 * outlier
    rel = relate(a, a, dtype_b=dtype)
    assert rel.relation in (R.ROUNDING, R.IDENTICAL) and rel.defect is None, rel.message


@given(matrices(square=None))
@SETTINGS
def test_transposed(a):
    rel = relate(a, a.T.copy())
    if a.shape[0] == a.shape[1] and np.allclose(a, a.T):
        return
    assert rel.defect == R.TRANSPOSED, rel.message
    if a.shape[0] != a.shape[1]:
        rel = relate(a, np.ascontiguousarray(a.T).reshape(a.shape))
        assert rel.defect == R.TRANSPOSED and rel.detail["shape_kept"], rel.message


@given(st.integers(1, 6), st.integers(2, 8), st.integers(1, 16), st.integers(0, 2**32 - 1),
       st.sampled_from(["once", "inverse", "twice"]))
@SETTINGS
def test_rotary_permuted(heads, half, cols, seed, how):
    rows = heads * 2 * half
    a = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    b = {"once": halves_to_adjacent(a, heads), "inverse": adjacent_to_halves(a, heads),
         "twice": halves_to_adjacent(halves_to_adjacent(a, heads), heads)}[how]
    if np.array_equal(a, b):
        return                                  # the permutation is the identity here
    rel = relate(a, b, heads=(heads,))
    assert rel.defect == R.ROTARY, rel.message
    # what the detector names reproduces b
    fn = halves_to_adjacent if rel.detail["transform"] == "halves_to_adjacent" else adjacent_to_halves
    c = a
    for _ in range(rel.detail["times"]):
        c = fn(c, rel.detail["heads"])
    assert np.array_equal(c, b)
    if how == "twice" and rel.detail["heads"] == heads and half > 2:
        assert rel.detail["times"] == 2


def test_rotary_wrong_head_count_in_stored_order():
    """A GGUF-style K (stored adjacent, undone with 2 KV heads) written with 4 heads."""
    a = np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32)
    stored = halves_to_adjacent(a, 4)
    rb = ref(stored, rotary_heads=2)
    ra = ref(a)
    stats = pair_stats(ra.numpy(order="hf"), rb.numpy(order="hf"))
    rel = classify(Pair("model.layers.0.self_attn.k_proj.weight", ra, rb, 2e-6, stats,
                        head_counts=(4, 2), expected_heads=2, head_field="num_kv_heads"))
    assert rel.defect == R.ROTARY
    assert rel.detail["view"] == "stored_b" and rel.detail["heads"] == 4
    assert "num_kv_heads is 2" in rel.message


@given(matrices(), st.sampled_from([0.5, 2.0, -1.0, 3.0, 0.1, -0.25]))
@SETTINGS
def test_scaled(a, s):
    rel = relate(a, a * np.float32(s))
    assert rel.defect == R.SCALED and rel.detail["scale"] == pytest.approx(s, rel=1e-5)


@given(matrices(), st.integers(0, 2**32 - 1))
@SETTINGS
def test_shuffled(a, seed):
    perm = np.random.default_rng(seed).permutation(a.shape[0])
    if np.array_equal(perm, np.arange(a.shape[0])):
        perm = np.roll(perm, 1)
    rel = relate(a, a[perm])
    assert rel.defect in (R.SHUFFLED, R.ROTARY), rel.message      # a few rotary perms are shuffles too
    if rel.defect == R.SHUFFLED:
        assert rel.detail["moved"] == int(np.sum(perm != np.arange(a.shape[0])))


@given(matrices(), st.integers(1, 40), st.booleans())
@SETTINGS
def test_padded_and_truncated(a, n, truncate):
    if truncate:
        n = min(n, a.shape[0] - 1)
        if n < 1:
            return
        rel = relate(a, a[:-n].copy())
        assert rel.defect == R.PADDING and rel.relation == "truncated", rel.message
    else:
        rel = relate(a, np.concatenate([a, np.zeros((n, a.shape[1]), np.float32)]))
        assert rel.defect == R.PADDING and rel.relation == "padded" and rel.detail["extra_rows_zero"]


@given(matrices(), st.integers(0, 2**32 - 1))
@SETTINGS
def test_unrelated(a, seed):
    b = np.random.default_rng([seed, 1]).standard_normal(a.shape).astype(np.float32) * 0.02
    assert relate(a, b).defect == R.UNRELATED


@given(matrices(), st.floats(0.01, 0.2))
@SETTINGS
def test_a_change_between_lossless_copies_is_never_noise(a, level):
    """Noise-sized differences between two F32 tensors are a change of values: noise can only
    be claimed where a side was stored lossy."""
    noise = np.random.default_rng([1, 7]).standard_normal(a.shape).astype(np.float32)
    b = a + noise * np.float32(level * np.linalg.norm(a) / np.linalg.norm(noise))
    rel = relate(a, b)
    assert rel.defect == R.VALUES_CHANGED and "both stored lossless" in rel.message, rel.message


@given(matrices(), st.floats(1.2, 1.8), st.floats(2.5, 6))
@SETTINGS
def test_noise_is_bounded_by_the_stored_dtype(a, inside, outside):
    """B stored F16: a difference of up to twice the F16 tolerance is noise, beyond is a change."""
    tol = pair_tolerance("F32", "F16")
    noise = np.random.default_rng([2, 9]).standard_normal(a.shape).astype(np.float32)
    for factor, want in ((inside, R.NOISE), (outside, R.VALUES_CHANGED)):
        b = a + noise * np.float32(factor * tol * np.linalg.norm(a) / np.linalg.norm(noise))
        rel = relate(a, b, dtype_b="F16")
        assert rel.defect == want, (factor, rel.message)


@pytest.mark.parametrize("make,pattern", [
    (lambda a: np.ones_like(a), "all ones"),
    (lambda a: np.zeros_like(a), "zeroed"),
    (lambda a: a + 1, "A + 1"),
    (lambda a: a - 1, "A - 1"),
    (lambda a: np.full_like(a, 0.5), "a constant 0.5"),
])
def test_vector_change_patterns(make, pattern):
    a = (1 + 0.1 * np.random.default_rng(3).standard_normal(64)).astype(np.float32)
    rel = relate(a, make(a).astype(np.float32))
    assert rel.defect == R.VALUES_CHANGED and rel.message.startswith(f"B is {pattern}"), rel.message


def test_shapes_no_layout_explains():
    a = np.ones((6, 4), np.float32)
    assert relate(a, np.ones((5, 3), np.float32)).defect == R.SHAPE


@given(st.lists(st.integers(1, 50), min_size=1, max_size=6), st.integers(0, 2**32 - 1))
@SETTINGS
def test_blockwise_moments_equal_whole(blocks, seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((sum(blocks), 7)).astype(np.float32)
    b = a + rng.standard_normal(a.shape).astype(np.float32) * 0.01
    m = Moments()
    start = 0
    for n in blocks:
        m.add(a[start:start + n], b[start:start + n])
        start += n
    whole, streamed = pair_stats(a, b), m.stats()
    for field in ("max_abs", "max_value"):
        assert getattr(streamed, field) == getattr(whole, field)
    for field in ("mean_abs", "rmse", "cosine", "rel_l2", "scale"):
        assert getattr(streamed, field) == pytest.approx(getattr(whole, field), rel=1e-5)
